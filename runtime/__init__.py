"""kimchi-edge runtime: load a model bundle and classify images.

Light by design: numpy, Pillow and ONNX Runtime only (TensorRT inside its backend); never torch or
fastai, never unpickles anything.
"""

from .classifier import Classifier, Prediction
from .errors import (
    BackendError,
    BundleError,
    DataError,
    GateFailed,
    ImageTooLargeError,
    InvalidInputError,
    KimchiEdgeError,
    MissingDependencyError,
    UsageError,
)
from .manifest import Artifact, BundleManifest, ModelMeta, Preprocessing, read_manifest
from .preprocess import Preprocessor, decode_image

from kimchi_edge import __version__  # the one place the version is written

__all__ = [
    "__version__",
    "Artifact",
    "BackendError",
    "Classifier",
    "Prediction",
    "BundleError",
    "BundleManifest",
    "DataError",
    "GateFailed",
    "ImageTooLargeError",
    "InvalidInputError",
    "KimchiEdgeError",
    "MissingDependencyError",
    "ModelMeta",
    "Preprocessing",
    "Preprocessor",
    "UsageError",
    "decode_image",
    "read_manifest",
]
