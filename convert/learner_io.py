"""Load ``learner.pkl`` (fastai ``learn.export()``) with errors a user can act on.

``learner.pkl`` is a Python pickle: unpickling runs whatever code the file names.  **Load only
learners you trust** (your own training runs).  fastai's own ``load_learner`` turns several failures
into an ``UnboundLocalError``; this loader mirrors it and names the actual problem instead:

* no file / an empty file / not a learner / a truncated or corrupt file;
* a learner that needs a function or class that is not defined here (the pickle stores only its
  module and name): the message names both and how to make it available (``--import``).
"""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

from kimchi_edge.runtime.errors import require

from .errors import LearnerError

LEARNER_NAME = "learner.pkl"
_ATTR_RE = re.compile(r"Can't get attribute '([^']+)' on <module '([^']+)'")


def import_for_unpickling(spec: str) -> None:
    """Make the functions a learner was exported with available before unpickling it.

    ``spec`` is a module name (``mypkg.labelling``) or a ``.py`` file.  Its public names are also
    copied into ``__main__``, because a learner exported from a notebook or script refers to its
    functions as ``__main__.<name>``.

    Raises:
        LearnerError: the module or file cannot be imported.
    """
    path = Path(spec)
    try:
        if spec.endswith(".py") or path.is_file():
            if not path.is_file():
                raise LearnerError(f"--import {spec}: no such file")
            name = f"_kimchi_edge_import_{path.stem}"
            mod_spec = importlib.util.spec_from_file_location(name, path)
            if mod_spec is None or mod_spec.loader is None:
                raise LearnerError(f"--import {spec}: not a Python file")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(spec)
    except LearnerError:
        raise
    except Exception as exc:  # any error while running the user's module
        raise LearnerError(f"--import {spec} failed: {type(exc).__name__}: {exc}") from exc
    main = sys.modules.get("__main__")
    if main is not None:
        for key, value in vars(module).items():
            if not key.startswith("_") and not hasattr(main, key):
                setattr(main, key, value)


def learner_path(run_or_file: str | Path) -> Path:
    """``RUN_DIR`` -> ``RUN_DIR/learner.pkl``; a file path is returned as is."""
    p = Path(run_or_file).expanduser()
    return p / LEARNER_NAME if p.is_dir() else p


#: Top-level module names of kimchi-edge 0.1, which pickled learners still refer to (``train.image_type``).
_LEGACY_TOP = ("train", "runtime")


def _unpickle(path: Path, torch: Any) -> Any:
    """``torch.load`` the learner; a kimchi-edge 0.1 learner's ``train.*`` names resolve to ``kimchi_edge.train.*``.

    The aliases live in ``sys.modules`` only while unpickling, so a user's own ``train`` module is never shadowed.
    """
    added: list[str] = []
    try:
        for _ in range(8):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return torch.load(path, map_location="cpu", weights_only=False)  # a pickle: trusted files only
            except ModuleNotFoundError as exc:
                name = exc.name or ""
                if name.split(".")[0] not in _LEGACY_TOP or name in added:
                    raise
                try:
                    module = importlib.import_module(f"kimchi_edge.{name}")
                except ImportError:
                    raise exc from None
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    legacy = ".".join(parts[:i])
                    if legacy not in sys.modules:
                        sys.modules[legacy] = importlib.import_module(f"kimchi_edge.{legacy}")
                        added.append(legacy)
                del module
        raise LearnerError(f"{path} refers to too many kimchi-edge 0.1 modules to load")
    finally:
        for legacy in added:
            sys.modules.pop(legacy, None)


def load_learner(run_or_file: str | Path, *, imports: Iterable[str] = ()) -> Any:
    """Load a fastai learner exported with ``learn.export()``, on the CPU, in eval mode.

    The file is a pickle: load only learners you trust.

    Args:
        run_or_file: a run folder (``learner.pkl`` inside) or the file itself.
        imports: modules or ``.py`` files to import first (see :func:`import_for_unpickling`).

    Returns:
        The ``fastai.learner.Learner``.

    Raises:
        LearnerError: missing, empty, corrupt or non-learner file; a function/class/module the
            pickle needs is not importable (named in the message).
        MissingDependencyError: fastai is not installed.
    """
    path = learner_path(run_or_file)
    if not path.exists():
        raise LearnerError(f"no learner at {path}: expected the learner.pkl of a run folder (kimchi-edge train writes it)")
    if not path.is_file():
        raise LearnerError(f"{path} is not a file; expected learner.pkl")
    if path.stat().st_size == 0:
        raise LearnerError(f"{path} is an empty (0-byte) file; re-export the learner (learn.export())")
    for spec in imports:
        import_for_unpickling(spec)
    with warnings.catch_warnings():  # fastai's import trips torch's TorchScript deprecation warnings
        warnings.simplefilter("ignore")
        require("fastai.learner", extra="convert", purpose="converting a learner")
        import torch
        from fastai.learner import Learner

    try:
        learn = _unpickle(path, torch)
    except AttributeError as exc:
        m = _ATTR_RE.search(str(exc))
        if m:
            name, module = m.groups()
            where = "the script or notebook that trained it" if module == "__main__" else f"module {module}"
            raise LearnerError(
                f"{path.name} needs {name!r} from {where}, which is not defined here; define it in an importable "
                f"module and pass --import MODULE_OR_FILE.py (or import it before calling load_learner)"
            ) from exc
        raise LearnerError(f"{path} could not be unpickled: {exc}") from exc
    except ModuleNotFoundError as exc:
        raise LearnerError(
            f"{path.name} needs the module {exc.name!r}, which is not installed or not on the path here; "
            "install it or pass --import FILE.py"
        ) from exc
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, IndexError, KeyError, ImportError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LearnerError(f"{path} is not a readable fastai learner (corrupt or truncated?): {first[:200]}") from exc
    if not isinstance(learn, Learner):
        raise LearnerError(f"{path} holds a {type(learn).__name__}, not a fastai Learner (expected learn.export())")
    learn.dls.cpu()
    if hasattr(learn, "channels_last"):
        learn = learn.to_contiguous(to_fp32=True)
    elif hasattr(learn, "mixed_precision"):
        learn = learn.to_fp32()
    elif hasattr(learn, "non_native_mixed_precision"):
        learn = learn.to_non_native_fp32()
    learn.model.eval()
    return learn


def learner_labels(learn: Any) -> tuple[str, ...]:
    """The learner's class labels in vocab order (exact text).

    Raises:
        LearnerError: the learner is not a single-label classifier.
    """
    vocab = getattr(learn.dls, "vocab", None)
    if vocab is None:
        raise LearnerError("the learner has no vocab: kimchi-edge converts single-label image classifiers")
    if len(vocab) and isinstance(vocab[0], (list, tuple)):  # (x_vocab, y_vocab) pairs
        vocab = vocab[-1]
    return tuple(str(v) for v in vocab)
