"""The fairness audit catches planted unfairness in small synthetic run folders."""

from __future__ import annotations

import copy
import hashlib
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fairlm import audit as fa

MODELS = ["resnet_bk", "mamba"]
TRAIN_TOKENS = 2_000
VOCAB = 50


class CausalToy(nn.Module):
    """Logit i is a function of the running mean of embeddings 0..i."""

    def __init__(self, vocab: int = VOCAB, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        counts = torch.arange(1, ids.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        return self.head(h.cumsum(1) / counts)


class LeakyToy(CausalToy):
    """Adds the mean over the whole sequence: every position sees the future."""

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(h + h.mean(1, keepdim=True))


class PeekOneToy(CausalToy):
    """Sees exactly one token ahead: a leak only at position t - 1."""

    def forward(self, ids):
        h = self.embed(ids)
        ahead = torch.cat([h[:, 1:], torch.zeros_like(h[:, :1])], dim=1)
        return self.head(h + 1e-3 * ahead)


def toy_factory(kinds: dict[str, type]):
    def build(name, config, vocab_size):
        assert config["run"]["model"] == name
        return kinds[name](vocab_size)
    return build


def base_config() -> dict:
    return {
        "data": {"tokenizer": "bpe", "vocab_size": VOCAB},
        "model": {"d_model": 8, "n_layers": 1},
        "train": {"lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 2, "batch_size": 2,
                  "grad_clip": 1.0, "spike_factor": 3.0, "spike_window": 5},
        "tokenizer_sha256": "ab" * 32,
    }


def pipeline_config(allow=()) -> dict:
    return {"grid": {"models": MODELS},
            "analysis": {"causality_tolerance": 1e-9, "causality_seq_len": 16,
                         "allow_failed_checks": list(allow)}}


def batch_shas(seed: int, steps: int) -> list[str]:
    return [hashlib.sha256(f"{seed}-{s}".encode()).hexdigest() for s in range(1, steps + 1)]


def make_run(root, model, seq_len=32, seed=42, steps=6, *, train=None, shas=None,
             status="COMPLETED", diverged_at=None, reason=None, losses=None, params=None,
             config=None):
    if config is None:
        config = base_config()
        config[model] = {"width": 8}
        config["run"] = {"model": model, "seq_len": seq_len, "seed": seed, "steps": steps}
    config["train"].update(train or {})
    shas = shas or batch_shas(seed, steps)
    rows = len(shas)
    losses = losses if losses is not None else list(np.linspace(5, 4, rows))
    metrics = pd.DataFrame({
        "step": np.arange(1, rows + 1), "loss": losses, "lr": 1e-3,
        "grad_norm": np.ones(rows), "tokens_per_s": 100.0, "peak_mem_mb": 10.0,
        "val_loss": np.nan, "spike": False, "batch_sha": shas, "elapsed_s": np.arange(rows),
    })
    completed = status == "COMPLETED"
    summary = {
        "model": model, "seq_len": seq_len, "seed": seed, "status": status,
        "diverged_at_step": diverged_at, "divergence_reason": reason,
        "steps_planned": steps, "steps_completed": rows,
        "final_val_ppl": 50.0 if completed else None, "test_ppl": 51.0 if completed else None,
        "tokens_seen": rows * config["train"]["batch_size"] * seq_len,
        "params": params or {"total": 1_000, "non_embedding": 600},
        "settings_hash": "same",
    }
    path = root / model / f"L{seq_len}" / f"seed{seed}"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "summary.json").write_text(json.dumps(summary))
    metrics.to_parquet(path / "metrics.parquet")
    return path


@pytest.fixture
def meta(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"splits": {"train": {"tokens": TRAIN_TOKENS}},
                                "tokenizer": {"vocab_size": VOCAB}}))
    return path


def fair_runs(root, seeds=(42, 43)):
    return [make_run(root, m, seed=s) for s in seeds for m in MODELS]


def by_name(audit: dict) -> dict:
    return {c["name"]: c for c in audit["checks"]}


CAUSAL = toy_factory({"resnet_bk": CausalToy, "mamba": CausalToy})


def test_fair_runs_pass_every_check(tmp_path, meta):
    audit = fa.run_audit(fair_runs(tmp_path / "runs"), meta, pipeline_config(), CAUSAL)
    assert [c["name"] for c in audit["checks"]] == list(fa.CHECK_NAMES)
    assert audit["passed"], [c["found"] for c in audit["checks"] if not c["passed"]]
    for check in audit["checks"]:
        assert check["compared"] and check["found"]
    assert fa.enforce(audit, []) == []
    exposure = by_name(audit)["exposure"]["details"]
    assert exposure["runs"][0]["tokens_seen"] == 6 * 2 * 32
    assert exposure["runs"][0]["epochs"] == pytest.approx(6 * 2 * 32 / TRAIN_TOKENS)
    assert exposure["params_ratio"]["non_embedding"] == pytest.approx(1.0)


def test_a_different_learning_rate_is_caught(tmp_path, meta):
    root = tmp_path / "runs"
    dirs = [make_run(root, "resnet_bk"), make_run(root, "mamba", train={"lr": 2e-3})]
    audit = fa.run_audit(dirs, meta, pipeline_config(), CAUSAL)
    check = by_name(audit)["identical_settings"]
    assert not check["passed"]
    assert check["details"][0]["differing_keys"] == ["train.lr"]
    assert "train.lr" in check["found"]
    with pytest.raises(fa.AuditFailure, match="identical_settings"):
        fa.enforce(audit, [])


def test_model_sections_may_differ(tmp_path, meta):
    root = tmp_path / "runs"
    dirs = [make_run(root, "resnet_bk"), make_run(root, "mamba")]
    config = json.loads((dirs[1] / "config.json").read_text())
    config["mamba"] = {"d_state": 16, "expand": 2}
    (dirs[1] / "config.json").write_text(json.dumps(config))
    audit = fa.run_audit(dirs, meta, pipeline_config(), CAUSAL)
    assert by_name(audit)["identical_settings"]["passed"]


def test_differing_keys_are_dotted_and_include_absent_keys():
    a = {"train": {"lr": 1, "betas": [0.9, 0.99]}, "data": {"x": 1}}
    b = {"train": {"lr": 1, "betas": [0.9, 0.999]}, "data": {}}
    assert fa.differing_keys(a, b) == ["data", "data.x", "train.betas"]


def test_a_different_data_order_is_caught(tmp_path, meta):
    root = tmp_path / "runs"
    shas = batch_shas(42, 6)
    swapped = shas[:3] + [shas[4], shas[3]] + shas[5:]
    dirs = [make_run(root, "resnet_bk", shas=shas), make_run(root, "mamba", shas=swapped)]
    audit = fa.run_audit(dirs, meta, pipeline_config(), CAUSAL)
    check = by_name(audit)["identical_data"]
    assert not check["passed"]
    assert check["details"][0]["first_mismatch_step"] == 4
    assert check["details"][0]["mismatched_steps"] == 2
    assert "first at step 4" in check["found"]


def test_a_shorter_diverged_run_is_compared_over_its_steps(tmp_path, meta):
    root = tmp_path / "runs"
    shas = batch_shas(42, 6)
    dirs = [make_run(root, "resnet_bk", shas=shas),
            make_run(root, "mamba", shas=shas[:4], status="DIVERGED", diverged_at=4,
                     reason="non-finite loss", losses=[5.0, 4.9, 4.8, math.nan])]
    audit = fa.run_audit(dirs, meta, pipeline_config(), CAUSAL)
    data = by_name(audit)["identical_data"]
    assert data["passed"] and data["details"][0]["common_steps"] == 4
    assert by_name(audit)["honest_outcomes"]["passed"]


def test_causality_probe_separates_causal_from_leaky_models():
    causal = fa.causality_probe(lambda: CausalToy(), VOCAB, 16, tolerance=1e-12)
    assert causal["passed"] and causal["dtype"] == "float64"
    assert causal["max_abs_diff_before_t"] == 0.0
    # the change at t must reach the logits at t and after, or the probe proved nothing
    assert all(p["max_abs_diff_from_t"] > 0 for p in causal["per_position"])
    for leaky in (LeakyToy, PeekOneToy):
        result = fa.causality_probe(lambda m=leaky: m(), VOCAB, 16, tolerance=1e-12)
        assert not result["passed"] and result["max_abs_diff_before_t"] > 1e-6


def test_a_non_causal_model_is_caught(tmp_path, meta):
    factory = toy_factory({"resnet_bk": LeakyToy, "mamba": CausalToy})
    audit = fa.run_audit(fair_runs(tmp_path / "runs"), meta, pipeline_config(), factory)
    check = by_name(audit)["causality"]
    assert not check["passed"]
    assert "resnet_bk" in check["found"] and "mamba" not in check["found"]
    assert {d["model"]: d["passed"] for d in check["details"]} == {
        "resnet_bk": False, "mamba": True}
    with pytest.raises(fa.AuditFailure, match="causality"):
        fa.enforce(audit, [])
    assert fa.enforce(audit, ["causality"]) == ["causality"]


def test_a_model_that_cannot_be_built_fails_causality(tmp_path, meta):
    def broken(name, config, vocab_size):
        raise ImportError("no such model")
    audit = fa.run_audit(fair_runs(tmp_path / "runs", seeds=(42,)), meta, pipeline_config(),
                         broken)
    assert not by_name(audit)["causality"]["passed"]
    assert "could not be probed" in by_name(audit)["causality"]["found"]


@pytest.mark.parametrize("case", ["oom_with_step", "oom_reason", "no_evidence"])
def test_dishonest_outcomes_are_caught(tmp_path, meta, case):
    root = tmp_path / "runs"
    good = make_run(root, "resnet_bk")
    if case == "oom_with_step":
        bad = make_run(root, "mamba", shas=batch_shas(42, 3), status="OOM", diverged_at=3)
    elif case == "oom_reason":
        bad = make_run(root, "mamba", shas=batch_shas(42, 3), status="DIVERGED", diverged_at=3,
                       reason="CUDA out of memory. Tried to allocate 2.00 GiB")
    else:
        bad = make_run(root, "mamba", shas=batch_shas(42, 3), status="DIVERGED", diverged_at=3)
    audit = fa.run_audit([good, bad], meta, pipeline_config(), CAUSAL)
    check = by_name(audit)["honest_outcomes"]
    assert not check["passed"]
    assert "mamba/L32/seed42" in check["found"]
    assert check["details"]["divergence_definition"]["spike_factor"] == 3.0
    assert check["details"]["divergence_definition"]["spike_window"] == 5


def test_an_honest_oom_passes(tmp_path, meta):
    root = tmp_path / "runs"
    dirs = [make_run(root, "resnet_bk"),
            make_run(root, "mamba", shas=batch_shas(42, 2), status="OOM")]
    audit = fa.run_audit(dirs, meta, pipeline_config(), CAUSAL)
    assert by_name(audit)["honest_outcomes"]["passed"]


def test_a_completed_run_with_a_nan_loss_is_caught(tmp_path, meta):
    root = tmp_path / "runs"
    dirs = [make_run(root, "resnet_bk"),
            make_run(root, "mamba", losses=[5, 4, math.nan, 4, 4, 4])]
    audit = fa.run_audit(dirs, meta, pipeline_config(), CAUSAL)
    check = by_name(audit)["honest_outcomes"]
    assert not check["passed"] and "step 3" in check["found"]


def test_exposure_reports_ratio_and_large_epochs(tmp_path, meta):
    root = tmp_path / "runs"
    dirs = [make_run(root, "resnet_bk", steps=400, params={"total": 900, "non_embedding": 500}),
            make_run(root, "mamba", steps=400, params={"total": 1100, "non_embedding": 550})]
    audit = fa.run_audit(dirs, meta, pipeline_config(), CAUSAL)
    check = by_name(audit)["exposure"]
    details = check["details"]
    assert check["passed"]
    assert details["params_ratio"] == {"numerator": "mamba", "denominator": "resnet_bk",
                                       "total": pytest.approx(1100 / 900),
                                       "non_embedding": pytest.approx(1.1)}
    assert details["max_epochs"] == pytest.approx(400 * 2 * 32 / TRAIN_TOKENS)
    assert details["large_epochs"] and "many times" in check["found"]


def test_exposure_fails_when_counts_are_missing(tmp_path, meta):
    root = tmp_path / "runs"
    dirs = [make_run(root, m) for m in MODELS]
    summary = json.loads((dirs[1] / "summary.json").read_text())
    summary.pop("params")
    (dirs[1] / "summary.json").write_text(json.dumps(summary))
    audit = fa.run_audit(dirs, meta, pipeline_config(), CAUSAL)
    assert not by_name(audit)["exposure"]["passed"]
    assert "mamba: parameter counts" in by_name(audit)["exposure"]["found"]


def test_write_audit_is_strict_json_and_records_allowed_failures(tmp_path, meta):
    factory = toy_factory({"resnet_bk": LeakyToy, "mamba": CausalToy})
    audit = fa.run_audit(fair_runs(tmp_path / "runs", seeds=(42,)), meta,
                         pipeline_config(allow=["causality"]), factory)
    assert audit["allowed_failures"] == ["causality"] and not audit["passed"]
    broken = copy.deepcopy(audit)
    broken["checks"][0]["details"] = {"x": float("nan")}
    out = fa.write_audit(broken, tmp_path / "audit" / "fairness.json")
    loaded = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert loaded["checks"][0]["details"] == {"x": None}
    assert loaded["causality_tolerance"] == 1e-9
    assert not list(out.parent.glob(".*tmp"))


def test_discover_run_dirs(tmp_path):
    dirs = fair_runs(tmp_path / "runs", seeds=(42,))
    assert fa.discover_run_dirs(tmp_path / "runs") == sorted(dirs)


@pytest.mark.parametrize("causal", [True, False])
def test_the_real_models_as_configured(tmp_path, meta, monkeypatch, causal):
    """The causal BK core passes; the published two-sided core (causal: false) is caught."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from fairlm.config import resolve, run_config

    config = resolve({"grid": {"seq_lens": [32], "steps": {"32": 6}},
                      "model": {"d_model": 16, "n_layers": 1},
                      "resnet_bk": {"causal": causal, "n_experts": 2},
                      "mamba": {"kernel": "chunked"},
                      "analysis": {"causality_seq_len": 16}})
    dirs = [make_run(tmp_path / "runs", m, config=run_config(config, m, 32, 42))
            for m in MODELS]
    audit = fa.run_audit(dirs, meta, config)
    check = by_name(audit)["causality"]
    results = {d["model"]: d for d in check["details"]}
    assert results["mamba"]["passed"], results["mamba"]
    assert results["resnet_bk"]["passed"] is causal, results["resnet_bk"]
    assert results["resnet_bk"]["dtype"] == "float64"
    assert check["passed"] is causal
    assert by_name(audit)["identical_settings"]["passed"]
