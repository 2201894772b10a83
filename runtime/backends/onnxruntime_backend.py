"""ONNX Runtime backend: asks only for execution providers that can really load on this machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import BundleError, InvalidInputError
from ..manifest import Artifact, BundleManifest, artifact_path
from ..sysinfo import can_load_library, cuda_hidden, load_libcuda


def _has_cuda_device() -> bool:
    if cuda_hidden():
        return False
    if load_libcuda() is None:
        return False
    return True


def usable_providers() -> list[str]:
    """Execution providers that will actually work here, best first.

    ``onnxruntime-gpu`` lists CUDA and TensorRT even on machines without a GPU or without TensorRT,
    and then prints pages of errors when asked for them; we check for the driver/library first.
    """
    available = ort.get_available_providers()
    wanted: list[str] = []
    cuda = _has_cuda_device()
    if cuda and "TensorrtExecutionProvider" in available and can_load_library("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        wanted.append("TensorrtExecutionProvider")
    if cuda and "CUDAExecutionProvider" in available:
        wanted.append("CUDAExecutionProvider")
    wanted.append("CPUExecutionProvider")
    return wanted


def physical_cores() -> int:
    """Cores this process may use (affinity aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class OnnxRuntimeBackend:
    """Runs an ONNX artifact of the bundle (``uint8`` NHWC input, normalisation inside the graph)."""

    name = "onnxruntime"

    def __init__(
        self,
        bundle_dir: Path,
        manifest: BundleManifest,
        artifact: Artifact,
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        self.artifact = artifact
        path = artifact_path(bundle_dir, artifact)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or physical_cores()
        opts.inter_op_num_threads = 1
        self.providers_requested = providers or usable_providers()
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers_requested)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise BundleError(f"ONNX Runtime could not load {path.name}: {str(exc).splitlines()[0]}") from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        self.expected_dtype = np.uint8 if "uint8" in inp.type else np.float32
        # per-image dims as the file declares them (None where symbolic): the item size when the
        # batch resample is inside the graph (Preprocessing.resample_in_graph), else the network size
        self.input_dims = [d if isinstance(d, int) else None for d in inp.shape]
        self.threads = opts.intra_op_num_threads

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if batch.dtype != self.expected_dtype:
            raise InvalidInputError(f"got a batch of dtype {batch.dtype}; this model expects {np.dtype(self.expected_dtype)}")
        dims = self.input_dims
        if batch.ndim != len(dims) or any(d is not None and d != n for d, n in zip(dims, batch.shape)):
            want = ", ".join("N" if d is None else str(d) for d in dims)
            raise InvalidInputError(f"got a batch of shape {tuple(batch.shape)}; expected ({want})")
        (out,) = self.session.run([self.output_name], {self.input_name: batch})
        return np.asarray(out, dtype=np.float32)

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "providers": self.session.get_providers(),
            "artifact": self.artifact.name,
            "file": self.artifact.file,
            "precision": self.artifact.precision,
            "threads": self.threads,
            "onnxruntime": ort.__version__,
        }

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]

    def __enter__(self) -> "OnnxRuntimeBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
