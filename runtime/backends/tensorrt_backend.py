"""TensorRT backend: a bundle's engine, checked against this machine *before* it is deserialised.

A TensorRT engine only runs on the TensorRT version and GPU it was built for ("delete your .engine files
after an upgrade").  The bundle therefore records, beside each engine, the facts it was built with
(written by ``kimchi_edge.convert.tensorrt``: ``Artifact.built_with`` has ``tensorrt``, ``compute_capability``,
``gpu``; ``Artifact.details`` has ``onnx_file``/``onnx_sha256`` of the ONNX it came from).  Before
touching the engine we compare those facts with what is installed (:func:`engine_mismatches`, a pure
function) and explain any difference with the command that fixes it
(``kimchi-edge build-engine BUNDLE --fp16``).
``backend="auto"`` then falls back to ONNX Runtime and says so in ``Classifier.notes``.

Only this module touches ``tensorrt`` and CUDA, and only inside functions, so the runtime imports without
them.  Engine execution (:class:`TensorRTBackend`) is deliberately thin: TensorRT's own API plus
Polygraphy's small CUDA wrapper (``polygraphy.cuda``) for device buffers and a stream.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import BackendError, BundleError, InvalidInputError, KimchiEdgeError
from ..manifest import Artifact, BundleManifest, artifact_path, verify_artifact
from ..sysinfo import cuda_device_facts

log = logging.getLogger(__name__)

#: What installing TensorRT takes, said once.
INSTALL_HINT = "JetPack ships it; on x86: pip install 'kimchi-edge[tensorrt]'"
#: Preference among compatible engines when neither the user nor the manifest chooses.
PRECISION_ORDER = ("int8", "fp16", "fp32")


class TensorRTUnavailable(KimchiEdgeError):
    """TensorRT cannot be used for this bundle here; the message says why and how to fix it."""


# --------------------------------------------------------------------------- facts about this machine


@functools.lru_cache(maxsize=1)
def installed_facts() -> dict[str, Any]:
    """What this machine offers TensorRT engines: ``tensorrt`` version, ``compute_capability``, ``gpu``.

    Values are ``None`` when absent (no TensorRT, no GPU).  Probed once per process.

    Returns:
        A dict with keys ``tensorrt``, ``compute_capability``, ``gpu`` and ``cuda_driver``.
    """
    try:
        import tensorrt as trt

        version: str | None = trt.__version__
    except ImportError:
        version = None
    return {"tensorrt": version, **cuda_device_facts()}


# --------------------------------------------------------------------------- compatibility (pure)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in str(v).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _same_version(built: str, here: str) -> bool:
    b, h = _version_tuple(built), _version_tuple(here)
    n = max(3, min(len(b), len(h)))  # 10.3.0 == 10.3.0.26; 8.5.2.2 != 8.5.1.7
    return b[:n] == h[:n]


def engine_mismatches(
    engine: Artifact,
    manifest: BundleManifest,
    installed: Mapping[str, Any],
    *,
    precision: str | None = None,
) -> list[str]:
    """Everything that stops ``engine`` from running here, as short phrases (empty list: compatible).

    Pure: the installed facts are passed in (see :func:`installed_facts`), so this is tested without
    TensorRT or a GPU.

    Args:
        engine: the engine's manifest entry (``format == "tensorrt"``).
        manifest: the bundle manifest (to check the ONNX the engine was built from is still the same).
        installed: ``{"tensorrt": "10.3.0" | None, "compute_capability": "8.7" | None, "gpu": ...}``.
        precision: the precision the user asked for, if any.

    Returns:
        Phrases such as ``"TensorRT: engine built with 10.3.0, installed 10.7.0"``.
    """
    problems: list[str] = []
    built = engine.built_with or {}
    details = engine.details or {}
    want_trt, have_trt = built.get("tensorrt"), installed.get("tensorrt")
    if not have_trt:
        problems.append(f"TensorRT: engine built with {want_trt or 'an unrecorded version'}, not installed here ({INSTALL_HINT})")
    elif not want_trt:
        problems.append("TensorRT: the manifest does not record which version built the engine")
    elif not _same_version(want_trt, have_trt):
        problems.append(f"TensorRT: engine built with {want_trt}, installed {have_trt}")

    want_cc, have_cc = built.get("compute_capability"), installed.get("compute_capability")
    if not have_cc:
        problems.append(f"GPU: engine built for compute capability {want_cc or '(unrecorded)'}, no CUDA GPU found here")
    elif not want_cc:
        problems.append("GPU: the manifest does not record the compute capability the engine was built for")
    elif _version_tuple(want_cc) != _version_tuple(have_cc):
        gpu_b, gpu_h = built.get("gpu"), installed.get("gpu")
        problems.append(
            f"GPU: engine built for compute capability {want_cc}{f' ({gpu_b})' if gpu_b else ''}, "
            f"this GPU has {have_cc}{f' ({gpu_h})' if gpu_h else ''}"
        )

    if precision and engine.precision != precision:
        problems.append(f"precision: engine is {engine.precision}, {precision} was asked for")

    src_file, src_sha = details.get("onnx_file"), details.get("onnx_sha256")
    if not src_file or not src_sha:
        problems.append("source: the manifest does not record which ONNX the engine was built from")
    else:
        src = next((a for a in manifest.artifacts if a.file == src_file), None)
        if src is None:
            problems.append(f"source: engine was built from {src_file}, which is no longer in the bundle")
        elif src.sha256 != src_sha:
            problems.append(
                f"source: {src_file} changed since the engine was built (SHA-256 {src.sha256[:12]}... now, "
                f"{src_sha[:12]}... then)"
            )
    return problems


def rebuild_hint(precision: str, bundle: str | Path = "BUNDLE") -> str:
    """The command that builds a ``precision`` engine for this machine."""
    return f"kimchi-edge build-engine {bundle} --{precision}"


def explain_mismatch(
    engine: Artifact,
    problems: Sequence[str],
    bundle: str | Path = "BUNDLE",
    *,
    rebuildable: bool = True,
    precision: str | None = None,
) -> str:
    """One line: which engine, what differs, and the fix.

    Args:
        engine: the engine that cannot run.
        problems: :func:`engine_mismatches` of it.
        bundle: the bundle path to put in the command.
        rebuildable: ``False`` when this machine has no TensorRT or GPU (rebuilding here cannot help).
        precision: the precision asked for (the rebuild command builds that one).
    """
    text = f"engine {engine.name} ({engine.file}) cannot run here: {'; '.join(problems)}"
    if rebuildable:
        text += f"; rebuild it here with: {rebuild_hint(precision or engine.precision, bundle)}"
    return text


def choose_engine(
    manifest: BundleManifest,
    installed: Mapping[str, Any],
    *,
    artifact: str | None = None,
    precision: str | None = None,
    bundle: str | Path = "BUNDLE",
    allow_ungated: bool = False,
) -> tuple[Artifact | None, list[str]]:
    """Pick the engine to run: the user's, else the manifest's recommendation, else int8 > fp16 > fp32.

    Only engines the accuracy gate passed (on TensorRT) are candidates, unless ``allow_ungated``.
    Pure, like :func:`engine_mismatches`.

    Returns:
        ``(engine, reasons)``: the first compatible engine (``None`` when none is) and one explanation
        per engine that was passed over.
    """
    engines = [a for a in manifest.artifacts if a.format == "tensorrt"]
    engines_skipped: list[str] = []
    if artifact:
        engines = [a for a in engines if a.name == artifact]
    if precision:
        engines = [a for a in engines if a.precision == precision]
    if not engines:
        what = f" named {artifact}" if artifact else f" in {precision}" if precision else ""
        return None, [f"the bundle has no TensorRT engine{what} (build one on the target: kimchi-edge build-engine {bundle} --fp16)"]
    if not allow_ungated:
        from . import ungated_reason

        gated = []
        for eng in engines:
            why = ungated_reason(manifest, eng, provider="tensorrt")
            if why:
                reasons_ungated = f"{why}; score it here: kimchi-edge verify {bundle} --artifact {eng.name}"
                engines_skipped.append(reasons_ungated)
            else:
                gated.append(eng)
        engines = gated
        if not engines:
            return None, engines_skipped
    rec = manifest.recommended.get("tensorrt")
    engines.sort(key=lambda a: (a.name != rec, PRECISION_ORDER.index(a.precision) if a.precision in PRECISION_ORDER else 9))
    reasons = list(engines_skipped)
    for eng in engines:
        problems = engine_mismatches(eng, manifest, installed, precision=precision)
        if not problems:
            return eng, reasons
        rebuildable = bool(installed.get("tensorrt")) and bool(installed.get("compute_capability"))
        reasons.append(explain_mismatch(eng, problems, bundle, rebuildable=rebuildable, precision=precision))
    return None, reasons


# --------------------------------------------------------------------------- loading and running


def create_tensorrt_backend(
    bundle_dir: Path,
    manifest: BundleManifest,
    *,
    artifact: str | None = None,
    precision: str | None = None,
    verify: bool = True,
    installed: Mapping[str, Any] | None = None,
    allow_ungated: bool = False,
) -> "TensorRTBackend":
    """Return a TensorRT backend for a compatible engine of the bundle.

    The compatibility check runs before the engine file is read, let alone deserialised.

    Raises:
        TensorRTUnavailable: no engine, or none compatible with this machine (the message says what
            differs and how to rebuild).
        BundleError: the engine's bytes differ from the manifest.
        BackendError: TensorRT refused the engine or could not create an execution context.
    """
    if installed is None:  # probe the GPU only when there is an engine to check it against
        installed = installed_facts() if any(a.format == "tensorrt" for a in manifest.artifacts) else {}
    engine, reasons = choose_engine(manifest, installed, artifact=artifact, precision=precision, bundle=bundle_dir,
                                    allow_ungated=allow_ungated)
    if engine is None:
        raise TensorRTUnavailable("; ".join(reasons))
    if verify:
        verify_artifact(bundle_dir, engine)
    return TensorRTBackend(bundle_dir, manifest, engine, installed=installed)


def _import_tensorrt():
    try:
        import tensorrt as trt
        from polygraphy import cuda
    except ImportError as exc:
        raise TensorRTUnavailable(f"the TensorRT backend needs tensorrt and polygraphy ({exc}); {INSTALL_HINT}") from None
    return trt, cuda


def _make_logger(trt):
    """A TensorRT logger that forwards to :mod:`logging` and keeps errors for our exception messages."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.last_error = ""

        def log(self, severity, msg):  # noqa: D401 - TensorRT callback
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.last_error = str(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

        def last(self) -> str:
            return self.last_error or "TensorRT gave no reason"

    return _Logger()


class TensorRTBackend:
    """Runs a bundle's TensorRT engine (``uint8`` NHWC in, logits out); calls are serialised by a lock.

    Args:
        bundle_dir: the bundle folder.
        manifest: its manifest.
        artifact: the engine entry (already checked by :func:`engine_mismatches`).
        installed: :func:`installed_facts`, reported by :meth:`info`.

    Raises:
        TensorRTUnavailable: tensorrt/polygraphy are not importable.
        BackendError: TensorRT returned nothing where an engine or context was expected.
    """

    name = "tensorrt"

    def __init__(self, bundle_dir: Path, manifest: BundleManifest, artifact: Artifact, *, installed: Mapping[str, Any] | None = None) -> None:
        trt, cuda = _import_tensorrt()
        self._trt = trt
        self.artifact = artifact
        self.facts = dict(installed or {})
        self._logger = _make_logger(trt)
        self._lock = threading.Lock()
        path = artifact_path(bundle_dir, artifact)
        rebuild = rebuild_hint(artifact.precision, bundle_dir)
        self.runtime = trt.Runtime(self._logger)
        if self.runtime is None:
            raise BackendError(f"TensorRT could not create a runtime: {self._logger.last()}")
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialise {artifact.file}: {self._logger.last()}; rebuild it with: {rebuild}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {artifact.file}: {self._logger.last()}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(f"{artifact.file} has inputs {inputs} and outputs {outputs}; expected one of each; rebuild it with: {rebuild}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.output_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        # per-image dims of the profile (Preprocessing.input_shape: the item size when the resample is in the graph)
        self.input_dims = tuple(int(d) for d in self.engine.get_tensor_profile_shape(self.input_name, 0)[2][1:])
        self._cuda = cuda
        self.stream = cuda.Stream()
        self._d_in = cuda.DeviceArray(shape=(0,), dtype=self.input_dtype)
        self._d_out = cuda.DeviceArray(shape=(0,), dtype=self.output_dtype)

    def _run_chunk(self, chunk: np.ndarray) -> np.ndarray:
        ctx = self.context
        if ctx is None:
            raise BackendError(f"the TensorRT backend for {self.artifact.file} is closed; load the bundle again")
        self._logger.last_error = ""  # an error logged by an earlier call must not be reported as this call's
        if not ctx.set_input_shape(self.input_name, tuple(chunk.shape)):
            raise BackendError(f"TensorRT refused input shape {tuple(chunk.shape)}: {self._logger.last()}")
        out_shape = tuple(ctx.get_tensor_shape(self.output_name))
        self._d_in.resize(chunk.shape)
        self._d_out.resize(out_shape)
        self._d_in.copy_from(chunk, self.stream)
        ctx.set_tensor_address(self.input_name, self._d_in.ptr)
        ctx.set_tensor_address(self.output_name, self._d_out.ptr)
        if not ctx.execute_async_v3(self.stream.ptr):
            raise BackendError(f"TensorRT inference failed on {self.artifact.file}: {self._logger.last()}")
        host = np.empty(out_shape, dtype=self.output_dtype)
        self._d_out.copy_to(host, self.stream)
        self.stream.synchronize()
        return host.astype(np.float32, copy=False)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run a ``uint8`` batch (split into chunks of the profile's largest batch) and return float32 logits."""
        if batch.dtype != self.input_dtype:
            raise BackendError(f"got a batch of dtype {batch.dtype}; engine {self.artifact.file} expects {self.input_dtype}")
        if batch.ndim != 1 + len(self.input_dims) or tuple(batch.shape[1:]) != self.input_dims:
            raise InvalidInputError(f"got a batch of shape {tuple(batch.shape)}; expected (N, {', '.join(map(str, self.input_dims))})")
        batch = np.ascontiguousarray(batch)
        with self._lock:  # one execution context: one inference at a time
            try:
                outs = [self._run_chunk(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
            except KimchiEdgeError:
                raise
            except Exception as exc:  # Polygraphy raises PolygraphyException on CUDA errors
                raise BackendError(f"TensorRT inference failed on {self.artifact.file}: {exc}") from exc
        return np.concatenate(outs)

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "providers": ["TensorRT"],
            "artifact": self.artifact.name,
            "file": self.artifact.file,
            "precision": self.artifact.precision,
            "tensorrt": self._trt.__version__,
            "gpu": self.facts.get("gpu"),
            "compute_capability": self.facts.get("compute_capability"),
            "max_batch": self.max_batch,
        }

    def close(self) -> None:
        with self._lock:
            for buf in (getattr(self, "_d_in", None), getattr(self, "_d_out", None)):
                if buf is not None:
                    buf.free()
            if getattr(self, "stream", None) is not None:
                self.stream.free()
                self.stream = None
            self.context = self.engine = self.runtime = None

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
