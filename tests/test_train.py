"""The training loop: schedule, records, determinism, divergence, OOM, checkpoints, resume."""

import errno
import math
import os
import signal

import pandas as pd
import pytest
import torch
from conftest import tiny_raw_config

from fairlm import checkpoint
from fairlm.config import merge, resolve, run_config
from fairlm.data import DataError
from fairlm.io import read_json
from fairlm.train import DivergenceMonitor, lr_at, train

TIMING = ["tokens_per_s", "peak_mem_mb", "elapsed_s"]


def make_run(model="resnet_bk", seq_len=16, seed=1, **train_overrides):
    config = resolve(merge(tiny_raw_config(), {"train": train_overrides}))
    return run_config(config, model, seq_len, seed)


def run(tmp_path, run_cfg, data, tag="run", log=lambda _m: None):
    out, ckpt = tmp_path / tag / "out", tmp_path / tag / "ckpt"
    summary = train(run_cfg, data, out, ckpt, log=log)
    return summary, pd.read_parquet(out / "metrics.parquet"), out, ckpt


def test_schedule_is_linear_warmup_then_cosine_to_min_lr():
    lr, min_lr, warmup, total = 1e-3, 1e-5, 2000, 10000
    assert lr_at(1, lr, min_lr, warmup, total) == pytest.approx(lr / warmup)
    assert lr_at(1000, lr, min_lr, warmup, total) == pytest.approx(lr / 2)
    assert lr_at(warmup, lr, min_lr, warmup, total) == pytest.approx(lr)
    assert lr_at(6000, lr, min_lr, warmup, total) == pytest.approx((lr + min_lr) / 2)
    assert lr_at(total, lr, min_lr, warmup, total) == pytest.approx(min_lr)
    s = 7345
    expected = min_lr + 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) * (
        lr - min_lr)
    assert lr_at(s, lr, min_lr, warmup, total) == pytest.approx(expected)


@pytest.mark.parametrize("model", ["resnet_bk", "mamba"])
def test_a_run_records_every_step_and_its_results(tmp_path, tiny_data, model):
    cfg = make_run(model)
    summary, metrics, out, _ = run(tmp_path, cfg, tiny_data)
    train_cfg = cfg["train"]
    assert summary["status"] == "COMPLETED" and summary["steps_completed"] == 8
    assert metrics["step"].tolist() == list(range(1, 9))
    # the schedule is really applied: the recorded lr is the formula's
    for step, lr in zip(metrics["step"], metrics["lr"], strict=True):
        assert lr == pytest.approx(lr_at(step, train_cfg["lr"], train_cfg["min_lr"],
                                         train_cfg["warmup_steps"], 8))
    assert metrics["val_loss"].notna().tolist() == [False] * 3 + [True] + [False] * 3 + [True]
    assert (metrics["grad_norm"] > 0).all() and (metrics["tokens_per_s"] > 0).all()
    assert summary["final_val_ppl"] == pytest.approx(math.exp(metrics["val_loss"].iloc[-1]))
    assert summary["test_ppl"] > 1 and summary["final_val_word_ppl"] > summary["final_val_ppl"]
    recorded = read_json(out / "config.json")
    assert recorded["train"] == train_cfg and recorded["run"]["model"] == model
    system = read_json(out / "system.json")
    assert system["torch"] == torch.__version__ and system["mamba_kernels"]


def test_same_config_and_seed_give_the_same_curve(tmp_path, tiny_data):
    cfg = make_run("mamba")
    _, a, _, _ = run(tmp_path, cfg, tiny_data, "a")
    _, b, _, _ = run(tmp_path, cfg, tiny_data, "b")
    pd.testing.assert_frame_equal(a.drop(columns=TIMING), b.drop(columns=TIMING))


def test_both_models_see_the_same_batches(tmp_path, tiny_data):
    _, a, _, _ = run(tmp_path, make_run("resnet_bk"), tiny_data, "a")
    _, b, _, _ = run(tmp_path, make_run("mamba"), tiny_data, "b")
    assert a["batch_sha"].tolist() == b["batch_sha"].tolist()
    _, c, _, _ = run(tmp_path, make_run("mamba", seed=2), tiny_data, "c")
    assert c["batch_sha"].tolist() != b["batch_sha"].tolist()


class Crash(Exception):
    pass


def crash_at(step):
    def log(message):
        if message.startswith(f"step {step}/"):
            raise Crash(message)
    return log


def test_a_crashed_run_resumes_exactly(tmp_path, tiny_data):
    cfg = make_run("resnet_bk", checkpoint_every=2, log_every=1)
    _, reference, _, _ = run(tmp_path, cfg, tiny_data, "reference")
    with pytest.raises(Crash):
        run(tmp_path, cfg, tiny_data, "killed", log=crash_at(5))
    lines = []
    summary, resumed, _, ckpt = run(tmp_path, cfg, tiny_data, "killed", log=lines.append)
    assert any("resuming from checkpoint step_00000004.pt" in line for line in lines)
    pd.testing.assert_frame_equal(reference.drop(columns=TIMING), resumed.drop(columns=TIMING))
    assert summary["status"] == "COMPLETED" and not ckpt.exists()


def test_a_corrupt_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_data):
    cfg = make_run("resnet_bk", checkpoint_every=2, log_every=1)
    _, reference, _, _ = run(tmp_path, cfg, tiny_data, "reference")
    with pytest.raises(Crash):
        run(tmp_path, cfg, tiny_data, "killed", log=crash_at(5))
    newest = tmp_path / "killed" / "ckpt" / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:-100])
    lines = []
    _, resumed, _, _ = run(tmp_path, cfg, tiny_data, "killed", log=lines.append)
    assert any("step_00000004.pt is corrupt" in line for line in lines)
    assert any("resuming from checkpoint step_00000002.pt" in line for line in lines)
    pd.testing.assert_frame_equal(reference.drop(columns=TIMING), resumed.drop(columns=TIMING))


def test_a_checkpoint_of_another_config_is_refused(tmp_path, tiny_data):
    with pytest.raises(Crash):
        run(tmp_path, make_run(checkpoint_every=2, log_every=1), tiny_data, "x", log=crash_at(3))
    with pytest.raises(checkpoint.CheckpointError, match="other settings"):
        run(tmp_path, make_run(checkpoint_every=2, log_every=1, lr=5e-3), tiny_data, "x")


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    checkpoint.save(folder, 2, {"step": 2, "settings_hash": "h"})

    def no_space(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(folder, 4, {"step": 4, "settings_hash": "h"})
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000002.pt", "step_00000002.sha256"]
    assert checkpoint.load_latest(folder, "h", log=lambda _m: None)["step"] == 2


def test_sigusr1_writes_a_checkpoint_and_training_goes_on(tmp_path, tiny_data):
    cfg = make_run("mamba", checkpoint_every=100, log_every=1, keep_checkpoints=True)

    def signal_at_3(message):
        if message.startswith("step 3/"):
            os.kill(os.getpid(), signal.SIGUSR1)

    summary, _, _, ckpt = run(tmp_path, cfg, tiny_data, log=signal_at_3)
    assert summary["status"] == "COMPLETED"
    assert (ckpt / "step_00000003.pt").is_file()


@pytest.mark.parametrize("model", ["resnet_bk", "mamba"])
def test_learning_rate_10_diverges_as_a_result(tmp_path, tiny_data, model):
    cfg = make_run(model, lr=10.0, min_lr=1.0)
    summary, metrics, out, _ = run(tmp_path, cfg, tiny_data)
    assert summary["status"] == "DIVERGED" and summary["divergence_reason"]
    step = summary["diverged_at_step"]
    assert metrics["step"].iloc[-1] == step and summary["steps_completed"] == step - 1
    assert summary["final_val_ppl"] is None and summary["test_ppl"] is None
    assert (out / "metrics.parquet").is_file() and (out / "system.json").is_file()


def monitor(**overrides):
    train_cfg = {"spike_factor": 3.0, "spike_window": 4, "explode_factor": 2.0,
                 "chance_tolerance": 0.01, "warmup_steps": 2, **overrides}
    return DivergenceMonitor(train_cfg, vocab_size=100)  # ln V = 4.605


def test_divergence_rules():
    assert monitor().update(1, math.nan, 1.0)[1] == "non-finite loss"
    assert monitor().update(1, 4.0, math.inf)[1] == "non-finite gradient norm"
    assert monitor().update(1, 4.0, math.inf, check_grad=False)[1] is None
    assert "above 2.0 × ln V" in monitor().update(1, 9.3, 1.0)[1]
    assert monitor(explode_factor=None).update(1, 9.3, 1.0)[1] is None
    collapsed = monitor()
    reasons = [collapsed.update(s, 4.6, 0.0)[1] for s in range(1, 7)]
    assert reasons[:5] == [None] * 5 and "no better than a uniform guess" in reasons[5]
    learning = monitor()
    assert all(learning.update(s, 4.6 - 0.2 * s, 1.0)[1] is None for s in range(1, 20))


def test_spikes_are_counted_and_the_run_goes_on():
    spikes = monitor(chance_tolerance=None, explode_factor=None, spike_window=20)
    losses = [3.0] * 12 + [9.5] + [3.0] * 5
    results = [spikes.update(s, loss, 1.0) for s, loss in enumerate(losses, start=1)]
    assert [s for s, (spike, _) in enumerate(results, start=1) if spike] == [13]
    assert all(reason is None for _, reason in results) and spikes.spike_steps == [13]


def test_out_of_memory_is_status_oom_not_divergence(tmp_path, tiny_data, monkeypatch):
    import fairlm.models.resnet_bk as resnet_bk

    build = resnet_bk.build

    def build_that_runs_out(config, vocab_size):
        model = build(config, vocab_size)
        features, calls = model.features, {"n": 0}

        def features_oom(ids):
            calls["n"] += 1
            if calls["n"] == 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return features(ids)

        model.features = features_oom
        return model

    monkeypatch.setattr(resnet_bk, "build", build_that_runs_out)
    summary, metrics, _, _ = run(tmp_path, make_run("resnet_bk"), tiny_data)
    assert summary["status"] == "OOM" and summary["diverged_at_step"] is None
    assert len(metrics) == 2 and summary["steps_completed"] == 2


def test_a_seq_len_longer_than_the_validation_split_needs_a_policy(tmp_path, tiny_data):
    cfg = make_run("resnet_bk", seq_len=64)
    cfg["data"]["eval_policy"] = "error"
    cfg["run"]["seq_len"] = 100_000
    with pytest.raises(DataError, match="eval_policy"):
        train(cfg, tiny_data, tmp_path / "out", tmp_path / "ckpt", log=lambda _m: None)
    assert not (tmp_path / "out").exists()
