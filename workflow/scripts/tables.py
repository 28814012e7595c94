"""Snakemake adapter: tables → fairlm.stats.write_tables."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821
sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821, SIM115

from fairlm.stats import write_tables  # noqa: E402

analysis = snakemake.params.analysis  # noqa: F821
write_tables(
    snakemake.params.run_dirs,  # noqa: F821
    snakemake.output.summary,  # noqa: F821
    snakemake.output.tests,  # noqa: F821
    snakemake.output.curves,  # noqa: F821
    alpha=analysis["alpha"],
    bootstrap_samples=analysis["bootstrap_samples"],
    bootstrap_seed=analysis["bootstrap_seed"],
)
