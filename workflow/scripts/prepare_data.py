"""Snakemake adapter: prepare_data → fairlm.data.prepare."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821
sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821, SIM115

from fairlm.data import prepare  # noqa: E402

prepare(
    snakemake.params.data,  # noqa: F821
    snakemake.params.data_dir,  # noqa: F821
    Path(snakemake.output.meta).parent,  # noqa: F821
    log=lambda message: print(message, file=sys.stderr),
)
