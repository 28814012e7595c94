"""Snakemake adapter: appendix_pdf → fairlm.paper.compile_pdf (needs a LaTeX engine)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821
sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821, SIM115

from fairlm.paper import compile_pdf  # noqa: E402

pdf, reason = compile_pdf(snakemake.input.tex, wrapper=snakemake.input.wrapper)  # noqa: F821
if pdf is None:
    raise SystemExit(f"appendix.pdf not built: {reason}; paper/appendix.tex is the product")
print(f"compiled {pdf}", file=sys.stderr)
