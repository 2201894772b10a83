"""TensorRT backend (engine from the bundle), with a compatibility check *before* deserialising.

Only this module imports ``tensorrt`` (and only inside functions), so the runtime stays importable
without it.  Not exercised on machines without TensorRT and a GPU (tests marked ``tensorrt``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import KimchiEdgeError
from ..manifest import BundleManifest


class TensorRTUnavailable(KimchiEdgeError):
    """TensorRT cannot be used for this bundle here; the message says why and how to fix it."""


def create_tensorrt_backend(bundle_dir: Path, manifest: BundleManifest, *, artifact: str | None = None, precision: str | None = None, verify: bool = True):
    """Return a TensorRT backend for a compatible engine of the bundle, or raise TensorRTUnavailable."""
    engines = [a for a in manifest.artifacts if a.format == "tensorrt"]
    if artifact:
        engines = [a for a in engines if a.name == artifact]
    if precision:
        engines = [a for a in engines if a.precision == precision]
    if not engines:
        raise TensorRTUnavailable("the bundle has no TensorRT engine (build one on the target: kimchi-edge build-engine BUNDLE --fp16)")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise TensorRTUnavailable("tensorrt is not installed (JetPack ships it; on x86: pip install 'kimchi-edge[tensorrt]')") from None
    raise TensorRTUnavailable("TensorRT engine execution is not implemented yet")
