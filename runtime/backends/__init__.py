"""Inference backends behind one small protocol, chosen by name from a registry.

A backend takes a ``uint8`` batch in the bundle's layout and returns float32 logits ``(N, classes)``.
``auto`` picks TensorRT when an engine in the bundle is compatible with what is installed, and ONNX
Runtime otherwise, and says which (``Classifier.info``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import BackendError, BundleError, UsageError
from ..manifest import Artifact, BundleManifest, verify_artifact

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")


class Backend(Protocol):
    """What every backend offers: load in the constructor, ``infer``, ``close``; a context manager."""

    name: str
    artifact: Artifact

    def infer(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - protocol
        """Run one ``uint8`` batch and return float32 logits ``(N, classes)``."""

    def info(self) -> dict[str, Any]:  # pragma: no cover - protocol
        """What is really in use: backend, provider(s), artifact, precision."""

    def close(self) -> None:  # pragma: no cover - protocol
        """Release the session/engine."""


def create_backend(
    name: str,
    bundle_dir: Path,
    manifest: BundleManifest,
    *,
    artifact: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
    providers: list[str] | None = None,
    verify: bool = True,
) -> tuple[Backend, list[str]]:
    """Create the backend ``name`` and return it with the notes explaining the choice.

    Args:
        name: ``"auto"``, ``"onnxruntime"`` or ``"tensorrt"``.
        bundle_dir: the bundle folder.
        manifest: its manifest.
        artifact: force one artifact by name (e.g. ``"onnx-int8"``).
        precision: prefer ``"fp32"``, ``"fp16"`` or ``"int8"`` among the candidates.
        threads: CPU threads for ONNX Runtime (default: all cores).
        providers: force ONNX Runtime execution providers.
        verify: check the chosen artifact's SHA-256 against the manifest before loading it.

    Returns:
        ``(backend, notes)`` where ``notes`` are human sentences such as a TensorRT fallback reason.
    """
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    notes: list[str] = []
    forced_onnx = artifact is not None and manifest.artifact(artifact).format != "tensorrt"  # unknown name: BundleError
    has_engine = any(a.format == "tensorrt" for a in manifest.artifacts)
    if name == "auto" and not forced_onnx and not has_engine:
        # Nothing to try.  Say so only where TensorRT could matter: a CUDA GPU is here but the bundle has no engine.
        if _cuda_gpu_present():
            notes.append("TensorRT not used: the bundle has no TensorRT engine for this GPU "
                         f"(build one with: kimchi-edge build-engine {bundle_dir}); using ONNX Runtime")
            log.info("%s", notes[-1])
    elif name == "tensorrt" or (name == "auto" and not forced_onnx):
        from .tensorrt_backend import TensorRTUnavailable, create_tensorrt_backend

        try:
            return create_tensorrt_backend(bundle_dir, manifest, artifact=artifact, precision=precision, verify=verify), notes
        except (TensorRTUnavailable, BackendError, BundleError) as exc:
            if name == "tensorrt":
                raise
            notes.append(f"TensorRT not used: {exc}; using ONNX Runtime instead")
            log.info("%s", notes[-1])
            if artifact is not None and not forced_onnx:
                artifact = None  # the engine asked for is not usable; let ONNX Runtime pick its own
    try:
        from .onnxruntime_backend import OnnxRuntimeBackend
    except ImportError as exc:
        from ..errors import MissingDependencyError

        raise MissingDependencyError(
            f"ONNX Runtime is not installed ({exc}); on a Jetson install NVIDIA's onnxruntime-gpu wheel for your "
            "JetPack, elsewhere: pip install 'kimchi-edge[onnxruntime]'"
        ) from exc

    art = choose_onnx_artifact(manifest, artifact=artifact, precision=precision)
    if verify:
        verify_artifact(bundle_dir, art)
    return OnnxRuntimeBackend(bundle_dir, manifest, art, threads=threads, providers=providers), notes


def _cuda_gpu_present() -> bool:
    from ..sysinfo import cuda_gpu_present

    return cuda_gpu_present()


def choose_onnx_artifact(manifest: BundleManifest, *, artifact: str | None = None, precision: str | None = None) -> Artifact:
    """Pick the ONNX artifact: the user's choice, else the manifest's recommendation, else FP32."""
    onnx = [a for a in manifest.artifacts if a.format == "onnx"]
    if artifact:
        art = manifest.artifact(artifact)
        if art.format != "onnx":
            raise UsageError(f"artifact {artifact!r} is {art.format}, not ONNX; ONNX artifacts: {[a.name for a in onnx]}")
        return art
    if not onnx:
        raise BundleError(f"bundle has no ONNX artifact (has {[a.name for a in manifest.artifacts]}); re-run kimchi-edge convert")
    if precision:
        for a in onnx:
            if a.precision == precision:
                return a
        raise UsageError(f"bundle has no ONNX artifact in {precision}; it has {[(a.name, a.precision) for a in onnx]}")
    rec = manifest.recommended.get("onnxruntime")
    if rec:
        return manifest.artifact(rec)
    for a in onnx:
        if a.precision == "fp32":
            return a
    return onnx[0]
