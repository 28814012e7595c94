"""The fairness audit: does the comparison compare like with like, and report honestly?

Five checks read the run-output contract (config.json, summary.json, metrics.parquet of every
run, and results/data/meta.json); each says what it compared, what it found and whether it
passed:

1. identical_settings  the resolved configs of the models of one (seq_len, seed) agree
                       outside the model sections (and run.model)
2. identical_data      those runs saw the same batches in the same order (batch_sha per step)
3. causality           no logit moves when a later token changes, for every model as configured
4. honest_outcomes     OOM is never a divergence, a divergence shows its non-finite value
5. exposure            parameter counts, tokens seen and epochs (informational)

`run_audit` returns a JSON-ready dict; `enforce` turns failed checks the config does not
allow into an `AuditFailure` that names each of them.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fairlm.io import read_json_if_exists, write_text

if TYPE_CHECKING:  # torch loads only for the causality check: the paper imports this module
    from torch import nn

CHECK_NAMES = ("identical_settings", "identical_data", "causality", "honest_outcomes", "exposure")
COMPLETED, DIVERGED, OOM = "COMPLETED", "DIVERGED", "OOM"
# Above this many passes over the train split the appendix warns about the exposure in words.
LARGE_EPOCHS = 10.0
# An out-of-memory error reported as a divergence is the defect this pattern looks for.
OOM_WORDS = re.compile(r"out of memory|\boom\b|memoryerror|cuda error: out", re.IGNORECASE)
_MISSING = object()

ModelFactory = Callable[[str, dict, int], "nn.Module"]


class AuditFailure(Exception):
    """A fairness check failed and the config does not allow it; the message names it."""


# ---------------------------------------------------------------------------------------------
# Loading runs


@dataclass
class Run:
    path: Path
    model: str
    seq_len: int
    seed: int
    config: dict
    summary: dict
    metrics: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.model}/L{self.seq_len}/seed{self.seed}"


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    config = read_json_if_exists(path / "config.json")
    summary = read_json_if_exists(path / "summary.json")
    if not config and not summary:
        raise FileNotFoundError(f"{path}: neither config.json nor summary.json exists")
    section = config.get("run", {})

    def pick(key):
        value = section.get(key, summary.get(key))
        if value is None:
            raise ValueError(f"{path}: config.json and summary.json lack {key!r}")
        return value

    metrics_path = path / "metrics.parquet"
    metrics = pd.read_parquet(metrics_path) if metrics_path.exists() else None
    return Run(path, str(pick("model")), int(pick("seq_len")), int(pick("seed")), config,
               summary, metrics)


def discover_run_dirs(runs_root: str | Path) -> list[Path]:
    """Every results/runs/{model}/L{seq_len}/seed{seed} folder that holds a summary.json."""
    return sorted(p.parent for p in Path(runs_root).glob("*/L*/seed*/summary.json"))


def _model_order(runs: Sequence[Run], config: dict) -> list[str]:
    present = {r.model for r in runs}
    preferred = [m for m in config.get("grid", {}).get("models", []) if m in present]
    return preferred + sorted(present - set(preferred))


def _groups(runs: Sequence[Run], order: list[str]) -> dict[tuple[int, int], list[Run]]:
    groups: dict[tuple[int, int], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.seq_len, run.seed)].append(run)
    return {key: sorted(groups[key], key=lambda r: order.index(r.model)) for key in sorted(groups)}


def _check(name: str, compared: str, found: str, passed: bool, details) -> dict:
    return {"name": name, "compared": compared, "found": found, "passed": bool(passed),
            "details": details}


# ---------------------------------------------------------------------------------------------
# 1. identical settings


def flatten(mapping: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are leaves (betas compare as one value)."""
    out = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out |= flatten(value, dotted)
        else:
            out[dotted] = value
    return out


def shared_part(config: dict, model_sections: Iterable[str]) -> dict:
    """The run config without any model's own section and without run.model."""
    shared = {k: v for k, v in config.items() if k not in set(model_sections)}
    if isinstance(shared.get("run"), dict):
        shared["run"] = {k: v for k, v in shared["run"].items() if k != "model"}
    return shared


def differing_keys(a: dict, b: dict) -> list[str]:
    flat_a, flat_b = flatten(a), flatten(b)
    return sorted(k for k in flat_a.keys() | flat_b.keys()
                  if flat_a.get(k, _MISSING) != flat_b.get(k, _MISSING))


def check_identical_settings(groups: dict, order: list[str]) -> dict:
    details, failures, single = [], [], 0
    for (seq_len, seed), runs in groups.items():
        entry = {"seq_len": seq_len, "seed": seed, "models": [r.model for r in runs],
                 "differing_keys": [], "values": {}, "settings_hash": {}}
        for run in runs:
            entry["settings_hash"][run.model] = run.summary.get("settings_hash")
        if len(runs) < 2:
            single += 1
            entry["note"] = "only one model ran: nothing to compare"
            details.append(entry)
            continue
        shared = [shared_part(r.config, order) for r in runs]
        keys = sorted({k for other in shared[1:] for k in differing_keys(shared[0], other)})
        flats = [flatten(s) for s in shared]
        entry["differing_keys"] = keys
        entry["values"] = {
            k: {r.model: f.get(k, "<absent>") for r, f in zip(runs, flats, strict=True)}
            for k in keys}
        hashes = {h for h in entry["settings_hash"].values() if h is not None}
        entry["hashes_agree"] = len(hashes) <= 1
        if not entry["hashes_agree"]:
            keys = entry["differing_keys"] = [*keys, "settings_hash"]
            entry["values"]["settings_hash"] = dict(entry["settings_hash"])
        if keys:
            failures.append(f"L{seq_len} seed {seed}: " + ", ".join(
                f"{k} ({', '.join(f'{m}={v!r}' for m, v in entry['values'].get(k, {}).items())})"
                for k in keys))
        details.append(entry)
    compared = ("for every (seq_len, seed), the resolved run configs (config.json) of the "
                "models outside their own model sections and run.model, and their "
                "settings_hash")
    if failures:
        found = "settings differ: " + "; ".join(failures)
    else:
        found = (f"identical in all {len(groups) - single} (seq_len, seed) groups with "
                 "more than one model")
        if single:
            found += f"; {single} group(s) hold a single model"
    return _check("identical_settings", compared, found, not failures, details)


# ---------------------------------------------------------------------------------------------
# 2. identical data


def _batch_order(run: Run) -> pd.Series | None:
    if run.metrics is None or "batch_sha" not in run.metrics.columns:
        return None
    frame = run.metrics[["step", "batch_sha"]].drop_duplicates("step", keep="last")
    return frame.set_index("step")["batch_sha"]


def check_identical_data(groups: dict) -> dict:
    details, failures, notes = [], [], []
    for (seq_len, seed), runs in groups.items():
        reference = runs[0]
        ref_order = _batch_order(reference)
        for run in runs[1:] if len(runs) > 1 else []:
            order = _batch_order(run)
            entry = {"seq_len": seq_len, "seed": seed, "reference": reference.model,
                     "model": run.model}
            missing = [r for r, o in ((reference, ref_order), (run, order)) if o is None]
            # a run that ran out of memory before its first step saw no data: nothing to compare
            unverifiable = [r for r in missing if r.summary.get("status") != OOM]
            if missing:
                entry["note"] = "no batch_sha: " + ", ".join(r.label for r in missing)
                if unverifiable:
                    failures.append(f"L{seq_len} seed {seed}: batch_sha missing for "
                                    + ", ".join(r.label for r in unverifiable))
                details.append(entry)
                continue
            common = ref_order.index.intersection(order.index).sort_values()
            differ = [int(s) for s in common if ref_order[s] != order[s]]
            entry |= {"common_steps": len(common), "steps": [len(ref_order), len(order)],
                      "mismatched_steps": len(differ), "first_mismatch_step":
                      differ[0] if differ else None}
            if differ:
                failures.append(f"L{seq_len} seed {seed}: {reference.model} and {run.model} "
                                f"saw different batches at {len(differ)} of {len(common)} "
                                f"common steps, first at step {differ[0]}")
            if not len(common):
                notes.append(f"L{seq_len} seed {seed}: no common step")
            details.append(entry)
    compared = ("for every (seq_len, seed), the sha256 of each step's batch (metrics.parquet "
                "batch_sha) of every model against the first model, over the steps both ran")
    if failures:
        found = "; ".join(failures)
    else:
        steps = sum(d.get("common_steps", 0) for d in details)
        found = f"identical batches at all {steps:,} common steps of {len(details)} run pairs"
        if notes:
            found += " (" + "; ".join(notes) + ")"
    return _check("identical_data", compared, found, not failures, details)


# ---------------------------------------------------------------------------------------------
# 3. causality


def _logits(model: nn.Module, ids):
    out = model(ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, tuple | list):
        out = out[0]
    return out


def probe_positions(seq_len: int) -> list[int]:
    return sorted({1, seq_len // 4, seq_len // 2, (3 * seq_len) // 4, seq_len - 1} - {0})


def causality_probe(
    model_factory: Callable[[], nn.Module],
    vocab_size: int,
    seq_len: int,
    tolerance: float,
    positions: Sequence[int] | None = None,
    seed: int = 0,
) -> dict:
    """Change token t of a random sequence; measure the largest logit change before t.

    The model is built by `model_factory()` under a fixed seed (random init), put in eval mode
    and run in float64 where it supports it (float32 otherwise, recorded). Each variant runs as
    its own batch of one, so that a batch statistic cannot hide or fake a leak.
    """
    import torch

    positions = list(positions or probe_positions(seq_len))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_factory().eval()
        generator = torch.Generator().manual_seed(seed)
        base = torch.randint(vocab_size, (1, seq_len), generator=generator)
        shifts = torch.randint(1, max(vocab_size, 2), (len(positions),), generator=generator)
    dtype, dtype_note = torch.float64, ""
    try:
        model.double()
        with torch.no_grad():
            reference = _logits(model, base)
    except Exception as error:  # kernels without float64 run in float32
        dtype, dtype_note = torch.float32, f"float64 unsupported ({type(error).__name__})"
        model.float()
        with torch.no_grad():
            reference = _logits(model, base)
    per_position, worst = [], 0.0
    for t, shift in zip(positions, shifts.tolist(), strict=True):
        changed = base.clone()
        changed[0, t] = (base[0, t] + shift) % vocab_size
        with torch.no_grad():
            logits = _logits(model, changed)
        before = (logits[:, :t] - reference[:, :t]).abs()
        after = (logits[:, t:] - reference[:, t:]).abs()
        leak = float(before.max()) if torch.isfinite(before).all() else math.inf
        per_position.append({"t": t, "max_abs_diff_before_t": leak,
                             "max_abs_diff_from_t": float(after.max())})
        worst = max(worst, leak)
    return {"seq_len": seq_len, "vocab_size": vocab_size, "dtype": str(dtype).split(".")[-1],
            "dtype_note": dtype_note, "positions": positions, "per_position": per_position,
            "max_abs_diff_before_t": worst, "tolerance": tolerance,
            "passed": worst <= tolerance}


def _default_factory(name: str, config: dict, vocab_size: int) -> nn.Module:
    from fairlm.models import build_model

    return build_model(name, config, vocab_size)


def _vocab_size(meta: dict, config: dict) -> int:
    size = meta.get("tokenizer", {}).get("vocab_size")
    return int(size if size is not None else config.get("data", {}).get("vocab_size", 8192))


def check_causality(
    runs: Sequence[Run],
    order: list[str],
    meta: dict,
    tolerance: float,
    seq_len: int,
    model_factory: ModelFactory | None = None,
) -> dict:
    factory = model_factory or _default_factory
    # one probe per distinct model configuration (usually one per model)
    configs: dict[tuple[str, str], Run] = {}
    for run in runs:
        key = (run.model, json.dumps({"model": run.config.get("model"),
                                      run.model: run.config.get(run.model)}, sort_keys=True))
        configs.setdefault(key, run)
    details, failures = [], []
    for (name, _), run in sorted(configs.items(), key=lambda kv: order.index(kv[0][0])):
        vocab = _vocab_size(meta, run.config)
        entry = {"model": name, "config_from": run.label,
                 "model_section": run.config.get(name)}
        try:
            result = causality_probe(lambda n=name, c=run.config, v=vocab: factory(n, c, v),
                                     vocab, seq_len, tolerance)
        except Exception as error:
            entry |= {"passed": False, "error": f"{type(error).__name__}: {error}"}
            failures.append(f"{name}: could not be probed ({type(error).__name__}: {error})")
            details.append(entry)
            continue
        entry |= result
        if not result["passed"]:
            leaks = [p["t"] for p in result["per_position"]
                     if not p["max_abs_diff_before_t"] <= tolerance]
            failures.append(f"{name} (as in {run.label}) is not causal: changing token t "
                            f"changes earlier logits by up to {result['max_abs_diff_before_t']:.3g}"
                            f" (tolerance {tolerance:g}; t = {', '.join(map(str, leaks))})")
        details.append(entry)
    compared = (f"for every model as configured (rebuilt from its config.json, random init, "
                f"eval mode, float64 where supported) at {seq_len} tokens: the largest change "
                "of any logit before position t when token t changes, against tolerance "
                f"{tolerance:g}")
    if failures:
        found = "; ".join(failures)
    else:
        found = "; ".join(f"{d['model']}: at most {d['max_abs_diff_before_t']:.3g} "
                          f"({d['dtype']})" for d in details) or "no model to probe"
    return _check("causality", compared, found, not failures and bool(details), details)


# ---------------------------------------------------------------------------------------------
# 4. honest outcomes


def divergence_definition(runs: list[Run], train_cfg: dict) -> dict:
    """The rules training applied, as it recorded them in summary.json, with the spike settings.

    Read from the runs rather than restated here, so that the appendix prints what was used.
    """
    recorded = next((r.summary["divergence_definition"] for r in runs
                     if isinstance(r.summary.get("divergence_definition"), dict)), None)
    definition = dict(recorded) if recorded else {
        "diverged": "not recorded by the runs (they predate the recorded definition)"}
    definition["spike_factor"] = train_cfg.get("spike_factor")
    definition["spike_window"] = train_cfg.get("spike_window")
    return definition


def _row_at(run: Run, step) -> dict | None:
    if run.metrics is None or step is None:
        return None
    rows = run.metrics[run.metrics["step"] == step]
    return None if rows.empty else rows.iloc[-1].to_dict()


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _outcome_problems(run: Run) -> tuple[list[str], str]:
    """What is dishonest about this run's reported outcome, and the evidence for it."""
    s = run.summary
    status, step = s.get("status"), s.get("diverged_at_step")
    reason = s.get("divergence_reason") or ""
    problems, evidence = [], ""
    evals = ["final_val_ppl", "test_ppl", "final_val_word_ppl", "test_word_ppl"]
    if status not in (COMPLETED, DIVERGED, OOM):
        return [f"unknown status {status!r}"], ""
    if status == OOM:
        if step is not None:
            problems.append(f"status OOM with diverged_at_step {step}: OOM counted as divergence")
        evidence = "out of memory"
    elif status == DIVERGED:
        if step is None:
            problems.append("status DIVERGED without diverged_at_step")
        if OOM_WORDS.search(reason):
            problems.append(f"an out-of-memory failure reported as divergence ({reason!r})")
        row = _row_at(run, step)
        bad = [k for k in ("loss", "grad_norm") if row is not None and k in row
               and not _finite(row[k])]
        if bad:
            evidence = f"non-finite {' and '.join(bad)} at step {step}"
        elif reason and not OOM_WORDS.search(reason):
            evidence = f"recorded reason: {reason}"
        elif step is not None:
            problems.append(f"no non-finite loss or gradient norm at step {step} in "
                            "metrics.parquet and no recorded reason")
    else:
        if step is not None:
            problems.append(f"status COMPLETED with diverged_at_step {step}")
        if run.metrics is not None and "loss" in run.metrics:
            losses = pd.to_numeric(run.metrics["loss"], errors="coerce").to_numpy(float)
            if not np.isfinite(losses).all():
                first = int(run.metrics["step"].to_numpy()[~np.isfinite(losses)][0])
                problems.append(f"status COMPLETED but the loss is not finite at step {first}")
        evidence = "completed"
    if status != COMPLETED:
        reported = [k for k in evals if s.get(k) is not None]
        if reported:
            problems.append(f"status {status} but reports {', '.join(reported)}")
    return problems, evidence


def check_honest_outcomes(runs: Sequence[Run], definition: dict) -> dict:
    details, failures, counts = [], [], defaultdict(int)
    for run in runs:
        problems, evidence = _outcome_problems(run)
        counts[run.summary.get("status")] += 1
        details.append({"run": run.label, "status": run.summary.get("status"),
                        "diverged_at_step": run.summary.get("diverged_at_step"),
                        "divergence_reason": run.summary.get("divergence_reason"),
                        "evidence": evidence, "problems": problems})
        failures += [f"{run.label}: {p}" for p in problems]
    compared = ("every run's status against its metrics: OOM never carries a divergence step; "
                "a DIVERGED run shows a non-finite loss or gradient norm at diverged_at_step (or "
                "records a reason other than memory); a COMPLETED run has only finite losses; "
                "runs that did not complete report no perplexity")
    tally = ", ".join(f"{counts[k]} {k}" for k in (COMPLETED, DIVERGED, OOM) if counts[k])
    found = "; ".join(failures) if failures else f"all {len(runs)} outcomes honest ({tally})"
    return _check("honest_outcomes", compared, found, not failures,
                  {"runs": details, "divergence_definition": definition})


# ---------------------------------------------------------------------------------------------
# 5. exposure


def _steps_run(run: Run) -> int | None:
    if run.metrics is not None:
        return int(len(run.metrics))
    steps = run.summary.get("steps_completed")
    return None if steps is None else int(steps)


def check_exposure(runs: Sequence[Run], order: list[str], meta: dict) -> dict:
    train_tokens = meta.get("splits", {}).get("train", {}).get("tokens")
    missing, per_run = [], []
    cells: dict[tuple[str, int], list[dict]] = defaultdict(list)
    params: dict[str, dict] = {}
    for run in runs:
        counts = run.summary.get("params") or {}
        if counts.get("total") is not None and counts.get("non_embedding") is not None:
            params.setdefault(run.model, {"total": int(counts["total"]),
                                          "non_embedding": int(counts["non_embedding"])})
        batch = run.config.get("train", {}).get("batch_size")
        steps = _steps_run(run)
        planned = run.config.get("run", {}).get("steps", run.summary.get("steps_planned"))
        tokens = steps * batch * run.seq_len if None not in (steps, batch) else None
        row = {"run": run.label, "model": run.model, "seq_len": run.seq_len,
               "steps": steps, "batch_size": batch, "tokens_seen": tokens,
               "tokens_seen_reported": run.summary.get("tokens_seen"),
               "epochs": tokens / train_tokens if tokens is not None and train_tokens else None,
               "tokens_planned": planned * batch * run.seq_len
               if None not in (planned, batch) else None}
        if tokens is None:
            missing.append(f"{run.label}: steps or batch size")
        per_run.append(row)
        cells[(run.model, run.seq_len)].append(row)
    if not train_tokens:
        missing.append("train split token count (meta.json splits.train.tokens)")
    missing += [f"{m}: parameter counts" for m in order if m not in params]

    cell_rows = []
    for (model, seq_len), rows in sorted(cells.items(),
                                         key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        seen = [r["tokens_seen"] for r in rows if r["tokens_seen"] is not None]
        planned = [r["tokens_planned"] for r in rows if r["tokens_planned"] is not None]
        cell_rows.append({
            "model": model, "seq_len": seq_len, "runs": len(rows),
            "tokens_planned": max(planned) if planned else None,
            "epochs_planned": max(planned) / train_tokens if planned and train_tokens else None,
            "tokens_seen_min": min(seen) if seen else None,
            "tokens_seen_max": max(seen) if seen else None,
            "epochs_max": max(seen) / train_tokens if seen and train_tokens else None,
        })
    ratio = None
    if len(order) >= 2 and order[0] in params and order[1] in params:
        a, b = params[order[1]], params[order[0]]
        ratio = {"numerator": order[1], "denominator": order[0],
                 "total": a["total"] / b["total"] if b["total"] else None,
                 "non_embedding": a["non_embedding"] / b["non_embedding"]
                 if b["non_embedding"] else None}
    epochs = [c["epochs_max"] for c in cell_rows if c["epochs_max"] is not None]
    planned_epochs = [c["epochs_planned"] for c in cell_rows if c["epochs_planned"] is not None]
    max_epochs = max(epochs + planned_epochs, default=None)
    details = {"train_tokens": train_tokens, "params": params, "params_ratio": ratio,
               "cells": cell_rows, "runs": per_run, "max_epochs": max_epochs,
               "large_epochs_threshold": LARGE_EPOCHS,
               "large_epochs": max_epochs is not None and max_epochs > LARGE_EPOCHS}
    compared = ("parameter counts (total, non-embedding) per model and their ratio; tokens "
                "seen per run (steps x batch_size x seq_len) and epochs over the train split "
                "(informational: passes unless counts are missing)")
    parts = [f"{m}: {p['total']:,} parameters ({p['non_embedding']:,} non-embedding)"
             for m, p in params.items()]
    if ratio and ratio["non_embedding"] is not None:
        parts.append(f"non-embedding ratio {ratio['numerator']}/{ratio['denominator']} = "
                     f"{ratio['non_embedding']:.3f}")
    if max_epochs is not None:
        parts.append(f"up to {max_epochs:,.1f} epochs over {train_tokens:,} train tokens")
        if details["large_epochs"]:
            parts.append("the runs pass over the training split many times")
    if missing:
        parts.insert(0, "missing: " + ", ".join(missing))
    return _check("exposure", compared, "; ".join(parts), not missing, details)


# ---------------------------------------------------------------------------------------------
# The audit


def _json_ready(value):
    """NaN and infinities become None (strict JSON); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_audit(
    run_dirs: Iterable[str | Path],
    meta_path: str | Path,
    config: dict,
    model_factory: ModelFactory | None = None,
) -> dict:
    """Run the five checks over `run_dirs`; `config` is the pipeline's resolved config.

    `model_factory(name, run_config, vocab_size)` builds a model for the causality check
    (default: fairlm.models.build_model).
    """
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("the audit needs at least one run folder")
    meta = read_json_if_exists(Path(meta_path))
    analysis = config.get("analysis", {})
    tolerance = float(analysis.get("causality_tolerance", 1e-6))
    probe_len = int(analysis.get("causality_seq_len", 64))
    allowed = list(analysis.get("allow_failed_checks", []))
    order = _model_order(runs, config)
    groups = _groups(runs, order)
    train_cfg = runs[0].config.get("train") or config.get("train", {})
    definition = divergence_definition(runs, train_cfg)

    checks = [
        check_identical_settings(groups, order),
        check_identical_data(groups),
        check_causality(runs, order, meta, tolerance, probe_len, model_factory),
        check_honest_outcomes(runs, definition),
        check_exposure(runs, order, meta),
    ]
    failed = [c["name"] for c in checks if not c["passed"]]
    return _json_ready({
        "checks": checks,
        "passed": not failed,
        "failed": failed,
        "allowed_failures": [name for name in failed if name in allowed],
        "allow_failed_checks": allowed,
        "divergence_definition": definition,
        "causality_tolerance": tolerance,
        "causality_seq_len": probe_len,
        "models": order,
        "runs": [r.label for r in runs],
    })


def write_audit(audit: dict, out_path: str | Path) -> Path:
    """Write the audit as strict JSON, atomically."""
    return write_text(out_path, json.dumps(_json_ready(audit), indent=2, allow_nan=False) + "\n")


def enforce(audit: dict, allow_failed_checks: Sequence[str]) -> list[str]:
    """Raise AuditFailure naming every failed check not allowed; return the allowed failures."""
    failed = [c for c in audit["checks"] if not c["passed"]]
    refused = [c for c in failed if c["name"] not in set(allow_failed_checks)]
    if refused:
        raise AuditFailure("fairness audit failed: " + " | ".join(
            f"{c['name']}: {c['found']}" for c in refused)
            + " (to publish anyway, list the check in analysis.allow_failed_checks)")
    return [c["name"] for c in failed]
