"""OpenVINO backend: the bundle's ONNX file compiled by the OpenVINO runtime for this machine's CPU.

On x86-64 CPUs OpenVINO is often faster than ONNX Runtime on the very same ``.onnx`` file, but its numbers are its
own (INT8 QDQ graphs especially: it fuses and requantizes differently), so it runs an artifact only where the
accuracy gate scored that artifact *on OpenVINO* and it passed (``"openvino"`` in the artifact's
``GateVerdict.providers``; checked by :func:`kimchi_edge.runtime.backends.create_backend`, not here).

The OpenVINO runtime itself is used, not ONNX Runtime's OpenVINO execution provider: that one ships as the
``onnxruntime-openvino`` wheel, which provides the same ``onnxruntime`` module as ``onnxruntime-gpu`` (our base
dependency on Linux x86-64) and would overwrite it.

Settings: device ``CPU``, ``PERFORMANCE_HINT=LATENCY`` (one stream), ``INFERENCE_NUM_THREADS`` = ``threads`` (default:
every core this process may use, like ONNX Runtime), ``INFERENCE_PRECISION_HINT=f32`` (on CPUs with AMX/AVX-512
BF16 OpenVINO would otherwise run an FP32 model in bfloat16, which is not what the gate scored elsewhere) and
``ENABLE_CPU_PINNING=False`` (ONNX Runtime does not pin either; with pinned threads a batch-1 call took 17.8 ms instead
of 3.5 ms on a 2-core machine other processes were using).

``openvino`` is imported only inside this module's functions, and this module only when the backend is asked for.
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError, BundleError, InvalidInputError, MissingDependencyError
from ..manifest import Artifact, BundleManifest, artifact_path

#: What installing OpenVINO takes, said once.
INSTALL_HINT = "pip install 'kimchi-edge[openvino]'"
#: The OpenVINO device this backend compiles for.
DEVICE = "CPU"
#: Compile settings besides the thread count (see the module docstring for why each).
SETTINGS: dict[str, Any] = {
    "PERFORMANCE_HINT": "LATENCY",
    "INFERENCE_PRECISION_HINT": "f32",
    "ENABLE_CPU_PINNING": False,  # like ONNX Runtime; pinned threads waited 5x longer on a shared 2-core machine
}


def import_openvino() -> Any:
    """The ``openvino`` module, or :class:`MissingDependencyError` naming the fix."""
    try:
        import openvino
    except ImportError as exc:
        raise MissingDependencyError(f"the OpenVINO backend needs openvino ({exc}); install it with: {INSTALL_HINT}") from exc
    return openvino


def _ov_message(exc: BaseException) -> str:
    """OpenVINO's message on one line, without its source locations ("Exception from src/...:", "Check '...' failed at")."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))]
    return " ".join(said or lines[:1]) or type(exc).__name__


def _cores() -> int:
    from .onnxruntime_backend import physical_cores  # the one cores helper; ONNX Runtime is a base dependency

    return physical_cores()


class OpenVINOBackend:
    """Runs an ONNX artifact of the bundle with OpenVINO on the CPU (``uint8`` NHWC input, normalisation in the graph).

    Safe to share between threads: each concurrent call takes its own infer request from a pool.
    """

    name = "openvino"

    def __init__(self, bundle_dir: Path, manifest: BundleManifest, artifact: Artifact, *, threads: int | None = None) -> None:
        ov = import_openvino()
        self.artifact = artifact
        self._ov_version = ov.get_version()
        path = artifact_path(bundle_dir, artifact)
        config = {**SETTINGS, "INFERENCE_NUM_THREADS": int(threads or _cores())}
        try:
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(str(path)), DEVICE, config)
        except Exception as exc:  # OpenVINO raises RuntimeError (and its own subclasses) for unreadable/unsupported graphs
            raise BundleError(f"OpenVINO could not load {path.name}: {_ov_message(exc)}") from exc
        inp = self.compiled.input(0)
        self.expected_dtype = np.uint8 if inp.get_element_type() == ov.Type.u8 else np.float32
        #: the input's dimensions, ``None`` where dynamic (the batch axis): ``[None, H, W, 3]``
        self.input_dims = [None if d.is_dynamic else d.get_length() for d in inp.get_partial_shape()]
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self.device_name = core.get_property(DEVICE, "FULL_DEVICE_NAME")
        self._idle: queue.SimpleQueue = queue.SimpleQueue()

    def _check_shape(self, batch: np.ndarray) -> None:
        fixed = self.input_dims
        if batch.ndim != len(fixed) or any(f is not None and f != n for f, n in zip(fixed, batch.shape)):
            want = ", ".join("N" if f is None else str(f) for f in fixed)
            raise InvalidInputError(f"got a batch of shape {tuple(batch.shape)}; expected ({want})")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if batch.dtype != self.expected_dtype:
            raise InvalidInputError(f"got a batch of dtype {batch.dtype}; this model expects {np.dtype(self.expected_dtype)}")
        self._check_shape(batch)
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            request.infer({0: np.ascontiguousarray(batch)})
            out = np.array(request.get_output_tensor(0).data, dtype=np.float32)  # a copy: the request reuses its buffer
        except Exception as exc:  # OpenVINO raises RuntimeError on failures inside the plugin
            raise BackendError(f"OpenVINO inference failed on {self.artifact.file}: {_ov_message(exc)}") from exc
        finally:
            self._idle.put(request)
        return out

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "providers": [DEVICE],
            "artifact": self.artifact.name,
            "file": self.artifact.file,
            "precision": self.artifact.precision,
            "threads": self.threads,
            "openvino": self._ov_version,
            "device": self.device_name,
            "performance_hint": SETTINGS["PERFORMANCE_HINT"],
            "inference_precision": SETTINGS["INFERENCE_PRECISION_HINT"],
            "cpu_pinning": SETTINGS["ENABLE_CPU_PINNING"],
        }

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait()
            except queue.Empty:
                break
        self.compiled = None  # type: ignore[assignment]

    def __enter__(self) -> "OpenVINOBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
