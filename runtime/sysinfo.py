"""Facts about this machine and this process, and a few numbers every stage computes the same way.

One implementation each of: the image file suffixes, latency percentiles, peak/now resident memory,
the load average, the CPU's integer dot-product instructions (``/proc/cpuinfo``), and probing the CUDA driver
(``libcuda``) with ctypes.  Used by the runtime
(backends, ``kimchi-edge predict``/``bench``), training (dataset scan), conversion (TensorRT facts)
and the benchmark (``kimchi_edge.bench``).

Light on purpose: the standard library at module level, numpy inside :func:`percentiles`; no
package-relative imports, so a measuring subprocess can load this file by path without importing
``kimchi_edge.runtime`` (see ``kimchi_edge.bench.experiments``).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, Sequence

#: File name endings (lower case) treated as images when a folder is scanned.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

#: Names the CUDA driver library has on Linux (``.so.1`` is what the driver installs) and Windows.
LIBCUDA_NAMES = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")

#: x86-64 CPU flags (Linux ``/proc/cpuinfo`` names) of integer dot products that add u8 x s8 products in 32 bits:
#: AVX-512 VNNI, AVX-VNNI, AMX-INT8.  Without them (AVX2 alone) ONNX Runtime multiplies with ``vpmaddubsw``, whose
#: 16-bit pair sums saturate unless the weights keep to 7 bits.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

# CUdevice_attribute values of the CUDA driver API.
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


_CPU_FLAGS: frozenset[str] | None = None


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux names them (``/proc/cpuinfo``); empty elsewhere or when unreadable."""
    global _CPU_FLAGS
    if _CPU_FLAGS is None:
        flags: frozenset[str] = frozenset()
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith(("flags", "Features")):  # x86 / ARM
                        flags = frozenset(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
        _CPU_FLAGS = flags
    return _CPU_FLAGS


def cpu_has_vnni(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU is x86-64 with VNNI-class integer dot products (:data:`VNNI_FLAGS`), where ONNX Runtime's
    u8 x s8 convolutions do not saturate with full 8-bit weights."""
    return bool(set(VNNI_FLAGS) & (cpu_flags() if flags is None else flags))


# --------------------------------------------------------------------------- statistics


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99, mean, min, max and count of ``values`` (numpy's default linear interpolation).

    Args:
        values: samples, e.g. latencies in ms.

    Returns:
        ``{"p50", "p90", "p99", "mean", "min", "max"}`` as floats and ``"n"`` as an int.

    Raises:
        ValueError: when ``values`` is empty.
    """
    import numpy as np

    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("percentiles of an empty sequence; expected at least one sample")
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


# --------------------------------------------------------------------------- this process, this machine


def memory_mb() -> dict[str, float]:
    """Resident memory of this process in MiB: ``VmRSS`` (now) and ``VmHWM`` (peak).

    Read from ``/proc/self/status`` on Linux; elsewhere only the peak (``VmHWM``), from
    ``getrusage`` (``ru_maxrss`` is KiB on Linux, bytes on macOS); ``{}`` where neither exists.
    """
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    if "VmHWM" not in out:
        try:
            import resource
        except ImportError:  # Windows
            return out
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["VmHWM"] = peak / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return out


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB (``VmHWM``), ``None`` where it cannot be read."""
    return memory_mb().get("VmHWM")


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages (``[]`` where the OS has none, e.g. Windows)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return []


# --------------------------------------------------------------------------- CUDA driver (ctypes, no extra package)


def cuda_hidden() -> bool:
    """``CUDA_VISIBLE_DEVICES`` hides every GPU (set to ``""`` or ``-1``)."""
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1")


def cuda_gpu_present() -> bool:
    """A CUDA device answers here: not hidden, the driver loads, ``cuInit`` works, at least one device."""
    return not cuda_hidden() and cuda_device_facts().get("gpu") is not None


def can_load_library(*names: str) -> bool:
    """Whether any of the shared libraries ``names`` loads here (e.g. ``"libnvinfer.so.10"``)."""
    return _load_first(names) is not None


def load_libcuda() -> Any | None:
    """The CUDA driver library (:data:`LIBCUDA_NAMES`) as a ``ctypes.CDLL``, or ``None`` when there is none."""
    return _load_first(LIBCUDA_NAMES)


def cuda_device_facts(device: int = 0) -> dict[str, str | None]:
    """GPU name, compute capability and CUDA driver version of ``device``, through the CUDA driver API.

    Args:
        device: CUDA device ordinal.

    Returns:
        ``{"gpu", "compute_capability", "cuda_driver"}``; each value is ``None`` when unknown (no driver,
        ``cuInit`` fails, or no such device), e.g. ``{"gpu": "Orin", "compute_capability": "8.7",
        "cuda_driver": "12.2"}``.
    """
    facts: dict[str, str | None] = {"gpu": None, "compute_capability": None, "cuda_driver": None}
    cu = load_libcuda()
    if cu is None or cu.cuInit(0) != 0:
        return facts
    version = ctypes.c_int()
    if cu.cuDriverGetVersion(ctypes.byref(version)) == 0:
        facts["cuda_driver"] = f"{version.value // 1000}.{(version.value % 1000) // 10}"
    count, dev = ctypes.c_int(), ctypes.c_int()
    if cu.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= device or cu.cuDeviceGet(ctypes.byref(dev), device) != 0:
        return facts
    name = ctypes.create_string_buffer(256)
    if cu.cuDeviceGetName(name, 256, dev) == 0:
        facts["gpu"] = name.value.decode(errors="replace")
    major, minor = ctypes.c_int(), ctypes.c_int()
    if (cu.cuDeviceGetAttribute(ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev) == 0
            and cu.cuDeviceGetAttribute(ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev) == 0):
        facts["compute_capability"] = f"{major.value}.{minor.value}"
    return facts


def _load_first(names: Sequence[str]) -> Any | None:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None
