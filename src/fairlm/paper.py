"""Appendix A, rendered from the pipeline's results files, and its PDF.

`render_appendix` fills paper/templates/appendix.tex.j2 (Jinja2 with LaTeX-safe delimiters:
blocks \\BLOCK{...}, variables \\VAR{...}, comments \\#{...}, line statements starting with
%%, line comments with %#). Autoescape is off; instead every value the template prints goes
through `latex_escape` unless this module built it as LaTeX (`TeX`): text read from files
can never inject markup.

Every number printed comes from a results file. Perplexities are printed to PPL_DIGITS
significant digits inside \\ppl{...}, so that each printed value is a value of summary.csv
rounded to that many digits (the tests parse them back). p-values print with three decimals,
"< 0.001" below that, and with more decimals where three would cross alpha.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import jinja2
import pandas as pd

from fairlm.audit import AuditFailure, enforce, flatten  # noqa: F401  (re-exported for callers)
from fairlm.io import read_json_if_exists, write_text

PAPER_DIR = Path(__file__).resolve().parents[2] / "paper"
TEMPLATE = PAPER_DIR / "templates" / "appendix.tex.j2"
WRAPPER = PAPER_DIR / "appendix_standalone.tex"
PPL_DIGITS = 4
NUMBER_DIGITS = 3
DISPLAY_NAMES = {"resnet_bk": "ResNet-BK", "mamba": "Mamba"}
TEST_NAMES = {
    "welch_t": r"Welch's $t$-test",
    "mann_whitney_u": r"Mann--Whitney $U$",
    "wilcoxon_signed_rank": "Wilcoxon signed-rank",
    "hedges_g": r"Hedges' $g$",
    "bootstrap_mean_diff": "bootstrap mean difference",
    "fisher_exact": "Fisher's exact test",
}
METRIC_NAMES = {"val_ppl": "validation PPL", "divergence": "divergence rate"}
# The test whose corrected p-value the sentences of A.3 quote, per metric.
PRIMARY_TESTS = {"val_ppl": "welch_t", "divergence": "fisher_exact"}
SYSTEM_KEYS = [
    ("cpu", "CPU"), ("cpu_count", "CPU cores"), ("memory_gb", "memory (GB)"), ("gpus", "GPUs"),
    ("platform", "platform"), ("python", "Python"), ("torch", "PyTorch"), ("cuda", "CUDA"),
    ("transformers", "transformers"), ("mamba_ssm", "mamba-ssm"),
    ("causal_conv1d", "causal-conv1d"), ("mambapy", "mambapy"), ("fairlm", "fairlm"),
    ("deterministic", "deterministic algorithms"), ("git_commit", "git commit"),
]


class TeX(str):
    """A string that is already LaTeX: printed as it is."""


# ---------------------------------------------------------------------------------------------
# Escaping and number formats


_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
}
_SPECIAL = re.compile("|".join(re.escape(c) for c in _ESCAPES))


# typographic characters our own texts use, as LaTeX (after the ASCII specials are escaped)
_UNICODE = {
    "±": r"$\pm$", "×": r"$\times$", "−": r"$-$", "≤": r"$\leq$", "≥": r"$\geq$",
    "→": r"$\rightarrow$", "≈": r"$\approx$", "–": "--", "—": "---", "…": r"\ldots{}",
    "α": r"$\alpha$", "β": r"$\beta$", "Δ": r"$\Delta$", "σ": r"$\sigma$", "μ": r"$\mu$",
    "‘": "`", "’": "'", "“": "``", "”": "''", "\u00a0": "~",
}


def _printable(char: str) -> str:
    # pdflatex's utf8 input covers accented Latin letters; anything else would stop the build
    if char in "\n\r\t":
        return " "
    if ord(char) < 32:
        return ""
    if ord(char) < 128 or (ord(char) < 0x250 and char.isalpha()) or char in _UNICODE:
        return char
    return f"[U+{ord(char):04X}]"


def latex_escape(value) -> TeX:
    """Text -> LaTeX that prints it: escapes \\ & % $ # _ { } ~ ^ < > | and odd characters."""
    if isinstance(value, TeX):
        return value
    text = "".join(_printable(c) for c in str(value))
    text = _SPECIAL.sub(lambda m: _ESCAPES[m.group()], text)
    return TeX("".join(_UNICODE.get(c, c) for c in text))


def _missing(value) -> bool:
    if value is None or value is pd.NA:
        return True
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def round_sig(value: float, digits: int) -> float:
    return float(f"{float(value):.{digits}g}")


def _positional(value: float, digits: int) -> str:
    """`value` to `digits` significant digits, no exponent, thousands as {,}, minus as $-$."""
    rounded = round_sig(value, digits)
    if rounded == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(rounded))))
    text = f"{abs(rounded):,.{decimals}f}".replace(",", "{,}")
    return ("$-$" if rounded < 0 else "") + text


def fmt_int(value) -> TeX:
    if _missing(value):
        return TeX("---")
    return TeX(f"{int(value):,}".replace(",", "{,}").replace("-", "$-$"))


def fmt_num(value, digits: int = NUMBER_DIGITS) -> TeX:
    """A measured quantity: `digits` significant digits, whole numbers above that."""
    if _missing(value):
        return TeX("---")
    if abs(float(value)) >= 10**digits:
        return fmt_int(round(float(value)))
    return TeX(_positional(value, digits))


def fmt_ppl(value) -> TeX:
    """A perplexity as \\ppl{...}: PPL_DIGITS significant digits of the file's value."""
    if _missing(value):
        return TeX("---")
    return TeX(r"\ppl{" + _positional(value, PPL_DIGITS) + "}")


def fmt_ppl_pm(mean, std) -> TeX:
    if _missing(mean):
        return TeX("---")
    if _missing(std):
        return fmt_ppl(mean)
    return TeX(f"{fmt_ppl(mean)} $\\pm$ {fmt_ppl(std)}")


def _p_text(p: float, alpha: float | None) -> tuple[str, str]:
    if p < 0.001 and (alpha is None or alpha > 0.001):
        return "<", "0.001"
    decimals = 3
    text = f"{p:.{decimals}f}"
    # the printed value must stay on the side of alpha that the exact value is on
    while alpha is not None and (float(text) < alpha) != (p < alpha) and decimals < 10:
        decimals += 1
        text = f"{p:.{decimals}f}"
    return "=", text


def fmt_p(p, alpha: float | None = None) -> TeX:
    if _missing(p):
        return TeX("---")
    relation, text = _p_text(float(p), alpha)
    return TeX(f"${'<' if relation == '<' else ''}{text}$")


def p_clause(p, alpha: float, name: str = r"p_{\mathrm{Holm}}") -> TeX:
    relation, text = _p_text(float(p), alpha)
    return TeX(f"${name} {relation} {text}$")


def model_name(model: str) -> TeX:
    return latex_escape(DISPLAY_NAMES.get(model, model))


def seq_len_text(seq_len) -> TeX:
    return TeX(f"{fmt_int(seq_len)} tokens")


def _plural(count: int, word: str) -> str:
    return word if count == 1 else word + "s"


# ---------------------------------------------------------------------------------------------
# Reading results


def _read_runs(run_dirs: Sequence[str | Path]) -> list[dict]:
    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir)
        config = read_json_if_exists(path / "config.json")
        summary = read_json_if_exists(path / "summary.json")
        section = config.get("run", {})
        runs.append({
            "path": path, "config": config, "summary": summary,
            "system": read_json_if_exists(path / "system.json"),
            "model": section.get("model", summary.get("model")),
            "seq_len": int(section.get("seq_len", summary.get("seq_len"))),
            "seed": int(section.get("seed", summary.get("seed"))),
            "steps": section.get("steps", summary.get("steps_planned")),
        })
    return runs


def _model_order(*sources: Sequence[str]) -> list[str]:
    seen = [m for source in sources for m in source if isinstance(m, str)]
    known = [m for m in DISPLAY_NAMES if m in seen]
    return known + sorted(set(seen) - set(known))


# ---------------------------------------------------------------------------------------------
# A.1 identical hyperparameters


def _value_text(value) -> TeX:
    if isinstance(value, bool):
        return TeX("true" if value else "false")
    if isinstance(value, int):
        return fmt_int(value) if abs(value) >= 10_000 else TeX(str(value))
    if isinstance(value, float):
        return TeX(_p_repr(value))
    if isinstance(value, list):
        return TeX(", ".join(_value_text(v) for v in value))
    if value is None:
        return TeX("null")
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{32,}", value):
        return fmt_hash(value)
    return latex_escape(value)


def fmt_hash(value: str) -> TeX:
    """A long hex digest that may break across lines (every 16 digits)."""
    return TeX(r"\allowbreak{}".join(value[i:i + 16] for i in range(0, len(value), 16)))


def _float_math(value: float) -> str:
    """A config float as written, for math mode (0.001 stays 0.001; 1e-05 is 1 x 10^-5)."""
    text = repr(value)
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa} \\times 10^{{{int(exponent)}}}"
    return text


def _p_repr(value: float) -> str:
    text = _float_math(value)
    return f"${text}$" if "times" in text else text


def _settings_rows(runs: list[dict], models: list[str]) -> list[dict]:
    """Every shared setting (train, data, model, tokenizer), with all values the runs used."""
    values: dict[str, list] = defaultdict(list)
    for run in runs:
        shared = {k: v for k, v in run["config"].items() if k not in set(models) and k != "run"}
        for key, value in flatten(shared).items():
            text = json.dumps(value, sort_keys=True)
            if text not in [json.dumps(v, sort_keys=True) for v in values[key]]:
                values[key].append(value)
    rows = []
    for key in sorted(values, key=lambda k: (k.split(".")[0] != "train", k)):
        distinct = values[key]
        rows.append({"key": key, "value": TeX(" / ".join(_value_text(v) for v in distinct)),
                     "differs": len(distinct) > 1})
    return rows


def _hyperparameters(runs: list[dict], models: list[str], meta: dict) -> dict:
    steps = defaultdict(set)
    for run in runs:
        steps[run["seq_len"]].add(run["steps"])
    train = next((r["config"].get("train") for r in runs if r["config"].get("train")), {})
    model_sections = []
    for model in models:
        of_model = [r for r in runs if r["model"] == model]
        sections = {json.dumps(r["config"].get(model, {}), sort_keys=True) for r in of_model}
        shared = next((r["config"].get("model", {}) for r in of_model), {})
        params = next((r["summary"].get("params") for r in of_model
                       if r["summary"].get("params")), {}) or {}
        items = [{"key": f"model.{k}", "value": _value_text(v)} for k, v in sorted(shared.items())]
        for text in sorted(sections):
            items += [{"key": f"{model}.{k}", "value": _value_text(v)}
                      for k, v in sorted(json.loads(text).items())]
        model_sections.append({"model": model_name(model), "settings": items,
                               "params_total": fmt_int(params.get("total")),
                               "params_non_embedding": fmt_int(params.get("non_embedding")),
                               "variants": len(sections)})
    hashes = defaultdict(dict)
    for run in runs:
        hashes[(run["seq_len"], run["seed"])][run["model"]] = run["summary"].get("settings_hash")
    hash_rows = []
    for (seq_len, seed), by_model in sorted(hashes.items()):
        known = [h for h in by_model.values() if h]
        hash_rows.append({
            "seq_len": fmt_int(seq_len), "seed": seed,
            "hashes": [latex_escape((by_model.get(m) or "---")[:12]) for m in models],
            "agree": ("yes" if len(set(known)) == 1 and len(known) == len(models) else
                      "no" if len(set(known)) > 1 else "---")})
    tokenizer = meta.get("tokenizer", {})
    return {
        "settings": _settings_rows(runs, models),
        "train": {k: _value_text(v) for k, v in train.items()},
        "has_schedule": all(k in train for k in ("lr", "min_lr", "warmup_steps")),
        "steps": [{"seq_len": fmt_int(n), "steps": TeX(" / ".join(fmt_int(s) for s in sorted(
            v, key=lambda x: (x is None, x)))),
            "tokens_per_step": fmt_int(train.get("batch_size", 0) * n)
            if train.get("batch_size") else TeX("---")}
            for n, v in sorted(steps.items())],
        "models": model_sections,
        "hash_rows": hash_rows,
        "hashes_all_agree": bool(hash_rows) and all(r["agree"] == "yes" for r in hash_rows),
        "tokenizer": {"kind": tokenizer.get("kind"),
                      "vocab_size": fmt_int(tokenizer.get("vocab_size")),
                      "sha256": _value_text(tokenizer.get("sha256") or "not recorded")},
    }


# ---------------------------------------------------------------------------------------------
# A.2 reproducibility


def _system_rows(runs: list[dict]) -> list[dict]:
    rows = []
    systems = [r["system"] for r in runs if r["system"]]
    for key, label in SYSTEM_KEYS:
        counts = Counter()
        for system in systems:
            value = system.get(key, "not recorded")
            if key == "gpus":
                value = ", ".join(f"{g.get('name')} ({g.get('memory_gb')} GB)"
                                  for g in value or []) or "none"
            counts[json.dumps(value) if not isinstance(value, str) else value] += 1
        if not counts:
            continue
        parts = []
        for value, count in counts.most_common():
            shown = value if not value.startswith(("[", "{", '"')) else json.loads(value)
            text = latex_escape("none" if shown in (None, "null") else shown)
            parts.append(text if len(counts) == 1 else TeX(f"{text} ({count} runs)"))
        rows.append({"label": label, "value": TeX("; ".join(parts))})
    return rows


def _kernel_rows(runs: list[dict], models: list[str]) -> list[dict]:
    rows = []
    for model in models:
        counts = Counter(r["system"].get("mamba_kernels") or "not recorded"
                         for r in runs if r["model"] == model and r["system"])
        if counts:
            rows.append({"model": model_name(model), "kernels": TeX("; ".join(
                latex_escape(k) + (TeX(f" ({c} runs)") if len(counts) > 1 else "")
                for k, c in counts.most_common()))})
    return rows


# ---------------------------------------------------------------------------------------------
# A.3 results


def divergence_sentence(rows: list[dict], seq_len: int) -> TeX:
    """What happened to the runs at one length, in words chosen by the counts."""
    at = seq_len_text(seq_len)
    diverged = [r for r in rows if int(r.get("diverged") or 0) > 0]
    calm = [r for r in rows if int(r.get("diverged") or 0) == 0]
    if not diverged:
        if len(rows) == 2:
            return TeX(f"Neither model diverged at {at}.")
        if len(rows) == 1:
            return TeX(f"{model_name(rows[0]['model'])} did not diverge at {at}.")
        return TeX(f"No model diverged at {at}.")
    parts = []
    for row in diverged:
        count, seeds = int(row["diverged"]), int(row["seeds"])
        text = (f"{model_name(row['model'])} diverged in {count} of {seeds} "
                f"{_plural(seeds, 'seed')} at {at}")
        first = row.get("first_divergence_step")
        if not _missing(first):
            text += f", first at step {fmt_int(first)}"
        parts.append(text)
    sentence = "; ".join(parts)
    if calm:
        names = " and ".join(model_name(r["model"]) for r in calm)
        sentence += f"; {names} did not diverge"
    return TeX(sentence + ".")


def oom_sentence(rows: list[dict], seq_len: int) -> TeX | None:
    parts = []
    for row in rows:
        oom, seeds = int(row.get("oom") or 0), int(row["seeds"])
        if oom:
            parts.append(f"{model_name(row['model'])} ran out of memory in {oom} of {seeds} "
                         f"{_plural(seeds, 'seed')}")
    if not parts:
        return None
    return TeX("; ".join(parts) + f" at {seq_len_text(seq_len)}. Out-of-memory runs are "
               "reported as OOM and never counted as divergences.")


def _summary_lookup(summary: pd.DataFrame) -> dict:
    return {(r["model"], int(r["seq_len"])): r for r in summary.to_dict("records")}


def significance_sentence(test: dict, summary_rows: dict, alpha: float) -> TeX:
    """One sentence per primary test; 'significant' only when the corrected p is below alpha."""
    seq_len = int(test["seq_len"])
    a, b = test["model_a"], test["model_b"]
    name = TEST_NAMES.get(test["test"], latex_escape(test["test"]))
    at = seq_len_text(seq_len)
    if test["metric"] == "val_ppl":
        mean_a = summary_rows.get((a, seq_len), {}).get("val_ppl_mean")
        mean_b = summary_rows.get((b, seq_len), {}).get("val_ppl_mean")
        lead = (f"At {at}, the mean validation perplexity is {fmt_ppl(mean_a)} for "
                f"{model_name(a)} and {fmt_ppl(mean_b)} for {model_name(b)}")
        subject = "the difference"
    else:
        lead = f"At {at}, the divergence rates of {model_name(a)} and {model_name(b)}"
        subject = None
    if _missing(test.get("p_holm")):
        note = test.get("note")
        reason = f" ({latex_escape(note)})" if isinstance(note, str) and note else ""
        if subject:
            return TeX(f"{lead}; {subject} was not tested{reason}.")
        return TeX(f"{lead} were not compared{reason}.")
    significant = float(test["p_holm"]) < alpha
    stats = f"{name}, {p_clause(test['p_holm'], alpha)}, $\\alpha = {_float_math(float(alpha))}$"
    if subject:
        verdict = "is significant" if significant else "is not significant"
        return TeX(f"{lead}; {subject} {verdict} ({stats}).")
    verdict = "differ significantly" if significant else "do not differ significantly"
    return TeX(f"{lead} {verdict} ({stats}).")


def _check_alpha(tests: pd.DataFrame, alpha: float) -> None:
    """tests.csv's own significant column must agree with p_holm < alpha."""
    if "significant" not in tests or tests.empty:
        return
    for row in tests.to_dict("records"):
        flag = row["significant"]
        if _missing(row["p_holm"]) or _missing(flag) or isinstance(flag, float):
            continue
        expected = float(row["p_holm"]) < alpha
        if str(flag).lower() in ("true", "false") and (str(flag).lower() == "true") != expected:
            raise ValueError(f"tests.csv marks significant={flag} at p_holm={row['p_holm']} "
                             f"but alpha is {alpha}: the tables were made with another alpha")


def _statistic_text(row: dict) -> TeX:
    if row["test"] == "bootstrap_mean_diff" and not _missing(row.get("ci_low")):
        return TeX(f"{fmt_num(row['statistic'])} [{fmt_num(row['ci_low'])}, "
                   f"{fmt_num(row['ci_high'])}]")
    return fmt_num(row.get("statistic"))


def _results(summary: pd.DataFrame, tests: pd.DataFrame, models: list[str],
             alpha: float) -> dict:
    lookup = _summary_lookup(summary)
    seq_lens = sorted({int(n) for n in summary["seq_len"]}) if len(summary) else []
    outcome_rows, cost_rows, paragraphs = [], [], []
    for seq_len in seq_lens:
        rows = [lookup[(m, seq_len)] for m in models if (m, seq_len) in lookup]
        for row in rows:
            outcome_rows.append({
                "model": model_name(row["model"]), "seq_len": fmt_int(seq_len),
                "seeds": fmt_int(row.get("seeds")),
                "outcomes": TeX(f"{fmt_int(row.get('completed'))} / "
                                f"{fmt_int(row.get('diverged'))} / {fmt_int(row.get('oom'))}"),
                "val": fmt_ppl_pm(row.get("val_ppl_mean"), row.get("val_ppl_std")),
                "test": fmt_ppl_pm(row.get("test_ppl_mean"), row.get("test_ppl_std")),
                "val_word": fmt_ppl(row.get("val_word_ppl_mean")),
                "test_word": fmt_ppl(row.get("test_word_ppl_mean")),
            })
            cost_rows.append({
                "model": model_name(row["model"]), "seq_len": fmt_int(seq_len),
                "steps": fmt_int(row.get("steps_planned")),
                "tokens_per_s": fmt_num(row.get("tokens_per_s_mean")),
                "peak_mem_mb": fmt_num(row.get("peak_mem_mb_max")),
                "params_total": fmt_int(row.get("params_total")),
                "params_non_embedding": fmt_int(row.get("params_non_embedding")),
            })
        sentences = [divergence_sentence(rows, seq_len)]
        oom = oom_sentence(rows, seq_len)
        if oom:
            sentences.append(oom)
        notes = [r for r in rows if isinstance(r.get("note"), str) and r["note"]]
        sentences += [TeX(f"{model_name(r['model'])}: {latex_escape(r['note'])}.")
                      for r in notes]
        if len(tests):
            primary = tests[(tests["seq_len"] == seq_len) & tests.apply(
                lambda r: PRIMARY_TESTS.get(r["metric"]) == r["test"], axis=1)]
            sentences += [significance_sentence(t, lookup, alpha)
                          for t in primary.to_dict("records")]
        paragraphs.append({"seq_len": fmt_int(seq_len), "sentences": sentences})

    test_rows = []
    for row in tests.to_dict("records") if len(tests) else []:
        has_p = not _missing(row.get("p_holm"))
        note = row.get("note") if isinstance(row.get("note"), str) else ""
        test_rows.append({
            "seq_len": fmt_int(row["seq_len"]),
            "metric": latex_escape(METRIC_NAMES.get(row["metric"], row["metric"])),
            "test": TeX(TEST_NAMES.get(row["test"], latex_escape(row["test"]))),
            "pair": TeX(f"{model_name(row['model_a'])} vs {model_name(row['model_b'])}"),
            "statistic": _statistic_text(row),
            "p": fmt_p(row.get("p_value"), alpha), "p_holm": fmt_p(row.get("p_holm"), alpha),
            "significant": ("yes" if has_p and float(row["p_holm"]) < alpha else
                            "no" if has_p else "---"),
            "note": note,
        })
    pairs = sorted({(r["model_a"], r["model_b"]) for r in tests.to_dict("records")}
                   if len(tests) else set())
    return {"outcome_rows": outcome_rows, "cost_rows": cost_rows, "paragraphs": paragraphs,
            "test_rows": test_rows,
            "pairs": TeX("; ".join(f"$a$ = {model_name(a)}, $b$ = {model_name(b)}"
                                   for a, b in pairs))}


def _figures(figures: dict, paper_dir: Path) -> list[dict]:
    """{label: path or (path, caption) or {"path", "caption"}} -> paths relative to paper/."""
    out = []
    for label, spec in figures.items():
        if isinstance(spec, dict):
            path, caption = spec["path"], spec.get("caption")
        elif isinstance(spec, tuple | list):
            path, caption = spec[0], spec[1] if len(spec) > 1 else None
        else:
            path, caption = spec, None
        candidate = Path(path)
        if candidate.is_absolute() or candidate.exists():
            resolved = candidate.resolve()
        else:
            resolved = (paper_dir / candidate).resolve()
        if not resolved.exists():
            raise FileNotFoundError(f"figure {label!r}: {path} does not exist")
        relative = Path(os.path.relpath(resolved, paper_dir.resolve())).as_posix()
        if re.search(r"[\s%#{}\\$&~^]", relative):
            raise ValueError(f"figure path {relative!r} has characters LaTeX cannot include")
        words = re.sub(r"[_\-]+", " ", Path(label).stem).strip()
        out.append({"path": relative, "label": re.sub(r"[^A-Za-z0-9:.-]", "-", label),
                    "caption": caption or f"{words[:1].upper()}{words[1:]} ({Path(path).name})."})
    return out


# ---------------------------------------------------------------------------------------------
# A.4 audit, A.5 benchmark


def _audit(audit: dict, models: list[str]) -> dict:
    checks = [{"name": c["name"], "compared": c.get("compared", ""), "found": c.get("found", ""),
               "passed": bool(c.get("passed"))} for c in audit.get("checks", [])]
    exposure = next((c.get("details") or {} for c in audit.get("checks", [])
                     if c.get("name") == "exposure"), {})
    ratio = exposure.get("params_ratio") or {}
    cells = [{"model": model_name(c["model"]), "seq_len": fmt_int(c["seq_len"]),
              "runs": fmt_int(c.get("runs")), "tokens_planned": fmt_int(c.get("tokens_planned")),
              "epochs_planned": fmt_num(c.get("epochs_planned")),
              "tokens_seen_max": fmt_int(c.get("tokens_seen_max")),
              "epochs_max": fmt_num(c.get("epochs_max"))}
             for c in exposure.get("cells", [])]
    params = [{"model": model_name(m), "total": fmt_int(p.get("total")),
               "non_embedding": fmt_int(p.get("non_embedding"))}
              for m, p in (exposure.get("params") or {}).items()]
    definition = audit.get("divergence_definition") or {}
    return {
        "checks": checks,
        "cells": cells,
        "params": params,
        "ratio": None if not ratio or _missing(ratio.get("non_embedding")) else {
            "numerator": model_name(ratio["numerator"]),
            "denominator": model_name(ratio["denominator"]),
            "total": fmt_num(ratio.get("total")), "non_embedding": fmt_num(ratio["non_embedding"])},
        "train_tokens": fmt_int(exposure.get("train_tokens")),
        "max_epochs": fmt_num(exposure.get("max_epochs")),
        "large_epochs": bool(exposure.get("large_epochs")),
        "large_threshold": _value_text(exposure.get("large_epochs_threshold")),
        "definition": [{"name": k, "text": v} for k, v in definition.items()
                       if isinstance(v, str)],
        "tolerance": _value_text(audit.get("causality_tolerance")),
        "causality_seq_len": fmt_int(audit.get("causality_seq_len")),
    }


BENCH_CHECKS = {
    "time_slope": "log-log slope of step time",
    "memory_slope": "log-log slope of peak memory",
    "trains_at_longest": "trains at the longest length (peak MB)",
    "core_speedup": "BK core vs the sequential loop (speed-up)",
    "core_share": "BK core share of a layer's time",
}


def _bench(bench_csv, bench_summary_json) -> dict | None:
    if not bench_csv and not bench_summary_json:
        return None
    slopes = []
    if bench_csv and Path(bench_csv).exists():
        from fairlm.plots import loglog_slope  # the figure's legend fits the same slopes

        table = pd.read_csv(bench_csv)
        if {"seq_len", "name"} <= set(table.columns):
            rows = table[table["kind"] == "model"] if "kind" in table else table
            for name in dict.fromkeys(rows["name"]):
                of_name = rows[rows["name"] == name]
                entry = {"name": model_name(name), "points": len(of_name)}
                for column in ("seconds", "peak_mem_mb"):
                    if column in of_name:
                        slope, where = loglog_slope(of_name["seq_len"].to_numpy(float),
                                                    pd.to_numeric(of_name[column],
                                                                  errors="coerce").to_numpy(float))
                        entry[column] = fmt_num(slope)
                        entry["where"] = latex_escape(where.replace("≥", ">="))
                    else:
                        entry[column] = TeX("---")
                slopes.append(entry)
    summary = read_json_if_exists(bench_summary_json) if bench_summary_json else {}
    summary = summary if isinstance(summary, dict) else {}
    checks = [{"check": latex_escape(BENCH_CHECKS.get(c.get("check"), c.get("check", ""))),
               "model": model_name(c.get("model", "")),
               "value": fmt_num(c["value"]) if isinstance(c.get("value"), int | float)
               else _value_text(c.get("value")),
               "target": latex_escape(c.get("target", "")),
               "passed": TeX(r"\textbf{pass}" if c.get("pass") else r"\textbf{fail}"),
               "note": latex_escape(c.get("note", ""))}
              for c in summary.get("checks", []) if isinstance(c, dict)]
    measurements = []
    size = None
    if bench_csv and Path(bench_csv).exists():
        table = pd.read_csv(bench_csv)
        for row in table.to_dict("records"):
            measurements.append({
                "kind": latex_escape(row.get("kind", "")), "name": model_name(row.get("name", "")),
                "seq_len": fmt_int(row.get("seq_len")), "batch": fmt_int(row.get("batch_size")),
                "seconds": fmt_num(row.get("seconds")), "memory": fmt_num(row.get("peak_mem_mb")),
                "tokens_per_s": fmt_int(row.get("tokens_per_s")),
                "status": latex_escape(row.get("status", ""))})
        models = table[table["kind"] == "model"] if "kind" in table else table.iloc[:0]
        if len(models):
            first = models.iloc[0]
            size = {"d_model": fmt_int(first.get("d_model")),
                    "n_layers": fmt_int(first.get("n_layers")),
                    "batch": fmt_int(first.get("batch_size"))}
    return {"slopes": slopes, "checks": checks, "measurements": measurements, "size": size,
            "machine": _machine_text(summary.get("system") or {})}


def _machine_text(system: dict) -> TeX | None:
    """'<CPU> (<n> cores), <GPU names>, torch <version>' from a system.json-like dict."""
    if not system:
        return None
    parts = [f"{system['cpu']} ({system.get('cpu_count')} cores)"] if system.get("cpu") else []
    parts += [gpu.get("name", "GPU") for gpu in system.get("gpus") or []]
    if system.get("torch"):
        parts.append(f"torch {system['torch']}")
    return latex_escape(", ".join(parts))


# ---------------------------------------------------------------------------------------------
# Rendering


def safe_path(value) -> TeX:
    """A file path or label printed verbatim (\\includegraphics must not see \\_)."""
    text = str(value)
    if re.search(r"[\s%#{}\\$&~^]", text):
        raise ValueError(f"{text!r} has characters LaTeX cannot take in a file name or label")
    return TeX(text)


def _finalize(value):
    if isinstance(value, TeX):
        return value
    if value is None:
        return TeX("---")
    if isinstance(value, bool):
        return TeX("yes" if value else "no")
    if isinstance(value, int):
        return fmt_int(value)
    if isinstance(value, float):
        return fmt_num(value)
    return latex_escape(value)


def environment(template_dir: str | Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        block_start_string=r"\BLOCK{", block_end_string="}",
        variable_start_string=r"\VAR{", variable_end_string="}",
        comment_start_string=r"\#{", comment_end_string="}",
        line_statement_prefix="%%", line_comment_prefix="%#",
        trim_blocks=True, lstrip_blocks=True, autoescape=False,
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
        finalize=_finalize,
    )
    env.filters["latex_escape"] = latex_escape
    env.filters["safe_path"] = safe_path
    return env


def render_appendix(
    summary_csv: str | Path,
    tests_csv: str | Path,
    audit_json: str | Path,
    run_dirs: Sequence[str | Path],
    meta_json: str | Path,
    figures: dict,
    out_tex: str | Path,
    bench_csv: str | Path | None = None,
    bench_summary_json: str | Path | None = None,
    command: str = "",
    alpha: float = 0.05,
    allow_failed_checks: Sequence[str] | None = None,
    template: str | Path = TEMPLATE,
) -> Path:
    """Write Appendix A to `out_tex` (atomically) from the results files.

    Raises AuditFailure, naming the check, when the audit failed a check that is not allowed
    (`allow_failed_checks`, default: the list the audit recorded from the config). `figures`
    maps a label to a path (absolute, relative to the working folder, or relative to the
    folder of `out_tex`), or to (path, caption).
    """
    audit = read_json_if_exists(audit_json)
    if not audit.get("checks"):
        raise ValueError(f"{audit_json}: no audit checks")
    allowed = list(audit.get("allow_failed_checks", []) if allow_failed_checks is None
                   else allow_failed_checks)
    enforce(audit, allowed)
    out_tex = Path(out_tex)
    summary = pd.read_csv(summary_csv)
    tests = pd.read_csv(tests_csv) if Path(tests_csv).exists() else pd.DataFrame()
    _check_alpha(tests, alpha)
    meta = read_json_if_exists(meta_json)
    runs = _read_runs(run_dirs)
    models = _model_order(list(summary.get("model", [])), [r["model"] for r in runs],
                          audit.get("models", []))
    failed = [c for c in audit["checks"] if not c.get("passed")]
    context = {
        "models": [model_name(m) for m in models],
        "ppl_digits": PPL_DIGITS,
        "alpha": _value_text(float(alpha)),
        "hyper": _hyperparameters(runs, models, meta),
        "seeds": TeX(", ".join(str(s) for s in sorted({r["seed"] for r in runs}))),
        "system_rows": _system_rows(runs),
        "kernel_rows": _kernel_rows(runs, models),
        "command": command,
        "meta": {"source": meta.get("source"),
                 "train_tokens": fmt_int(meta.get("splits", {}).get("train", {}).get("tokens"))},
        "allowed_failures": [{"name": c["name"], "compared": c.get("compared", ""),
                              "found": c.get("found", "")} for c in failed],
        "results": _results(summary, tests, models, alpha),
        "figures": _figures(figures or {}, out_tex.parent),
        "audit": _audit(audit, models),
        "bench": _bench(bench_csv, bench_summary_json),
    }
    text = environment(Path(template).parent).get_template(Path(template).name).render(context)
    return write_text(out_tex, text.lstrip("\n"))


# ---------------------------------------------------------------------------------------------
# PDF


class LatexError(RuntimeError):
    """The LaTeX engine ran and failed; the message holds the end of its log."""


def _engine_commands(engine: str, driver: str, jobname: str, outdir: str) -> list[list[str]]:
    flags = ["-interaction=nonstopmode", "-halt-on-error", f"-jobname={jobname}"]
    if shutil.which("latexmk"):
        mode = {"pdflatex": "-pdf", "lualatex": "-lualatex", "xelatex": "-xelatex"}[engine]
        return [["latexmk", mode, *flags, f"-outdir={outdir}", driver]]
    run = [engine, *flags, f"-output-directory={outdir}", driver]
    return [run, run]  # twice: references and float placement settle on the second pass


def compile_pdf(
    tex_path: str | Path,
    engine: str = "pdflatex",
    wrapper: str | Path | None = None,
    timeout_s: int = 300,
) -> tuple[Path | None, str]:
    """Compile `tex_path` through the standalone wrapper into <stem>.pdf beside it.

    Runs latexmk when installed, else `engine` twice, in the folder of `tex_path` (so that
    figures/xxx.png resolve), building in a temporary folder there and moving the PDF into
    place. Returns (pdf path, "") or (None, reason) when no engine is installed; raises
    LatexError when the engine fails.
    """
    tex_path = Path(tex_path).resolve()
    paper_dir = tex_path.parent
    if engine not in ("pdflatex", "lualatex", "xelatex"):
        raise ValueError(f"unknown LaTeX engine {engine!r}")
    if not shutil.which(engine) and not shutil.which("latexmk"):
        return None, (f"no LaTeX engine: neither {engine} nor latexmk is on PATH (Debian: "
                      "apt-get install --no-install-recommends texlive-latex-base "
                      "texlive-latex-recommended)")
    if shutil.which("latexmk") and not shutil.which(engine):
        return None, f"latexmk is installed but {engine} is not"
    wrapper = Path(wrapper) if wrapper else (
        paper_dir / WRAPPER.name if (paper_dir / WRAPPER.name).exists() else WRAPPER)
    wrapper_rel = Path(os.path.relpath(wrapper.resolve(), paper_dir)).as_posix()
    build = Path(tempfile.mkdtemp(prefix=f"{tex_path.stem}.build-", dir=paper_dir))
    try:
        driver = build / "driver.tex"
        # the wrapper inputs \appendixfile; the driver names the file to compile
        driver.write_text(f"\\def\\appendixfile{{{tex_path.name}}}\\input{{{wrapper_rel}}}\n")
        driver_rel = Path(os.path.relpath(driver, paper_dir)).as_posix()
        outdir = Path(os.path.relpath(build, paper_dir)).as_posix()
        for command in _engine_commands(engine, driver_rel, tex_path.stem, outdir):
            result = subprocess.run(command, cwd=paper_dir, capture_output=True, text=True,
                                    timeout=timeout_s, errors="replace")
            if result.returncode != 0:
                log = build / f"{tex_path.stem}.log"
                tail = (log.read_text(errors="replace") if log.exists() else result.stdout)
                raise LatexError(f"{' '.join(command[:1])} failed on {tex_path} "
                                 f"(exit {result.returncode}):\n{tail[-3000:]}")
        pdf = build / f"{tex_path.stem}.pdf"
        if not pdf.exists():
            raise LatexError(f"{engine} wrote no PDF for {tex_path}")
        target = tex_path.with_suffix(".pdf")
        os.replace(pdf, target)
        return target, ""
    finally:
        shutil.rmtree(build, ignore_errors=True)
