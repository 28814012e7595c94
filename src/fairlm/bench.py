"""The scaling benchmark: time and memory of one training step against sequence length.

`run_scaling_benchmark(config)` measures, with the settings of config["bench"]:
- kind "model": every model of config["grid"]["models"] at d_model / n_layers / batch_size of
  the bench section, one forward+backward of the training loss (cross-entropy on all
  positions), for each of bench.seq_lens;
- kind "core": the BK core as a parallel scan ("bk_core_scan") and as the sequential loop
  ("bk_core_loop", vectorised over batch, autograd), at core_seq_len x core_batch_size;
- kind "share": a whole ResNet-BK layer ("bk_layer") and its BK core alone
  ("bk_core_in_layer"), at core_seq_len, d_model share_d_model, batch 1.
Each row: the median of `repeats` forward+backward passes after one warm-up, and the peak
memory above the memory held just before the first pass. On CPU every row runs in a fresh
subprocess (ru_maxrss is a per-process high-water mark); on CUDA in this process, with
torch.cuda.max_memory_allocated. An OOM or error is a row with that status, never a crash.

`summarise_scaling(df)` turns the rows into the issue's targets with values and pass/fail.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import torch

from fairlm.config import section
from fairlm.memory import current_rss_mb, is_oom, keep_freed_memory, peak_memory_mb
from fairlm.stats import loglog_slope

if TYPE_CHECKING:  # pandas is imported where used: each subprocess worker starts faster
    import pandas as pd

COLUMNS = [
    "kind", "name", "seq_len", "batch_size", "d_model", "n_layers",
    "seconds", "peak_mem_mb", "tokens_per_s", "status", "note",
]
MEMORY_LIMIT_MB = 24 * 1024
SLOPE_RANGE = (8192, 131072)
TARGETS = {
    "time_slope": 1.10,  # at most
    "memory_slope": 1.10,  # at most
    "core_speedup": 20.0,  # at least
    "core_share": 0.10,  # at most
}


def bench_settings(config: dict) -> dict:
    return section(config, "bench")


def plan(config: dict) -> list[dict]:
    """Every measurement of the benchmark, in the order it runs."""
    bench = bench_settings(config)
    models = list((config.get("grid") or {}).get("models") or ["resnet_bk", "mamba"])
    specs = []
    for name in models:
        for n in sorted(bench["seq_lens"]):
            specs.append({"kind": "model", "name": name, "seq_len": n,
                          "batch_size": bench["batch_size"], "d_model": bench["d_model"],
                          "n_layers": bench["n_layers"]})
    for name in ["bk_core_scan", "bk_core_loop"]:
        specs.append({"kind": "core", "name": name, "seq_len": bench["core_seq_len"],
                      "batch_size": bench["core_batch_size"], "d_model": None, "n_layers": None})
    for name in ["bk_layer", "bk_core_in_layer"]:
        specs.append({"kind": "share", "name": name, "seq_len": bench["core_seq_len"],
                      "batch_size": 1, "d_model": bench["share_d_model"], "n_layers": 1})
    return specs


def resolve_device(config: dict) -> str:
    wanted = (config.get("train") or {}).get("device", "auto")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def run_scaling_benchmark(
    config: dict,
    *,
    isolate: bool | None = None,
    vocab_size: int | None = None,
    timeout_s: float = 3600.0,
    log=None,
) -> pd.DataFrame:
    """Run every measurement of `plan(config)`; one row each (see the module docstring).

    isolate: a fresh subprocess per row (default: on CPU only). vocab_size: the LM head of the
    model rows (default bench.vocab_size, else data.vocab_size). After an OOM, the longer
    lengths of that model are recorded as OOM without being run.
    """
    import pandas as pd

    device = resolve_device(config)
    if isolate is None:
        isolate = device == "cpu"
    if vocab_size is None:
        vocab_size = bench_settings(config)["vocab_size"]
    rows = []
    out_of_memory_at: dict[str, int] = {}
    for spec in plan(config):
        if spec["kind"] == "model" and spec["name"] in out_of_memory_at:
            result = {"status": "oom",
                      "note": f"not run: out of memory at {out_of_memory_at[spec['name']]}"}
        elif isolate:
            result = _measure_in_subprocess(spec, config, device, vocab_size, timeout_s)
        else:
            result = measure(spec, config, device, vocab_size)
        if result["status"] == "oom" and spec["kind"] == "model":
            out_of_memory_at.setdefault(spec["name"], spec["seq_len"])
        row = _row(spec, result)
        rows.append(row)
        if log is not None:
            log(f"{row['kind']:5s} {row['name']:16s} N={row['seq_len']:>7d} "
                f"{row['status']:5s} {row['seconds']:.4g} s {row['peak_mem_mb']:.1f} MB")
    return pd.DataFrame(rows, columns=COLUMNS)


def _row(spec: dict, result: dict) -> dict:
    seconds = result.get("seconds", math.nan)
    tokens = spec["seq_len"] * spec["batch_size"]
    return {
        **{k: spec[k] for k in ["kind", "name", "seq_len", "batch_size", "d_model", "n_layers"]},
        "seconds": seconds,
        "peak_mem_mb": result.get("peak_mem_mb", math.nan),
        "tokens_per_s": tokens / seconds if seconds and seconds > 0 else math.nan,
        "status": result["status"],
        "note": result.get("note", ""),
    }


# ---------------------------------------------------------------------------------------------
# one measurement


def measure(spec: dict, config: dict, device: str, vocab_size: int) -> dict:
    """Median forward+backward seconds and peak memory above the pre-step baseline."""
    repeats = int(bench_settings(config)["repeats"])
    step = None
    try:
        step, note = _make_step(spec, config, torch.device(device), vocab_size)
        baseline = _memory_before(device)
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # the first pass is the warm-up
                times.append(time.perf_counter() - start)
        peak = peak_memory_mb(device) - baseline
        return {"status": "ok", "seconds": statistics.median(times),
                "peak_mem_mb": max(peak, 0.0), "note": note}
    except Exception as error:  # a failed measurement is a result, not a crash
        status = "oom" if is_oom(error) else "error"
        return {"status": status, "note": f"{type(error).__name__}: {str(error)[:300]}"}
    finally:
        del step
        if device == "cuda":
            torch.cuda.empty_cache()


def _make_step(spec: dict, config: dict, device: torch.device, vocab_size: int):
    from fairlm.models import build_model, kernel_description, lm_loss
    from fairlm.models.bk_core import green_diagonal, green_diagonal_reference_loop
    from fairlm.models.resnet_bk import ResNetBKBlock, settings_from_config

    generator = torch.Generator().manual_seed(0)
    n, batch = spec["seq_len"], spec["batch_size"]
    settings = settings_from_config(config)
    z = 1j * settings["z_imag"]

    if spec["kind"] == "model":
        run_cfg = copy.deepcopy(config)
        run_cfg.setdefault("model", {}).update(d_model=spec["d_model"], n_layers=spec["n_layers"])
        model = build_model(spec["name"], run_cfg, vocab_size).to(device).train()
        ids = torch.randint(0, vocab_size, (batch, n + 1), generator=generator).to(device)

        def step():
            model.zero_grad(set_to_none=True)
            lm_loss(model, ids).backward()  # the training loss, chunked head included

        return step, kernel_description(model)

    if spec["kind"] == "share" and spec["name"] == "bk_layer":
        block = ResNetBKBlock(spec["d_model"], settings).to(device).train()
        h = torch.randn(batch, n, spec["d_model"], generator=generator).to(device)
        h.requires_grad_(True)

        def step():
            block.zero_grad(set_to_none=True)
            h.grad = None
            block(h).sum().backward()

        return step, f"ResNet-BK layer, {settings['bk_heads']} BK head(s), whole block"

    # the core alone: potentials as the layer makes them (clamped range), heads as in the layer
    heads = settings["bk_heads"] if spec["kind"] == "share" else 1
    clamp = settings["potential_clamp"]
    shape = (batch, heads, n) if spec["kind"] == "share" else (batch, n)
    v = (torch.rand(shape, generator=generator) * 2 - 1).mul(clamp).to(device)
    v.requires_grad_(True)
    core = green_diagonal_reference_loop if spec["name"] == "bk_core_loop" else green_diagonal

    def step():
        v.grad = None
        green = core(v, z, settings["causal"])
        # a real loss that reads both feature channels, as the layer does
        (green.real.sum() + green.imag.sum()).backward()

    return step, "loop over positions, autograd" if core is not green_diagonal else "scan"


def _memory_before(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    return current_rss_mb()


def _measure_in_subprocess(spec, config, device, vocab_size, timeout_s) -> dict:
    request = json.dumps({"spec": spec, "config": config, "device": device,
                          "vocab_size": vocab_size})
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fairlm.bench"], input=request, capture_output=True,
            text=True, timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "note": f"timeout after {timeout_s:.0f} s"}
    if done.returncode < 0:
        signal_number = -done.returncode
        status = "oom" if signal_number == 9 else "error"
        return {"status": status, "note": f"killed by signal {signal_number}"
                + (" (the kernel's OOM killer)" if status == "oom" else "")}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"status": "error",
                "note": f"worker exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def _worker() -> None:
    request = json.loads(sys.stdin.read())
    if request["device"] == "cpu":
        keep_freed_memory()
    threads = ((request["config"].get("train") or {}).get("threads"))
    if threads:
        torch.set_num_threads(int(threads))
    result = measure(request["spec"], request["config"], request["device"],
                     request["vocab_size"])
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# summary


def log_log_slope(seq_lens, values) -> float | None:
    """The scaling exponent (fairlm.stats.loglog_slope); None, not NaN, for the JSON summary."""
    slope = loglog_slope(seq_lens, values)
    return None if math.isnan(slope) else slope


def summarise_scaling(
    df: pd.DataFrame,
    slope_range: tuple[int, int] = SLOPE_RANGE,
    memory_limit_mb: float = MEMORY_LIMIT_MB,
) -> dict:
    """The issue's targets, each with its value and pass/fail.

    Slopes fit the ok rows with slope_range[0] <= seq_len <= slope_range[1]; "trains at the
    longest length" needs an ok row at slope_range[1] within memory_limit_mb.
    """
    lo, hi = slope_range
    checks = []
    summary: dict = {"slope_range": [lo, hi], "time_slope": {}, "memory_slope": {},
                     "core_speedup": None, "core_share": None}
    models = df[df["kind"] == "model"]
    for name, rows in models.groupby("name", sort=True):
        fit = rows[(rows["status"] == "ok") & rows["seq_len"].between(lo, hi)]
        time_slope = log_log_slope(fit["seq_len"], fit["seconds"])
        positive = fit[fit["peak_mem_mb"] > 0]
        memory_slope = log_log_slope(positive["seq_len"], positive["peak_mem_mb"])
        summary["time_slope"][name] = time_slope
        summary["memory_slope"][name] = memory_slope
        checks.append(_check("time_slope", name, time_slope, "<=", TARGETS["time_slope"],
                             f"log-log fit over {len(fit)} lengths in [{lo}, {hi}]"))
        checks.append(_check("memory_slope", name, memory_slope, "<=", TARGETS["memory_slope"],
                             f"log-log fit over {len(positive)} lengths in [{lo}, {hi}]"))
        longest = rows[rows["seq_len"] == hi]
        trained = bool(
            len(longest) and (longest["status"] == "ok").all()
            and (longest["peak_mem_mb"] <= memory_limit_mb).all()
        )
        memory = float(longest["peak_mem_mb"].max()) if len(longest) else None
        checks.append({
            "check": "trains_at_longest", "model": name, "value": memory,
            "target": f"status ok at N={hi}, peak <= {memory_limit_mb:.0f} MB",
            "pass": trained,
            "note": ", ".join(longest["status"]) if len(longest) else f"no row at N={hi}",
        })

    speedup = _ratio(df, "core", "bk_core_loop", "bk_core_scan")
    summary["core_speedup"] = speedup
    core_rows = df[df["kind"] == "core"]
    where = (f"N={int(core_rows['seq_len'].iloc[0])}, batch {int(core_rows['batch_size'].iloc[0])}"
             if len(core_rows) else "")
    checks.append(_check("core_speedup", "resnet_bk", speedup, ">=", TARGETS["core_speedup"],
                         f"loop time / scan time, forward+backward, {where}"))
    share = _ratio(df, "share", "bk_core_in_layer", "bk_layer")
    summary["core_share"] = share
    share_rows = df[df["kind"] == "share"]
    where = (f"N={int(share_rows['seq_len'].iloc[0])}, d_model {int(share_rows['d_model'].iloc[0])}"
             ", batch 1" if len(share_rows) else "")
    checks.append(_check("core_share", "resnet_bk", share, "<=", TARGETS["core_share"],
                         f"BK core time / layer time, forward+backward, {where}"))
    summary["checks"] = checks
    summary["all_pass"] = all(c["pass"] for c in checks)
    return summary


def _ratio(df: pd.DataFrame, kind: str, numerator: str, denominator: str) -> float | None:
    rows = df[(df["kind"] == kind) & (df["status"] == "ok")]
    top = rows.loc[rows["name"] == numerator, "seconds"]
    bottom = rows.loc[rows["name"] == denominator, "seconds"]
    if top.empty or bottom.empty or not bottom.iloc[0] > 0:
        return None
    return float(top.iloc[0] / bottom.iloc[0])


def _check(check: str, model: str, value, relation: str, target: float, note: str) -> dict:
    if value is None or not math.isfinite(value):
        passed = False
    else:
        passed = value <= target if relation == "<=" else value >= target
    return {"check": check, "model": model, "value": value,
            "target": f"{relation} {target:g}", "pass": bool(passed), "note": note}


if __name__ == "__main__":
    _worker()
