"""WikiText-2 → one tokenizer for every model → token arrays that training memory-maps.

The corpus comes from a local folder (train.txt, valid.txt, test.txt) when `data_dir` is set,
else from the dataset hub. Everything a later stage must trust is hashed in meta.json: the text
of each split, the tokenizer and the token arrays.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fairlm.io import atomic_path, read_json, sha256_bytes, sha256_file, write_json

SPLITS = ("train", "valid", "test")
UNK = "<unk>"
EOS = "<eos>"


class DataError(RuntimeError):
    """Missing, empty or inconsistent data; the message names the file."""


# -- corpus -------------------------------------------------------------------------------------

def load_local_corpus(data_dir: str | os.PathLike) -> dict[str, str]:
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"data_dir {str(folder)!r} is not a folder")
    corpus = {}
    for split in SPLITS:
        path = folder / f"{split}.txt"
        if not path.is_file():
            raise DataError(f"data_dir {str(folder)!r} has no {split}.txt")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"{path} is empty")
        corpus[split] = text
    return corpus


def load_hub_corpus(name: str, variant: str) -> dict[str, str]:
    import datasets  # heavy; only the hub path needs it

    try:
        loaded = datasets.load_dataset(name, variant)
    except Exception as error:  # the hub raises many types; all mean "no corpus"
        raise DataError(
            f"could not load {name}/{variant} from the dataset hub ({error}); "
            "set data_dir to a local folder with train.txt, valid.txt, test.txt"
        ) from error
    hub_split = {"train": "train", "valid": "validation", "test": "test"}
    return {split: "".join(loaded[hub_split[split]]["text"]) for split in SPLITS}


def count_words(text: str) -> int:
    """Whitespace-separated words plus one end-of-line per line (the WikiText convention)."""
    return len(text.split()) + text.count("\n")


# -- tokenizers ---------------------------------------------------------------------------------

def train_tokenizer(kind: str, train_text: str, vocab_size: int, min_frequency: int):
    """A `tokenizers.Tokenizer` trained on the train split only (or GPT-2's from the hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = train_text.splitlines(keepends=True)
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(lines, trainer=trainer)
    elif kind == "word":
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=1, special_tokens=[UNK, EOS], show_progress=False
        )
        tokenizer.train_from_iterator(lines, trainer=trainer)
    elif kind == "gpt2":
        try:
            tokenizer = Tokenizer.from_pretrained("gpt2")
        except Exception as error:
            raise DataError(f"could not load the gpt2 tokenizer from the hub ({error})") from error
    else:
        raise DataError(f"unknown tokenizer {kind!r}; choose bpe, word or gpt2")
    return tokenizer


def encode(tokenizer, text: str, kind: str) -> np.ndarray:
    """Encode a split line by line; the word tokenizer gets an explicit end-of-line token."""
    lines = text.splitlines(keepends=True)
    if kind == "word":
        # whitespace splitting would drop line ends; WikiText counts one <eos> per line
        lines = [line.rstrip("\n") + (f" {EOS}" if line.endswith("\n") else "") for line in lines]
    ids = [token for encoding in tokenizer.encode_batch(lines) for token in encoding.ids]
    dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max else np.uint32
    return np.asarray(ids, dtype=dtype)


# -- the prepare_data stage --------------------------------------------------------------------

def prepare(data_cfg: dict, data_dir: str | None, out_dir: str | os.PathLike, log=print) -> dict:
    """Load the corpus, train the tokenizer, write token arrays and meta.json into `out_dir`."""
    out = Path(out_dir)
    if data_dir:
        corpus, source = load_local_corpus(data_dir), {"kind": "local", "path": str(data_dir)}
    else:
        corpus = load_hub_corpus(data_cfg["hub_name"], data_cfg["hub_config"])
        source = {"kind": "hub", "name": data_cfg["hub_name"], "variant": data_cfg["hub_config"]}
    log(f"corpus from {source}: " + ", ".join(f"{s} {len(t):,} chars" for s, t in corpus.items()))

    kind = data_cfg["tokenizer"]
    tokenizer = train_tokenizer(
        kind, corpus["train"], data_cfg["vocab_size"], data_cfg["min_frequency"]
    )
    tokenizer_json = tokenizer.to_str()
    with atomic_path(out / "tokenizer.json") as tmp:
        tmp.write_text(tokenizer_json)

    splits = {}
    for split, text in corpus.items():
        ids = encode(tokenizer, text, kind)
        if len(ids) < 2:
            raise DataError(f"split {split} has {len(ids)} tokens; at least 2 are needed")
        with atomic_path(out / f"{split}.npy") as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, ids)
        splits[split] = {
            "sha256": sha256_bytes(text.encode("utf-8")),
            "chars": len(text),
            "words": count_words(text),
            "tokens": int(len(ids)),
            "array": f"{split}.npy",
            "array_sha256": sha256_file(out / f"{split}.npy"),
        }
        log(f"{split}: {len(ids):,} tokens, {splits[split]['words']:,} words")
    meta = {
        "source": source,
        "splits": splits,
        "tokenizer": {
            "kind": kind,
            "vocab_size": tokenizer.get_vocab_size(),
            "requested_vocab_size": data_cfg["vocab_size"],
            "file": "tokenizer.json",
            "sha256": sha256_bytes(tokenizer_json.encode("utf-8")),
        },
        "word_count_rule": "whitespace-separated words plus one end-of-line per line",
    }
    write_json(out / "meta.json", meta)
    return meta


# -- what training reads -----------------------------------------------------------------------

def load_verified(data_dir: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """meta.json and memory-mapped token arrays, each checked against its recorded hash."""
    folder = Path(data_dir)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing; run the prepare_data rule first")
    meta = read_json(meta_path)
    tokenizer_path = folder / meta["tokenizer"]["file"]
    if not tokenizer_path.is_file():
        raise DataError(f"{tokenizer_path} is missing")
    tokenizer_sha = sha256_bytes(tokenizer_path.read_bytes())
    if tokenizer_sha != meta["tokenizer"]["sha256"]:
        raise DataError(
            f"{tokenizer_path} does not match meta.json (sha256 {tokenizer_sha[:12]}… recorded "
            f"{meta['tokenizer']['sha256'][:12]}…): the tokenizer is not the one that made the "
            "token arrays; rerun prepare_data"
        )
    arrays = {}
    for split, info in meta["splits"].items():
        path = folder / info["array"]
        if not path.is_file():
            raise DataError(f"token array {path} is missing")
        actual = sha256_file(path)
        if actual != info["array_sha256"]:
            raise DataError(
                f"token array {path} does not match meta.json (sha256 {actual[:12]}… recorded "
                f"{info['array_sha256'][:12]}…); rerun prepare_data"
            )
        ids = np.load(path, mmap_mode="r")
        if len(ids) and int(ids.max()) >= meta["tokenizer"]["vocab_size"]:
            raise DataError(f"token array {path} holds ids beyond the tokenizer's vocabulary")
        arrays[split] = ids
    return meta, arrays


def batch_starts(seed: int, step: int, n_tokens: int, seq_len: int, batch_size: int) -> np.ndarray:
    """Window starts of one optimiser step: a function of (seed, step) alone.

    Every model trained with the same seed sees the same windows in the same order, and a
    resumed run needs no sampler state to continue exactly.
    """
    high = n_tokens - seq_len - 1
    if high < 0:
        raise DataError(
            f"the train split has {n_tokens:,} tokens, fewer than seq_len + 1 = {seq_len + 1:,}"
        )
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, high + 1, size=batch_size)


def windows(ids: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """[len(starts), seq_len + 1] int64 windows (inputs are [:, :-1], targets [:, 1:])."""
    return np.stack([np.asarray(ids[s : s + seq_len + 1], dtype=np.int64) for s in starts])
