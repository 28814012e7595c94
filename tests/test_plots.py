"""fairlm.plots draws readable 300 dpi PNGs from small synthetic tables, edge cases included."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg
from PIL import Image

from fairlm import plots, stats


def assert_png(path, figsize):
    assert path.exists() and path.stat().st_size > 0
    assert not list(path.parent.glob(".*.tmp")), "a temporary file was left behind"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.info["dpi"] == pytest.approx((plots.DPI, plots.DPI), abs=0.1)
        assert img.size == (round(figsize[0] * plots.DPI), round(figsize[1] * plots.DPI))
    pixels = mpimg.imread(path)[..., :3]
    # A blank canvas has one colour; a drawn figure has lines, text and fills in many shades.
    assert pixels.std() > 0.02
    packed = (np.round(pixels * 255).astype(np.int64) * [65536, 256, 1]).sum(axis=-1)
    assert len(np.unique(packed)) > 50


def run_summaries(rows):
    columns = ["model", "seq_len", "seed", "status", "diverged_at_step"]
    return pd.DataFrame(rows, columns=columns)


def synthetic_curves(model, seq_len, n_steps, seeds, diverge_at=None, rng=None):
    rng = rng or np.random.default_rng(0)
    frames = []
    for seed in range(seeds):
        steps = np.arange(1, n_steps + 1)
        loss = 9.0 * steps ** -0.3 + rng.normal(0, 0.05, n_steps)
        if diverge_at is not None and seed == 0:
            steps, loss = steps[:diverge_at], loss[:diverge_at]
            loss[-1] = np.nan
        frames.append(pd.DataFrame({"model": model, "seq_len": seq_len, "seed": seed,
                                    "step": steps, "loss": loss}))
    return pd.concat(frames, ignore_index=True)


def test_loss_curves_with_divergence_and_a_single_seed(tmp_path):
    rng = np.random.default_rng(1)
    metrics = pd.concat([
        synthetic_curves("resnet_bk", 128, 200, seeds=3, diverge_at=120, rng=rng),
        synthetic_curves("mamba", 128, 200, seeds=1, rng=rng),  # single seed: no std band
    ])
    runs = run_summaries([
        ("resnet_bk", 128, 0, "DIVERGED", 120), ("resnet_bk", 128, 1, "COMPLETED", None),
        ("resnet_bk", 128, 2, "COMPLETED", None), ("mamba", 128, 0, "COMPLETED", None),
    ])
    curves = stats.aggregate_curves(metrics, runs)
    out = plots.plot_loss_curves(curves, runs, 128, tmp_path / "figs" / "loss_L128.png")
    assert out == tmp_path / "figs" / "loss_L128.png"
    assert_png(out, (7.0, 4.2))


def test_loss_curves_when_every_seed_diverged_at_once(tmp_path):
    metrics = pd.DataFrame({"model": "resnet_bk", "seq_len": 64, "seed": [0, 1],
                            "step": [1, 1], "loss": [np.nan, np.inf]})
    runs = run_summaries([("resnet_bk", 64, 0, "DIVERGED", 1), ("resnet_bk", 64, 1, "DIVERGED", 1)])
    curves = stats.aggregate_curves(metrics, runs)
    assert (curves["n_alive"] == 0).all()
    out = plots.plot_loss_curves(curves, runs, 64, tmp_path / "loss_L64.png")
    assert_png(out, (7.0, 4.2))


def summary_table():
    return pd.DataFrame({
        "model": ["resnet_bk"] * 3 + ["mamba"] * 3,
        "seq_len": [1024, 4096, 16384] * 2,
        "seeds": [3] * 6,
        "completed": [3, 1, 0, 3, 2, 3],
        "diverged": [0, 2, 3, 0, 0, 0],
        "oom": [0, 0, 0, 0, 1, 0],
        "val_ppl_mean": [40.0, 45.0, np.nan, 38.0, 39.0, 37.5],
        "val_ppl_std": [1.0, np.nan, np.nan, 0.8, 0.5, 0.7],
    })


def test_summary_plot_with_single_seed_and_all_diverged_cells(tmp_path):
    out = plots.plot_summary(summary_table(), tmp_path / "summary.png")
    assert_png(out, (9.0, 3.8))


def test_summary_plot_with_no_completed_run_anywhere(tmp_path):
    table = summary_table().assign(completed=0, diverged=3, oom=0, val_ppl_mean=np.nan,
                                   val_ppl_std=np.nan)
    assert_png(plots.plot_summary(table, tmp_path / "summary.png"), (9.0, 3.8))


def scaling_table():
    rows = []
    for n in [1024, 2048, 4096, 8192, 16384, 32768]:
        rows.append(("model", "resnet_bk", n, 2e-6 * n, 10 + 1e-3 * n, "ok"))
        quadratic_fail = n > 16384
        rows.append(("model", "mamba", n, np.nan if quadratic_fail else 1e-9 * n**2,
                     np.nan if quadratic_fail else 10 + 1e-6 * n**2,
                     "OOM" if quadratic_fail else "ok"))
        rows.append(("core", "bk_core", n, 1e-6 * n, 5.0, "ok"))  # not a model row
    frame = pd.DataFrame(rows, columns=["kind", "name", "seq_len", "seconds", "peak_mem_mb",
                                        "status"])
    return frame.assign(batch_size=1, d_model=64, n_layers=2, tokens_per_s=np.nan, note="")


def test_loglog_slope_uses_the_long_context_points():
    n = np.array([1024, 2048, 4096, 8192, 16384, 32768], float)
    # quadratic below 8192, linear from 8192 on: the fit must see only the linear part
    values = np.where(n < 8192, n**2, 8192 * n)
    slope, where = plots.loglog_slope(n, values)
    assert slope == pytest.approx(1.0) and "8192" in where
    slope, where = plots.loglog_slope(n[:3], n[:3] ** 2)
    assert slope == pytest.approx(2.0) and where == "all N"
    assert np.isnan(plots.loglog_slope(n[:1], n[:1])[0])


def test_scaling_plot_with_oom_rows(tmp_path):
    out = plots.plot_scaling(scaling_table(), tmp_path / "scaling.png")
    assert_png(out, (9.0, 3.8))


def test_scaling_plot_when_every_measurement_failed(tmp_path):
    table = scaling_table().assign(seconds=np.nan, peak_mem_mb=np.nan, status="OOM")
    assert_png(plots.plot_scaling(table, tmp_path / "scaling.png"), (9.0, 3.8))
