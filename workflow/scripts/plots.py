"""Snakemake adapter: plots → fairlm.plots (one figure per seq_len, a summary, the scaling)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821
sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821, SIM115

import pandas as pd  # noqa: E402

from fairlm import plots  # noqa: E402
from fairlm.stats import load_runs  # noqa: E402

curves = pd.read_parquet(snakemake.input.curves)  # noqa: F821
summary = pd.read_csv(snakemake.input.summary)  # noqa: F821
runs, _ = load_runs(snakemake.params.run_dirs)  # noqa: F821
for seq_len in snakemake.params.seq_lens:  # noqa: F821
    plots.plot_loss_curves(curves, runs, seq_len, snakemake.output[f"loss_L{seq_len}"])  # noqa: F821
plots.plot_summary(summary, snakemake.output.summary)  # noqa: F821
if snakemake.input.bench:  # noqa: F821
    plots.plot_scaling(pd.read_csv(snakemake.input.bench), snakemake.output.scaling)  # noqa: F821
