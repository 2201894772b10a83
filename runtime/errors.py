"""One exception family for the whole project.

Every error a user can cause (bad data, bad image, bad bundle, a failed gate, a missing optional
dependency) is a :class:`KimchiEdgeError`.  The CLI catches exactly this class, prints its one-line
message and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class KimchiEdgeError(Exception):
    """Base class of every error kimchi-edge raises on purpose.

    Attributes:
        exit_code: process exit status the CLI uses for this error.
    """

    exit_code = 1


class UsageError(KimchiEdgeError):
    """Wrong paths or options given by the user (exit 2, like argparse)."""

    exit_code = 2


class DataError(UsageError):
    """A training/validation data folder that cannot be used as given."""


class InvalidInputError(KimchiEdgeError):
    """An image or array handed to the runtime that it cannot classify."""


class ImageTooLargeError(InvalidInputError):
    """An image whose pixel count exceeds the configured limit (decompression-bomb guard)."""


class BundleError(KimchiEdgeError):
    """A model bundle that is missing, incomplete, tampered with or incompatible."""


class GateFailed(KimchiEdgeError):
    """An artifact that does not classify like the original learner."""


class BackendError(KimchiEdgeError):
    """An inference backend failed while loading or running (e.g. TensorRT could not deserialise an engine)."""


class MissingDependencyError(KimchiEdgeError):
    """An optional dependency needed at this point is not installed; the message names the fix."""


def require(module: str, *, extra: str, purpose: str):
    """Import an optional dependency or raise :class:`MissingDependencyError` naming the fix.

    Args:
        module: importable module name, e.g. ``"fastai.vision.all"``.
        extra: the kimchi-edge extra that provides it, e.g. ``"train"``.
        purpose: what needs it, e.g. ``"training"``.

    Returns:
        The imported module.

    Raises:
        MissingDependencyError: when the import fails.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised in the isolation test
        raise MissingDependencyError(
            f"{purpose} needs {module.split('.')[0]} ({exc}); install it with: pip install 'kimchi-edge[{extra}]'"
        ) from exc
