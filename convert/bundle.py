"""Run folder -> model bundle: every artifact, the reference predictions, the manifest, and the gate.

The bundle is built under a temporary name beside its final place and renamed only when complete
(:func:`kimchi_edge.runtime.fsutil.atomic_directory`), so an interrupted conversion never leaves a folder that
loads.  Everything that can be checked cheaply (run folder, labels, image paths, calibration count,
output folder) is checked before the learner is even loaded.

``learner.pkl`` is a pickle: convert only learners you trust.
"""

from __future__ import annotations

import os
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kimchi_edge.runtime.errors import BundleError, GateFailed, UsageError
from kimchi_edge.runtime.fsutil import atomic_directory, atomic_write_json, sha256_file
from kimchi_edge.runtime.manifest import (
    MANIFEST_NAME,
    VERIFICATION_DIR,
    VERIFICATION_NAME,
    Artifact,
    BundleManifest,
    VerificationImage,
    VerificationSet,
    write_manifest,
    write_typed,
)

from .gate import REFERENCE_NAME, GateReport, Reference, Thresholds, reference_to_dict, run_gate
from .runfolder import Item, RunFolder, read_run, resolve_images, stratified_sample

DEFAULT_CALIB = 200
DEFAULT_VERIFICATION_IMAGES = 200
DEFAULT_VERIFICATION_MB = 25.0
FILES = {
    "onnx-fp32": "model.onnx",
    "onnx-int8": "model.int8.onnx",  # INT8 for ONNX Runtime on CPU (uint8 activations)
    "onnx-int8-vnni": "model.int8-vnni.onnx",  # the same with 8-bit weights, for x86-64 CPUs with VNNI (built on one)
    "onnx-int8-qdq-s8": "model.int8-qdq-s8.onnx",  # INT8 for TensorRT (symmetric int8 QDQ)
    "torchscript": "model.torchscript.pt",
    "ort-fp32": "model.ort",
}


@dataclass
class BundleResult:
    """What :func:`bundle_from_run` built."""

    path: Path
    manifest: BundleManifest
    gate: GateReport | None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _versions() -> dict[str, str]:
    import fastai
    import onnx
    import onnxruntime
    import torch

    import kimchi_edge

    out = {"torch": torch.__version__, "fastai": fastai.__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__, "python": platform.python_version(), "kimchi_edge": kimchi_edge.__version__}
    try:
        import onnxscript

        out["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    return out


def _artifact(folder: Path, name: str, fmt: str, precision: str, input_kind: str, built_with: dict, details: dict,
              target: str = "") -> Artifact:
    path = folder / FILES[name]
    return Artifact(
        name=name, file=path.name, format=fmt, precision=precision, sha256=sha256_file(path),
        size_bytes=path.stat().st_size, input=input_kind, built_with=built_with, details=details, target=target,
    )


def reference_from_learner(learn: Any, files: Sequence[Path], items: Sequence[Item], labels: Sequence[str], *, data_root: str, batch_size: int = 32, quiet: bool = False) -> Reference:
    """The learner's own probabilities on ``files`` through its fastai pipeline (``test_dl`` + ``get_preds``)."""
    import fastai
    import torch
    from fastai.callback.progress import ProgressCallback  # noqa: F401  (also patches Learner.no_bar)

    # rm_type_tfms=0: the items are files, so every type transform (the image decoder) applies; fastai would
    # otherwise infer it from the decoder's type annotation (which fails for `Any`).
    dl = learn.dls.test_dl([str(f) for f in files], bs=batch_size, num_workers=0, rm_type_tfms=0)
    import sys

    ctx = learn.no_bar() if quiet or not sys.stdout.isatty() else nullcontext()
    with ctx, torch.no_grad():
        probs, _ = learn.get_preds(dl=dl)
    p = probs.float().numpy().astype(np.float64)
    note = "learn.get_preds (loss-function activation)"
    if p.ndim != 2 or p.shape[1] != len(labels):
        raise BundleError(f"the learner returns shape {tuple(p.shape)} for {len(files)} images; expected ({len(files)}, {len(labels)})")
    if (p < -1e-6).any() or not np.allclose(p.sum(1), 1.0, atol=1e-3):  # loss without a softmax activation
        from kimchi_edge.runtime.classifier import softmax

        p, note = softmax(p), "learn.get_preds + softmax (the loss function has no activation)"
    source = {"what": "fastai learner predictions on the validation files of split.json", "how": note,
              "pipeline": "learn.dls.test_dl (fastai validation transforms)", "fastai": fastai.__version__, "torch": torch.__version__}
    return Reference(data_root=data_root, labels=tuple(labels), items=tuple(items), probabilities=p, source=source)


def _check_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--out {out} is a file; expected a folder for the bundle")
        if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise UsageError(f"--out {out} exists and is not a kimchi-edge bundle; refusing to replace it (choose another --out)")


def bundle_from_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    data_root: str | Path | None = None,
    int8: bool = True,
    calib: int | None = None,
    calib_method: str = "auto",
    calib_seed: int = 0,
    torchscript: bool = True,
    ort: bool = True,
    engines: Sequence[str] = (),
    timing_cache: str | Path | None = None,
    opset: int = 18,
    exporter: str = "auto",
    imports: Sequence[str] = (),
    gate: bool = True,
    thresholds: Thresholds | None = None,
    batch_size: int = 16,
    threads: int | None = None,
    fast_decode: bool = False,
    verification_images: int = DEFAULT_VERIFICATION_IMAGES,
    verification_mb: float = DEFAULT_VERIFICATION_MB,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> BundleResult:
    """Build the bundle of a run folder and run the accuracy gate on it.

    Args:
        run_dir: the run folder (``learner.pkl``, ``model_meta.json``, ``split.json``).
        out: the bundle folder (default ``RUN_DIR/bundle``); a previous bundle there is replaced only
            once the new one is complete.
        data_root: where the images of ``split.json`` are now, if they moved.
        int8: build the INT8 QDQ ONNX models: ``onnx-int8`` for ONNX Runtime on CPU (``onnx-int8-vnni`` too, on a CPU
            with VNNI) and ``onnx-int8-qdq-s8`` for TensorRT (:data:`kimchi_edge.convert.int8.RECIPES`).
        calib: number of calibration images from the training split (default ``min(200, train)``);
            an error when larger than the training split.
        calib_method: ``auto`` (each method scored on training images held back from calibration, the best kept)
            or ``minmax``, ``entropy``, ``percentile``.
        calib_seed: seed of the stratified calibration sample.
        torchscript: write the traced TorchScript model.
        ort: write ONNX Runtime's mobile format (``model.ort`` + the operator config of a reduced build), gated too.
        engines: TensorRT engine precisions to build (``"fp16"``, ``"int8"``); skipped with one line
            when TensorRT or a GPU is absent.
        timing_cache: TensorRT timing cache (default: beside the bundle).
        opset: ONNX opset (>= 17).
        exporter: ``auto`` | ``dynamo`` | ``legacy``.
        imports: modules/``.py`` files the learner's pickle needs (see :mod:`kimchi_edge.convert.learner_io`).
        gate: run the accuracy gate at the end.
        thresholds: gate thresholds.
        batch_size: batch size for the reference and the gate.
        threads: CPU threads for the gate.
        fast_decode: score with the runtime's reduced-scale JPEG decoding (see :func:`kimchi_edge.convert.gate.run_gate`).
        verification_images / verification_mb: size of the verification set copied into the bundle (a
            stratified sample of the validation files, original bytes) that ``verify`` and ``build-engine`` gate on
            where the data is not; 0 leaves it out.
        quiet: no progress bars, no table; errors and the verdict still print.
        log: where messages go.

    Returns:
        A :class:`BundleResult`.

    Raises:
        UsageError / DataError / LearnerError / BundleError / ConversionError: bad input (nothing is
            written).
        GateFailed: an FP32/FP16 artifact failed the gate; the complete bundle with ``gate.md`` is
            kept for inspection.
    """
    from .learner_io import learner_labels, load_learner
    from .tensorrt import build_engines, default_timing_cache

    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    say = (lambda msg: None) if quiet else log
    plan = _plan(run_dir, out, data_root=data_root, int8=int8, calib=calib, calib_seed=calib_seed, engines=engines, log=log)
    run, labels = plan.run, plan.run.meta.labels

    t = time.perf_counter()
    learn = load_learner(run.learner, imports=imports)
    got = learner_labels(learn)
    if got != labels:
        raise BundleError(f"learner vocab {list(got)} differs from model_meta.json labels {list(labels)}")
    seconds["load"] = time.perf_counter() - t
    say(f"convert: loaded {run.learner} ({run.meta.architecture}, {len(labels)} classes) in {seconds['load']:.1f} s")

    versions = _versions()
    with atomic_directory(plan.out, overwrite=True) as tmp:
        t = time.perf_counter()
        say(f"convert: reference predictions of the fastai learner on {len(plan.valid_files)} validation images")
        ref = reference_from_learner(learn, plan.valid_files, run.valid, labels, data_root=str(plan.root),
                                     batch_size=max(batch_size, 32), quiet=quiet)
        atomic_write_json(tmp / REFERENCE_NAME, reference_to_dict(ref))
        seconds["reference"] = time.perf_counter() - t

        artifacts = _write_artifacts(learn, tmp, plan, versions, seconds, torchscript=torchscript, ort=ort, opset=opset,
                                     exporter=exporter, calib_method=calib_method, calib_seed=calib_seed,
                                     int8_min_agreement=(thresholds or Thresholds()).int8_min_agreement,
                                     batch_size=batch_size, quiet=quiet, say=say, log=log)
        manifest = _manifest(plan, artifacts, versions, sha256_file(tmp / REFERENCE_NAME), torchscript=torchscript,
                             calib_method=calib_method, calib_seed=calib_seed)
        vs = write_verification_set(tmp, run.valid, plan.valid_files, labels, max_images=verification_images,
                                    max_mb=verification_mb)
        if vs is not None:
            manifest = manifest.replace(source={**manifest.source, "verification": VERIFICATION_NAME,
                                                "verification_sha256": sha256_file(tmp / VERIFICATION_NAME),
                                                "verification_images": len(vs.images),
                                                "verification_bytes": sum(v.size_bytes for v in vs.images)})
            say(f"convert: verification set of {len(vs.images)} validation images "
                f"({sum(v.size_bytes for v in vs.images) / 1e6:.1f} MB) copied into the bundle")
        if plan.engines:
            t = time.perf_counter()
            engine_arts = build_engines(tmp, manifest, tuple(plan.engines), timing_cache=timing_cache or default_timing_cache(plan.out), log=say)
            manifest = manifest.replace(artifacts=manifest.artifacts + tuple(engine_arts))
            seconds["tensorrt"] = time.perf_counter() - t
        write_manifest(tmp, manifest)

        report: GateReport | None = None
        failure: GateFailed | None = None
        if gate:
            t = time.perf_counter()
            try:
                report = run_gate(tmp, data_root=plan.root, thresholds=thresholds, batch_size=batch_size, threads=threads,
                                  fast_decode=fast_decode, quiet=quiet, log=log)
            except GateFailed as exc:
                failure = exc
                failed_dir = _keep_failed(tmp, plan.out)  # the previous bundle (if any) stays in place, untouched
            seconds["gate"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_all
    if failure is not None:
        kept = "the previous bundle is unchanged; " if plan.out.exists() else ""
        raise GateFailed(f"{str(failure).replace(str(tmp), str(failed_dir))}; {kept}the failed bundle is kept for "
                         f"inspection in {failed_dir}")
    from kimchi_edge.runtime.manifest import read_manifest

    return BundleResult(path=plan.out, manifest=read_manifest(plan.out), gate=report, seconds=seconds, notes=plan.notes)


def _keep_failed(tmp: Path, out: Path) -> Path:
    """Move a complete bundle that failed its gate to ``OUT.failed-gate`` (replacing an older one) instead of ``OUT``."""
    import shutil

    failed = out.with_name(f"{out.name}.failed-gate")
    if failed.exists():
        shutil.rmtree(failed)
    os.replace(tmp, failed)
    return failed


@dataclass
class _Plan:
    """What a conversion will do, settled before the learner is loaded (every check that costs nothing)."""

    run: RunFolder
    root: Path
    out: Path
    valid_files: list[Path]
    calib_items: list[Item]
    calib_files: list[Path]
    engines: tuple[str, ...]
    notes: list[str]
    int8: bool


def _plan(run_dir: str | Path, out: str | Path | None, *, data_root: str | Path | None, int8: bool, calib: int | None,
          calib_seed: int, engines: Sequence[str], log: Callable[[str], None]) -> _Plan:
    """Read the run folder and check labels, image paths, calibration count, engines and ``out`` — before any work."""
    from .tensorrt import tensorrt_unavailable_reason

    run = read_run(run_dir)
    root = Path(data_root).expanduser() if data_root else run.data_root
    valid_files = resolve_images(run.valid, root, what="validation")
    calib_items: list[Item] = []
    calib_files: list[Path] = []
    if int8:
        if not run.train:
            raise UsageError(f"{run.path / 'split.json'} lists no training images to calibrate INT8 with; pass --no-int8")
        count = calib if calib is not None else min(DEFAULT_CALIB, len(run.train))
        calib_items = stratified_sample(run.train, count, run.meta.labels, seed=calib_seed)
        calib_files = resolve_images(calib_items, root, what="training (INT8 calibration)")
    bad = [e for e in engines if e not in ("fp16", "int8")]
    if bad:
        raise UsageError(f"unknown engine precision {bad[0]!r}; choose fp16 and/or int8")
    if "int8" in engines and not int8:
        raise UsageError("an INT8 TensorRT engine is built from the INT8 ONNX model; drop --no-int8 or the INT8 engine")
    out_dir = Path(out).expanduser() if out else run.path / "bundle"
    _check_out(out_dir)
    notes: list[str] = []
    if engines:
        reason = tensorrt_unavailable_reason()
        if reason:
            log(f"TensorRT engines skipped: {reason}")
            notes.append(f"TensorRT engines ({', '.join(engines)}) not built: {reason}")
            engines = ()
    return _Plan(run, root, out_dir, valid_files, calib_items, calib_files, tuple(engines), notes, int8)


def _write_artifacts(learn: Any, tmp: Path, plan: _Plan, versions: dict[str, str], seconds: dict[str, float], *,
                     torchscript: bool, ort: bool, opset: int, exporter: str, calib_method: str, calib_seed: int,
                     int8_min_agreement: float, batch_size: int,
                     quiet: bool, say: Callable[[str], None], log: Callable[[str], None]) -> list[Artifact]:
    """TorchScript (optional), FP32 ONNX and INT8 QDQ ONNX (optional) into ``tmp``, each timed in ``seconds``."""
    meta = plan.run.meta
    common = {k: versions[k] for k in ("torch", "fastai", "kimchi_edge")}
    onnx_input = f"{meta.preprocessing.dtype}-{meta.preprocessing.layout.lower()}"
    artifacts: list[Artifact] = []
    if torchscript:
        from .torchscript import torchscript_from_learner

        t = time.perf_counter()
        details = torchscript_from_learner(learn, meta, tmp / FILES["torchscript"])
        artifacts.append(_artifact(tmp, "torchscript", "torchscript", "fp32", "float-nchw-normalized", common, details))
        seconds["torchscript"] = time.perf_counter() - t
        say(f"convert: TorchScript (traced) in {seconds['torchscript']:.1f} s")

    from .onnx_export import onnx_from_learner

    t = time.perf_counter()
    exp = onnx_from_learner(learn, meta, tmp / FILES["onnx-fp32"], opset=opset, exporter=exporter, log=log)
    onnx_built = {**common, "onnx": versions["onnx"], "opset": str(exp.opset), "exporter": exp.exporter,
                  "onnxruntime": versions["onnxruntime"], **({"onnxscript": versions["onnxscript"]} if "onnxscript" in versions else {})}
    details = {**exp.details, "ort_vs_torch_max_abs_diff": exp.max_abs_diff}
    if exp.fallback_reason:
        details["fallback_reason"] = exp.fallback_reason
        plan.notes.append(f"ONNX exported with the legacy exporter: {exp.fallback_reason}")
    artifacts.append(_artifact(tmp, "onnx-fp32", "onnx", "fp32", onnx_input, onnx_built, details))
    seconds["onnx"] = time.perf_counter() - t
    say(f"convert: ONNX ({exp.exporter} exporter, opset {exp.opset}) in {seconds['onnx']:.1f} s")

    if plan.int8:
        from .int8 import RECIPES, int8_artifacts_from_onnx

        t = time.perf_counter()
        say(f"convert: INT8 calibration on {len(plan.calib_files)} training images (stratified by class; calibration "
            f"{calib_method}{', each method scored on a held-back slice' if calib_method == 'auto' else ''})")
        unbuilt = {t_: why for t_, r in RECIPES.items() if (why := r.unbuildable_reason())}
        recipes = {t_: r for t_, r in RECIPES.items() if t_ not in unbuilt}
        plan.notes.extend(unbuilt.values())
        built = int8_artifacts_from_onnx(tmp / FILES["onnx-fp32"], {t_: tmp / FILES[r.artifact] for t_, r in recipes.items()},
                                         plan.calib_files, meta, method=calib_method, min_agreement=int8_min_agreement,
                                         batch_size=batch_size, quiet=quiet, log=say)
        for target, details in built.items():
            details["calibration_seed"] = calib_seed
            artifacts.append(_artifact(tmp, RECIPES[target].artifact, "onnx", "int8", onnx_input, onnx_built, details,
                                       target=target))
        seconds["int8"] = time.perf_counter() - t
        say(f"convert: INT8 QDQ ONNX ({', '.join(r.artifact for r in recipes.values())}) in {seconds['int8']:.1f} s")

    if ort:
        from .ort_format import ort_from_onnx

        t = time.perf_counter()
        details = ort_from_onnx(tmp / FILES["onnx-fp32"], tmp)
        artifacts.append(_artifact(tmp, "ort-fp32", "ort", "fp32", onnx_input, onnx_built, details))
        seconds["ort"] = time.perf_counter() - t
        say(f"convert: ONNX Runtime mobile format (.ort, {details['target_platform']}) in {seconds['ort']:.1f} s")
    return artifacts


def _manifest(plan: _Plan, artifacts: list[Artifact], versions: dict[str, str], reference_sha256: str, *,
              torchscript: bool, calib_method: str, calib_seed: int) -> BundleManifest:
    """The bundle's manifest before the gate: artifacts, default recommendation, where everything came from."""
    run = plan.run
    return BundleManifest(
        model=run.meta,
        artifacts=tuple(artifacts),
        recommended={"onnxruntime": "onnx-fp32", **({"torchscript": "torchscript"} if torchscript else {})},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source={
            "run_dir": str(run.path.resolve()),
            "learner_sha256": sha256_file(run.learner),
            "data_root": str(plan.root),
            "split": {"layout": run.split.layout, "seed": run.split.seed, "valid_pct": run.split.valid_pct,
                      "train": len(run.train), "valid": len(run.valid), "test": len(run.test),
                      "excluded": len(run.split.excluded)},
            "reference": REFERENCE_NAME,
            "reference_sha256": reference_sha256,
            "calibration": ({"split": "train", "images": len(plan.calib_items), "seed": calib_seed, "method": calib_method}
                            if plan.int8 else {}),
            "versions": versions,
            "notes": plan.notes,
        },
    )


def write_verification_set(bundle: Path, items: Sequence[Item], files: Sequence[Path], labels: Sequence[str], *,
                           max_images: int = DEFAULT_VERIFICATION_IMAGES, max_mb: float = DEFAULT_VERIFICATION_MB,
                           seed: int = 0) -> VerificationSet | None:
    """Copy a stratified sample of the validation files, byte for byte, into ``bundle/verification/``.

    Every class keeps at least one image when the budget allows; files are taken in stratified order until
    ``max_images`` or ``max_mb`` is reached (a file larger than the whole budget is skipped).  Returns ``None``
    when nothing fits.
    """
    import shutil

    if max_images < 1 or max_mb <= 0:
        return None
    by_file = {it.file: f for it, f in zip(items, files)}
    order = stratified_sample(items, min(len(items), max_images), labels, seed=seed)
    budget = int(max_mb * 1e6)
    folder = bundle / VERIFICATION_DIR
    folder.mkdir(exist_ok=True)
    chosen: list[VerificationImage] = []
    used = 0
    for it in order:
        src = by_file[it.file]
        size = src.stat().st_size
        if used + size > budget:
            continue
        name = f"{VERIFICATION_DIR}/{len(chosen):04d}{src.suffix.lower()}"
        shutil.copyfile(src, bundle / name)
        chosen.append(VerificationImage(file=name, source=it.file, label=it.label, sha256=sha256_file(bundle / name), size_bytes=size))
        used += size
    if not chosen:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    vs = VerificationSet(images=tuple(chosen), of_valid=len(items), seed=seed)
    write_typed(bundle / VERIFICATION_NAME, vs)
    return vs
