"""Snakemake adapter: bench → fairlm.bench (scaling of both models and of the BK core)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821
sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821, SIM115

from fairlm.bench import run_scaling_benchmark, summarise_scaling  # noqa: E402
from fairlm.io import atomic_path, write_json  # noqa: E402
from fairlm.provenance import system_info  # noqa: E402

bench = snakemake.params.config["bench"]  # noqa: F821
table = run_scaling_benchmark(snakemake.params.config)  # noqa: F821
with atomic_path(snakemake.output.scaling) as tmp:  # noqa: F821
    table.to_csv(tmp, index=False)
summary = summarise_scaling(table, slope_range=(bench["slope_from"], max(bench["seq_lens"])))
summary["system"] = system_info()
write_json(snakemake.output.summary, summary)  # noqa: F821
print(table.to_string(), file=sys.stderr)
