"""fairlm.stats against scipy, hand-computed values and planted runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from fairlm import stats

# ---------------------------------------------------------------------------------------------
# Synthetic runs following the run-output contract


def summary_record(model, seq_len, seed, status="COMPLETED", val_ppl=None, diverged_at=None,
                   steps=10, spikes=(), train_loss=None):
    completed = status == "COMPLETED"
    return {
        "model": model, "seq_len": seq_len, "seed": seed, "status": status,
        "diverged_at_step": diverged_at,
        "divergence_reason": "non-finite loss" if status == "DIVERGED" else None,
        "steps_planned": steps,
        "steps_completed": steps if completed else (diverged_at or 1) - 1,
        "final_train_loss": train_loss if train_loss is not None else (
            np.log(val_ppl) if completed else None),
        "final_val_loss": np.log(val_ppl) if completed else None,
        "final_val_ppl": val_ppl if completed else None,
        "final_val_word_ppl": 1.5 * val_ppl if completed else None,
        "test_loss": np.log(val_ppl + 1) if completed else None,
        "test_ppl": val_ppl + 1 if completed else None,
        "test_word_ppl": 1.5 * (val_ppl + 1) if completed else None,
        "spikes": {"count": len(spikes), "steps": list(spikes)},
        "tokens_seen": 1000, "epochs": 0.5, "tokens_per_s_mean": 100.0 + seed,
        "peak_mem_mb": 50.0 + seed, "wall_time_s": 3.0,
        "params": {"total": 1234, "non_embedding": 234}, "settings_hash": "abc",
    }


def summaries_frame(records):
    frame = pd.DataFrame(records)
    frame["params_total"] = [r["params"]["total"] for r in records]
    frame["params_non_embedding"] = [r["params"]["non_embedding"] for r in records]
    frame["spikes_count"] = [r["spikes"]["count"] for r in records]
    return frame.drop(columns=["params", "spikes"])


def metrics_frame(losses, val_every=5):
    steps = np.arange(1, len(losses) + 1)
    val = np.where(steps % val_every == 0, np.asarray(losses, float) + 0.1, np.nan)
    return pd.DataFrame({
        "step": steps, "loss": losses, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0,
        "peak_mem_mb": 50.0, "val_loss": val, "spike": False, "batch_sha": "x" * 64,
        "elapsed_s": steps * 0.1,
    })


def write_run(root: Path, record: dict, losses) -> Path:
    run_dir = root / record["model"] / f"L{record['seq_len']}" / f"seed{record['seed']}"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(record))
    (run_dir / "config.json").write_text(json.dumps({
        "run": {"model": record["model"], "seq_len": record["seq_len"],
                "seed": record["seed"], "steps": record["steps_planned"]},
    }))
    metrics_frame(losses).to_parquet(run_dir / "metrics.parquet")
    return run_dir


# ---------------------------------------------------------------------------------------------
# Building blocks


def test_holm_matches_hand_computation_and_skips_nan():
    # finite p sorted: 0.005, 0.01, 0.03, 0.04 (m = 4) -> 0.02, 0.03, 0.06, max(0.04, 0.06)
    adjusted = stats.holm([0.01, 0.04, 0.03, np.nan, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, np.nan, 0.02])
    np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])
    assert np.isnan(stats.holm([np.nan, np.nan])).all()
    assert stats.holm([]).shape == (0,)


def test_hedges_g_matches_formula_by_hand():
    # means 2 and 5, both variances 1 -> d = -3; J = 1 - 3 / (4 * 6 - 9) = 0.8 -> g = -2.4
    assert stats.hedges_g([1, 2, 3], [4, 5, 6]) == pytest.approx(-2.4)
    assert stats.hedges_g([4, 5, 6], [1, 2, 3]) == pytest.approx(2.4)
    # unequal sizes: pooled var = (3 * var(a) + 1 * var(b)) / 4
    a, b = np.array([1.0, 3.0, 4.0, 8.0]), np.array([2.0, 6.0])
    pooled = (3 * a.var(ddof=1) + 1 * b.var(ddof=1)) / 4
    expected = (1 - 3 / (4 * 6 - 9)) * (a.mean() - b.mean()) / np.sqrt(pooled)
    assert stats.hedges_g(a, b) == pytest.approx(expected)
    assert np.isnan(stats.hedges_g([1.0], [2.0, 3.0]))
    assert np.isnan(stats.hedges_g([2.0, 2.0], [3.0, 3.0]))


def test_bootstrap_is_seeded_and_covers_the_observed_difference():
    a = np.array([31.2, 29.8, 33.5, 30.1, 32.4])
    b = np.array([27.9, 28.4, 26.7, 29.3, 28.0])
    first = stats.bootstrap_diff_ci(a, b, samples=2000, seed=7)
    assert first == stats.bootstrap_diff_ci(a, b, samples=2000, seed=7)
    assert first != stats.bootstrap_diff_ci(a, b, samples=2000, seed=8)
    low, high = first
    assert low < a.mean() - b.mean() < high
    # The bootstrap distribution of a mean difference is bounded by the extreme resamples.
    assert a.min() - b.max() <= low and high <= a.max() - b.min()
    # No spread, no uncertainty: the interval collapses onto the difference.
    assert stats.bootstrap_diff_ci([3.0, 3.0], [1.0, 1.0], 500, 0) == (2.0, 2.0)


# ---------------------------------------------------------------------------------------------
# compare


VAL_PPL = {
    # seq_len -> (resnet_bk, mamba) completed val ppl by seed
    64: ({1: 31.2, 2: 29.8, 3: 33.5, 4: 30.1}, {1: 27.9, 2: 28.4, 3: 26.7, 4: 29.3, 5: 28.0}),
    128: ({1: 40.0, 2: 41.5, 3: 39.2}, {1: 40.8, 2: 39.9, 3: 41.1}),
}


def planted_summaries():
    records = []
    for seq_len, (bk, mamba) in VAL_PPL.items():
        records += [summary_record("resnet_bk", seq_len, s, val_ppl=v) for s, v in bk.items()]
        records += [summary_record("mamba", seq_len, s, val_ppl=v) for s, v in mamba.items()]
    # seq_len 64: resnet_bk seed 5 diverged; seq_len 128: 4 resnet_bk seeds diverged,
    # mamba has an OOM seed that must stay out of the divergence table.
    records.append(summary_record("resnet_bk", 64, 5, "DIVERGED", diverged_at=6))
    records += [summary_record("resnet_bk", 128, s, "DIVERGED", diverged_at=s) for s in (4, 5, 6,
                                                                                      7)]
    records.append(summary_record("mamba", 128, 4, "OOM"))
    return summaries_frame(records)


def pick(tests, seq_len, test):
    rows = tests[(tests["seq_len"] == seq_len) & (tests["test"] == test)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_compare_matches_scipy_on_planted_data():
    tests = stats.compare(planted_summaries(), alpha=0.05, bootstrap_samples=1000,
                          bootstrap_seed=3)
    assert list(tests.columns) == stats.TEST_COLUMNS
    assert set(tests["model_a"]) == {"resnet_bk"} and set(tests["model_b"]) == {"mamba"}
    bk, mamba = VAL_PPL[64]
    a, b = np.array(list(bk.values())), np.array(list(mamba.values()))

    welch = pick(tests, 64, "welch_t")
    expected = sps.ttest_ind(a, b, equal_var=False)
    assert welch["statistic"] == pytest.approx(expected.statistic)
    assert welch["p_value"] == pytest.approx(expected.pvalue)
    assert (welch["n_a"], welch["n_b"]) == (4, 5)
    assert welch["mean_a"] == pytest.approx(a.mean()) and welch["metric"] == "val_ppl"

    mwu = pick(tests, 64, "mann_whitney_u")
    expected = sps.mannwhitneyu(a, b, alternative="two-sided")
    assert mwu["statistic"] == pytest.approx(expected.statistic)
    assert mwu["p_value"] == pytest.approx(expected.pvalue)

    # Paired by seed: seeds 1-4 are completed by both; mamba seed 5 has no partner.
    wil = pick(tests, 64, "wilcoxon_signed_rank")
    paired = sps.wilcoxon([bk[s] for s in range(1, 5)], [mamba[s] for s in range(1, 5)])
    assert (wil["n_a"], wil["n_b"]) == (4, 4)
    assert wil["statistic"] == pytest.approx(paired.statistic)
    assert wil["p_value"] == pytest.approx(paired.pvalue)

    g = pick(tests, 64, "hedges_g")
    assert g["statistic"] == pytest.approx(stats.hedges_g(a, b))
    assert np.isnan(g["p_value"]) and pd.isna(g["significant"])

    boot = pick(tests, 64, "bootstrap_mean_diff")
    assert boot["statistic"] == pytest.approx(a.mean() - b.mean())
    assert (boot["ci_low"], boot["ci_high"]) == pytest.approx(stats.bootstrap_diff_ci(a, b, 1000,
                                                                                      3))


def test_fisher_exact_on_divergence_excludes_oom():
    tests = stats.compare(planted_summaries(), bootstrap_samples=200)
    fisher = pick(tests, 128, "fisher_exact")
    # resnet_bk: 4 diverged, 3 completed; mamba: 0 diverged, 3 completed (the OOM seed is out)
    expected = sps.fisher_exact([[4, 0], [3, 3]])
    assert fisher["metric"] == "divergence"
    assert (fisher["n_a"], fisher["n_b"]) == (7, 3)
    assert fisher["mean_a"] == pytest.approx(4 / 7) and fisher["mean_b"] == 0
    assert fisher["p_value"] == pytest.approx(expected.pvalue)
    assert fisher["statistic"] == pytest.approx(expected.statistic)
    assert "OOM runs excluded" in fisher["note"] and "mamba: 1" in fisher["note"]


def test_holm_runs_across_seq_lens_within_each_test():
    tests = stats.compare(planted_summaries(), alpha=0.05, bootstrap_samples=200)
    for name in ["welch_t", "mann_whitney_u", "wilcoxon_signed_rank", "fisher_exact"]:
        family = tests[tests["test"] == name].sort_values("seq_len")
        assert len(family) == 2
        np.testing.assert_allclose(family["p_holm"], stats.holm(family["p_value"].to_numpy()))
        assert (family["p_holm"] >= family["p_value"]).all()
        assert list(family["significant"]) == list(family["p_holm"] < 0.05)


def test_compare_with_too_little_data_gives_nan_and_notes():
    records = [
        summary_record("resnet_bk", 64, 1, val_ppl=30.0),
        summary_record("resnet_bk", 64, 2, "DIVERGED", diverged_at=3),
        summary_record("mamba", 64, 1, val_ppl=30.0),
        summary_record("mamba", 64, 2, val_ppl=31.0),
        # all of resnet_bk diverged at 128: no perplexity at all, divergence still testable
        summary_record("resnet_bk", 128, 1, "DIVERGED", diverged_at=2),
        summary_record("resnet_bk", 128, 2, "DIVERGED", diverged_at=4),
        summary_record("mamba", 128, 1, val_ppl=40.0),
        summary_record("mamba", 128, 2, val_ppl=40.0),
    ]
    tests = stats.compare(summaries_frame(records), bootstrap_samples=200)
    for seq_len in (64, 128):
        for name in ["welch_t", "mann_whitney_u", "hedges_g", "bootstrap_mean_diff"]:
            row = pick(tests, seq_len, name)
            assert np.isnan(row["statistic"]) and np.isnan(row["p_value"])
            assert "insufficient data" in row["note"]
    # seq_len 64: the one shared seed has a zero difference -> the signed-rank test cannot run
    wil = pick(tests, 64, "wilcoxon_signed_rank")
    assert np.isnan(wil["p_value"]) and "cannot run" in wil["note"]
    fisher = pick(tests, 128, "fisher_exact")
    assert fisher["p_value"] == pytest.approx(sps.fisher_exact([[2, 0], [0, 2]]).pvalue)


def test_compare_with_a_single_model_has_no_pairs():
    records = [summary_record("mamba", 64, s, val_ppl=30.0 + s) for s in range(3)]
    tests = stats.compare(summaries_frame(records))
    assert tests.empty and list(tests.columns) == stats.TEST_COLUMNS


# ---------------------------------------------------------------------------------------------
# Curves and summary


def planted_metrics():
    frames = []
    losses = {
        1: [5.0, 4.0, 3.0, 2.5, 2.0, 1.8],
        2: [5.2, 4.4, 3.4, np.nan],  # diverged at step 4 (non-finite loss)
        3: [4.8, 3.6, 2.6, 2.3, 2.2, 2.0],
    }
    for seed, values in losses.items():
        frame = metrics_frame(values, val_every=2)
        frame[["model", "seq_len", "seed"]] = ["mamba", 64, seed]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True), losses


def test_curves_drop_a_diverged_seed_and_never_average_its_nan():
    metrics, losses = planted_metrics()
    summaries = summaries_frame([
        summary_record("mamba", 64, 1, val_ppl=10.0),
        summary_record("mamba", 64, 2, "DIVERGED", diverged_at=4),
        summary_record("mamba", 64, 3, val_ppl=11.0),
    ])
    curves = stats.aggregate_curves(metrics, summaries).set_index("step")
    assert list(curves.index) == [1, 2, 3, 4, 5, 6]
    assert list(curves["n_alive"]) == [3, 3, 3, 2, 2, 2]
    for step in (1, 3):
        values = [losses[s][step - 1] for s in (1, 2, 3)]
        assert curves.loc[step, "loss_mean"] == pytest.approx(np.mean(values))
        assert curves.loc[step, "loss_std"] == pytest.approx(np.std(values, ddof=1))
        assert curves.loc[step, "loss_min"] == min(values)
        assert curves.loc[step, "loss_max"] == max(values)
    assert curves.loc[4, "loss_mean"] == pytest.approx((2.5 + 2.3) / 2)
    assert np.isfinite(curves["loss_mean"]).all()
    # validation every 2 steps; at step 4 only the two live seeds count
    assert curves.loc[4, "n_val"] == 2
    assert curves.loc[4, "val_loss_mean"] == pytest.approx((2.6 + 2.4) / 2)
    assert np.isnan(curves.loc[3, "val_loss_mean"])


def test_curves_cut_a_threshold_divergence_with_finite_loss():
    metrics, _ = planted_metrics()
    metrics.loc[(metrics["seed"] == 2) & (metrics["step"] == 4), "loss"] = 50.0
    summaries = summaries_frame([
        summary_record("mamba", 64, 1, val_ppl=10.0),
        summary_record("mamba", 64, 2, "DIVERGED", diverged_at=4),
        summary_record("mamba", 64, 3, val_ppl=11.0),
    ])
    curves = stats.aggregate_curves(metrics, summaries).set_index("step")
    assert curves.loc[4, "n_alive"] == 2 and curves.loc[4, "loss_max"] < 50.0
    # Without summaries only the loss itself can tell, so the finite 50 would count.
    assert stats.aggregate_curves(metrics).set_index("step").loc[4, "loss_max"] == 50.0


def test_curves_single_seed_keeps_std_nan():
    metrics, _ = planted_metrics()
    one = metrics[metrics["seed"] == 1]
    curves = stats.aggregate_curves(one)
    assert (curves["n_alive"] == 1).all()
    assert curves["loss_std"].isna().all()
    np.testing.assert_allclose(curves["loss_mean"], one["loss"])


def test_summarise_counts_failures_and_averages_completed_only():
    records = [
        summary_record("resnet_bk", 64, 1, val_ppl=30.0, spikes=(3,)),
        summary_record("resnet_bk", 64, 2, val_ppl=34.0),
        summary_record("resnet_bk", 64, 3, val_ppl=29.0),
        summary_record("resnet_bk", 64, 4, "DIVERGED", diverged_at=9, spikes=(2, 7)),
        summary_record("resnet_bk", 64, 5, "OOM"),
        summary_record("resnet_bk", 128, 1, "DIVERGED", diverged_at=12),
        summary_record("resnet_bk", 128, 2, "DIVERGED", diverged_at=5),
        summary_record("mamba", 64, 1, val_ppl=28.0),
    ]
    table = stats.summarise(summaries_frame(records))
    assert list(zip(table["model"], table["seq_len"], strict=True)) == [
        ("resnet_bk", 64), ("resnet_bk", 128), ("mamba", 64)]
    cell = table.iloc[0]
    assert (cell["seeds"], cell["completed"], cell["diverged"], cell["oom"]) == (5, 3, 1, 1)
    assert cell["diverged_steps"] == "9" and cell["first_divergence_step"] == 9
    assert cell["spikes_total"] == 3
    done = np.array([30.0, 34.0, 29.0])
    assert cell["val_ppl_mean"] == pytest.approx(done.mean())
    assert cell["val_ppl_std"] == pytest.approx(done.std(ddof=1))
    assert (cell["val_ppl_min"], cell["val_ppl_max"]) == (29.0, 34.0)
    assert cell["test_ppl_mean"] == pytest.approx((done + 1).mean())
    assert cell["val_word_ppl_mean"] == pytest.approx((1.5 * done).mean())
    assert cell["final_loss_mean"] == pytest.approx(np.log(done).mean())
    assert cell["tokens_per_s_mean"] == pytest.approx(102.0)  # seeds 1-3 only
    assert cell["peak_mem_mb_max"] == 53.0
    assert (cell["params_total"], cell["params_non_embedding"]) == (1234, 234)
    assert "1 diverged" in cell["note"] and "1 oom" in cell["note"]

    all_diverged = table.iloc[1]
    assert all_diverged["completed"] == 0 and all_diverged["diverged"] == 2
    assert all_diverged["diverged_steps"] == "5;12" and all_diverged["first_divergence_step"] == 5
    assert np.isnan(all_diverged["val_ppl_mean"]) and np.isnan(all_diverged["test_ppl_max"])
    assert "no completed run" in all_diverged["note"]

    single = table.iloc[2]
    assert single["val_ppl_mean"] == 28.0 and np.isnan(single["val_ppl_std"])
    assert single["diverged_steps"] == "" and pd.isna(single["first_divergence_step"])


# ---------------------------------------------------------------------------------------------
# Files end to end


def test_load_runs_and_write_tables(tmp_path):
    runs = tmp_path / "runs"
    dirs = []
    for seed, ppl in [(1, 30.0), (2, 32.0), (3, 31.0)]:
        dirs.append(write_run(runs, summary_record("resnet_bk", 64, seed, val_ppl=ppl, steps=6),
                              [5.0, 4.0, 3.5, 3.0, 2.8, 2.7]))
    dirs.append(write_run(runs, summary_record("resnet_bk", 64, 4, "DIVERGED", diverged_at=3,
                                               steps=6), [5.0, 9.0, np.inf]))
    for seed, ppl in [(1, 28.0), (2, 29.5), (3, 28.7), (4, 29.0)]:
        dirs.append(write_run(runs, summary_record("mamba", 64, seed, val_ppl=ppl, steps=6),
                              [5.1, 4.1, 3.4, 3.1, 2.9, 2.6]))

    summaries, metrics = stats.load_runs(dirs)
    assert len(summaries) == 8 and len(metrics) == 6 * 7 + 3
    assert {"params_total", "spikes_count", "run_dir"} <= set(summaries.columns)
    assert metrics.groupby(["model", "seed"]).size().loc[("resnet_bk", 4)] == 3

    tables = tmp_path / "tables"
    paths = stats.write_tables(dirs, tables / "summary.csv", tables / "tests.csv",
                               tables / "curves.parquet", alpha=0.05, bootstrap_samples=300,
                               bootstrap_seed=1)
    assert sorted(p.name for p in tables.iterdir()) == ["curves.parquet", "summary.csv",
                                                        "tests.csv"]
    summary = pd.read_csv(paths["summary"])
    assert list(summary["model"]) == ["resnet_bk", "mamba"]  # grid order kept
    assert summary.loc[0, "diverged"] == 1 and summary.loc[0, "completed"] == 3
    tests = pd.read_csv(paths["tests"])
    assert set(tests["test"]) == {"welch_t", "mann_whitney_u", "wilcoxon_signed_rank",
                                  "hedges_g", "bootstrap_mean_diff", "fisher_exact"}
    curves = pd.read_parquet(paths["curves"])
    bk = curves[curves["model"] == "resnet_bk"].set_index("step")
    assert list(bk["n_alive"]) == [4, 4, 3, 3, 3, 3]
    assert np.isfinite(bk["loss_mean"]).all()
