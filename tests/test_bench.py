"""The scaling benchmark: a tiny real run, failures as rows, and the summary's arithmetic."""

import math

import pandas as pd
import pytest

from fairlm.bench import COLUMNS, plan, run_scaling_benchmark, summarise_scaling


def tiny_config(models=("resnet_bk",)):
    return {
        "grid": {"models": list(models)},
        "model": {"d_model": 16, "n_layers": 1},
        "data": {"vocab_size": 64},
        "train": {"device": "cpu", "threads": 1},
        "bench": {"seq_lens": [64, 128], "d_model": 16, "n_layers": 1, "batch_size": 1,
                  "repeats": 1, "core_seq_len": 64, "core_batch_size": 2, "share_d_model": 16},
    }


def test_tiny_benchmark_in_fresh_subprocesses():
    config = tiny_config()
    df = run_scaling_benchmark(config)
    assert list(df.columns) == COLUMNS
    assert len(df) == len(plan(config)) == 6
    assert set(df["status"]) == {"ok"}, df["note"].tolist()
    assert (df["seconds"] > 0).all()
    assert (df["peak_mem_mb"] >= 0).all()
    tokens = df["batch_size"] * df["seq_len"]
    assert (df["tokens_per_s"] - tokens / df["seconds"]).abs().max() < 1e-6
    models = df[df["kind"] == "model"]
    assert models["seq_len"].tolist() == [64, 128]
    assert "parallel scan" in models["note"].iloc[0]
    assert sorted(df.loc[df["kind"] == "core", "name"]) == ["bk_core_loop", "bk_core_scan"]
    assert sorted(df.loc[df["kind"] == "share", "name"]) == ["bk_core_in_layer", "bk_layer"]

    summary = summarise_scaling(df, slope_range=(64, 128))
    assert math.isfinite(summary["time_slope"]["resnet_bk"])
    assert summary["core_speedup"] > 0 and summary["core_share"] > 0
    names = {c["check"] for c in summary["checks"]}
    assert names == {"time_slope", "memory_slope", "trains_at_longest", "core_speedup",
                     "core_share"}
    assert all(isinstance(c["pass"], bool) for c in summary["checks"])


def test_failures_are_rows_not_crashes():
    config = tiny_config(models=("resnet_bk", "no_such_model"))
    config["bench"]["seq_lens"] = [16, 32]
    # an embedding of 2**46 x 16 floats needs more address space than any machine has
    df = run_scaling_benchmark(config, isolate=False, vocab_size=2**46)
    models = df[df["kind"] == "model"].set_index(["name", "seq_len"])
    assert models.loc[("resnet_bk", 16), "status"] == "oom"
    assert "can't allocate memory" in models.loc[("resnet_bk", 16), "note"]
    assert models.loc[("resnet_bk", 32), "note"].startswith("not run")
    assert (models.loc["no_such_model", "status"] == "error").all()
    assert (df.loc[df["kind"] != "model", "status"] == "ok").all()
    summary = summarise_scaling(df, slope_range=(16, 32))
    failed = {(c["check"], c["model"]) for c in summary["checks"] if not c["pass"]}
    assert ("trains_at_longest", "resnet_bk") in failed
    assert summary["all_pass"] is False


def synthetic(time_exponent, oom_at_longest=False):
    rows = []
    for model in ["resnet_bk", "mamba"]:
        for n in [4096, 8192, 16384, 32768, 65536, 131072]:
            ok = not (oom_at_longest and n == 131072)
            rows.append({"kind": "model", "name": model, "seq_len": n, "batch_size": 1,
                         "seconds": 1e-5 * n**time_exponent if ok else math.nan,
                         "peak_mem_mb": 0.01 * n if ok else math.nan,
                         "status": "ok" if ok else "oom"})
    rows += [
        {"kind": "core", "name": "bk_core_scan", "seq_len": 32768, "batch_size": 8,
         "seconds": 0.1, "peak_mem_mb": 1.0, "status": "ok"},
        {"kind": "core", "name": "bk_core_loop", "seq_len": 32768, "batch_size": 8,
         "seconds": 3.0, "peak_mem_mb": 1.0, "status": "ok"},
        {"kind": "share", "name": "bk_layer", "seq_len": 32768, "batch_size": 1,
         "d_model": 512, "seconds": 2.0, "peak_mem_mb": 1.0, "status": "ok"},
        {"kind": "share", "name": "bk_core_in_layer", "seq_len": 32768, "batch_size": 1,
         "d_model": 512, "seconds": 0.1, "peak_mem_mb": 1.0, "status": "ok"},
    ]
    return pd.DataFrame(rows)


def test_summary_fits_only_the_slope_range():
    # a steep segment below 8192 must not enter the fit
    df = synthetic(1.05)
    df.loc[df["seq_len"] == 4096, "seconds"] = 1e3
    summary = summarise_scaling(df)
    assert summary["time_slope"]["resnet_bk"] == pytest.approx(1.05)
    assert summary["memory_slope"]["mamba"] == pytest.approx(1.0)
    assert summary["core_speedup"] == pytest.approx(30.0)
    assert summary["core_share"] == pytest.approx(0.05)
    assert summary["all_pass"] is True


def test_summary_flags_missed_targets():
    summary = summarise_scaling(synthetic(1.5, oom_at_longest=True))
    failed = {(c["check"], c["model"]) for c in summary["checks"] if not c["pass"]}
    assert ("time_slope", "resnet_bk") in failed and ("time_slope", "mamba") in failed
    assert ("trains_at_longest", "mamba") in failed
    assert ("memory_slope", "mamba") not in failed
    assert summary["all_pass"] is False
