"""A malformed config fails before any job runs, with a message naming the key."""

import pytest
import yaml

from fairlm.config import ConfigError, load_schema, resolve, run_config, shared_settings


def test_defaults_fill_every_key_of_the_schema():
    config = resolve({})
    schema = load_schema()
    for section, sub in schema["properties"].items():
        assert section in config
        for key in sub.get("properties", {}):
            assert key in config[section], f"{section}.{key} has no default"


def test_paper_config_is_the_protocol(repo):
    config = resolve(yaml.safe_load((repo / "config" / "config.yaml").read_text()))
    assert config["grid"]["seq_lens"] == [8192, 32768, 131072]
    assert config["grid"]["seeds"] == [42, 43, 44, 45, 46]
    assert config["grid"]["steps"] == {"8192": 5000, "32768": 10000, "131072": 10000}
    train = config["train"]
    assert (train["lr"], train["min_lr"], train["warmup_steps"]) == (1e-3, 1e-5, 2000)
    assert train["betas"] == [0.9, 0.999] and train["weight_decay"] == 0.01
    assert train["batch_size"] == 8 and train["grad_clip"] == 1.0
    assert config["model"] == {"d_model": 512, "n_layers": 6}


def test_quick_config_spans_16x_with_three_seeds(repo):
    config = resolve(yaml.safe_load((repo / "config" / "quick.yaml").read_text()))
    lens = config["grid"]["seq_lens"]
    assert len(lens) >= 3 and max(lens) / min(lens) >= 16
    assert len(config["grid"]["seeds"]) >= 3
    assert set(config["grid"]["models"]) == {"resnet_bk", "mamba"}


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"grid": {"models": ["transformer"]}}, "transformer"),
        ({"train": {"lr": -1.0}}, "train.lr"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"grid": {"seq_lens": [128, 0]}}, "grid.seq_lens[1]"),
        ({"grid": {"seq_lens": [12.5]}}, "grid.seq_lens[0]"),
        ({"grid": {"seq_lens": ["long"]}}, "grid.seq_lens[0]"),
        ({"grid": {"seeds": []}}, "grid.seeds"),
        ({"trian": {"lr": 1e-3}}, "trian"),
        ({"train": {"learning_rate": 1e-3}}, "learning_rate"),
        ({"train": {"betas": [0.9]}}, "train.betas"),
        ({"train": {"batch_size": 8, "micro_batch_size": 3}}, "train.micro_batch_size"),
        ({"train": {"lr": 1e-4, "min_lr": 1e-3}}, "train.min_lr"),
        ({"grid": {"seq_lens": [100], "steps": {"200": 5}}}, "grid.steps"),
        ({"data": {"tokenizer": "sentencepiece"}}, "data.tokenizer"),
        ({"model": {"d_model": 0}}, "model.d_model"),
        ({"mamba": {"dt_min": 0.5, "dt_max": 0.1}}, "mamba.dt_min"),
        ({"analysis": {"allow_failed_checks": ["everything"]}}, "analysis.allow_failed_checks"),
    ],
)
def test_malformed_config_names_the_key(patch, key):
    with pytest.raises(ConfigError) as caught:
        resolve(patch)
    assert key in str(caught.value)


def test_yaml_integer_keys_of_steps_are_accepted():
    config = resolve({"grid": {"seq_lens": [64], "steps": {64: 3}}})
    assert config["grid"]["steps"] == {"64": 3}


def test_run_configs_differ_only_in_the_model_section(tiny_config):
    a = run_config(tiny_config, "resnet_bk", 16, 1)
    b = run_config(tiny_config, "mamba", 16, 1)
    assert "mamba" not in a and "resnet_bk" not in b
    assert shared_settings(a) == shared_settings(b)
    assert a["run"] == {"model": "resnet_bk", "seq_len": 16, "seed": 1, "steps": 8}
