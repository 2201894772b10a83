"""Third-party warnings a user can do nothing about, filtered where they are raised (never globally).

* ``fastai.layers`` decorates functions with ``torch.jit.script`` when it is imported; torch >= 2.10
  answers with ``FutureWarning: `torch.jit.script` is deprecated``.  Filtered around the first
  import of fastai (:func:`importing_fastai`); the same warning from anyone else's code still shows.
* sklearn's ``UndefinedMetricWarning`` (a class never predicted) is not filtered but avoided: the
  metrics pass ``zero_division=0`` (``train.api._metrics``, ``train.reports.classification_report``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

TORCH_JIT_SCRIPT_DEPRECATED = r"`torch\.jit\.script` is deprecated"


@contextlib.contextmanager
def importing_fastai() -> Iterator[None]:
    """Context for importing fastai (or anything that imports it first) without torch's jit.script notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TORCH_JIT_SCRIPT_DEPRECATED, category=FutureWarning)
        yield
