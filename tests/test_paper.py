"""Appendix A: rendered from synthetic results, every perplexity traceable, compiled to PDF."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from fairlm import audit as fa  # noqa: E402
from fairlm import paper  # noqa: E402
from fairlm.stats import write_tables  # noqa: E402

MODELS = ["resnet_bk", "mamba"]
SEQ_LENS = [32, 64]
SEEDS = [42, 43, 44]
VOCAB = 40
NASTY = r"host_1 & 50% $x #y {z} ~a ^b <c> |d \e"


class CausalToy(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 4)
        self.head = nn.Linear(4, vocab)

    def forward(self, ids):
        h = self.embed(ids).cumsum(1)
        return self.head(h / torch.arange(1, ids.shape[1] + 1, dtype=h.dtype).view(1, -1, 1))


def _run(root, model, seq_len, seed, status="COMPLETED", diverged_at=None, steps=8):
    rng = np.random.default_rng(hash((model, seq_len, seed)) % 2**32)
    config = {
        "data": {"tokenizer": "bpe", "vocab_size": VOCAB},
        "model": {"d_model": 4, "n_layers": 1},
        "train": {"lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 2, "batch_size": 2,
                  "betas": [0.9, 0.999], "grad_clip": 1.0, "spike_factor": 3.0,
                  "spike_window": 4},
        "tokenizer_sha256": "cd" * 32,
        model: {"causal": True} if model == "resnet_bk" else {"d_state": 16},
        "run": {"model": model, "seq_len": seq_len, "seed": seed, "steps": steps},
    }
    rows = diverged_at or steps
    loss = list(np.linspace(6, 4, rows) + rng.normal(0, 0.01, rows))
    if status == "DIVERGED":
        loss[-1] = float("nan")
    shas = [hashlib.sha256(f"{seq_len}-{seed}-{s}".encode()).hexdigest()
            for s in range(1, rows + 1)]
    metrics = pd.DataFrame({
        "step": np.arange(1, rows + 1), "loss": loss, "lr": 1e-3, "grad_norm": 1.0,
        "tokens_per_s": 1000.0 + rng.normal(0, 10, rows), "peak_mem_mb": 50.0,
        "val_loss": np.nan, "spike": False, "batch_sha": shas, "elapsed_s": np.arange(rows)})
    done = status == "COMPLETED"
    ppl = float(np.exp(4 + rng.normal(0, 0.05) + (0.1 if model == "mamba" else 0)))
    summary = {
        "model": model, "seq_len": seq_len, "seed": seed, "status": status,
        "diverged_at_step": diverged_at, "divergence_reason":
            "non-finite loss" if status == "DIVERGED" else None,
        "steps_planned": steps, "steps_completed": rows - (status == "DIVERGED"),
        "final_train_loss": 4.0, "final_val_loss": float(np.log(ppl)) if done else None,
        "final_val_ppl": ppl if done else None,
        "final_val_word_ppl": ppl * 1.7 if done else None,
        "test_loss": None, "test_ppl": ppl * 1.01 if done else None,
        "test_word_ppl": ppl * 1.75 if done else None,
        "spikes": {"count": 0, "steps": []}, "tokens_seen": rows * 2 * seq_len,
        "tokens_per_s_mean": float(metrics["tokens_per_s"].mean()), "peak_mem_mb": 50.0,
        "wall_time_s": 1.0, "params": {"total": 400 if model == "mamba" else 380,
                                       "non_embedding": 240 if model == "mamba" else 220},
        "settings_hash": hashlib.sha256(f"{seq_len}-{seed}".encode()).hexdigest(),
    }
    system = {"hostname": NASTY, "cpu": NASTY, "cpu_count": 2,
              "memory_gb": 8.0, "gpus": [], "python": "3.11.2", "torch": "2.13.0+cpu",
              "cuda": None, "transformers": "5.0.0", "mamba_ssm": None, "mambapy": "1.2.0",
              "mamba_kernels": "chunked selective scan (CPU)" if model == "mamba"
              else "causal BK scan (torch)", "deterministic": False,
              "git_commit": "0123456789abcdef", "command": "snakemake --cores 2"}
    path = root / model / f"L{seq_len}" / f"seed{seed}"
    path.mkdir(parents=True)
    for name, obj in (("config", config), ("summary", summary), ("system", system)):
        (path / f"{name}.json").write_text(json.dumps(obj))
    metrics.to_parquet(path / "metrics.parquet")
    return path


def make_results(tmp_path, diverge=True, allow=()):
    """Synthetic runs -> the real stats tables, the real audit, a figure."""
    runs = tmp_path / "results" / "runs"
    dirs = []
    for seq_len in SEQ_LENS:
        for seed in SEEDS:
            for model in MODELS:
                failing = diverge and model == "mamba" and seq_len == 64 and seed != 43
                dirs.append(_run(runs, model, seq_len, seed,
                                 status="DIVERGED" if failing else "COMPLETED",
                                 diverged_at=5 + seed % 2 if failing else None))
    tables = tmp_path / "results" / "tables"
    write_tables(dirs, tables / "summary.csv", tables / "tests.csv", tables / "curves.parquet",
                 alpha=0.05, bootstrap_samples=200, models=MODELS)
    meta = tmp_path / "results" / "data" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"source": "synthetic_corpus (local)", "splits": {
        "train": {"tokens": 100}}, "tokenizer": {"kind": "bpe", "vocab_size": VOCAB,
                                                 "sha256": "ef" * 32}}))
    config = {"grid": {"models": MODELS}, "analysis": {
        "causality_tolerance": 1e-9, "causality_seq_len": 8, "allow_failed_checks": list(allow)}}
    audit = fa.run_audit(dirs, meta, config, lambda n, c, v: CausalToy(v))
    audit_path = fa.write_audit(audit, tmp_path / "results" / "audit" / "fairness.json")
    figure = tmp_path / "paper" / "figures" / "loss_curves_L64.png"
    figure.parent.mkdir(parents=True)
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [3, 1, 2])
    fig.savefig(figure, dpi=60)
    plt.close(fig)
    return {"summary_csv": tables / "summary.csv", "tests_csv": tables / "tests.csv",
            "audit_json": audit_path, "run_dirs": dirs, "meta_json": meta,
            "figures": {"loss_curves_L64": str(figure)},
            "out_tex": tmp_path / "paper" / "appendix.tex",
            "command": "snakemake --cores 2 --configfile config/quick_test.yaml"}


def render(inputs, **extra):
    return paper.render_appendix(**inputs, **extra).read_text()


PPL_COLUMNS = ["val_ppl_mean", "val_ppl_std", "test_ppl_mean", "test_ppl_std",
               "val_word_ppl_mean", "test_word_ppl_mean"]


def test_latex_escape_covers_every_special_character():
    assert paper.latex_escape(r"a\b&c%d$e#f_g{h}i~j^k<l>m|n") == (
        r"a\textbackslash{}b\&c\%d\$e\#f\_g\{h\}i\textasciitilde{}j\textasciicircum{}k"
        r"\textless{}l\textgreater{}m\textbar{}n")
    assert paper.latex_escape("naïve\tok ✓") == "naïve ok [U+2713]"
    already = paper.TeX(r"\ppl{1.0}")
    assert paper.latex_escape(already) is already


def test_number_formats():
    assert paper.fmt_int(32768) == "32{,}768"
    assert paper.fmt_ppl(123.456) == r"\ppl{123.5}"
    assert paper.fmt_ppl(12345.6) == r"\ppl{12{,}350}"
    assert paper.fmt_ppl(9.99951) == r"\ppl{10.00}"
    assert paper.fmt_ppl(float("nan")) == "---"
    assert paper.fmt_p(0.0004) == "$<0.001$"
    assert paper.fmt_p(0.0123) == "$0.012$"
    # three decimals would print 0.050 for a p below alpha: more digits keep the side
    assert paper.fmt_p(0.04996, alpha=0.05) == "$0.04996$"
    assert paper.fmt_num(-1.23456) == "$-$1.23"


def test_sentences_follow_the_counts():
    diverged = [{"model": "resnet_bk", "seeds": 5, "diverged": 0, "oom": 0},
                {"model": "mamba", "seeds": 5, "diverged": 3, "oom": 0,
                 "first_divergence_step": 4120}]
    assert paper.divergence_sentence(diverged, 32768) == (
        "Mamba diverged in 3 of 5 seeds at 32{,}768 tokens, first at step 4{,}120; "
        "ResNet-BK did not diverge.")
    calm = [dict(r, diverged=0) for r in diverged]
    assert paper.divergence_sentence(calm, 32768) == "Neither model diverged at 32{,}768 tokens."
    oom = [dict(diverged[0], oom=5), diverged[1]]
    assert "ResNet-BK ran out of memory in 5 of 5 seeds" in paper.oom_sentence(oom, 131072)
    assert paper.oom_sentence(calm, 8192) is None


def test_significance_is_claimed_only_below_alpha():
    rows = {("resnet_bk", 8192): {"val_ppl_mean": 50.0}, ("mamba", 8192): {"val_ppl_mean": 60.0}}
    test = {"seq_len": 8192, "metric": "val_ppl", "test": "welch_t", "model_a": "resnet_bk",
            "model_b": "mamba", "p_holm": 0.01, "note": ""}
    assert "is significant" in paper.significance_sentence(test, rows, alpha=0.05)
    assert "is not significant" in paper.significance_sentence(test, rows, alpha=0.005)
    missing = dict(test, p_holm=float("nan"), note="insufficient data: 1 and 0 runs")
    text = paper.significance_sentence(missing, rows, alpha=0.05)
    assert "not tested" in text and "significant" not in text


def test_appendix_content_comes_from_the_files(tmp_path):
    inputs = make_results(tmp_path)
    tex = render(inputs)
    summary = pd.read_csv(inputs["summary_csv"])
    # every printed perplexity is a summary.csv value at PPL_DIGITS significant digits
    allowed = {paper.round_sig(v, paper.PPL_DIGITS)
               for v in summary[PPL_COLUMNS].to_numpy().ravel() if np.isfinite(v)}
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    printed = [float(p.replace("{,}", ""))
               for p in re.findall(r"\\ppl\{((?:[^{}]|\{,\})*)\}", body)]
    assert len(printed) >= len(summary) * 4
    assert set(printed) <= allowed
    row = summary[(summary["model"] == "mamba") & (summary["seq_len"] == 64)].iloc[0]
    assert int(row["diverged"]) == 2
    assert (f"Mamba diverged in 2 of 3 seeds at 64 tokens, first at step "
            f"{int(row['first_divergence_step'])}") in tex
    assert "Neither model diverged at 32 tokens." in tex
    # the hyperparameters and provenance are those of the runs
    assert "$1 \\times 10^{-5}$" in tex and "0.9, 0.999" in tex
    assert "ResNet-BK" in tex and "Mamba" in tex
    assert "chunked selective scan (CPU)" in tex
    assert paper.latex_escape(NASTY) in tex and NASTY not in tex
    assert r"\includegraphics[width=\linewidth]{figures/loss_curves_L64.png}" in tex
    assert "The hashes agree for every sequence length and seed." in tex
    # exposure: 8 steps x 2 x 64 tokens over 100 train tokens = 10.24 epochs > 10
    assert "The exposure is large" in tex and "10.2" in tex
    # significance words follow the corrected p-values of tests.csv
    tests = pd.read_csv(inputs["tests_csv"])
    welch = tests[(tests["test"] == "welch_t") & (tests["seq_len"] == 32)].iloc[0]
    verdict = "is significant" if welch["p_holm"] < 0.05 else "is not significant"
    assert re.search(r"At 32 tokens, the mean validation perplexity .*? " + verdict, tex)
    assert "fairness check" not in tex  # no box: the audit passed


def test_a_failed_check_stops_the_appendix_unless_allowed(tmp_path):
    inputs = make_results(tmp_path)
    audit = json.loads(inputs["audit_json"].read_text())
    audit["checks"][0]["passed"] = False
    audit["checks"][0]["found"] = "settings differ: train.lr (resnet_bk=0.001, mamba=0.002)"
    inputs["audit_json"].write_text(json.dumps(audit))
    with pytest.raises(fa.AuditFailure, match="identical_settings"):
        render(inputs)
    assert not inputs["out_tex"].exists()
    tex = render(inputs, allow_failed_checks=["identical_settings"])
    box = tex.index(r"\fbox")
    assert tex.index("A.3 Results") < box < tex.index("Outcomes and perplexities")
    assert "identical\\_settings'' failed" in tex
    assert "train.lr (resnet\\_bk=0.001, mamba=0.002)" in tex


def test_bench_section_is_defensive(tmp_path):
    inputs = make_results(tmp_path, diverge=False)
    bench = tmp_path / "scaling.csv"
    pd.DataFrame({"kind": "model", "name": ["resnet_bk"] * 3 + ["mamba"] * 3,
                  "seq_len": [1024, 2048, 4096] * 2,
                  "seconds": [1.0, 2.0, 4.0, 1.0, 2.2, 4.9],
                  "peak_mem_mb": [10.0, 20.0, 40.0, 10, 21, 44], "status": "ok"}).to_csv(bench)
    bench_summary = tmp_path / "bench.json"
    bench_summary.write_text(json.dumps({"checks": [
        {"check": "core_speedup", "model": "resnet_bk", "value": 12.5, "target": ">= 20",
         "pass": False, "note": "N=4096, 50% of the loop"},
        {"check": "time_slope", "model": "mamba", "value": 1.02, "target": "<= 1.1",
         "pass": True, "note": "fit"}], "system": {"cpu": "Some CPU", "cpu_count": 2}}))
    tex = render(inputs, bench_csv=bench, bench_summary_json=bench_summary)
    assert "A.5 Scaling benchmark" in tex
    assert "ResNet-BK: time slope 1.00" in tex
    assert "BK core vs the sequential loop (speed-up) & ResNet-BK & 12.5" in tex
    assert r"\textbf{fail}" in tex and r"\textbf{pass}" in tex
    assert r"50\% of the loop" in tex and r"\textgreater{}= 20" in tex
    assert "Some CPU (2 cores)" in tex
    assert "4{,}096" in tex  # every measurement is listed
    assert "Neither model diverged at 64 tokens." in tex
    assert "A.5" not in render(inputs)


needs_pdflatex = pytest.mark.skipif(not shutil.which("pdflatex"),
                                    reason="pdflatex is not installed")


@needs_pdflatex
@pytest.mark.parametrize("driver", ["latexmk", "pdflatex"])
def test_the_appendix_compiles_to_a_visible_pdf(tmp_path, monkeypatch, driver):
    if driver == "latexmk" and not shutil.which("latexmk"):
        pytest.skip("latexmk is not installed")
    if driver == "pdflatex":  # hide latexmk: the engine runs twice by itself
        which = shutil.which
        monkeypatch.setattr(paper.shutil, "which",
                            lambda name: None if name == "latexmk" else which(name))
    inputs = make_results(tmp_path)
    tex_path = paper.render_appendix(**inputs)
    pdf, reason = paper.compile_pdf(tex_path, wrapper=paper.WRAPPER)
    assert pdf == tex_path.with_suffix(".pdf") and reason == ""
    assert pdf.read_bytes().startswith(b"%PDF")
    assert not list(pdf.parent.glob("appendix.build-*"))
    if not shutil.which("pdftoppm"):
        pytest.skip("pdftoppm is not installed (poppler-utils)")
    subprocess.run(["pdftoppm", "-png", "-r", "40", "-f", "1", "-l", "1", str(pdf),
                    str(tmp_path / "page")], check=True)
    page = mpimg.imread(next(tmp_path.glob("page*.png")))
    assert page.std() > 0.05  # text and rules, not a blank page


@needs_pdflatex
def test_a_latex_error_raises_and_leaves_nothing_behind(tmp_path):
    tex = tmp_path / "appendix.tex"
    tex.write_text("\\undefinedmacro\n")
    with pytest.raises(paper.LatexError, match="undefinedmacro"):
        paper.compile_pdf(tex, wrapper=paper.WRAPPER)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["appendix.tex"]


def test_compile_pdf_without_an_engine_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(paper.shutil, "which", lambda name: None)
    pdf, reason = paper.compile_pdf(tmp_path / "appendix.tex")
    assert pdf is None and "no LaTeX engine" in reason


def test_tables_made_with_another_alpha_are_refused(tmp_path):
    inputs = make_results(tmp_path)
    tests = pd.read_csv(inputs["tests_csv"])
    tested = tests.dropna(subset=["p_holm"])
    alpha = float(tested["p_holm"].min()) / 2 if tested["significant"].any() else 0.999
    if tested["significant"].astype(bool).eq(tested["p_holm"] < alpha).all():
        pytest.skip("no alpha separates these synthetic p-values")
    with pytest.raises(ValueError, match="another alpha"):
        render(inputs, alpha=alpha)


def test_enforce_names_every_refused_check():
    audit = {"checks": [{"name": n, "passed": n == "exposure", "found": f"{n} broke"}
                        for n in fa.CHECK_NAMES]}
    with pytest.raises(fa.AuditFailure) as caught:
        fa.enforce(audit, ["causality"])
    message = str(caught.value)
    assert all(n in message for n in ["identical_settings", "identical_data", "honest_outcomes"])
    assert "causality broke" not in message and "exposure" not in message
