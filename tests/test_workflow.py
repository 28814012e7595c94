"""The Snakemake workflow end to end on the tiny config: every output, a failed seed re-run
alone, a killed run resumed exactly, malformed configs rejected before any job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, tiny_raw_config

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(workdir: Path, *args: str, env: dict | None = None, timeout: int = 900):
    command = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def write_config(folder: Path, overrides: dict | None = None) -> Path:
    from fairlm.config import merge

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(merge(tiny_raw_config(), overrides or {})))
    return path


def jobs_run(output: str) -> dict[str, int]:
    """The 'Job stats' table that Snakemake prints before it runs anything."""
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    rows = re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)
    return {m[1]: int(m[2]) for m in rows if m[1] != "total"}


def test_lint_is_clean():
    result = subprocess.run([*SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr


def test_paper_protocol_plans_30_training_jobs(tmp_path):
    # --configfile takes several values: targets go before it
    result = snakemake(tmp_path, "paper/appendix.tex", "-n", "--cores", "1", "--configfile",
                       str(REPO / "config" / "config.yaml"))
    assert result.returncode == 0, result.stderr
    assert jobs_run(result.stdout + result.stderr)["train"] == 30


@pytest.mark.parametrize("overrides, named", [
    ({"grid": {"models": ["resnet_bk", "transformer"]}}, "transformer"),
    ({"train": {"lr": -0.1}}, "train.lr"),
    ({"grid": {"seeds": []}}, "grid.seeds"),
    ({"train": {"warmup": 10}}, "warmup"),
])
def test_malformed_config_is_rejected_before_any_job(tmp_path, overrides, named):
    config = write_config(tmp_path / "cfg", overrides)
    result = snakemake(tmp_path / "work", "--cores", "1", "--configfile", str(config))
    assert result.returncode != 0
    assert named in result.stderr
    assert not (tmp_path / "work" / "results").exists()


@pytest.fixture(scope="module")
def tiny_workflow(tmp_path_factory):
    """One tiny pipeline run: first with a seed that fails on purpose, then the recovery."""
    work = tmp_path_factory.mktemp("workflow")
    config = write_config(work / "cfg")
    failed = snakemake(work, "--cores", "2", "--keep-going", "--configfile", str(config),
                       env={"FAIRLM_FAIL_RUN": "mamba/L16/seed2"})
    failed.completed_runs = sorted(
        p.parent.relative_to(work) for p in work.glob("results/runs/*/L*/seed*/summary.json"))
    failed.made_appendix = (work / "paper/appendix.tex").exists()
    recovered = snakemake(work, "--cores", "2", "--configfile", str(config))
    return work, failed, recovered


@pytest.mark.slow
def test_a_failed_seed_leaves_the_others_and_is_rerun_alone(tiny_workflow):
    work, failed, recovered = tiny_workflow
    assert failed.returncode != 0
    assert "failure injected for mamba/L16/seed2" in failed.stdout + failed.stderr
    assert len(failed.completed_runs) == 7
    assert Path("results/runs/mamba/L16/seed2") not in failed.completed_runs
    assert not failed.made_appendix
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    output = recovered.stdout + recovered.stderr
    planned = jobs_run(output)
    assert planned["train"] == 1 and "prepare_data" not in planned
    assert "wildcards: model=mamba, seq_len=16, seed=2" in output


@pytest.mark.slow
def test_every_output_exists_and_the_appendix_reports_measured_numbers(tiny_workflow):
    work, _, recovered = tiny_workflow
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    for model in ("resnet_bk", "mamba"):
        for seq_len in (16, 64):
            for seed in (1, 2):
                run = work / f"results/runs/{model}/L{seq_len}/seed{seed}"
                for name in ("metrics.parquet", "summary.json", "config.json", "system.json"):
                    assert (run / name).is_file(), run / name
    for path in ("results/data/meta.json", "results/tables/summary.csv", "results/tables/tests.csv",
                 "results/tables/curves.parquet", "results/audit/fairness.json",
                 "paper/figures/loss_L16.png", "paper/figures/loss_L64.png",
                 "paper/figures/summary.png", "paper/appendix.tex"):
        assert (work / path).is_file(), path
    summary = pd.read_csv(work / "results/tables/summary.csv")
    tex = (work / "paper/appendix.tex").read_text()
    printed = [float(v) for v in re.findall(r"\\ppl\{([0-9.]+)\}", tex)]
    assert printed, "the appendix prints no perplexity"
    values = summary.filter(regex="ppl").to_numpy(dtype=float).ravel()
    values = values[np.isfinite(values)]
    for value in printed:
        assert np.isclose(values, value, rtol=5e-4).any(), f"{value} is not in summary.csv"
    assert not list(work.glob("results/**/.*.tmp")), "a temporary file was left behind"


@pytest.mark.slow
def test_the_appendix_compiles_to_a_pdf_with_a_page_that_is_not_blank(tiny_workflow):
    import shutil

    if not shutil.which("pdflatex"):
        pytest.skip("pdflatex is not installed (Debian: texlive-latex-base)")
    if not shutil.which("pdftoppm"):
        pytest.skip("pdftoppm is not installed (Debian: poppler-utils)")
    work, _, recovered = tiny_workflow
    assert recovered.returncode == 0
    pdf = work / "paper/appendix.pdf"
    assert pdf.is_file() and pdf.read_bytes().startswith(b"%PDF")
    subprocess.run(["pdftoppm", "-r", "50", "-f", "1", "-l", "1", "-png", str(pdf),
                    str(work / "page")], check=True)
    from matplotlib.image import imread

    page = imread(next(work.glob("page*.png")))
    assert page.std() > 0.02, "page 1 is blank"


@pytest.mark.slow
def test_sigkill_then_rerun_incomplete_resumes_and_matches(tmp_path):
    overrides = {"grid": {"models": ["resnet_bk"], "seq_lens": [64], "seeds": [3],
                          "steps": {64: 120}},
                 "train": {"checkpoint_every": 10, "eval_every": 60, "log_every": 10}}
    target = "results/runs/resnet_bk/L64/seed3/metrics.parquet"
    reference = tmp_path / "reference"
    config = write_config(reference / "cfg", overrides)
    assert snakemake(reference, target, "--cores", "1", "--configfile", str(config)).returncode == 0

    killed = tmp_path / "killed"
    config = write_config(killed / "cfg", overrides)
    command = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(killed), target, "--cores",
               "1", "--configfile", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    checkpoints = killed / "results/checkpoints/resnet_bk/L64/seed3"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("step_00000030.sha256")) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / target).is_file()

    assert snakemake(killed, "--unlock", "--configfile", str(config)).returncode == 0
    resumed = snakemake(killed, target, "--cores", "1", "--rerun-incomplete", "--configfile",
                        str(config))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (killed / "logs/train/resnet_bk/L64/seed3.log").read_text()
    assert re.search(r"resuming from checkpoint step_000000[3-9]0\.pt", log), log
    a = pd.read_parquet(reference / target)
    b = pd.read_parquet(killed / target)
    timing = ["tokens_per_s", "peak_mem_mb", "elapsed_s"]
    pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing))
    assert not checkpoints.exists()


@pytest.mark.slow
def test_the_html_report_has_every_figure_with_its_caption(tiny_workflow, tmp_path):
    work, _, recovered = tiny_workflow
    assert recovered.returncode == 0
    config = work / "cfg" / "config.yaml"
    report = tmp_path / "report.html"
    result = snakemake(work, "--report", str(report), "--configfile", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    html = report.read_text(errors="replace")
    for name in ("loss_L16.png", "loss_L64.png", "summary.png"):
        assert name in html
    for caption in ("Training loss against optimiser step", "Final validation perplexity"):
        assert caption in html


@pytest.mark.slow
def test_learning_rate_10_ends_runs_diverged_and_the_appendix_says_so(tmp_path):
    config = write_config(tmp_path / "cfg", {
        "grid": {"seq_lens": [16], "seeds": [1, 2]}, "train": {"lr": 10.0, "min_lr": 1.0}})
    result = snakemake(tmp_path, "paper/appendix.tex", "--cores", "2", "--configfile",
                       str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    for model in ("resnet_bk", "mamba"):
        for seed in (1, 2):
            summary = yaml.safe_load(
                (tmp_path / f"results/runs/{model}/L16/seed{seed}/summary.json").read_text())
            assert summary["status"] == "DIVERGED" and summary["diverged_at_step"] >= 1
    tex = (tmp_path / "paper/appendix.tex").read_text()
    assert "ResNet-BK diverged in 2 of 2 seeds at 16 tokens" in tex
    assert "Mamba diverged in 2 of 2 seeds" in tex


def tamper_lr(run: Path):
    import json

    path = run / "config.json"
    config = json.loads(path.read_text())
    config["train"]["lr"] *= 2
    path.write_text(json.dumps(config))


def tamper_data_order(run: Path):
    metrics = pd.read_parquet(run / "metrics.parquet")
    metrics["batch_sha"] = metrics["batch_sha"].iloc[::-1].to_numpy()
    metrics.to_parquet(run / "metrics.parquet", index=False)


def tamper_oom_as_divergence(run: Path):
    import json

    path = run / "summary.json"
    summary = json.loads(path.read_text())
    summary.update(status="OOM", diverged_at_step=3, divergence_reason="out of memory")
    path.write_text(json.dumps(summary))


@pytest.mark.slow
@pytest.mark.parametrize("tamper, check", [
    (tamper_lr, "identical_settings"),
    (tamper_data_order, "identical_data"),
    (tamper_oom_as_divergence, "honest_outcomes"),
])
def test_planted_unfairness_stops_the_pipeline_before_the_appendix(
        tiny_workflow, tmp_path, tamper, check):
    import shutil

    source, _, recovered = tiny_workflow
    assert recovered.returncode == 0
    work = tmp_path / "work"
    shutil.copytree(source, work, symlinks=True)
    tamper(work / "results/runs/mamba/L64/seed1")
    config = write_config(work / "cfg")
    result = snakemake(work, "paper/appendix.tex", "--cores", "1", "--configfile", str(config))
    assert result.returncode != 0
    log = (work / "logs/appendix.log").read_text()
    assert "fairness audit failed" in log and f"{check}:" in log
    assert not (work / "paper/appendix.tex").exists()
    audit = yaml.safe_load((work / "results/audit/fairness.json").read_text())
    assert check in audit["failed"]


@pytest.mark.slow
def test_a_non_causal_model_is_caught_and_an_allowed_failure_is_boxed(tmp_path):
    overrides = {"grid": {"seq_lens": [16], "seeds": [1]}, "resnet_bk": {"causal": False}}
    config = write_config(tmp_path / "cfg", overrides)
    result = snakemake(tmp_path, "paper/appendix.tex", "--cores", "2", "--configfile",
                       str(config))
    assert result.returncode != 0
    log = (tmp_path / "logs/appendix.log").read_text()
    assert "fairness audit failed" in log and "causality:" in log
    assert not (tmp_path / "paper/appendix.tex").exists()

    overrides["analysis"] = {"allow_failed_checks": ["causality"]}
    config = write_config(tmp_path / "cfg", overrides)
    result = snakemake(tmp_path, "paper/appendix.tex", "--cores", "2", "--configfile",
                       str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    tex = (tmp_path / "paper/appendix.tex").read_text()
    assert "\\fbox" in tex and "causality" in tex.lower()
