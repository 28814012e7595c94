"""Memory facts shared by training and the benchmark: peaks, the current RSS, and OOM errors."""

from __future__ import annotations

import os
import resource

import torch


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak since the last reset on CUDA; the process's high-water mark (RSS) on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            resident_pages = int(handle.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the high-water mark so far is the best baseline there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def is_oom(error: BaseException) -> bool:
    """Out of memory, on CUDA (OutOfMemoryError) or from the CPU allocator."""
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks instead of returning each large one to the kernel.

    By default every freed tensor over 32 MB goes back to the OS and the next one page-faults
    in again; at long sequence lengths that kernel time grows faster than the model's O(N)
    compute and would bend a CPU scaling measurement. Returns whether glibc accepted it.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # the largest value mallopt takes: a 131,072-token logit tensor alone is over 1 GiB
        largest = 2**31 - 1
        return bool(libc.mallopt(m_mmap_threshold, largest)) and bool(
            libc.mallopt(m_trim_threshold, largest))
    except (OSError, AttributeError):  # not glibc
        return False
