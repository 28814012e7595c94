"""One training run: the same loop, schedule, data order and clipping for every model.

Read top to bottom: settings → data → model → optimiser → (resume) → steps → evaluation →
results. Divergence and OOM are results, written like any other; a crash is a failed job.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import statistics
import time
from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fairlm import checkpoint
from fairlm.config import shared_settings
from fairlm.data import DataError, batch_starts, load_verified, windows
from fairlm.io import atomic_path, sha256_bytes, sha256_json, write_json
from fairlm.memory import is_oom, keep_freed_memory, peak_memory_mb
from fairlm.models import build_model, kernel_description, lm_loss, parameter_counts
from fairlm.provenance import system_info

COMPLETED, DIVERGED, OOM = "COMPLETED", "DIVERGED", "OOM"
EVAL_TOKENS_PER_BATCH = 16_384  # short windows are evaluated several at a time


# -- the schedule -------------------------------------------------------------------------------

def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimiser step `step` (1-based): linear warmup, then cosine to min_lr."""
    if warmup_steps and step <= warmup_steps:
        return lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# -- divergence ---------------------------------------------------------------------------------

class DivergenceMonitor:
    """Divergence (the run stops, a result) and loss spikes (counted, the run goes on).

    Diverged: a non-finite loss or gradient norm; a loss above explode_factor × ln V, the loss
    of a uniform guess over V tokens; or, once warmup + window steps are done, a median loss
    over the last window that is still no better than that uniform guess (a collapsed model).
    A spike: a loss above spike_factor × the median of the last window of finite losses.
    """

    def __init__(self, train_cfg: dict, vocab_size: int):
        self.spike_factor, self.window = train_cfg["spike_factor"], train_cfg["spike_window"]
        self.explode_factor = train_cfg["explode_factor"]
        self.chance_tolerance = train_cfg["chance_tolerance"]
        self.warmup_steps = train_cfg["warmup_steps"]
        self.chance_loss = math.log(vocab_size)
        self.recent: deque[float] = deque(maxlen=self.window)
        self.spike_steps: list[int] = []

    def update(self, step: int, loss: float, grad_norm: float, check_grad: bool = True):
        """Return (spike, divergence reason or None) for this step."""
        if not math.isfinite(loss):
            return False, "non-finite loss"
        if check_grad and not math.isfinite(grad_norm):
            return False, "non-finite gradient norm"
        if self.explode_factor is not None and loss > self.explode_factor * self.chance_loss:
            return False, (f"loss {loss:.4g} above {self.explode_factor} × ln V = "
                           f"{self.explode_factor * self.chance_loss:.4g}")
        enough = len(self.recent) >= min(self.window, 10)
        spike = enough and loss > self.spike_factor * statistics.median(self.recent)
        if spike:
            self.spike_steps.append(step)
        self.recent.append(loss)
        if (self.chance_tolerance is not None and step >= self.warmup_steps + self.window
                and len(self.recent) == self.window):
            median = statistics.median(self.recent)
            if median > (1 - self.chance_tolerance) * self.chance_loss:
                return spike, (f"median loss {median:.4g} over the last {self.window} steps no "
                               f"better than a uniform guess (ln V = {self.chance_loss:.4g})")
        return spike, None

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "spike_steps": list(self.spike_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.recent = deque(state["recent"], maxlen=self.window)
        self.spike_steps = list(state["spike_steps"])


def divergence_definition(train_cfg: dict) -> dict:
    definition = {
        "diverged": "the training loss or the global gradient norm (before clipping) is not "
                    "finite (NaN or ±Inf); the run stops at that step with status DIVERGED",
        "spike": f"a loss above {train_cfg['spike_factor']} × the median of the last "
                 f"{train_cfg['spike_window']} finite losses (counted, the run goes on)",
        "oom": "running out of memory ends the run with status OOM, never counted as divergence",
    }
    if train_cfg["explode_factor"] is not None:
        definition["explosion"] = (
            f"a loss above {train_cfg['explode_factor']} × ln V (V the vocabulary size; ln V is "
            "the loss of a uniform guess) is a divergence")
    if train_cfg["chance_tolerance"] is not None:
        definition["collapse"] = (
            f"after warmup + {train_cfg['spike_window']} steps, a median loss over the last "
            f"{train_cfg['spike_window']} steps above (1 − {train_cfg['chance_tolerance']}) × "
            "ln V, no better than a uniform guess, is a divergence")
    return definition


# -- signals: checkpoint before SLURM's time limit or preemption --------------------------------

class SignalFlag:
    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -- helpers --------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases, norms, scalars and SSM vectors keep their values.

    The same rule for every model, so weight decay is not a hidden difference between them.
    """
    decay, keep = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else keep).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": keep, "weight_decay": 0.0}]


def resolve_device(train_cfg: dict) -> torch.device:
    wanted = train_cfg["device"]
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config train.device is cuda but no CUDA device is available")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def autocast_for(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def evaluate(model, ids: np.ndarray, seq_len: int, micro_batch: int, device, precision) -> tuple:
    """Total NLL (nats) and number of predicted tokens over the whole split.

    Consecutive windows of seq_len predictions cover every token but the first exactly once;
    the last window is shorter.
    """
    micro_batch = max(micro_batch, EVAL_TOKENS_PER_BATCH // seq_len)
    model.eval()
    n = len(ids)
    starts = list(range(0, n - 1, seq_len))
    total, count = 0.0, 0
    for i in range(0, len(starts), micro_batch):
        group = starts[i : i + micro_batch]
        lengths = [min(seq_len, n - 1 - s) for s in group]
        for length in sorted(set(lengths)):
            same = [s for s, ln in zip(group, lengths, strict=True) if ln == length]
            batch = torch.from_numpy(windows(ids, np.asarray(same), length)).to(device)
            with autocast_for(device, precision):
                nll = lm_loss(model, batch, reduction="sum")
            total += float(nll)
            count += batch[:, 1:].numel()
    model.train()
    return total, count


def check_eval_lengths(meta: dict, seq_len: int, policy: str) -> None:
    for split in ("valid", "test"):
        tokens = meta["splits"][split]["tokens"]
        if tokens < seq_len + 1 and policy == "error":
            raise DataError(
                f"the {split} split has {tokens:,} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1:,}; set data.eval_policy: whole_split to evaluate it as one "
                "shorter window, or use a shorter seq_len"
            )


# -- the run ------------------------------------------------------------------------------------

def train(run_cfg: dict, data_dir, out_dir, checkpoint_dir, log=print) -> dict:
    """Train one (model, seq_len, seed) run and write its four result files into `out_dir`."""
    run, train_cfg = run_cfg["run"], run_cfg["train"]
    name, seq_len, seed, steps = run["model"], run["seq_len"], run["seed"], run["steps"]
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)

    meta, arrays = load_verified(data_dir)
    check_eval_lengths(meta, seq_len, run_cfg["data"]["eval_policy"])
    train_ids = arrays["train"]
    batch_starts(seed, 1, len(train_ids), seq_len, 1)  # fails early when the split is too short

    device = resolve_device(train_cfg)
    allocator_tuned = device.type == "cpu" and keep_freed_memory()
    if train_cfg["threads"]:
        torch.set_num_threads(train_cfg["threads"])
    if train_cfg["deterministic"] and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False

    recorded = dict(run_cfg, tokenizer_sha256=meta["tokenizer"]["sha256"],
                    data_sha256={s: v["array_sha256"] for s, v in meta["splits"].items()})
    settings_hash = sha256_json(shared_settings(recorded))
    run_hash = sha256_json(recorded)

    seed_everything(seed)
    model = build_model(name, run_cfg, meta["tokenizer"]["vocab_size"]).to(device)
    if train_cfg["grad_checkpointing"] and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    params = parameter_counts(model)
    optimizer = torch.optim.AdamW(
        param_groups(model, train_cfg["weight_decay"]), lr=train_cfg["lr"],
        betas=tuple(train_cfg["betas"]), eps=train_cfg["eps"],
    )
    fp16 = device.type == "cuda" and train_cfg["precision"] == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    micro = train_cfg["micro_batch_size"] or train_cfg["batch_size"]
    accumulation = train_cfg["batch_size"] // micro
    monitor = DivergenceMonitor(train_cfg, meta["tokenizer"]["vocab_size"])
    rows: list[dict] = []
    start_step, elapsed_before = 1, 0.0

    state = checkpoint.load_latest(checkpoint_dir, run_hash, log=log)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        monitor.load_state_dict(state["monitor"])
        set_rng_state(state["rng"])
        rows, start_step, elapsed_before = state["rows"], state["step"] + 1, state["elapsed_s"]

    def save_checkpoint(step: int) -> None:
        checkpoint.save(checkpoint_dir, step, {
            "step": step, "settings_hash": run_hash, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "monitor": monitor.state_dict(), "rng": rng_state(), "rows": rows,
            "elapsed_s": elapsed_before + time.perf_counter() - t0,
            "data_position": {"next_step": step + 1, "sampler": "batch_starts(seed, step)"},
        })

    log(f"{name} L={seq_len} seed={seed}: {params['total']:,} parameters "
        f"({params['non_embedding']:,} non-embedding), {steps} steps, batch "
        f"{train_cfg['batch_size']} = {accumulation} × {micro}, device {device}, "
        f"kernels: {kernel_description(model)}")
    status, diverged_at, reason = COMPLETED, None, None
    t0 = time.perf_counter()
    model.train()
    with SignalFlag() as signals:
        for step in range(start_step, steps + 1):
            lr = lr_at(step, train_cfg["lr"], train_cfg["min_lr"], train_cfg["warmup_steps"], steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = windows(train_ids, batch_starts(seed, step, len(train_ids), seq_len,
                                                    train_cfg["batch_size"]), seq_len)
            t_step = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                loss_sum = 0.0
                optimizer.zero_grad(set_to_none=True)
                for part in np.split(batch, accumulation):
                    tokens = torch.from_numpy(part).to(device)
                    with autocast_for(device, train_cfg["precision"]):
                        loss = lm_loss(model, tokens)
                    scaler.scale(loss / accumulation).backward()
                    loss_sum += float(loss.detach())
                scaler.unscale_(optimizer)
                clip = train_cfg["grad_clip"] if train_cfg["grad_clip"] > 0 else math.inf
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            except Exception as error:
                if not is_oom(error):
                    raise
                log(f"step {step}: out of memory ({error}); status OOM")
                status = OOM
                break
            loss_value = loss_sum / accumulation
            seconds = time.perf_counter() - t_step
            row = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": batch.shape[0] * seq_len / seconds,
                   "peak_mem_mb": peak_memory_mb(device), "val_loss": math.nan,
                   "spike": False, "batch_sha": sha256_bytes(batch.tobytes()),
                   "elapsed_s": elapsed_before + time.perf_counter() - t0}
            rows.append(row)
            # fp16's scaler skips steps with overflowing gradients by design; only the loss counts
            row["spike"], reason = monitor.update(step, loss_value, grad_norm, check_grad=not fp16)
            if reason is not None:
                status, diverged_at = DIVERGED, step
                log(f"step {step}: {reason} (loss {loss_value}, grad norm {grad_norm}); "
                    "status DIVERGED")
                break
            scaler.step(optimizer)
            scaler.update()
            if step % train_cfg["eval_every"] == 0 or step == steps:
                nll, count = evaluate(model, arrays["valid"], seq_len, micro, device,
                                      train_cfg["precision"])
                row["val_loss"] = nll / count
            if step % train_cfg["log_every"] == 0 or step == steps or step == start_step:
                done = step - start_step + 1
                eta = (time.perf_counter() - t0) / done * (steps - step)
                val = f" val {row['val_loss']:.4f}" if math.isfinite(row["val_loss"]) else ""
                log(f"step {step}/{steps} loss {loss_value:.4f}{val} lr {lr:.3e} "
                    f"grad {grad_norm:.3f} {row['tokens_per_s']:,.0f} tok/s ETA {eta:,.0f} s")
            if step % train_cfg["checkpoint_every"] == 0 and step < steps:
                save_checkpoint(step)
            if signals.received is not None:
                save_checkpoint(step)
                received, signals.received = signals.received, None
                log(f"signal {signal.Signals(received).name}: checkpoint written at step {step}")
                if received == signal.SIGTERM:
                    raise SystemExit(128 + received)

    wall = elapsed_before + time.perf_counter() - t0
    summary = {
        "model": name, "seq_len": seq_len, "seed": seed, "status": status,
        "diverged_at_step": diverged_at, "divergence_reason": reason,
        "steps_planned": steps, "steps_completed": len(rows) - (status == DIVERGED),
        "final_train_loss": next((r["loss"] for r in reversed(rows)
                                  if math.isfinite(r["loss"]) and r["step"] != diverged_at), None),
        "spikes": {"count": len(monitor.spike_steps), "steps": monitor.spike_steps},
        "tokens_seen": len(rows) * train_cfg["batch_size"] * seq_len,
        "epochs": len(rows) * train_cfg["batch_size"] * seq_len / meta["splits"]["train"]["tokens"],
        "tokens_per_s_mean": float(np.mean([r["tokens_per_s"] for r in rows])) if rows else None,
        "peak_mem_mb": max((r["peak_mem_mb"] for r in rows), default=None),
        "wall_time_s": wall, "params": params, "settings_hash": settings_hash,
        "divergence_definition": divergence_definition(train_cfg),
    }
    evals = {"final_val_loss": None, "final_val_ppl": None, "final_val_word_ppl": None,
             "test_loss": None, "test_ppl": None, "test_word_ppl": None}
    if status == COMPLETED:
        for split, prefix in (("valid", "final_val"), ("test", "test")):
            if split == "valid" and rows and math.isfinite(rows[-1]["val_loss"]):
                nll = rows[-1]["val_loss"] * (len(arrays["valid"]) - 1)
                count = len(arrays["valid"]) - 1
            else:
                nll, count = evaluate(model, arrays[split], seq_len, micro, device,
                                      train_cfg["precision"])
            words = meta["splits"][split]["words"]
            loss_key = "final_val_loss" if split == "valid" else "test_loss"
            evals[loss_key] = nll / count
            evals[f"{prefix}_ppl"] = math.exp(nll / count)
            evals[f"{prefix}_word_ppl"] = math.exp(nll / words)
    summary.update(evals)

    system = system_info(kernel_description(model), deterministic=bool(train_cfg["deterministic"]))
    system["device"] = str(device)
    system["glibc_keeps_freed_memory"] = allocator_tuned
    write_json(out_dir / "config.json", recorded)
    write_json(out_dir / "system.json", system)
    metrics = pd.DataFrame(rows, columns=[
        "step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb", "val_loss", "spike",
        "batch_sha", "elapsed_s"])
    with atomic_path(out_dir / "metrics.parquet") as tmp:
        metrics.to_parquet(tmp, index=False)
    write_json(out_dir / "summary.json", summary)
    if not train_cfg["keep_checkpoints"]:
        checkpoint.remove_all(checkpoint_dir)
    ppl = f", val ppl {summary['final_val_ppl']:.2f}" if summary["final_val_ppl"] else ""
    log(f"done: {status}{ppl}, {wall:,.0f} s")
    return summary
