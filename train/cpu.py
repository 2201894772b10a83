"""Training on a CPU without wasting the user's time: threads that fit the machine, memory kept for reuse.

Two measurements on the 2-core development machine (see docs/TRAINING.md, "CPU training") led here:

* **Allocation churn.** glibc hands every block above its mmap threshold (at most 32 MiB) straight
  back to the kernel when it is freed; a training step at 224 px allocates and frees activations of
  ~100 MB each, so every step page-faults them in again.  EfficientNet-Lite0, 224 px, batch 64:
  system time 14.0 s against 8.9 s of user time for two steps; with the freed memory kept (below)
  0.4 s system time and half the wall time.  :func:`keep_freed_memory` raises the mmap and trim
  thresholds, as ``MALLOC_MMAP_THRESHOLD_`` would, but from inside the process.
* **Threads that wait for a busy core.** PyTorch's intra-op threads meet at a barrier after every
  operator; when another process holds one of two cores, the barrier waits for it (and spins
  meanwhile).  At a load average of ~5 on 2 cores, one thread trained 2x faster than two.
  :func:`default_threads` therefore counts the cores the load average leaves free.
"""

from __future__ import annotations

import os

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_KEEP_BYTES = 1 << 30


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """Intra-op threads for training: the cores the 1-minute load average leaves free, at least 1.

    Args:
        cores: cores available (default :func:`cpu_count`).
        load: 1-minute load average (default: :func:`kimchi_edge.runtime.sysinfo.loadavg`; all cores when unknown).
    """
    cores = cpu_count() if cores is None else cores
    if load is None:
        from kimchi_edge.runtime.sysinfo import loadavg

        one = loadavg()
        if not one:
            return cores
        load = one[0]
    return max(1, min(cores, int(cores - load + 0.5)))


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks for reuse instead of returning them to the kernel.

    Returns:
        True if the allocator took the setting (glibc), False elsewhere (musl, macOS, Windows),
        where nothing changes.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) or bool(mallopt(_M_MMAP_MAX, 0))
    return bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)) and ok


def setup_cpu_training(threads: int | None = None) -> int:
    """Apply both settings for a CPU training run; return the number of intra-op threads used.

    Args:
        threads: intra-op threads (default :func:`default_threads`).
    """
    import torch

    keep_freed_memory()
    n = threads or default_threads()
    torch.set_num_threads(n)
    return n
