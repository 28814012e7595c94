"""Aggregation of training runs and the significance tests between models.

A pure library over the run-output contract (summary.json, config.json, metrics.parquet): it
reads files and tables, never models. Two rules run through every function here:

- A diverged or OOM run is counted, never averaged: statistics of losses and perplexities use
  COMPLETED runs only, and the counts say what happened to the others.
- Not enough data is an answer, not an error: a statistic that cannot be computed is NaN and the
  `note` column says why.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from fairlm.io import atomic_path, read_json, read_json_if_exists

COMPLETED, DIVERGED, OOM = "COMPLETED", "DIVERGED", "OOM"
RUN_KEYS = ["model", "seq_len", "seed"]
GROUP_KEYS = ["model", "seq_len"]


# ---------------------------------------------------------------------------------------------
# Loading


def _read_summary(run_dir: Path) -> dict:
    summary = read_json(run_dir / "summary.json")
    run_section = read_json_if_exists(run_dir / "config.json").get("run", {})
    # The summary is the primary record; config.json fills in what an older summary lacks.
    for key in RUN_KEYS:
        if summary.get(key) is None and key in run_section:
            summary[key] = run_section[key]
    if summary.get("steps_planned") is None and "steps" in run_section:
        summary["steps_planned"] = run_section["steps"]
    missing = [key for key in RUN_KEYS if summary.get(key) is None]
    if missing:
        raise ValueError(f"{run_dir}: summary.json and config.json lack {missing}")

    params = summary.pop("params", None) or {}
    spikes = summary.pop("spikes", None) or {}
    summary["params_total"] = params.get("total")
    summary["params_non_embedding"] = params.get("non_embedding")
    summary["spikes_count"] = spikes.get("count", 0)
    summary["spike_steps"] = ";".join(str(s) for s in sorted(spikes.get("steps", [])))
    summary["run_dir"] = str(run_dir)
    return summary


def load_runs(run_dirs: Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read every run folder: (summaries, one row per run; metrics, long, with run keys).

    Rows keep the order of `run_dirs` (the workflow lists them in grid order, which is the
    order models are compared and drawn in). Nested summary fields are flattened:
    params.total -> params_total, params.non_embedding -> params_non_embedding,
    spikes.count -> spikes_count, spikes.steps -> spike_steps (";"-joined).
    """
    summary_rows, metric_frames = [], []
    for run_dir in map(Path, run_dirs):
        summary = _read_summary(run_dir)
        summary_rows.append(summary)
        metrics = pd.read_parquet(run_dir / "metrics.parquet")
        for key in RUN_KEYS:
            metrics[key] = summary[key]
        metric_frames.append(metrics)

    summaries = pd.DataFrame(summary_rows)
    if summaries.empty:
        summaries = pd.DataFrame(columns=[*RUN_KEYS, "status"])
    summaries = summaries.astype({"seq_len": "int64", "seed": "int64"})
    metrics = pd.concat(metric_frames, ignore_index=True) if metric_frames else pd.DataFrame(
        columns=[*RUN_KEYS, "step", "loss"]
    )
    metrics = metrics.astype({"seq_len": "int64", "seed": "int64", "step": "int64"})
    return summaries, metrics


def model_order(frame: pd.DataFrame, models: Sequence[str] | None = None) -> list[str]:
    """Models in the given order, else in order of first appearance (the grid order)."""
    present = list(dict.fromkeys(frame["model"])) if "model" in frame else []
    if models is None:
        return present
    return [m for m in models if m in present] + [m for m in present if m not in models]


# ---------------------------------------------------------------------------------------------
# Curves


def _alive_rows(metrics: pd.DataFrame, summaries: pd.DataFrame | None) -> pd.Series:
    """True where a seed is still running with a finite loss.

    A run that diverged at step s counts up to s - 1, whatever it logged at s or after.
    """
    alive = pd.Series(np.isfinite(metrics["loss"].to_numpy(dtype=float)), index=metrics.index)
    if summaries is not None and "diverged_at_step" in summaries and not summaries.empty:
        stops = summaries.loc[summaries["status"] == DIVERGED, [*RUN_KEYS, "diverged_at_step"]]
        stops = stops.dropna(subset=["diverged_at_step"])
        if not stops.empty:
            stop = metrics[RUN_KEYS].merge(stops, on=RUN_KEYS, how="left")["diverged_at_step"]
            stop = stop.fillna(np.inf).to_numpy(dtype=float)
            alive &= metrics["step"].to_numpy(dtype=float) < stop
    return alive


def aggregate_curves(metrics: pd.DataFrame, summaries: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (model, seq_len, step): training-loss mean/std/min/max over the seeds alive there.

    n_alive counts seeds with a finite loss at that step that have not diverged before it; a
    non-finite loss never enters a statistic. With `summaries`, a DIVERGED run is cut at its
    diverged_at_step even if the loss logged there is finite (e.g. a divergence by threshold).
    loss_std uses ddof=1 and is NaN where a single seed is alive (no spread to estimate); plots
    draw no band there. Every logged step appears, so n_alive == 0 marks steps where all seeds
    have stopped (statistics NaN). val_loss_{mean,std} and n_val (the seeds with a finite
    validation loss) are present when metrics has a val_loss column.
    """
    columns = [*GROUP_KEYS, "step", "loss_mean", "loss_std", "loss_min", "loss_max", "n_alive"]
    has_val = "val_loss" in metrics.columns
    if has_val:
        columns += ["val_loss_mean", "val_loss_std", "n_val"]
    if metrics.empty:
        return pd.DataFrame(columns=columns)

    frame = metrics[[*RUN_KEYS, "step", "loss"] + (["val_loss"] if has_val else [])].copy()
    alive = _alive_rows(frame, summaries)
    frame["loss"] = frame["loss"].where(alive)
    if has_val:
        finite_val = np.isfinite(frame["val_loss"].to_numpy(dtype=float))
        frame["val_loss"] = frame["val_loss"].where(alive & finite_val)

    # pandas' groupby std is the sample std (ddof=1)
    grouped = frame.groupby([*GROUP_KEYS, "step"], sort=True)
    curves = grouped["loss"].agg(
        loss_mean="mean", loss_std="std", loss_min="min", loss_max="max",
        n_alive="count",
    )
    if has_val:
        curves = curves.join(grouped["val_loss"].agg(
            val_loss_mean="mean", val_loss_std="std", n_val="count",
        ))
    curves = curves.reset_index()
    curves["n_alive"] = curves["n_alive"].astype("int64")
    if has_val:
        curves["n_val"] = curves["n_val"].astype("int64")
    return curves[columns]


# ---------------------------------------------------------------------------------------------
# Per-cell summary


def _describe(values: pd.Series, prefix: str) -> dict:
    values = pd.to_numeric(values, errors="coerce").dropna()
    return {
        f"{prefix}_mean": values.mean() if len(values) else np.nan,
        f"{prefix}_std": values.std(ddof=1) if len(values) > 1 else np.nan,
        f"{prefix}_min": values.min() if len(values) else np.nan,
        f"{prefix}_max": values.max() if len(values) else np.nan,
    }


def _mean(values: pd.Series) -> float:
    values = pd.to_numeric(values, errors="coerce").dropna()
    return float(values.mean()) if len(values) else np.nan


def _first_known(values: pd.Series):
    values = values.dropna()
    return values.iloc[0] if len(values) else np.nan


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame else pd.Series(np.nan, index=frame.index)


def summarise(summaries: pd.DataFrame, models: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (model, seq_len): counts of every outcome, statistics of COMPLETED runs.

    Loss, perplexity, throughput and memory statistics are over COMPLETED runs only (std ddof=1,
    NaN with fewer than two); diverged and OOM seeds are counted in `diverged` and `oom`, never
    averaged. spikes_total counts spikes over all runs of the cell (a spike before a divergence
    is part of the story). params_* are the same for every seed of a model and are taken from
    any run that reports them. `note` says in words why statistics are missing.
    """
    rows = []
    for model in model_order(summaries, models):
        of_model = summaries[summaries["model"] == model]
        for seq_len in sorted(of_model["seq_len"].unique()):
            cell = of_model[of_model["seq_len"] == seq_len]
            done = cell[cell["status"] == COMPLETED]
            diverged = cell[cell["status"] == DIVERGED]
            steps = sorted(int(s) for s in _column(diverged, "diverged_at_step").dropna())
            row = {
                "model": model,
                "seq_len": int(seq_len),
                "seeds": len(cell),
                "completed": len(done),
                "diverged": len(diverged),
                "oom": int((cell["status"] == OOM).sum()),
                "diverged_steps": ";".join(map(str, steps)),
                "first_divergence_step": steps[0] if steps else pd.NA,
                "spikes_total": int(pd.to_numeric(_column(cell, "spikes_count")).fillna(0).sum()),
                "steps_planned": _first_known(_column(cell, "steps_planned")),
            }
            row |= _describe(_column(done, "final_train_loss"), "final_loss")
            row |= _describe(_column(done, "final_val_ppl"), "val_ppl")
            row["val_word_ppl_mean"] = _mean(_column(done, "final_val_word_ppl"))
            row |= _describe(_column(done, "test_ppl"), "test_ppl")
            row["test_word_ppl_mean"] = _mean(_column(done, "test_word_ppl"))
            row["tokens_per_s_mean"] = _mean(_column(done, "tokens_per_s_mean"))
            peak = pd.to_numeric(_column(done, "peak_mem_mb"), errors="coerce").dropna()
            row["peak_mem_mb_max"] = peak.max() if len(peak) else np.nan
            row["params_total"] = _first_known(_column(cell, "params_total"))
            row["params_non_embedding"] = _first_known(_column(cell, "params_non_embedding"))
            row["note"] = _summary_note(row)
            rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table["first_divergence_step"] = table["first_divergence_step"].astype("Int64")
        for name in ["params_total", "params_non_embedding", "steps_planned"]:
            table[name] = pd.to_numeric(table[name]).astype("Int64")
    return table


def _summary_note(row: dict) -> str:
    if row["completed"] == row["seeds"]:
        return ""
    failed = [f"{row[k]} {k}" for k in ("diverged", "oom") if row[k]]
    other = row["seeds"] - row["completed"] - row["diverged"] - row["oom"]
    if other:
        failed.append(f"{other} other status")
    if row["completed"] == 0:
        return f"no completed run ({', '.join(failed)}): statistics are empty"
    return f"statistics over {row['completed']} completed of {row['seeds']} ({', '.join(failed)})"


# ---------------------------------------------------------------------------------------------
# Tests


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values; NaN entries stay NaN and do not count in m."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    known = np.flatnonzero(~np.isnan(p))
    m = len(known)
    if m == 0:
        return adjusted
    order = known[np.argsort(p[known], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    """Hedges' g of a minus b: Cohen's d on the pooled sd times J = 1 - 3 / (4 (n1 + n2) - 9).

    NaN with fewer than two values in either group or a zero pooled sd (no scale to measure by).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n1, n2 = len(a), len(b)
    if n1 < 2 or n2 < 2:
        return np.nan
    pooled_var = ((n1 - 1) * a.var(ddof=1) + (n2 - 1) * b.var(ddof=1)) / (n1 + n2 - 2)
    if pooled_var <= 0:
        return np.nan
    correction = 1.0 - 3.0 / (4.0 * (n1 + n2) - 9.0)
    return float(correction * (a.mean() - b.mean()) / np.sqrt(pooled_var))


def bootstrap_diff_ci(
    a: Sequence[float], b: Sequence[float], samples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(a) - mean(b), resampling each group on its own.

    Deterministic for a given seed (numpy Generator). NaN, NaN when a group is empty.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return np.nan, np.nan
    rng = np.random.default_rng(seed)
    means_a = a[rng.integers(0, len(a), size=(samples, len(a)))].mean(axis=1)
    means_b = b[rng.integers(0, len(b), size=(samples, len(b)))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means_a - means_b, [tail, 100.0 - tail])
    return float(low), float(high)


TEST_COLUMNS = [
    "seq_len", "metric", "test", "model_a", "model_b", "n_a", "n_b", "mean_a", "mean_b",
    "statistic", "p_value", "p_holm", "significant", "ci_low", "ci_high", "note",
]


def _row(seq_len, metric, test, model_a, model_b, a, b, **values) -> dict:
    row = dict.fromkeys(TEST_COLUMNS, np.nan)
    row |= {
        "seq_len": int(seq_len), "metric": metric, "test": test,
        "model_a": model_a, "model_b": model_b, "n_a": len(a), "n_b": len(b),
        "mean_a": float(np.mean(a)) if len(a) else np.nan,
        "mean_b": float(np.mean(b)) if len(b) else np.nan,
        "note": "",
    }
    row |= values
    return row


def _too_few(a, b, needed: int = 2) -> str:
    if len(a) < needed or len(b) < needed:
        return f"insufficient data: {len(a)} and {len(b)} completed runs (need >= {needed} each)"
    return ""


def _val_ppl_tests(seq_len, model_a, model_b, runs_a, runs_b, bootstrap_samples, bootstrap_seed):
    done_a = runs_a[runs_a["status"] == COMPLETED].dropna(subset=["final_val_ppl"])
    done_b = runs_b[runs_b["status"] == COMPLETED].dropna(subset=["final_val_ppl"])
    a = done_a["final_val_ppl"].to_numpy(dtype=float)
    b = done_b["final_val_ppl"].to_numpy(dtype=float)
    args = (seq_len, "val_ppl")
    too_few = _too_few(a, b)
    rows = []

    if too_few:
        rows.append(_row(*args, "welch_t", model_a, model_b, a, b, note=too_few))
    else:
        result = sps.ttest_ind(a, b, equal_var=False)
        note = "" if np.isfinite(result.pvalue) else "undefined: both groups have zero variance"
        rows.append(_row(*args, "welch_t", model_a, model_b, a, b, statistic=result.statistic,
                         p_value=result.pvalue, note=note))

    if too_few:
        rows.append(_row(*args, "mann_whitney_u", model_a, model_b, a, b, note=too_few))
    else:
        result = sps.mannwhitneyu(a, b, alternative="two-sided")
        rows.append(_row(*args, "mann_whitney_u", model_a, model_b, a, b,
                         statistic=result.statistic, p_value=result.pvalue))

    paired = done_a[["seed", "final_val_ppl"]].merge(
        done_b[["seed", "final_val_ppl"]], on="seed", suffixes=("_a", "_b")
    ).sort_values("seed")
    pa = paired["final_val_ppl_a"].to_numpy(dtype=float)
    pb = paired["final_val_ppl_b"].to_numpy(dtype=float)
    nonzero = int(np.count_nonzero(pa - pb))
    seeds = ",".join(str(s) for s in paired["seed"])
    if nonzero < 1:
        note = (f"cannot run: {len(paired)} seeds completed by both, {nonzero} nonzero "
                "differences (need >= 1)")
        rows.append(_row(*args, "wilcoxon_signed_rank", model_a, model_b, pa, pb, note=note))
    else:
        result = sps.wilcoxon(pa, pb, zero_method="wilcox", alternative="two-sided")
        note = f"paired by seed ({seeds})"
        if nonzero < len(paired):
            note += f"; {len(paired) - nonzero} zero differences dropped"
        rows.append(_row(*args, "wilcoxon_signed_rank", model_a, model_b, pa, pb,
                         statistic=result.statistic, p_value=result.pvalue, note=note))

    g = hedges_g(a, b)
    note = too_few or ("" if np.isfinite(g) else "undefined: pooled standard deviation is zero")
    rows.append(_row(*args, "hedges_g", model_a, model_b, a, b, statistic=g, note=note))

    if too_few:
        rows.append(_row(*args, "bootstrap_mean_diff", model_a, model_b, a, b, note=too_few))
    else:
        low, high = bootstrap_diff_ci(a, b, bootstrap_samples, bootstrap_seed)
        rows.append(_row(*args, "bootstrap_mean_diff", model_a, model_b, a, b,
                         statistic=float(a.mean() - b.mean()), ci_low=low, ci_high=high,
                         note=f"95% percentile CI of mean_a - mean_b, {bootstrap_samples} "
                              f"resamples, seed {bootstrap_seed}"))
    return rows


def _divergence_test(seq_len, model_a, model_b, runs_a, runs_b):
    counted_a = runs_a[runs_a["status"] != OOM]
    counted_b = runs_b[runs_b["status"] != OOM]
    div_a = (counted_a["status"] == DIVERGED).to_numpy(dtype=float)
    div_b = (counted_b["status"] == DIVERGED).to_numpy(dtype=float)
    notes = []
    oom_a, oom_b = len(runs_a) - len(counted_a), len(runs_b) - len(counted_b)
    if oom_a or oom_b:
        notes.append(f"OOM runs excluded ({model_a}: {oom_a}, {model_b}: {oom_b})")
    too_few = _too_few(div_a, div_b)
    if too_few:
        notes.insert(0, too_few.replace("completed runs", "non-OOM runs"))
        return _row(seq_len, "divergence", "fisher_exact", model_a, model_b, div_a, div_b,
                    note="; ".join(notes))
    table = np.array([
        [div_a.sum(), div_b.sum()],
        [len(div_a) - div_a.sum(), len(div_b) - div_b.sum()],
    ], dtype=int)
    result = sps.fisher_exact(table, alternative="two-sided")
    notes.insert(0, "rows [diverged, not diverged] x columns [model_a, model_b] = "
                    f"{table.tolist()}; statistic is the sample odds ratio; means are rates")
    return _row(seq_len, "divergence", "fisher_exact", model_a, model_b, div_a, div_b,
                statistic=result.statistic, p_value=result.pvalue, note="; ".join(notes))


def compare(
    summaries: pd.DataFrame,
    alpha: float = 0.05,
    bootstrap_samples: int = 10000,
    bootstrap_seed: int = 0,
    models: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Tests between every pair of models at every seq_len (columns: TEST_COLUMNS).

    val_ppl (final validation perplexity of COMPLETED runs): welch_t, mann_whitney_u,
    wilcoxon_signed_rank (paired by seed), hedges_g (a minus b), bootstrap_mean_diff (CI of
    mean_a - mean_b). divergence (DIVERGED among non-OOM runs): fisher_exact. Holm's correction
    runs across sequence lengths within each (metric, test, model pair) family; significant is
    p_holm < alpha, and NA for the tests without a p-value. Insufficient data gives NaN and a
    note, never an exception.
    """
    rows = []
    order = model_order(summaries, models)
    for seq_len in sorted(summaries["seq_len"].unique()) if len(summaries) else []:
        at_len = summaries[summaries["seq_len"] == seq_len]
        present = [m for m in order if m in set(at_len["model"])]
        for model_a, model_b in itertools.combinations(present, 2):
            runs_a = at_len[at_len["model"] == model_a]
            runs_b = at_len[at_len["model"] == model_b]
            rows += _val_ppl_tests(seq_len, model_a, model_b, runs_a, runs_b,
                                   bootstrap_samples, bootstrap_seed)
            rows.append(_divergence_test(seq_len, model_a, model_b, runs_a, runs_b))

    tests = pd.DataFrame(rows, columns=TEST_COLUMNS)
    if tests.empty:
        return tests
    tests["p_value"] = tests["p_value"].astype(float)
    for _, family in tests.groupby(["metric", "test", "model_a", "model_b"], sort=False):
        tests.loc[family.index, "p_holm"] = holm(family["p_value"].to_numpy())
    tests["significant"] = pd.array(
        [pd.NA if np.isnan(p) else bool(p < alpha) for p in tests["p_holm"]], dtype="boolean"
    )
    return tests


# ---------------------------------------------------------------------------------------------
# Writing


def _atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path), then move it over path, so readers never see a half file."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_tables(
    run_dirs: Iterable[str | Path],
    out_summary_csv: str | Path,
    out_tests_csv: str | Path,
    out_curves_parquet: str | Path,
    alpha: float = 0.05,
    bootstrap_samples: int = 10000,
    bootstrap_seed: int = 0,
    models: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Load the runs and write summary.csv, tests.csv and curves.parquet atomically."""
    summaries, metrics = load_runs(run_dirs)
    summary = summarise(summaries, models)
    tests = compare(summaries, alpha, bootstrap_samples, bootstrap_seed, models)
    curves = aggregate_curves(metrics, summaries)
    return {
        "summary": _atomic_write(out_summary_csv, lambda p: summary.to_csv(p, index=False)),
        "tests": _atomic_write(out_tests_csv, lambda p: tests.to_csv(p, index=False)),
        "curves": _atomic_write(out_curves_parquet, lambda p: curves.to_parquet(p, index=False)),
    }


def loglog_slope(x, y) -> float:
    """Least-squares slope of log(y) on log(x) over the finite positive points.

    NaN with fewer than two distinct x: a scaling exponent (1 for O(N), 2 for O(N^2)).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    if len(np.unique(x)) < 2:
        return float("nan")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])
