"""A real ``tritonserver`` for the tests and the serving comparison: the one nvidia-pytriton ships.

The server runs from the venv ``tests/triton/setup_triton_venv.sh`` makes (Debian's Python 3.11, shared libpython):
its Python backend stub embeds that interpreter, finds it first on ``PATH`` (the way PyTriton itself starts the
server) and so imports that venv's packages, kimchi_edge included.  The wheel keeps the stubs apart
(``python_backend_stubs/3.X``); the backend folder the server gets is assembled here, with the 3.11 stub in it.

Nothing here is kimchi-edge code under test: it only starts, waits for and stops the server.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SETUP = "bash tests/triton/setup_triton_venv.sh"


def triton_venv() -> Path:
    """Where the Triton venv is (``$KIMCHI_EDGE_TRITON_VENV`` or ``.venv-triton`` at the repository root)."""
    return Path(os.environ.get("KIMCHI_EDGE_TRITON_VENV") or REPO / ".venv-triton")


def triton_unavailable() -> str:
    """'' when a real tritonserver can run here; else why not (the skip reason)."""
    venv = triton_venv()
    if not (venv / ".installed").is_file():
        return f"no Triton venv at {venv} (make it with: {SETUP})"
    if not _pytriton_root(venv).is_dir():
        return f"{venv} has no nvidia-pytriton (re-run {SETUP} after deleting it)"
    try:
        import tritonclient.http  # noqa: F401
    except ImportError:
        return "the tests' client needs tritonclient[http] in this venv: pip install 'kimchi-edge[triton]'"
    return _serves_this_checkout(str(venv))


@functools.lru_cache(maxsize=None)
def _serves_this_checkout(venv: str) -> str:
    """'' when the venv's kimchi_edge (what the Python backend steps import) is this repository's."""
    out = subprocess.run([f"{venv}/bin/python", "-c", "import kimchi_edge; print(kimchi_edge.__file__)"],
                         capture_output=True, text=True, timeout=60, check=False)
    where = out.stdout.strip()
    if out.returncode != 0 or not where.startswith(str(REPO) + os.sep):
        return f"{venv} imports kimchi_edge from {where or 'nowhere'}, not {REPO} (re-run {SETUP})"
    return ""


def _pytriton_root(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages/pytriton/tritonserver"))
    return found[0] if found else venv / "missing-pytriton"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_directory(dest: Path, venv: Path | None = None) -> Path:
    """Triton's backend folder with the Python backend and the stub for the venv's Python (as PyTriton lays it)."""
    venv = venv or triton_venv()
    root = _pytriton_root(venv)
    version = next(venv.glob("lib/python3*")).name.removeprefix("python")
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for f in (root / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, python / f.name)
    shutil.copy2(root / "python_backend_stubs" / version / "triton_python_backend_stub", python / "triton_python_backend_stub")
    return dest


class TritonServer:
    """``tritonserver`` on loopback with a model repository, explicit model control; a context manager.

    Args:
        repository: the model repository.
        models: models to load at start (their ensembles' steps load with them); others load on demand.
        workdir: where the backend folder and the server log go.
        timeout_s: how long to wait for readiness.
    """

    def __init__(self, repository: Path, models: Sequence[str], workdir: Path, timeout_s: float = 120.0) -> None:
        self.repository, self.models, self.workdir, self.timeout_s = Path(repository), list(models), Path(workdir), timeout_s
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path = self.workdir / "tritonserver.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        root = _pytriton_root(triton_venv())
        return [str(root / "bin" / "tritonserver"), f"--model-repository={self.repository}",
                f"--backend-directory={backend_directory(self.workdir / 'backends')}",
                "--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models),
                "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
                f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false", "--log-verbose=0", "--exit-timeout-secs=5"]

    def environment(self) -> dict[str, str]:
        venv = triton_venv()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        libs = sorted(venv.glob("lib/python3*/site-packages/nvidia_pytriton.libs"))
        env["LD_LIBRARY_PATH"] = ":".join([*(str(p) for p in libs), *filter(None, [env.get("LD_LIBRARY_PATH")])])
        env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"  # the stub's interpreter is the venv's
        env["VIRTUAL_ENV"] = str(venv)
        return env

    def start(self) -> TritonServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.http_status("/v2/health/ready") == 200:
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {self.timeout_s:.0f} s:\n{self.log_tail()}")

    def http_status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its backend stubs
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_triton(repository: Path, models: Sequence[str], workdir: Path) -> Iterator[TritonServer]:
    with TritonServer(repository, models, workdir) as server:
        yield server
