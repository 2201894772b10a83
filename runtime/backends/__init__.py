"""Inference backends behind one small protocol, chosen by name from a registry.

A backend takes a ``uint8`` batch in the bundle's layout and returns float32 logits ``(N, classes)``.
``auto`` picks TensorRT when an engine in the bundle is compatible with what is installed; else, on x86-64 with
OpenVINO installed, OpenVINO when the accuracy gate passed the chosen ONNX artifact *on OpenVINO*; else ONNX Runtime;
and says which (``Classifier.info``).
"""

from __future__ import annotations

import importlib.util
import logging
import platform
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import BackendError, BundleError, MissingDependencyError, UsageError
from ..manifest import TARGET_ORT_CPU, TARGET_ORT_CPU_VNNI, Artifact, BundleManifest, verify_artifact

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt", "openvino")
#: the ``GateVerdict.providers`` entry that lets an ONNX artifact run on the OpenVINO backend
OPENVINO = "openvino"


class Backend(Protocol):
    """What every backend offers: load in the constructor, ``infer``, ``close``; a context manager."""

    name: str
    artifact: Artifact

    def infer(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - protocol
        """Run one ``uint8`` batch and return float32 logits ``(N, classes)``."""

    def info(self) -> dict[str, Any]:  # pragma: no cover - protocol
        """What is really in use: backend, provider(s), artifact, precision."""

    def close(self) -> None:  # pragma: no cover - protocol
        """Release the session/engine."""


def create_backend(
    name: str,
    bundle_dir: Path,
    manifest: BundleManifest,
    *,
    artifact: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
    providers: list[str] | None = None,
    verify: bool = True,
    allow_ungated: bool = False,
) -> tuple[Backend, list[str]]:
    """Create the backend ``name`` and return it with the notes explaining the choice.

    Args:
        name: ``"auto"``, ``"onnxruntime"``, ``"tensorrt"`` or ``"openvino"``.
        bundle_dir: the bundle folder.
        manifest: its manifest.
        artifact: force one artifact by name (e.g. ``"onnx-int8"``).
        precision: prefer ``"fp32"``, ``"fp16"`` or ``"int8"`` among the candidates.
        threads: CPU threads for ONNX Runtime / OpenVINO (default: all cores).
        providers: force ONNX Runtime execution providers (``auto`` then never picks OpenVINO).
        verify: check the chosen artifact's SHA-256 against the manifest before loading it.
        allow_ungated: also run an artifact (or execution provider) the accuracy gate did not pass on this
            bundle; by default only what passed runs, and a bundle whose FP32 artifact failed is refused.

    Returns:
        ``(backend, notes)`` where ``notes`` are human sentences such as a TensorRT fallback reason.
    """
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    notes: list[str] = []
    if name == OPENVINO:
        if providers:
            raise UsageError(f"providers={providers} are ONNX Runtime execution providers; the openvino backend takes none "
                             "(use backend='onnxruntime' to choose providers)")
        if artifact is not None and manifest.artifact(artifact).format != "onnx":
            raise UsageError(f"artifact {artifact!r} is {manifest.artifact(artifact).format}; OpenVINO runs the bundle's .onnx "
                             f"artifacts ({[a.name for a in manifest.artifacts if a.format == 'onnx']})")
        art = choose_onnx_artifact(manifest, artifact=artifact, precision=precision, allow_ungated=allow_ungated,
                                   bundle=bundle_dir, provider=OPENVINO)
        rec = next((a for a in manifest.artifacts if a.name == manifest.recommended.get("onnxruntime")), None)
        if artifact is None and rec is not None and rec.name != art.name and precision in (None, rec.precision):
            notes.append(f"OpenVINO runs {art.name}, not the recommended {rec.name}: {ungated_reason(manifest, rec, provider=OPENVINO)}")
        return _openvino_backend(bundle_dir, manifest, art, threads=threads, verify=verify, notes=notes), notes
    forced_onnx = artifact is not None and manifest.artifact(artifact).format != "tensorrt"  # unknown name: BundleError
    has_engine = any(a.format == "tensorrt" for a in manifest.artifacts)
    if name == "auto" and not forced_onnx and not has_engine:
        # Nothing to try.  Say so only where TensorRT could matter: a CUDA GPU is here but the bundle has no engine.
        if _cuda_gpu_present():
            notes.append("TensorRT not used: the bundle has no TensorRT engine for this GPU "
                         f"(build one with: kimchi-edge build-engine {bundle_dir}); using ONNX Runtime")
            log.info("%s", notes[-1])
    elif name == "tensorrt" or (name == "auto" and not forced_onnx):
        from .tensorrt_backend import TensorRTUnavailable, create_tensorrt_backend

        try:
            trt_backend = create_tensorrt_backend(bundle_dir, manifest, artifact=artifact, precision=precision,
                                                  verify=verify, allow_ungated=allow_ungated)
            ungated = ungated_reason(manifest, trt_backend.artifact, provider="tensorrt")
            if ungated:
                notes.append(f"UNGATED: {ungated}; running it only because allow_ungated/--allow-ungated was given")
            return trt_backend, notes
        except (TensorRTUnavailable, BackendError, BundleError) as exc:
            if name == "tensorrt":
                raise
            notes.append(f"TensorRT not used: {exc}; using ONNX Runtime instead")
            log.info("%s", notes[-1])
            if artifact is not None and not forced_onnx:
                artifact = None  # the engine asked for is not usable; let ONNX Runtime pick its own
    try:
        from .onnxruntime_backend import OnnxRuntimeBackend
    except ImportError as exc:
        raise MissingDependencyError(
            f"ONNX Runtime is not installed ({exc}); on a Jetson install NVIDIA's onnxruntime-gpu wheel for your "
            "JetPack, elsewhere: pip install 'kimchi-edge[onnxruntime]'"
        ) from exc

    art = choose_onnx_artifact(manifest, artifact=artifact, precision=precision, allow_ungated=allow_ungated, bundle=bundle_dir)
    if name == "auto" and not providers and art.format == "onnx" and not _gated_on_gpu(manifest, art) and _openvino_applies():
        ov_ungated = ungated_reason(manifest, art, provider=OPENVINO)
        verdict = manifest.gate.verdict(art.name) if manifest.gate else None
        if not ov_ungated and verdict is not None and verdict.fastest != OPENVINO:
            pass  # passed there but was not faster in the gate's measurement: ONNX Runtime stays (OpenVINO where it wins)
        elif not ov_ungated:
            try:
                ov_backend = _openvino_backend(bundle_dir, manifest, art, threads=threads, verify=verify, notes=notes)
                # a TensorRT fallback note said where it fell back to before OpenVINO was chosen
                notes[:] = [n.replace("using ONNX Runtime", "using OpenVINO") if n.startswith("TensorRT not used") else n for n in notes]
                return ov_backend, notes
            except (MissingDependencyError, BackendError, BundleError) as exc:  # a broken install: ONNX Runtime still runs
                notes.append(f"OpenVINO not used: {exc}; using ONNX Runtime instead")
                log.info("%s", notes[-1])
        elif not ungated_reason(manifest, art):  # gated for ONNX Runtime, just not on OpenVINO: say how to change that
            notes.append(f"OpenVINO not used: {ov_ungated} (see {Path(str(bundle_dir)) / 'gate.md'}; "
                         f"kimchi-edge verify {bundle_dir} scores it there); using ONNX Runtime")
            log.info("%s", notes[-1])
    rec = next((a for a in manifest.artifacts if a.name == manifest.recommended.get("onnxruntime")), None)
    if artifact is None and rec is not None and rec.name != art.name and cpu_mismatch(rec):
        notes.append(f"running {art.name}, not the recommended {rec.name}: {cpu_mismatch(rec)}")
        log.info("%s", notes[-1])
    chosen_providers = gated_providers(manifest, art, providers, allow_ungated=allow_ungated, bundle=bundle_dir, notes=notes)
    ungated = ungated_reason(manifest, art)
    if ungated:
        notes.append(f"UNGATED: {ungated}; running it only because allow_ungated/--allow-ungated was given")
    if verify:
        verify_artifact(bundle_dir, art)
    return OnnxRuntimeBackend(bundle_dir, manifest, art, threads=threads, providers=chosen_providers), notes


def _gated_on_gpu(manifest: BundleManifest, art: Artifact) -> bool:
    """``art`` passed on a GPU execution provider and a CUDA GPU is here: ONNX Runtime on the GPU beats OpenVINO on the CPU."""
    v = manifest.gate.verdict(art.name) if manifest.gate else None
    return bool(v and {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(v.providers)) and _cuda_gpu_present()


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be found (found, not imported: importing it takes ~0.3 s)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):  # an import hook refusing it, or a broken half-imported module
        return False


def _openvino_applies() -> bool:
    """``auto`` considers OpenVINO on x86-64 CPUs where the ``openvino`` package is installed."""
    return platform.machine().lower() in ("x86_64", "amd64") and openvino_installed()


def _openvino_backend(bundle_dir: Path, manifest: BundleManifest, art: Artifact, *, threads: int | None, verify: bool,
                      notes: list[str]) -> Backend:
    """The OpenVINO backend on ``art`` (already chosen and gated); an UNGATED note when only allow_ungated let it through."""
    from .openvino_backend import OpenVINOBackend

    ungated = ungated_reason(manifest, art, provider=OPENVINO)
    if ungated:
        notes.append(f"UNGATED: {ungated}; running it only because allow_ungated/--allow-ungated was given")
    if verify:
        verify_artifact(bundle_dir, art)
    return OpenVINOBackend(bundle_dir, manifest, art, threads=threads)


def _cuda_gpu_present() -> bool:
    from ..sysinfo import cuda_gpu_present

    return cuda_gpu_present()


def cpu_mismatch(art: Artifact, vnni: bool | None = None) -> str:
    """'' when ``art`` may run on this CPU (``vnni``: whether it has VNNI-class dot products, probed when None); else why not.

    Only the INT8 file for VNNI CPUs (``onnxruntime-cpu-vnni``: full 8-bit weights) is CPU-specific: on x86 without VNNI
    ONNX Runtime's u8 x s8 kernels saturate with those weights, so its gate verdict, measured on a VNNI CPU, says
    nothing about what it computes here.
    """
    if art.target != TARGET_ORT_CPU_VNNI:
        return ""
    from .. import sysinfo

    if sysinfo.cpu_has_vnni() if vnni is None else vnni:
        return ""
    return (f"{art.name} is the INT8 for x86-64 CPUs with VNNI (full 8-bit weights; flags {'/'.join(sysinfo.VNNI_FLAGS)}) "
            "and this CPU has none, where ONNX Runtime's integer kernels saturate with those weights")


def ungated_reason(manifest: BundleManifest, art: Artifact, provider: str | None = None, *, vnni: bool | None = None) -> str:
    """'' when the accuracy gate passed ``art`` on this bundle (on ``provider`` when given) and it is made for this CPU
    (:func:`cpu_mismatch`); else why not, in words."""
    mismatch = cpu_mismatch(art, vnni)
    if mismatch:
        return mismatch
    gate = manifest.gate
    if gate is None:
        return f"the accuracy gate has never run on this bundle, so {art.name} is unverified"
    if art.precision != "fp32":  # quantized or reduced from the FP32 model: it can't be trusted when that failed
        for a in manifest.artifacts:
            fv = gate.verdict(a.name) if a.precision == "fp32" and a.format == art.format else None
            if fv is not None and fv.status == "fail":
                return f"{a.name}, the model {art.name} was made from, {fv.in_words()}"
    v = gate.verdict(art.name)
    if v is None:
        return f"{art.name} has no accuracy-gate verdict (it was added after the gate ran)"
    if not v.passed:
        return f"{art.name} {v.in_words()}" if v.status != "skipped" else f"{art.name} was {v.in_words()}"
    # OpenVINO computes its own numbers: it needs its own pass, even where older verdicts recorded no providers at all
    if provider and (v.providers or provider == OPENVINO) and provider not in v.providers:
        return f"{art.name} passed the gate on {', '.join(v.providers) or 'ONNX Runtime'}, not on {provider}"
    return ""


def _refuse(reason: str, bundle: Any) -> BundleError:
    return BundleError(f"{reason} (see {Path(str(bundle)) / 'gate.md'}); re-check it here with kimchi-edge verify {bundle}, "
                       "or load it anyway with allow_ungated=True / --allow-ungated")


def choose_onnx_artifact(manifest: BundleManifest, *, artifact: str | None = None, precision: str | None = None,
                         allow_ungated: bool = False, bundle: Any = "BUNDLE", provider: str | None = None,
                         vnni: bool | None = None) -> Artifact:
    """Pick the ONNX artifact to run: only one the accuracy gate passed, unless ``allow_ungated``.

    Order: the user's choice; else the manifest's recommendation; else a passing FP32, then any passing artifact
    (of ``precision`` when given).  A bundle whose FP32 artifact failed is refused: what was quantized from it can't
    be trusted either.  With ``provider`` (``"openvino"``) "passed" means passed on that provider.  Unless named, only
    files meant for a CPU runtime are candidates (:func:`runs_on_cpu_runtimes`): the INT8 QDQ made for TensorRT
    (``target == "tensorrt"``) runs on ONNX Runtime only when asked for by name.  The INT8 for VNNI CPUs runs only on a
    CPU that has VNNI (``vnni``: probed when None; :func:`cpu_mismatch`), even when named; where it was recommended
    and this CPU lacks VNNI, the next passing artifact of the same precision (the portable ``onnx-int8``) runs.

    Raises:
        BundleError: no ONNX artifact, or none that passed (one line naming gate.md and the way out).
        UsageError: the named artifact is not ONNX, or none in ``precision``.
    """
    onnx = [a for a in manifest.artifacts if a.format == "onnx"]  # the .ort copy runs only when named (it is for apps)
    named = artifact is not None
    if artifact:
        art = manifest.artifact(artifact)
        if art.format not in ("onnx", "ort"):
            raise UsageError(f"artifact {artifact!r} is {art.format}, not ONNX; ONNX artifacts: {[a.name for a in onnx]}")
        mismatch = cpu_mismatch(art, vnni)
        if mismatch:  # not a question of the gate: allow_ungated does not make it compute the right numbers here
            portable = [a.name for a in onnx if a.precision == art.precision and runs_on_cpu_runtimes(a) and not cpu_mismatch(a, vnni)]
            raise UsageError(mismatch + (f"; run {portable[0]} instead" if portable else ""))
        reason = ungated_reason(manifest, art, provider=provider, vnni=vnni)
        if reason and not allow_ungated:
            raise _refuse(reason, bundle)
        return art
    if not onnx:
        raise BundleError(f"bundle has no ONNX artifact (has {[a.name for a in manifest.artifacts]}); re-run kimchi-edge convert")
    if not named:
        onnx = [a for a in onnx if runs_on_cpu_runtimes(a) and not cpu_mismatch(a, vnni)]
    if precision:
        onnx = [a for a in onnx if a.precision == precision]
        if not onnx:
            raise UsageError(f"bundle has no ONNX artifact in {precision}; it has "
                             f"{[(a.name, a.precision) for a in manifest.artifacts if a.format == 'onnx']}")
    rec = manifest.recommended.get("onnxruntime")
    rec_precision = next((a.precision for a in manifest.artifacts if a.name == rec), "fp32")
    # the recommendation; else what shares its precision (the portable INT8 where the VNNI one was recommended); else FP32
    ordered = sorted(onnx, key=lambda a: (a.name != rec, a.precision != rec_precision, a.precision != "fp32"))
    fp32_failed = [a for a in onnx if a.precision == "fp32" and manifest.gate is not None
                   and (v := manifest.gate.verdict(a.name)) is not None and v.status == "fail"]
    if not allow_ungated:
        if fp32_failed:
            raise _refuse(ungated_reason(manifest, fp32_failed[0]) + "; the bundle does not classify like the learner", bundle)
        for a in ordered:
            if not ungated_reason(manifest, a, provider=provider, vnni=vnni):
                return a
        raise _refuse(f"no ONNX artifact of this bundle has passed the accuracy gate{f' on {provider}' if provider else ''}: "
                      + "; ".join(ungated_reason(manifest, a, provider=provider, vnni=vnni) for a in ordered), bundle)
    return ordered[0]


def runs_on_cpu_runtimes(art: Artifact) -> bool:
    """Whether ``art`` is a file ONNX Runtime / OpenVINO pick by themselves.

    INT8 comes in one file per target: ``onnxruntime-cpu`` (uint8 activations, 7-bit int8 weights: what ONNX Runtime runs
    as integer kernels on x86-64 and, by ONNX Runtime's guidance, also fine on ARM64) is picked on every CPU;
    ``onnxruntime-cpu-vnni`` (the same with full 8-bit weights) too, where :func:`cpu_mismatch` lets it;
    ``tensorrt`` (symmetric int8 QDQ) is for TensorRT engines.  ``""`` (FP32, or the one INT8 file of a bundle from
    before targets existed) is picked as before; a target this runtime does not know is never picked by itself.
    """
    return art.target in ("", TARGET_ORT_CPU, TARGET_ORT_CPU_VNNI)


def gated_providers(manifest: BundleManifest, art: Artifact, forced: list[str] | None, *, allow_ungated: bool,
                    bundle: Any, notes: list[str]) -> list[str] | None:
    """ONNX Runtime providers to use: those usable here that the gate passed ``art`` on (all of them with ``allow_ungated``).

    Returns ``forced`` or the filtered list (``None`` = the backend's own choice, when nothing needs filtering).
    """
    from .onnxruntime_backend import usable_providers

    verdict = manifest.gate.verdict(art.name) if manifest.gate else None
    wanted = list(forced) if forced else usable_providers()
    if allow_ungated or verdict is None or not verdict.providers:
        return forced  # ungated load (already noted), or a verdict from before providers were recorded
    allowed = [p for p in wanted if p in verdict.providers]
    if not allowed:
        raise _refuse(f"{art.name} passed the gate on {', '.join(verdict.providers)}, which is not available here "
                      f"(here: {', '.join(wanted)})", bundle)
    dropped = [p for p in wanted if p not in verdict.providers and p != "CPUExecutionProvider"]
    if dropped and wanted[0] != allowed[0]:
        notes.append(f"{', '.join(dropped)} not used: the gate scored {art.name} on {', '.join(verdict.providers)}; "
                     f"run kimchi-edge verify {bundle} here to score it on {dropped[0]}")
    return allowed
