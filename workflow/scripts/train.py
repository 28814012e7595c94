"""Snakemake adapter: train → fairlm.train.train for one (model, seq_len, seed)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821
sys.stderr = open(snakemake.log[0], "a", buffering=1)  # noqa: F821, SIM115

import torch  # noqa: E402

from fairlm.train import train  # noqa: E402

run_config = snakemake.params.run_config  # noqa: F821
run = run_config["run"]
name = f"{run['model']}/L{run['seq_len']}/seed{run['seed']}"
# Failure injection for the recovery tests: FAIRLM_FAIL_RUN="mamba/L128/seed43,..."
if name in os.environ.get("FAIRLM_FAIL_RUN", "").split(","):
    raise RuntimeError(f"failure injected for {name} by FAIRLM_FAIL_RUN")
if run_config["train"]["threads"] is None:
    torch.set_num_threads(snakemake.threads)  # noqa: F821

train(
    run_config,
    data_dir=Path(snakemake.input[0]).parent,  # noqa: F821
    out_dir=Path(snakemake.output.summary).parent,  # noqa: F821
    checkpoint_dir=snakemake.params.checkpoint_dir,  # noqa: F821
    log=lambda message: print(message, file=sys.stderr),
)
