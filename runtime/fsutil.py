"""Small file helpers: hashing and atomic writes (a crash never leaves a half-written file)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Read once at import (``os.umask`` can only be read by setting it, which is not thread-safe later).
_UMASK = _read_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    The file gets the usual permissions (``0o666`` minus the umask), not ``mkstemp``'s owner-only ``0o600``,
    so a bundle stays readable by the service account that serves it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # POSIX; on Windows the default is fine
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def dump_json(obj: Any) -> str:
    """JSON as people read it: UTF-8 (Korean stays Korean, no \\uXXXX escapes), indented, sorted never."""
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as UTF-8 JSON atomically."""
    atomic_write_text(path, dump_json(obj))


def read_json(path: str | os.PathLike) -> Any:
    """Read a UTF-8 JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_partials(final: str | os.PathLike) -> list[Path]:
    """Delete ``.NAME.partial-PID-*`` / ``.NAME.old-PID`` folders beside ``final`` left by a process that is gone.

    A ``kill -9`` during :func:`atomic_directory` leaves one; the next run cleans it.  A folder whose process still
    runs (a concurrent build) is left alone.  Returns what was removed.
    """
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for kind in ("partial", "old"):
        for p in final.parent.glob(f".{final.name}.{kind}-*"):
            pid_text = p.name[len(f".{final.name}.{kind}-"):].split("-")[0]
            if not pid_text.isdigit() or _pid_alive(int(pid_text)):
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside ``final`` and rename it into place at the end.

    If the body raises (or the process is killed) the partial folder never takes the final name, so
    nothing half-written ever looks complete; the folder a killed process leaves (``.NAME.partial-PID-*``) is
    removed by the next call.  With ``overwrite`` an existing ``final`` is replaced only after the new one is
    complete.  To keep a finished folder *out* of the final place (e.g. a bundle that failed its gate), move the
    temporary folder away inside the body: then nothing is renamed and ``final`` stays as it was.

    Yields:
        The temporary directory to write into.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(final)
    remove_stale_partials(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it owner-only
    try:
        yield tmp
        if not tmp.exists():  # the body moved it elsewhere on purpose
            return
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
