"""Snakemake adapter: audit → fairlm.audit (the appendix enforces the result)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821
sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821, SIM115

from fairlm.audit import run_audit, write_audit  # noqa: E402

audit = run_audit(
    snakemake.params.run_dirs,  # noqa: F821
    snakemake.input.meta,  # noqa: F821
    snakemake.params.config,  # noqa: F821
)
write_audit(audit, snakemake.output[0])  # noqa: F821
for check in audit["checks"]:
    print(f"{check['name']}: {'pass' if check['passed'] else 'FAIL'}: {check['found']}",
          file=sys.stderr)
