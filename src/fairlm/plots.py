"""Figures for the paper, drawn from the tables alone (curves, summary, scaling).

Every function writes a 300 dpi PNG atomically and returns its path. Missing data is drawn as
missing (an annotation says so) rather than raising: an all-diverged cell is a result.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fairlm.io import atomic_path  # noqa: E402
from fairlm.stats import loglog_slope as loglog_fit  # noqa: E402

DPI = 300
# A log y-axis only helps when the curve spans more than an order of magnitude.
LOG_Y_RATIO = 10.0
# Scaling slopes are fitted on the long-context regime, where the asymptotic cost dominates.
SLOPE_MIN_SEQ_LEN = 8192
LABELS = {"resnet_bk": "ResNet-BK", "mamba": "Mamba"}


def _label(model: str) -> str:
    return LABELS.get(model, model)


def _models(frame: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(frame["model"])) if "model" in frame and len(frame) else []


def _colours(models: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {model: cycle[i % len(cycle)] for i, model in enumerate(models)}


def _save(fig, out_png: str | Path) -> Path:
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches=None)
    finally:
        plt.close(fig)
    return Path(out_png)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def plot_loss_curves(
    curves_df: pd.DataFrame, summaries_df: pd.DataFrame, seq_len: int, out_png: str | Path
) -> Path:
    """Mean training loss per model with a ±1 std band and the min–max range, at one seq_len.

    Dashed vertical lines mark each diverged seed's step, labelled with the seed. The std band
    is absent where a single seed is alive (std is NaN there).
    """
    curves = curves_df[curves_df["seq_len"] == seq_len]
    runs = summaries_df[summaries_df["seq_len"] == seq_len] if len(summaries_df) else summaries_df
    models = list(dict.fromkeys(_models(runs) + _models(curves)))
    colours = _colours(models)

    fig, ax = plt.subplots(figsize=(7.0, 4.2), layout="constrained")
    seed_counts = []
    for model in models:
        colour = colours[model]
        curve = curves[(curves["model"] == model)].sort_values("step")
        of_model = runs[runs["model"] == model] if len(runs) else runs
        n_seeds = len(of_model)
        diverged = of_model[of_model["status"] == "DIVERGED"] if n_seeds else of_model
        seed_counts.append(f"{_label(model)} {n_seeds}" + (f" ({len(diverged)} diverged)"
                                                             if len(diverged) else ""))
        if len(curve) and curve["loss_mean"].notna().any():
            step = curve["step"].to_numpy()
            mean, std = curve["loss_mean"].to_numpy(float), curve["loss_std"].to_numpy(float)
            ax.fill_between(step, curve["loss_min"], curve["loss_max"], color=colour,
                            alpha=0.12, linewidth=0, label=f"{_label(model)} min–max")
            ax.fill_between(step, mean - std, mean + std, color=colour, alpha=0.3,
                            linewidth=0, label=f"{_label(model)} ±1 std")
            ax.plot(step, mean, color=colour, linewidth=1.2, label=f"{_label(model)} mean")
        else:
            ax.plot([], [], color=colour, label=f"{_label(model)}: no finite loss")
        for i, (_, run) in enumerate(diverged.sort_values("diverged_at_step").iterrows()):
            if pd.isna(run.get("diverged_at_step")):
                continue
            at = float(run["diverged_at_step"])
            ax.axvline(at, color=colour, linestyle="--", linewidth=0.8,
                       label=f"{_label(model)} divergence" if i == 0 else None)
            # Labels sit at the foot of the line, clear of the legend in the top corner.
            ax.annotate(f"seed {run['seed']}", xy=(at, 0.0), xycoords=("data", "axes fraction"),
                        xytext=(2, 3), textcoords="offset points", rotation=90,
                        fontsize=6, color=colour, ha="left", va="bottom")

    finite = curves[["loss_min", "loss_max"]].to_numpy(float) if len(curves) else np.array([])
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if finite.size and finite.max() / finite.min() > LOG_Y_RATIO:
        ax.set_yscale("log")
    if not finite.size:
        _no_data(ax, "no finite training loss at this sequence length")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(f"Training loss, sequence length {int(seq_len):,} tokens; "
                 f"seeds: {', '.join(seed_counts) or 'none'}", fontsize=9)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right", ncol=max(1, len(models)))
    return _save(fig, out_png)


def _offset_positions(seq_lens: np.ndarray, index: int, count: int) -> np.ndarray:
    # Models side by side on a log axis: a small multiplicative nudge keeps error bars apart.
    return seq_lens * 1.06 ** (index - (count - 1) / 2)


def plot_summary(summary_df: pd.DataFrame, out_png: str | Path) -> Path:
    """Two panels against seq_len (log x): final validation perplexity (mean ± std over
    completed seeds) and divergence rate (diverged / non-OOM runs, annotated k/n)."""
    models = _models(summary_df)
    colours = _colours(models)
    fig, (ax_ppl, ax_div) = plt.subplots(1, 2, figsize=(9.0, 3.8), layout="constrained")
    seq_lens = sorted(summary_df["seq_len"].unique()) if len(summary_df) else []

    for index, model in enumerate(models):
        rows = summary_df[summary_df["model"] == model].sort_values("seq_len")
        x = _offset_positions(rows["seq_len"].to_numpy(float), index, len(models))
        mean = rows["val_ppl_mean"].to_numpy(float)
        std = np.nan_to_num(rows["val_ppl_std"].to_numpy(float))  # one seed: no bar
        has = np.isfinite(mean)
        if has.any():
            ax_ppl.errorbar(x[has], mean[has], yerr=std[has], color=colours[model], marker="o",
                            capsize=3, linewidth=1.2, label=_label(model))
        for xi in x[~has]:
            ax_ppl.annotate("no completed run", xy=(xi, 0.02), xycoords=("data", "axes fraction"),
                            rotation=90, fontsize=6, color=colours[model], ha="center")

        counted = (rows["seeds"] - rows["oom"]).to_numpy(float)
        diverged = rows["diverged"].to_numpy(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(counted > 0, diverged / counted, np.nan)
        ax_div.plot(x, rate, color=colours[model], marker="s", linewidth=1.2, label=_label(model))
        for xi, r, k, n in zip(x, rate, diverged, counted, strict=True):
            if np.isfinite(r):
                # stacked per model so equal rates do not print on top of each other
                ax_div.annotate(f"{int(k)}/{int(n)}", xy=(xi, r), xytext=(0, 5 + 8 * index),
                                textcoords="offset points", fontsize=6, ha="center",
                                color=colours[model])

    for ax in (ax_ppl, ax_div):
        ax.set_xscale("log")
        if seq_lens:
            ax.set_xticks(seq_lens, [f"{int(n):,}" for n in seq_lens])
            ax.minorticks_off()
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(True, alpha=0.3)
    ax_ppl.set_ylabel("final validation perplexity")
    ax_ppl.set_title("Validation perplexity (mean ± std, completed seeds)", fontsize=9)
    ax_div.set_ylabel("divergence rate")
    ax_div.set_ylim(-0.05, 1.2)
    ax_div.set_title("Divergence rate (diverged / non-OOM runs)", fontsize=9)
    if not models:
        _no_data(ax_ppl, "no runs")
        _no_data(ax_div, "no runs")
    for ax in (ax_ppl, ax_div):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, out_png)


def loglog_slope(seq_len: np.ndarray, values: np.ndarray) -> tuple[float, str]:
    """Least-squares slope of log(values) on log(seq_len) and the range it was fitted on.

    Fitted over seq_len >= SLOPE_MIN_SEQ_LEN when two such points exist, else over all; NaN
    with fewer than two points.
    """
    seq_len, values = np.asarray(seq_len, float), np.asarray(values, float)
    keep = np.isfinite(values) & (values > 0) & np.isfinite(seq_len) & (seq_len > 0)
    seq_len, values = seq_len[keep], values[keep]
    long = seq_len >= SLOPE_MIN_SEQ_LEN
    if long.sum() >= 2:
        seq_len, values, where = seq_len[long], values[long], f"N ≥ {SLOPE_MIN_SEQ_LEN}"
    else:
        where = "all N"
    return loglog_fit(seq_len, values), where


def plot_scaling(scaling_df: pd.DataFrame, out_png: str | Path) -> Path:
    """Forward+backward time and peak memory against sequence length, log-log, per model.

    Uses the rows with kind == "model". The legend gives each line's fitted log-log slope.
    Rows without a positive measurement (OOM, skipped) are marked with an x on the top edge.
    """
    rows = scaling_df[scaling_df["kind"] == "model"] if len(scaling_df) else scaling_df
    names = list(dict.fromkeys(rows["name"])) if len(rows) else []
    colours = _colours(names)
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8), layout="constrained")
    panels = [("seconds", "time per step (s)"), ("peak_mem_mb", "peak memory (MiB)")]

    for ax, (column, ylabel) in zip(axes, panels, strict=True):
        drawn = False
        for name in names:
            of_name = rows[rows["name"] == name].sort_values("seq_len")
            values = pd.to_numeric(of_name[column], errors="coerce").to_numpy(float)
            seq_len = of_name["seq_len"].to_numpy(float)
            ok = np.isfinite(values) & (values > 0)
            slope, where = loglog_slope(seq_len, values)
            slope_text = f"slope {slope:.2f}, {where}" if np.isfinite(slope) else "no slope"
            if ok.any():
                drawn = True
                ax.plot(seq_len[ok], values[ok], marker="o", color=colours[name],
                        linewidth=1.2, label=f"{_label(name)} ({slope_text})")
            statuses = (of_name["status"].astype(str).to_numpy() if "status" in of_name
                        else np.full(len(of_name), "failed"))
            for n, status in zip(seq_len[~ok], statuses[~ok], strict=True):
                ax.plot([n], [1.0], marker="x", color=colours[name], linestyle="none",
                        transform=ax.get_xaxis_transform(), clip_on=False)
                ax.annotate(str(status), xy=(n, 1.0), xycoords=("data", "axes fraction"),
                            xytext=(0, -10), textcoords="offset points", fontsize=6,
                            ha="center", color=colours[name])
        ax.set_xscale("log")
        if drawn:  # a log axis needs at least one positive value
            ax.set_yscale("log")
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
        else:
            _no_data(ax, "no successful measurement")
    fig.suptitle(_scaling_title(rows), fontsize=9)
    return _save(fig, out_png)


def _scaling_title(rows: pd.DataFrame) -> str:
    parts = []
    for column, name in [("d_model", "d_model"), ("n_layers", "layers"), ("batch_size", "batch")]:
        values = rows[column].dropna().unique() if column in rows and len(rows) else []
        if len(values) == 1:
            parts.append(f"{name} {values[0]}")
    return "Scaling with sequence length" + (f" ({', '.join(parts)})" if parts else "")
