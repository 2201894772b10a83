"""kimchi-edge: take a fastai image classifier to the edge and prove it still classifies like the original.

One import name for the whole toolchain::

    from kimchi_edge import Classifier          # the light runtime (numpy, Pillow, ONNX Runtime)
    import kimchi_edge.runtime                   # bundle manifest, preprocessing, backends, server
    import kimchi_edge.train                     # fastai stage          (extra: [train])
    import kimchi_edge.convert                   # bundle + accuracy gate (extra: [convert])
    import kimchi_edge.mobile_demo               # Streamlit camera demo  (extra: [demo])
    import kimchi_edge.bench                     # side-by-side benchmark (extra: [convert])

The folders stay at the top of the repository (``runtime/``, ``train/`` ...); ``pyproject.toml`` maps them
under this package.  Importing ``kimchi_edge`` itself loads nothing: the runtime names below are loaded on
first use, so ``kimchi_edge.__version__`` works even where ONNX Runtime is not installed yet.
"""

from __future__ import annotations

#: The one place the version is written (pyproject.toml reads it from here).
__version__ = "0.2.0"

_RUNTIME_NAMES = (
    "Artifact", "BackendError", "BundleError", "BundleManifest", "Classifier", "DataError", "GateFailed",
    "ImageTooLargeError", "InvalidInputError", "KimchiEdgeError", "MissingDependencyError", "ModelMeta",
    "Prediction", "Preprocessing", "Preprocessor", "UsageError", "decode_image", "read_manifest",
)

__all__ = ["__version__", *_RUNTIME_NAMES]


def __getattr__(name: str):
    if name in _RUNTIME_NAMES:
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'kimchi_edge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_RUNTIME_NAMES))
