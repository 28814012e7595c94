"""Snakemake adapter: appendix → fairlm.paper.render_appendix, after the audit gate."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821
sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821, SIM115

from fairlm.audit import enforce  # noqa: E402
from fairlm.io import read_json  # noqa: E402
from fairlm.paper import render_appendix  # noqa: E402

inputs = snakemake.input  # noqa: F821
# A failed fairness check stops the paper here, naming the check, unless the config allows it.
enforce(read_json(inputs.audit), snakemake.params.allow_failed_checks)  # noqa: F821
bench = list(inputs.bench)
render_appendix(
    summary_csv=inputs.summary,
    tests_csv=inputs.tests,
    audit_json=inputs.audit,
    run_dirs=snakemake.params.run_dirs,  # noqa: F821
    meta_json=inputs.meta,
    figures=snakemake.params.figures,  # noqa: F821
    out_tex=snakemake.output[0],  # noqa: F821
    bench_csv=bench[0] if bench else None,
    bench_summary_json=bench[1] if bench else None,
    command=snakemake.params.command,  # noqa: F821
    alpha=snakemake.params.alpha,  # noqa: F821
    template=inputs.template,
    allow_failed_checks=snakemake.params.allow_failed_checks,  # noqa: F821
)
