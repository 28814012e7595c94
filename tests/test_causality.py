"""Changing token t changes no logit before t, for both models as configured in
config/quick.yaml; the published two-sided BK core is caught."""

import pytest
import yaml
from conftest import REPO

from fairlm.audit import causality_probe
from fairlm.config import resolve, run_config
from fairlm.models import build_model


def quick_config(**section_overrides):
    config = yaml.safe_load((REPO / "config" / "quick.yaml").read_text())
    for section, values in section_overrides.items():
        config.setdefault(section, {}).update(values)
    return resolve(config)


@pytest.mark.parametrize("model", ["resnet_bk", "mamba"])
def test_models_of_the_quick_config_are_causal(model):
    config = quick_config()
    run = run_config(config, model, config["grid"]["seq_lens"][0], config["grid"]["seeds"][0])
    vocab = config["data"]["vocab_size"]
    probe = causality_probe(lambda: build_model(model, run, vocab), vocab, seq_len=64,
                            tolerance=1e-9, positions=[1, 17, 40, 63])
    assert probe["passed"], probe
    assert probe["max_abs_diff_before_t"] <= 1e-9
    # the probe is not vacuous: changing token t does change the logits from t on
    assert min(p["max_abs_diff_from_t"] for p in probe["per_position"]) > 1e-6


def test_the_published_two_sided_core_is_caught():
    config = quick_config(resnet_bk={"causal": False})
    run = run_config(config, "resnet_bk", 64, 42)
    vocab = config["data"]["vocab_size"]
    probe = causality_probe(lambda: build_model("resnet_bk", run, vocab), vocab, seq_len=64,
                            tolerance=1e-6)
    assert not probe["passed"] and probe["max_abs_diff_before_t"] > 1e-6
