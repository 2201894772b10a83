"""Start ``kimchi-edge demo`` as a real server on an ephemeral port for the browser and HTTPS tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
GUARD = Path(__file__).resolve().parent / "import_guard"


def guarded_env(log: Path, **extra: str) -> dict[str, str]:
    """Environment for a child process in which torch/fastai imports fail and are logged to ``log``."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(GUARD), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["KIMCHI_EDGE_IMPORT_LOG"] = str(log)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str, timeout: float = 5.0) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the self-signed test certificate
    with urllib.request.urlopen(url, timeout=timeout, context=ctx if url.startswith("https") else None) as r:
        return r.read().decode("utf-8", "replace")


@contextlib.contextmanager
def demo_server(args: list[str], env: dict[str, str], log: Path, scheme: str = "http", timeout: float = 90.0) -> Iterator[str]:
    """Run ``python -m kimchi_edge demo ARGS --port P`` and yield its base URL once it answers.

    The server runs in its own process group and is stopped (SIGTERM, then SIGKILL) by group id.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "kimchi_edge", "demo", *args, "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"{scheme}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"demo server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                if fetch(f"{url}/_stcore/health", timeout=2).strip() == "ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"demo server did not answer within {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
