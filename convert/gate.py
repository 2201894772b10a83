"""The accuracy gate: does every artifact classify the validation images like the fastai learner did?

Runs where the model will run — this module imports only the runtime (numpy, Pillow, ONNX Runtime),
never torch or fastai, so ``kimchi-edge verify`` works on a Jetson.  The reference is
``reference.json`` in the bundle: the fastai learner's own probabilities on the exact validation files
of ``split.json``, computed by ``kimchi-edge convert`` with the fastai pipeline.  Each candidate
artifact is fed the same image *files* through the runtime (:class:`runtime.Classifier` /
:class:`kimchi_edge.runtime.preprocess.Preprocessor`), exactly as in deployment.

Per artifact: top-1 accuracy and its difference to the reference (points, with a paired 95 % interval:
Wilson intervals of the discordant pairs combined by MOVER), top-1 agreement with the reference (Wilson interval),
max and mean |Δprobability|, per-class accuracy difference, end-to-end images/s (decode + preprocess
+ inference).

Policy (thresholds configurable, :class:`Thresholds`):

* FP32/FP16 artifacts must agree with the reference on >= 99.5 % of images and lose <= 0.5 points,
  else :class:`kimchi_edge.runtime.errors.GateFailed` (non-zero exit);
* INT8 artifacts may lose <= 1.0 point; otherwise they are marked not recommended and the report
  names the FP32 (ONNX Runtime) / FP16 (TensorRT) artifact used instead.

TorchScript artifacts are scored only where torch is importable (in ``convert``); elsewhere they are
skipped with that reason.  Where OpenVINO is installed, every ONNX artifact is scored a second time through the
runtime's OpenVINO backend (row ``"onnx-int8 @ openvino"``, same thresholds): that row decides only whether the
runtime may run the artifact on OpenVINO (``"openvino"`` in its verdict's providers), never the artifact's status.
Results go to ``gate.md``, ``gate.json`` and the ``gate`` entry of ``manifest.json`` (all written atomically), and
the recommendation per backend is updated.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kimchi_edge.runtime.backends import cpu_mismatch
from kimchi_edge.runtime.classifier import softmax
from kimchi_edge.runtime.errors import BundleError, GateFailed, KimchiEdgeError, UsageError
from kimchi_edge.runtime.fsutil import sha256_file
from kimchi_edge.runtime.manifest import (
    GATE_JSON,
    GATE_MD,
    REFERENCE_NAME,
    VERIFICATION_DIR,
    VERIFICATION_NAME,
    Artifact,
    BundleManifest,
    ReferenceFile,
    ReferenceItem,
    VerificationSet,
    read_manifest,
    read_typed,
    to_dict,
    artifact_path,
    unsafe_relative_path,
    verify_artifact,
)

from .gate_policy import (
    PREFERENCE, ArtifactResult, Thresholds, decide, embedded_mismatch, jitter_note, judge_decode_variant, quantization_summary, recommend,
)
from .gate_report import GateReport, format_markdown, format_table, write_report
from .gate_stats import compare, paired_difference_interval, wilson_interval
from .progress import progress
from .runfolder import Item, resolve_images

__all__ = [
    "ArtifactResult", "GATE_JSON", "GATE_MD", "GateReport", "PREFERENCE", "REFERENCE_NAME", "Reference", "Thresholds",
    "compare", "format_markdown", "format_table", "paired_difference_interval", "read_reference", "reference_to_dict",
    "run_gate", "wilson_interval",
]


# --------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class Reference:
    data_root: str
    labels: tuple[str, ...]
    items: tuple[Item, ...]
    probabilities: np.ndarray  # (N, classes)
    source: Mapping[str, Any] = field(default_factory=dict)

    @property
    def targets(self) -> np.ndarray:
        index = {lab: i for i, lab in enumerate(self.labels)}
        return np.array([index[it.label] for it in self.items], dtype=np.int64)


def reference_file(ref: Reference) -> ReferenceFile:
    """The typed ``reference.json`` of a :class:`Reference`."""
    return ReferenceFile(
        data_root=ref.data_root, labels=tuple(ref.labels), source=dict(ref.source),
        items=tuple(ReferenceItem(it.file, it.label, ref.labels[int(np.argmax(p))], tuple(float(v) for v in p))
                    for it, p in zip(ref.items, ref.probabilities)),
    )


def reference_to_dict(ref: Reference) -> dict[str, Any]:
    return to_dict(reference_file(ref))


def read_reference(bundle_dir: str | Path, manifest: BundleManifest) -> Reference:
    """Read ``reference.json`` and check it against the manifest (labels, recorded SHA-256).

    Raises:
        BundleError: missing, malformed, modified or inconsistent with the manifest.
    """
    path = Path(bundle_dir) / REFERENCE_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir} has no {REFERENCE_NAME}: the gate needs the learner's reference predictions (re-run kimchi-edge convert)")
    want = manifest.source.get("reference_sha256") if manifest.source else None
    if want and sha256_file(path) != want:
        raise BundleError(f"{REFERENCE_NAME} has been modified since kimchi-edge convert wrote it (SHA-256 differs); re-run convert")
    raw: ReferenceFile = read_typed(ReferenceFile, path)
    labels = raw.labels
    items = tuple(Item(e.file, e.label) for e in raw.items)
    try:
        probs = np.asarray([e.probabilities for e in raw.items], dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path} is malformed: {type(exc).__name__}: {exc}") from exc
    if labels != manifest.labels:
        raise BundleError(f"{REFERENCE_NAME} labels {list(labels)} differ from the manifest's {list(manifest.labels)}")
    if not items or probs.shape != (len(items), len(labels)):
        raise BundleError(f"{path}: expected {len(items)} x {len(labels)} probabilities, got shape {probs.shape}")
    unknown = {it.label for it in items} - set(labels)
    if unknown:
        raise BundleError(f"{path}: labels not in the vocab: {sorted(unknown)[:5]}")
    return Reference(raw.data_root, labels, items, probs, dict(raw.source))


def verification_reference(bundle: Path, manifest: BundleManifest, ref: Reference) -> tuple[Reference, list[Path]]:
    """The reference restricted to the bundle's verification set, and those files (hashes checked first).

    Raises:
        BundleError: ``verification.json`` or one of its images was modified, is missing, or names a file that is
            not in ``reference.json``.
    """
    path = bundle / VERIFICATION_NAME
    want = manifest.source.get("verification_sha256") if manifest.source else None
    if want and sha256_file(path) != want:
        raise BundleError(f"{VERIFICATION_NAME} has been modified since kimchi-edge convert wrote it (SHA-256 differs)")
    vs: VerificationSet = read_typed(VerificationSet, path)
    index = {it.file: i for i, it in enumerate(ref.items)}
    rows, files, items = [], [], []
    for v in vs.images:
        problem = unsafe_relative_path(v.file)
        if problem or not v.file.startswith(f"{VERIFICATION_DIR}/"):
            raise BundleError(f"{VERIFICATION_NAME}: {v.file!r} is not a file of the bundle's {VERIFICATION_DIR}/ folder")
        f = bundle / v.file
        if not f.is_file() or sha256_file(f) != v.sha256:
            raise BundleError(f"verification image {v.file} is missing or modified (SHA-256 differs); re-run kimchi-edge convert")
        if v.source not in index:
            raise BundleError(f"{VERIFICATION_NAME}: {v.source!r} is not in {REFERENCE_NAME}")
        i = index[v.source]
        if ref.items[i].label != v.label:
            raise BundleError(f"{VERIFICATION_NAME}: {v.file} is labelled {v.label!r} but {REFERENCE_NAME} says {ref.items[i].label!r}")
        rows.append(i)
        files.append(f)
        items.append(Item(v.file[len(VERIFICATION_DIR) + 1:], v.label))
    if not rows:
        raise BundleError(f"{VERIFICATION_NAME} lists no images")
    sub = Reference(str(bundle / VERIFICATION_DIR), ref.labels, tuple(items), ref.probabilities[rows],
                    {**dict(ref.source), "verification_set": f"{len(rows)} of {vs.of_valid} validation images"})
    return sub, files


# --------------------------------------------------------------------------- candidates


class _Skip(Exception):
    pass


def _run_classifier(bundle: Path, art: Artifact, files: list[Path], *, batch_size: int, threads: int | None, fast_decode: bool, quiet: bool,
                    backend: str | None = None) -> tuple[np.ndarray, float, float, dict]:
    from kimchi_edge.runtime.classifier import Classifier

    backend = backend or ("tensorrt" if art.format == "tensorrt" else "onnxruntime")
    try:
        # the gate is what makes an artifact gated: it must load the candidate before any verdict exists
        clf = Classifier.from_bundle(bundle, backend=backend, artifact=art.name, threads=threads, fast_decode=fast_decode,
                                     allow_ungated=True)
    except BundleError:  # missing or modified file: the gate must not pass over it
        raise
    except KimchiEdgeError as exc:
        if art.format == "tensorrt":
            raise _Skip(f"TensorRT unavailable: {exc}") from exc
        raise
    with clf:
        clf.predict_batch(files[: min(len(files), batch_size)], batch_size=batch_size)  # warm-up
        probs, infer = [], 0.0
        bar = progress(total=len(files), desc=f"gate {art.name}" + (" @ openvino" if backend == "openvino" else ""), quiet=quiet, unit="img")
        t0 = time.perf_counter()
        for s in range(0, len(files), batch_size):
            preds = clf.predict_batch(files[s : s + batch_size], batch_size=batch_size)
            probs.extend(p.probabilities for p in preds)
            infer += sum(p.timings_ms["infer"] for p in preds)
            bar.update(len(preds))
        wall = time.perf_counter() - t0
        bar.close()
        info = {k: v for k, v in clf.info.items() if k in ("backend", "providers", "artifact", "precision", "threads", "onnxruntime",
                                                            "openvino", "device", "performance_hint", "inference_precision", "cpu_pinning")}
        session = getattr(clf.backend, "session", None)
        if session is not None:  # ONNX: the labels/preprocessing embedded at export time
            try:
                info["_metadata"] = dict(session.get_modelmeta().custom_metadata_map)
            except Exception:  # metadata is a cross-check only
                pass
    return np.asarray(probs, dtype=np.float64), len(files) / wall, infer / len(files), info


def fp32_jitter(bundle: Path, files: list[Path], *, batch_size: int = 16, threads: int | None = None, draws: int = 2,
                quiet: bool = True) -> dict[str, Any]:
    """``onnx-fp32`` against its own answers on ``files`` when every input pixel moves by -1, 0 or +1 grey level.

    The same perturbation as the INT8 stage's ``fp32_input_jitter`` (p = 1/4, 1/2, 1/4, seeded), here on the gate's own
    images: a diagnosis of the model, printed as a note when an INT8 artifact fails; it chooses nothing and changes
    no verdict.  Full-size decoding, as the gate scores.
    """
    from kimchi_edge.runtime.classifier import Classifier

    with Classifier.from_bundle(bundle, backend="onnxruntime", artifact="onnx-fp32", threads=threads, fast_decode=False,
                                allow_ungated=True) as clf:
        rngs = [np.random.default_rng(seed) for seed in range(draws)]
        same = np.zeros(draws)
        flipped: list[int] = []  # images whose label moved in at least one draw
        steps = np.array([-1.0, 0.0, 0.0, 1.0], dtype=np.float32)
        bar = progress(total=len(files), desc="gate FP32 jitter", quiet=quiet, unit="img")
        for start in range(0, len(files), batch_size):
            x = clf.preprocessor.batch(files[start : start + batch_size])
            ref = clf.infer_array(x).argmax(1)
            moved_any = np.zeros(len(x), dtype=bool)
            for d, rng in enumerate(rngs):
                moved = np.clip(x.astype(np.float32) + rng.choice(steps, size=x.shape), 0, 255).astype(x.dtype)
                kept = clf.infer_array(moved).argmax(1) == ref
                same[d] += int(kept.sum())
                moved_any |= ~kept
            flipped.extend(start + int(i) for i in np.flatnonzero(moved_any))
            bar.update(len(x))
        bar.close()
    agree = same / max(len(files), 1)
    return {"agreement": round(float(agree.mean()), 6), "agreement_per_draw": [round(float(a), 6) for a in agree],
            "images": len(files), "draws": draws, "split": "validation (the gate's images)", "flipped": flipped}


def split_by_stability(valid_jitter: Mapping[str, Any], agree: np.ndarray) -> dict[str, Any]:
    """An artifact's per-image agreement ``agree`` (bool, the gate's images in order) split by whether ``onnx-fp32``
    kept its label under every jitter draw of :func:`fp32_jitter` ("stable") or moved in one ("flipped")."""
    flipped = np.zeros(len(agree), dtype=bool)
    flipped[[i for i in valid_jitter.get("flipped", []) if i < len(agree)]] = True

    def part(mask: np.ndarray) -> float | None:
        return round(float(agree[mask].mean()), 6) if mask.any() else None

    return {"stable_images": int((~flipped).sum()), "agreement_on_stable": part(~flipped),
            "flipped_images": int(flipped.sum()), "agreement_on_flipped": part(flipped), "draws": valid_jitter.get("draws")}


def _run_torchscript(bundle: Path, art: Artifact, manifest: BundleManifest, files: list[Path], *, batch_size: int, threads: int | None, fast_decode: bool, quiet: bool) -> tuple[np.ndarray, float, float, dict]:
    try:
        import torch
    except ImportError:
        raise _Skip("torch is not installed here (TorchScript is checked by kimchi-edge convert)") from None
    from kimchi_edge.runtime.preprocess import Preprocessor

    from .torchscript import load_torchscript, torchscript_logits

    verify_artifact(bundle, art)
    pre = Preprocessor(manifest.preprocessing, fast_decode=fast_decode)
    module = load_torchscript(artifact_path(bundle, art), threads=threads)
    torchscript_logits(module, pre.normalize(pre.batch(files[:1])))  # warm-up
    probs, infer = [], 0.0
    bar = progress(total=len(files), desc=f"gate {art.name}", quiet=quiet, unit="img")
    t0 = time.perf_counter()
    for s in range(0, len(files), batch_size):
        x = pre.normalize(pre.batch(files[s : s + batch_size]))
        t1 = time.perf_counter()
        probs.extend(softmax(torchscript_logits(module, x)))
        infer += (time.perf_counter() - t1) * 1e3
        bar.update(len(x))
    wall = time.perf_counter() - t0
    bar.close()
    return np.asarray(probs, dtype=np.float64), len(files) / wall, infer / len(files), {"backend": "torch", "torch": torch.__version__, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- the gate


def run_gate(
    bundle_dir: str | Path,
    *,
    data_root: str | Path | None = None,
    artifacts: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    batch_size: int = 16,
    threads: int | None = None,
    fast_decode: bool = False,
    check_fast_decode: bool = True,
    openvino: bool = True,
    quiet: bool = False,
    write: bool = True,
    raise_on_failure: bool = True,
    data_option: str = "--data",
    log: Callable[[str], None] = print,
) -> GateReport:
    """Score every artifact of a bundle against ``reference.json`` and record the verdict.

    Args:
        bundle_dir: the bundle folder.
        data_root: where the validation images are now: the full validation split is scored.  Default: the
            bundle's own verification set (``verification.json``) when it has one, else the root recorded at
            convert time.
        artifacts: only these artifact names (default: all).
        thresholds: pass/fail limits.
        batch_size: images per inference call.
        threads: CPU threads for ONNX Runtime / torch.
        fast_decode: score with the runtime's reduced-scale JPEG decoding.  Off by default: the
            reference decoded every image at full size, so the verdict isolates the artifact.
        check_fast_decode: also score ``onnx-fp32`` with the runtime's default fast JPEG decoding and
            report it as an informational row (never fails the gate).
        openvino: where OpenVINO is installed, also score each ONNX artifact on it (row ``"NAME @ openvino"``); only
            an artifact whose row passed may run on the OpenVINO backend.  The rows never change an artifact's status.
        quiet: no progress bars and no table.
        write: write ``gate.md``, ``gate.json`` and the manifest's ``gate``/``recommended``.
        raise_on_failure: raise :class:`GateFailed` when an FP32/FP16 artifact fails.
        data_option: the CLI option to name when images are missing.
        log: where the table and verdict lines go.

    Returns:
        The :class:`GateReport`.

    Raises:
        BundleError: bad bundle or reference.  DataError: validation images missing.
        UsageError: unknown artifact name.  GateFailed: an FP32/FP16 artifact failed (after writing
        the reports).
    """
    bundle = Path(bundle_dir)
    thresholds = thresholds or Thresholds()
    manifest = read_manifest(bundle)
    ref = read_reference(bundle, manifest)
    if data_root is None and (bundle / VERIFICATION_NAME).is_file():
        ref, files = verification_reference(bundle, manifest, ref)
        root = bundle / VERIFICATION_DIR
    else:
        root = Path(data_root).expanduser() if data_root else Path(ref.data_root)
        files = resolve_images(ref.items, root, option=data_option)
    chosen = _chosen_artifacts(bundle, manifest, artifacts)
    run = dict(batch_size=batch_size, threads=threads, quiet=quiet)

    per_image: dict[str, np.ndarray] = {}
    results = [_score(bundle, manifest, manifest.artifact(name), ref, files, thresholds, per_image, fast_decode=fast_decode, **run)
               for name in chosen]
    jpeg = any(f.suffix.lower() in (".jpg", ".jpeg") for f in files)
    info_rows = []
    fast_ok = fast_decode  # scored with reduced-scale decoding throughout: that is what passed
    if check_fast_decode and not fast_decode and jpeg and "onnx-fp32" in chosen:
        row, fast_ok = _fast_decode_row(bundle, manifest.artifact("onnx-fp32"), ref, files, thresholds, **run)
        info_rows.append(row)

    ov_rows = _openvino_rows(bundle, manifest, chosen, ref, files, thresholds, fast_decode=fast_decode, **run) if openvino else []

    status = _statuses(manifest, results)
    recommended, notes = recommend(manifest, status)
    failed, passed = _verdict(manifest, results + ov_rows + info_rows, status, notes)
    failed_int8 = [r for r in results if r.precision == "int8" and not r.backend and r.status == "fail"]
    if failed_int8 and any(a.name == "onnx-fp32" for a in manifest.artifacts):
        # why INT8 missed: how far the FP32 model itself holds on these very images under a one-grey-level jitter
        valid_jitter = fp32_jitter(bundle, files, batch_size=batch_size, threads=threads, quiet=quiet)
        for r in failed_int8:  # where its misses are: on images FP32 answers stably, or on those one grey level flips
            if r.name in per_image:
                r.quantization = {**(r.quantization or {}), "valid_jitter": split_by_stability(valid_jitter, per_image[r.name])}
    else:
        valid_jitter = None
    notes.extend(n for n in (jitter_note(r, thresholds, valid_jitter) for r in results) if n)
    report = GateReport(
        bundle=str(bundle), passed=passed, thresholds=thresholds, reference=_reference_summary(ref),
        results=results + ov_rows + info_rows, recommended=recommended, notes=notes, data_root=str(root),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        environment=_environment(fast_decode=fast_decode, batch_size=batch_size, results=results + ov_rows),
        fast_decode_passed=bool(fast_ok and passed),
    )
    if not quiet:
        log(format_table(report))
        for line in notes:
            log(f"gate: {line}")
    if write:
        write_report(bundle, manifest, report, status)
    if failed and raise_on_failure:
        raise GateFailed(
            f"accuracy gate failed: {'; '.join(f'{r.name} {r.reason}' for r in failed)}"
            + (f" (see {bundle / GATE_MD})" if write else "")
        )
    return report


def _environment(*, fast_decode: bool, batch_size: int, results: Sequence[ArtifactResult]) -> dict[str, Any]:
    """The machine the verdicts were obtained on: CPU, providers/engines that ran, GPU, CUDA driver, TensorRT."""
    from kimchi_edge.runtime.sysinfo import VNNI_FLAGS, cpu_flags, cpu_has_vnni, cuda_device_facts

    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                           "node": platform.node(), "fast_decode": fast_decode, "batch_size": batch_size}
    if cpu_flags():  # what decides which INT8 kernels ONNX Runtime runs (sysinfo.cpu_has_vnni)
        env["cpu_int8_dot"] = ", ".join(f for f in VNNI_FLAGS if f in cpu_flags()) if cpu_has_vnni() else \
            ("avx2 (no VNNI)" if "avx2" in cpu_flags() else "none of avx2/" + "/".join(VNNI_FLAGS))
    env.update({k: v for k, v in cuda_device_facts().items() if v})
    env["ran_on"] = {r.name: [r.backend] if r.backend else (r.runtime.get("providers") or [r.runtime.get("backend")])[:1]
                     for r in results if r.runtime}
    for key in ("tensorrt", "openvino"):
        version = next((r.runtime.get(key) for r in results if r.runtime.get(key)), None)
        if version:
            env[key] = version
    return env


def _chosen_artifacts(bundle: Path, manifest: BundleManifest, artifacts: Sequence[str] | None) -> list[str]:
    """The artifact names to score; a missing or modified file stops the gate before anything is scored."""
    known = [a.name for a in manifest.artifacts]
    chosen = list(artifacts) if artifacts else known
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise UsageError(f"bundle has no artifact {unknown[0]!r}; it has {known}")
    for name in chosen:
        verify_artifact(bundle, manifest.artifact(name))
    return chosen


def _reference_summary(ref: Reference) -> dict[str, Any]:
    ok = ref.probabilities.argmax(1) == ref.targets
    return {"source": dict(ref.source), "n": len(ok), "top1": float(ok.mean()),
            "top1_interval": wilson_interval(int(ok.sum()), len(ok))}


def _score(bundle: Path, manifest: BundleManifest, art: Artifact, ref: Reference, files: list[Path], thresholds: Thresholds,
           agreement: dict[str, np.ndarray] | None = None, **run: Any) -> ArtifactResult:
    """Run one artifact on the files, compare with the reference and decide (``skipped`` with the reason if it can't run).

    ``agreement`` (when given) receives the artifact's per-image top-1 agreement with the reference.
    """
    r = ArtifactResult(name=art.name, format=art.format, precision=art.precision, status="skipped")
    mismatch = cpu_mismatch(art)
    if mismatch:  # scored here it would measure saturated kernels, not what runs on the CPUs it is for
        r.reason = mismatch
        return r
    try:
        if art.format == "torchscript":
            probs, ips, ims, info = _run_torchscript(bundle, art, manifest, files, **run)
        elif art.format in ("onnx", "ort", "tensorrt"):
            probs, ips, ims, info = _run_classifier(bundle, art, files, **run)
        else:
            raise _Skip(f"the runtime does not load {art.format!r} artifacts")
    except _Skip as exc:
        r.reason = str(exc)
        return r
    r.metrics = compare(ref.probabilities, probs, ref.targets, ref.labels)
    if agreement is not None:
        agreement[art.name] = np.asarray(probs).argmax(1) == ref.probabilities.argmax(1)
    metadata = info.pop("_metadata", None)
    if metadata is not None:
        mismatch = embedded_mismatch(metadata, manifest)
        if mismatch:
            info["mismatch"] = mismatch
    r.images_per_s, r.infer_ms_per_image, r.runtime = ips, ims, info
    if art.precision == "int8" and art.format == "onnx":
        r.quantization = quantization_summary(art.target, art.details)
    decide(r, thresholds)
    return r


def _fast_decode_row(bundle: Path, art: Artifact, ref: Reference, files: list[Path], thresholds: Thresholds,
                     **run: Any) -> tuple[ArtifactResult, bool]:
    """``onnx-fp32`` with reduced-scale JPEG decoding, held to the FP32 thresholds: the runtime's default only if it passes."""
    probs, ips, ims, info = _run_classifier(bundle, art, files, fast_decode=True, **run)
    info.pop("_metadata", None)
    row = ArtifactResult(name="onnx-fp32 + fast JPEG decode", format=art.format, precision=art.precision, status="info",
                         metrics=compare(ref.probabilities, probs, ref.targets, ref.labels), images_per_s=ips,
                         infer_ms_per_image=ims, runtime=info)
    return row, judge_decode_variant(row, thresholds)


def _openvino_rows(bundle: Path, manifest: BundleManifest, chosen: Sequence[str], ref: Reference, files: list[Path],
                   thresholds: Thresholds, **run: Any) -> list[ArtifactResult]:
    """Each chosen ONNX artifact scored again on the OpenVINO backend (none where OpenVINO is not installed)."""
    from kimchi_edge.runtime.backends import openvino_installed

    if not openvino_installed():
        return []
    rows = []
    for name in chosen:
        art = manifest.artifact(name)
        if art.format != "onnx":
            continue
        r = ArtifactResult(name=f"{art.name} @ openvino", format=art.format, precision=art.precision, status="skipped",
                           artifact=art.name, backend="openvino")
        try:
            probs, r.images_per_s, r.infer_ms_per_image, r.runtime = _run_classifier(bundle, art, files, backend="openvino", **run)
        except KimchiEdgeError as exc:  # e.g. OpenVINO cannot read the graph: the artifact just does not run there
            r.reason = f"OpenVINO could not run it: {exc}"
            rows.append(r)
            continue
        r.runtime.pop("_metadata", None)
        r.metrics = compare(ref.probabilities, probs, ref.targets, ref.labels)
        decide(r, thresholds)
        rows.append(r)
    return rows


def _statuses(manifest: BundleManifest, results: Sequence[ArtifactResult]) -> dict[str, str]:
    """This run's status per artifact, else the last recorded one (e.g. TorchScript scored by convert, skipped on a Jetson)."""
    known = {a.name for a in manifest.artifacts}
    status = {n: v.status for n, v in manifest.gate.artifacts.items() if n in known} if manifest.gate else {}
    for r in results:
        if r.status != "skipped" or r.name not in status:
            status[r.name] = r.status
    return status


def _verdict(manifest: BundleManifest, results: Sequence[ArtifactResult], status: Mapping[str, str],
             notes: list[str]) -> tuple[list[ArtifactResult], bool]:
    """(the full-precision artifacts that failed now, whether the gate passed); explains itself in ``notes``."""
    failed = [r for r in results if r.status == "fail" and r.precision != "int8" and not r.backend]
    precision = {a.name: a.precision for a in manifest.artifacts}
    rescored = {r.name for r in results if r.status != "skipped"}
    earlier = [n for n, s in status.items() if s == "fail" and precision.get(n) != "int8" and n not in rescored]
    if earlier:
        notes.append(f"{', '.join(earlier)} failed an earlier gate run and were not re-scored here")
    if failed:
        notes.insert(0, "FAILED: " + "; ".join(f"{r.name}: {r.reason}" for r in failed))
    for r in results:
        if r.status == "fail" and r.backend:
            notes.append(f"{r.artifact} failed on {r.backend} ({r.reason}): the runtime will not run it there")
        elif r.status == "skipped":
            notes.append(f"{r.name} not scored here: {r.reason}")
        elif r.status == "info":
            m = r.metrics
            notes.append(
                f"with reduced-scale JPEG decoding onnx-fp32 agrees on {m['agreement'] * 100:.2f}% "
                f"({m['delta'] * 100:+.2f} points) and {r.reason}"
            )
    return failed, not failed and not earlier
