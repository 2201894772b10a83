"""Progress bars for long steps: tqdm when installed (on stderr, only on a terminal), otherwise nothing; ``quiet`` turns them off."""

from __future__ import annotations

import sys
from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress(*, total: int, desc: str, quiet: bool = False, unit: str = "it") -> Any:
    """A progress bar with ``update(n)`` / ``close()`` (a context manager too)."""
    if quiet:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # runtime-only installs need not have tqdm
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True, disable=None)  # None: off when not a terminal
