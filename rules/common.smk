# Config resolution, the grid (model × seq_len × seed) and resources shared by every rule.
import os
import shlex
import shutil
import sys

# the library, also where it is not pip-installed (conda environments); scripts do the same
sys.path.insert(0, os.path.join(workflow.basedir, "src"))

from fairlm.config import ConfigError, resolve, run_config  # noqa: E402
from snakemake.exceptions import WorkflowError  # noqa: E402

# Fill every default from workflow/schemas/config.schema.yaml and reject a malformed config
# (naming the key) before any job runs.
try:
    config.update(resolve(config))
except ConfigError as error:
    raise WorkflowError(str(error)) from None

RUN = "results/runs/{model}/L{seq_len}/seed{seed}"
GRID = config["grid"]


wildcard_constraints:
    model="|".join(GRID["models"]),
    seq_len=r"[1-9][0-9]*",
    seed=r"[0-9]+",


def run_dirs():
    return expand(RUN, model=GRID["models"], seq_len=GRID["seq_lens"], seed=GRID["seeds"])


def run_files(name):
    return [f"{d}/{name}" for d in run_dirs()]


def figure_paths():
    figures = {f"loss_L{n}": f"paper/figures/loss_L{n}.png" for n in GRID["seq_lens"]}
    figures["summary"] = "paper/figures/summary.png"
    if config["bench"]["enabled"]:
        figures["scaling"] = "paper/figures/scaling.png"
    return figures


def reproduce_command():
    """The command that remakes the appendix with this config (stable across invocations, so
    that it does not trigger a re-run as a parameter would if it held sys.argv)."""
    words = ["snakemake", "paper/appendix.tex"]
    configfiles = [os.path.relpath(f) for f in workflow.overwrite_configfiles]
    if configfiles:
        words.extend(["--configfile", *configfiles])
    overrides = workflow.config_settings.overwrite_config
    if overrides:
        words.extend(["--config", *(f"{k}={v}" for k, v in overrides.items())])
    return shlex.join(words)


def figure_captions():
    """{label: (path, caption)}: one caption per figure kind, shared by the report and paper."""
    captions = {}
    for label, path in figure_paths().items():
        kind = label.split("_")[0]
        text = " ".join(open(workflow.source_path(f"../report/{kind}.rst")).read().split())
        if kind == "loss":
            text = f"Sequence length {int(label[len('loss_L'):]):,} tokens. {text}"
        captions[label] = (path, text)
    return captions


def latex_engine():
    return shutil.which("latexmk") or shutil.which("pdflatex")


def final_targets():
    targets = ["paper/appendix.tex", "results/audit/fairness.json"]
    if latex_engine():
        targets.append("paper/appendix.pdf")
    return targets


def per_length(table, seq_len, default, attempt):
    """A resource from the config's per-seq_len table, grown with each retry."""
    return int(table.get(str(seq_len), default)) * attempt


def train_mem_mb(wildcards, attempt):
    res = config["resources"]
    return per_length(res["mem_mb"], wildcards.seq_len, res["default_mem_mb"], attempt)


def train_runtime(wildcards, attempt):
    res = config["resources"]
    return per_length(res["runtime_min"], wildcards.seq_len, res["default_runtime_min"], attempt)
