"""Checkpoints a killed run resumes from: atomic, checksummed, with a fallback to the one before.

A checkpoint is `step_XXXXXXXX.pt` with a sidecar `step_XXXXXXXX.sha256`; the sidecar is
written after the checkpoint is in place, so a checkpoint without a matching sidecar is never
trusted. The two newest checkpoints are kept.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from fairlm.io import atomic_path, sha256_bytes

KEEP = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (another config, or none readable)."""


def _paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("step_*.pt"))


def save(folder: str | os.PathLike, step: int, state: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    path = folder / f"step_{step:08d}.pt"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    with atomic_path(path.with_suffix(".sha256")) as tmp:
        tmp.write_text(sha256_bytes(payload) + "\n")
    for old in _paths(folder)[:-KEEP]:
        old.unlink(missing_ok=True)
        old.with_suffix(".sha256").unlink(missing_ok=True)
    return path


def load_latest(folder: str | os.PathLike, settings_hash: str, log=print) -> dict | None:
    """The newest checkpoint whose checksum verifies, or None when there is none.

    A corrupt checkpoint is reported and skipped; one written under other settings is refused,
    because resuming it would silently mix two experiments.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for path in reversed(_paths(folder)):
        sidecar = path.with_suffix(".sha256")
        payload = path.read_bytes()
        expected = sidecar.read_text().strip() if sidecar.is_file() else None
        if expected != sha256_bytes(payload):
            log(f"checkpoint {path.name} is corrupt or incomplete (checksum mismatch); "
                "falling back to the one before it")
            continue
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
        if state.get("settings_hash") != settings_hash:
            raise CheckpointError(
                f"checkpoint {path} was written by a run with other settings "
                f"(settings hash {str(state.get('settings_hash'))[:12]}…, this run "
                f"{settings_hash[:12]}…); delete {folder} to start this run afresh"
            )
        log(f"resuming from checkpoint {path.name} (step {state['step']})")
        return state
    return None


def remove_all(folder: str | os.PathLike) -> None:
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.suffix in {".pt", ".sha256", ".tmp"} or path.name.startswith("."):
            path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass
