"""Corpus → tokenizer → token arrays, and the checks that protect them."""

import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

from fairlm.data import (
    DataError,
    batch_starts,
    count_words,
    load_hub_corpus,
    load_local_corpus,
    load_verified,
    prepare,
    windows,
)
from fairlm.io import read_json

DATA_CFG = {"hub_name": "Salesforce/wikitext", "hub_config": "wikitext-2-v1",
            "vocab_size": 300, "min_frequency": 2}


def test_meta_records_hashes_and_counts(tiny_data, fixture_corpus):
    meta = read_json(tiny_data / "meta.json")
    assert meta["source"]["kind"] == "local"
    assert meta["tokenizer"]["kind"] == "bpe" and meta["tokenizer"]["vocab_size"] <= 300
    for split in ("train", "valid", "test"):
        info = meta["splits"][split]
        text = (fixture_corpus / f"{split}.txt").read_text()
        assert info["words"] == count_words(text)
        ids = np.load(tiny_data / info["array"], mmap_mode="r")
        assert isinstance(ids, np.memmap) and len(ids) == info["tokens"] > 0
    loaded_meta, arrays = load_verified(tiny_data)
    assert loaded_meta == meta and set(arrays) == {"train", "valid", "test"}


def test_bpe_round_trips_the_text(tiny_data, fixture_corpus):
    tokenizer = Tokenizer.from_file(str(tiny_data / "tokenizer.json"))
    ids = np.load(tiny_data / "valid.npy")
    assert tokenizer.decode(ids.tolist()) == (fixture_corpus / "valid.txt").read_text()


def test_word_tokenizer_counts_one_token_per_word_and_line(tmp_path, fixture_corpus):
    meta = prepare(dict(DATA_CFG, tokenizer="word", vocab_size=100_000), str(fixture_corpus),
                   tmp_path, log=lambda _m: None)
    for split in ("train", "valid", "test"):
        assert meta["splits"][split]["tokens"] == meta["splits"][split]["words"]


def test_full_wikitext2_word_count(full_corpus):
    corpus = load_local_corpus(full_corpus)
    assert count_words(corpus["train"]) == 2_088_628  # the corpus README's count


def test_data_order_depends_on_seed_and_step_alone():
    a = batch_starts(42, 7, 10_000, 128, 8)
    assert np.array_equal(a, batch_starts(42, 7, 10_000, 128, 8))
    assert not np.array_equal(a, batch_starts(43, 7, 10_000, 128, 8))
    assert not np.array_equal(a, batch_starts(42, 8, 10_000, 128, 8))
    assert a.min() >= 0 and a.max() <= 10_000 - 129


def test_windows_are_seq_len_plus_one_tokens():
    ids = np.arange(100, dtype=np.uint16)
    batch = windows(ids, np.array([0, 10]), 5)
    assert batch.dtype == np.int64 and batch.shape == (2, 6)
    assert batch[1].tolist() == [10, 11, 12, 13, 14, 15]


def test_train_split_shorter_than_a_window_is_an_error():
    with pytest.raises(DataError, match="fewer than seq_len"):
        batch_starts(1, 1, 100, 128, 2)


def test_missing_and_empty_split_files_are_named(tmp_path, fixture_corpus):
    folder = tmp_path / "corpus"
    shutil.copytree(fixture_corpus, folder)
    (folder / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt"):
        load_local_corpus(folder)
    (folder / "test.txt").write_text("  \n")
    with pytest.raises(DataError, match="test.txt is empty"):
        load_local_corpus(folder)
    with pytest.raises(DataError, match="not a folder"):
        load_local_corpus(tmp_path / "nowhere")


def test_tampered_token_array_is_refused(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    ids = np.load(data / "train.npy")
    ids[0] = (ids[0] + 1) % 256
    np.save(data / "train.npy", ids)
    with pytest.raises(DataError, match="train.npy does not match meta.json"):
        load_verified(data)


def test_tokenizer_that_does_not_match_the_arrays_is_refused(tmp_path, tiny_data, fixture_corpus):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    other = tmp_path / "other"
    prepare(dict(DATA_CFG, tokenizer="word", vocab_size=500), str(fixture_corpus), other,
            log=lambda _m: None)
    shutil.copy(other / "tokenizer.json", data / "tokenizer.json")
    with pytest.raises(DataError, match="tokenizer"):
        load_verified(data)


def test_missing_meta_names_the_rule(tmp_path):
    with pytest.raises(DataError, match="prepare_data"):
        load_verified(tmp_path)


def test_hub_unreachable_fails_fast_with_advice():
    with pytest.raises(DataError, match="data_dir"):
        load_hub_corpus("Salesforce/wikitext", "wikitext-2-v1")
