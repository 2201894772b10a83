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
skipped with that reason.  Results go to ``gate.md``, ``gate.json`` and the ``gate`` entry of
``manifest.json`` (all written atomically), and the recommendation per backend is updated.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kimchi_edge.runtime.classifier import softmax
from kimchi_edge.runtime.errors import BundleError, GateFailed, KimchiEdgeError, UsageError
from kimchi_edge.runtime.fsutil import atomic_write_json, atomic_write_text, read_json, sha256_file
from kimchi_edge.runtime.manifest import Artifact, BundleManifest, read_manifest, verify_artifact, write_manifest

from .progress import progress
from .runfolder import Item, resolve_images

REFERENCE_NAME = "reference.json"
GATE_JSON = "gate.json"
GATE_MD = "gate.md"
#: backend -> artifact names in order of preference (the first one that passes is recommended)
PREFERENCE: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnx-int8", "onnx-fp32"),
    "tensorrt": ("trt-int8", "trt-fp16"),
    "torchscript": ("torchscript",),
}


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits, in fractions (agreement) and accuracy points (losses)."""

    min_agreement: float = 0.995  # FP32/FP16: top-1 agreement with the reference
    max_loss_points: float = 0.5  # FP32/FP16: top-1 accuracy loss vs the reference
    int8_max_loss_points: float = 1.0  # INT8: top-1 accuracy loss vs the reference
    int8_min_agreement: float = 0.0  # INT8: optional agreement floor (off by default)


# --------------------------------------------------------------------------- statistics


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n``."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference_interval(cand: np.ndarray, ref: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Interval of ``mean(cand) - mean(ref)`` for paired 0/1 outcomes on the same images.

    The difference is ``(b - c) / n`` where ``b`` counts images only the candidate gets right and
    ``c`` those only the reference gets right; everything else cancels.  The interval combines the
    Wilson intervals of ``b / n`` and ``c / n`` by MOVER (Zou & Donner's "method of variance estimates
    recovery", Newcombe's square-and-add).  It stays honest when the two agree on every image: with
    no discordant pair in ``n`` images it is about ``±(3.84 / n)`` (the Wilson bound of 0 / n), not
    the degenerate ``[0, 0]`` of a bootstrap.
    """
    cand, ref = np.asarray(cand, bool), np.asarray(ref, bool)
    n = len(cand)
    if n == 0:
        return (-1.0, 1.0)
    b = int(np.sum(cand & ~ref))
    c = int(np.sum(~cand & ref))
    pb, pc = b / n, c / n
    lb, ub = wilson_interval(b, n, z)
    lc, uc = wilson_interval(c, n, z)
    delta = pb - pc
    lo = delta - math.sqrt((pb - lb) ** 2 + (uc - pc) ** 2)
    hi = delta + math.sqrt((ub - pb) ** 2 + (pc - lc) ** 2)
    return (max(-1.0, lo), min(1.0, hi))


def compare(ref_probs: np.ndarray, cand_probs: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """All gate metrics of one candidate against the reference (fractions, not percent)."""
    n = len(targets)
    ref_pred, cand_pred = ref_probs.argmax(1), cand_probs.argmax(1)
    ref_ok, cand_ok = ref_pred == targets, cand_pred == targets
    agree = cand_pred == ref_pred
    dp = np.abs(cand_probs - ref_probs)
    per_class = {}
    for i, lab in enumerate(labels):
        m = targets == i
        k = int(m.sum())
        ra = float(ref_ok[m].mean()) if k else float("nan")
        ca = float(cand_ok[m].mean()) if k else float("nan")
        per_class[lab] = {"n": k, "reference_top1": ra, "top1": ca, "delta": ca - ra if k else float("nan")}
    delta = float(cand_ok.mean() - ref_ok.mean())
    return {
        "n": n,
        "top1": float(cand_ok.mean()),
        "top1_interval": wilson_interval(int(cand_ok.sum()), n),
        "delta": delta,
        "delta_interval": paired_difference_interval(cand_ok, ref_ok),
        "agreement": float(agree.mean()),
        "agreement_interval": wilson_interval(int(agree.sum()), n),
        "disagreements": int((~agree).sum()),
        "max_abs_dprob": float(dp.max()) if dp.size else 0.0,
        "mean_abs_dprob": float(dp.mean()) if dp.size else 0.0,
        "per_class": per_class,
    }


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


def reference_to_dict(ref: Reference) -> dict[str, Any]:
    return {
        "data_root": ref.data_root,
        "labels": list(ref.labels),
        "source": dict(ref.source),
        "items": [
            {"file": it.file, "label": it.label, "prediction": ref.labels[int(np.argmax(p))], "probabilities": [float(v) for v in p]}
            for it, p in zip(ref.items, ref.probabilities)
        ],
    }


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
    try:
        raw = read_json(path)
        labels = tuple(str(v) for v in raw["labels"])
        items = tuple(Item(str(e["file"]), str(e["label"])) for e in raw["items"])
        probs = np.asarray([e["probabilities"] for e in raw["items"]], dtype=np.float64)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is malformed: {type(exc).__name__}: {exc}") from exc
    if labels != manifest.labels:
        raise BundleError(f"{REFERENCE_NAME} labels {list(labels)} differ from the manifest's {list(manifest.labels)}")
    if not items or probs.shape != (len(items), len(labels)):
        raise BundleError(f"{path}: expected {len(items)} x {len(labels)} probabilities, got shape {probs.shape}")
    unknown = {it.label for it in items} - set(labels)
    if unknown:
        raise BundleError(f"{path}: labels not in the vocab: {sorted(unknown)[:5]}")
    return Reference(str(raw.get("data_root", "")), labels, items, probs, raw.get("source", {}))


# --------------------------------------------------------------------------- candidates


@dataclass
class ArtifactResult:
    name: str
    format: str
    precision: str
    status: str  # "pass" | "fail" | "skipped"
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    images_per_s: float = 0.0
    infer_ms_per_image: float = 0.0
    runtime: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Skip(Exception):
    pass


def _run_classifier(bundle: Path, art: Artifact, files: list[Path], *, batch_size: int, threads: int | None, fast_decode: bool, quiet: bool) -> tuple[np.ndarray, float, float, dict]:
    from kimchi_edge.runtime.classifier import Classifier

    backend = "tensorrt" if art.format == "tensorrt" else "onnxruntime"
    try:
        clf = Classifier.from_bundle(bundle, backend=backend, artifact=art.name, threads=threads, fast_decode=fast_decode, max_pixels=None)
    except BundleError:  # missing or modified file: the gate must not pass over it
        raise
    except KimchiEdgeError as exc:
        if art.format == "tensorrt":
            raise _Skip(f"TensorRT unavailable: {exc}") from exc
        raise
    with clf:
        clf.predict_batch(files[: min(len(files), batch_size)], batch_size=batch_size)  # warm-up
        probs, infer = [], 0.0
        bar = progress(total=len(files), desc=f"gate {art.name}", quiet=quiet, unit="img")
        t0 = time.perf_counter()
        for s in range(0, len(files), batch_size):
            preds = clf.predict_batch(files[s : s + batch_size], batch_size=batch_size)
            probs.extend(p.probabilities for p in preds)
            infer += sum(p.timings_ms["infer"] for p in preds)
            bar.update(len(preds))
        wall = time.perf_counter() - t0
        bar.close()
        info = {k: v for k, v in clf.info.items() if k in ("backend", "providers", "artifact", "precision", "threads", "onnxruntime")}
        session = getattr(clf.backend, "session", None)
        if session is not None:  # ONNX: the labels/preprocessing embedded at export time
            try:
                info["_metadata"] = dict(session.get_modelmeta().custom_metadata_map)
            except Exception:  # metadata is a cross-check only
                pass
    return np.asarray(probs, dtype=np.float64), len(files) / wall, infer / len(files), info


def _run_torchscript(bundle: Path, art: Artifact, manifest: BundleManifest, files: list[Path], *, batch_size: int, threads: int | None, fast_decode: bool, quiet: bool) -> tuple[np.ndarray, float, float, dict]:
    try:
        import torch
    except ImportError:
        raise _Skip("torch is not installed here (TorchScript is checked by kimchi-edge convert)") from None
    from kimchi_edge.runtime.preprocess import Preprocessor

    from .torchscript import load_torchscript, torchscript_logits

    verify_artifact(bundle, art)
    pre = Preprocessor(manifest.preprocessing, max_pixels=None, fast_decode=fast_decode)
    module = load_torchscript(bundle / art.file, threads=threads)
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


@dataclass
class GateReport:
    bundle: str
    passed: bool
    thresholds: Thresholds
    reference: dict[str, Any]
    results: list[ArtifactResult]
    recommended: dict[str, str]
    notes: list[str]
    data_root: str
    created: str
    environment: dict[str, Any]

    def result(self, name: str) -> ArtifactResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "created": self.created,
            "bundle": self.bundle,
            "data_root": self.data_root,
            "thresholds": dataclasses.asdict(self.thresholds),
            "reference": self.reference,
            "artifacts": [r.to_dict() for r in self.results],
            "recommended": self.recommended,
            "notes": self.notes,
            "environment": self.environment,
        }


def embedded_mismatch(metadata: Mapping[str, str], manifest: BundleManifest) -> str:
    """Compare the labels/preprocessing embedded in an ONNX file with the manifest's ('' when they agree)."""
    import json

    from kimchi_edge.runtime.manifest import to_dict

    problems = []
    raw = metadata.get("kimchi_edge.labels")
    if raw is not None:
        try:
            if tuple(json.loads(raw)) != manifest.labels:
                problems.append("labels")
        except ValueError:
            problems.append("labels (unreadable)")
    raw = metadata.get("kimchi_edge.preprocessing")
    if raw is not None:
        try:
            embedded = json.loads(raw)
        except ValueError:
            embedded = None
        if not isinstance(embedded, dict):
            problems.append("preprocessing (unreadable)")
        else:
            ours = to_dict(manifest.preprocessing)
            diff = [k for k, v in ours.items() if k in embedded and not _same(embedded[k], v)]
            if diff:
                problems.append("preprocessing " + ", ".join(diff))
    return f"the manifest disagrees with what the model was exported with: {'; '.join(problems)}" if problems else ""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    return a == b


def _decide(r: ArtifactResult, t: Thresholds) -> None:
    m = r.metrics
    loss = -m["delta"] * 100
    if r.precision == "int8":
        problems = []
        if loss > t.int8_max_loss_points + 1e-9:
            problems.append(f"loses {loss:.2f} points > {t.int8_max_loss_points:g}")
        if m["agreement"] < t.int8_min_agreement - 1e-12:
            problems.append(f"agreement {m['agreement'] * 100:.2f}% < {t.int8_min_agreement * 100:g}%")
    else:
        problems = []
        if m["agreement"] < t.min_agreement - 1e-12:
            problems.append(f"agreement {m['agreement'] * 100:.2f}% < {t.min_agreement * 100:g}% ({m['disagreements']} of {m['n']} images differ)")
        if loss > t.max_loss_points + 1e-9:
            problems.append(f"loses {loss:.2f} points > {t.max_loss_points:g}")
    if r.runtime.get("mismatch"):
        problems.append(r.runtime["mismatch"])
    r.status = "fail" if problems else "pass"
    r.reason = "; ".join(problems)


def _recommend(manifest: BundleManifest, status: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Best artifact per backend: the first in :data:`PREFERENCE` that passed (or is not scored yet).

    When the full-precision artifact of a backend fails, nothing is recommended for that backend: an
    INT8 model quantized from it cannot be trusted either.
    """
    by_name = {a.name: a for a in manifest.artifacts}
    rec: dict[str, str] = {}
    notes: list[str] = []
    for backend, prefs in PREFERENCE.items():
        present = [n for n in prefs if n in by_name]
        if not present:
            continue
        if any(status.get(n) == "fail" and by_name[n].precision != "int8" for n in present):
            notes.append(f"{', '.join(n for n in present if status.get(n) == 'fail')} failed the gate; no artifact is recommended for {backend}")
            continue
        ok = [n for n in present if status.get(n) == "pass"] or [n for n in present if status.get(n) in (None, "", "skipped")]
        if ok:
            rec[backend] = ok[0]
        for n in present:
            if status.get(n) == "fail":
                notes.append(
                    f"{n} failed the gate and is not recommended; {backend} uses {ok[0]} instead"
                    if ok else f"{n} failed the gate; no artifact is recommended for {backend}"
                )
    for backend, name in manifest.recommended.items():  # keep recommendations for backends we do not rank
        if backend not in PREFERENCE and name in by_name and status.get(name) != "fail":
            rec[backend] = name
    return rec, notes


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
    quiet: bool = False,
    write: bool = True,
    raise_on_failure: bool = True,
    data_option: str = "--data",
    log: Callable[[str], None] = print,
) -> GateReport:
    """Score every artifact of a bundle against ``reference.json`` and record the verdict.

    Args:
        bundle_dir: the bundle folder.
        data_root: where the validation images are now (default: the root recorded at convert time).
        artifacts: only these artifact names (default: all).
        thresholds: pass/fail limits.
        batch_size: images per inference call.
        threads: CPU threads for ONNX Runtime / torch.
        fast_decode: score with the runtime's reduced-scale JPEG decoding.  Off by default: the
            reference decoded every image at full size, so the verdict isolates the artifact.
        check_fast_decode: also score ``onnx-fp32`` with the runtime's default fast JPEG decoding and
            report it as an informational row (never fails the gate).
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
    root = Path(data_root).expanduser() if data_root else Path(ref.data_root)
    files = resolve_images(ref.items, root, option=data_option)
    known = [a.name for a in manifest.artifacts]
    chosen = list(artifacts) if artifacts else known
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise UsageError(f"bundle has no artifact {unknown[0]!r}; it has {known}")
    for name in chosen:  # a missing or modified file stops the gate before anything is scored
        verify_artifact(bundle, manifest.artifact(name))

    targets = ref.targets
    ref_ok = ref.probabilities.argmax(1) == targets
    ref_summary = {
        "source": dict(ref.source),
        "n": len(targets),
        "top1": float(ref_ok.mean()),
        "top1_interval": wilson_interval(int(ref_ok.sum()), len(targets)),
    }
    results: list[ArtifactResult] = []
    for name in chosen:
        art = manifest.artifact(name)
        r = ArtifactResult(name=art.name, format=art.format, precision=art.precision, status="skipped")
        try:
            if art.format == "torchscript":
                probs, ips, ims, info = _run_torchscript(bundle, art, manifest, files, batch_size=batch_size, threads=threads, fast_decode=fast_decode, quiet=quiet)
            elif art.format in ("onnx", "tensorrt"):
                probs, ips, ims, info = _run_classifier(bundle, art, files, batch_size=batch_size, threads=threads, fast_decode=fast_decode, quiet=quiet)
            else:
                raise _Skip(f"the runtime does not load {art.format!r} artifacts")
        except _Skip as exc:
            r.reason = str(exc)
            results.append(r)
            continue
        r.metrics = compare(ref.probabilities, probs, targets, ref.labels)
        metadata = info.pop("_metadata", None)
        if metadata is not None:
            mismatch = embedded_mismatch(metadata, manifest)
            if mismatch:
                info["mismatch"] = mismatch
        r.images_per_s, r.infer_ms_per_image, r.runtime = ips, ims, info
        _decide(r, thresholds)
        results.append(r)

    info_rows: list[ArtifactResult] = []
    jpeg = any(f.suffix.lower() in (".jpg", ".jpeg") for f in files)
    if check_fast_decode and not fast_decode and jpeg and "onnx-fp32" in chosen:
        art = manifest.artifact("onnx-fp32")
        probs, ips, ims, info = _run_classifier(bundle, art, files, batch_size=batch_size, threads=threads, fast_decode=True, quiet=quiet)
        info.pop("_metadata", None)
        r = ArtifactResult(name="onnx-fp32 + fast JPEG decode", format=art.format, precision=art.precision, status="info",
                           reason="runtime default decoding (reduced-scale JPEG); informational, not gated",
                           metrics=compare(ref.probabilities, probs, targets, ref.labels), images_per_s=ips, infer_ms_per_image=ims, runtime=info)
        info_rows.append(r)

    # statuses: this run's, else the last recorded one (e.g. TorchScript scored by convert, skipped on a Jetson)
    previous = dict(manifest.gate.get("artifacts", {})) if manifest.gate else {}
    status = {n: (v.get("status") if isinstance(v, Mapping) else None) for n, v in previous.items()}
    status = {n: s for n, s in status.items() if n in known}
    for r in results:
        if r.status != "skipped" or r.name not in status:
            status[r.name] = r.status
    recommended, notes = _recommend(manifest, status)
    failed = [r for r in results if r.status == "fail" and r.precision != "int8"]
    precision = {a.name: a.precision for a in manifest.artifacts}
    earlier = [n for n, s in status.items() if s == "fail" and precision.get(n) != "int8" and n not in {r.name for r in results if r.status != "skipped"}]
    passed = not failed and not earlier
    if earlier:
        notes.append(f"{', '.join(earlier)} failed an earlier gate run and were not re-scored here")
    if failed:
        notes.insert(0, "FAILED: " + "; ".join(f"{r.name}: {r.reason}" for r in failed))
    for r in results:
        if r.status == "skipped":
            notes.append(f"{r.name} not scored here: {r.reason}")
    for r in info_rows:
        m = r.metrics
        notes.append(
            f"with the runtime's default fast JPEG decoding, onnx-fp32 agrees on {m['agreement'] * 100:.2f}% "
            f"({m['delta'] * 100:+.2f} points); Classifier.from_bundle(..., fast_decode=False) decodes like fastai"
        )
    report = GateReport(
        bundle=str(bundle), passed=passed, thresholds=thresholds, reference=ref_summary, results=results + info_rows,
        recommended=recommended, notes=notes, data_root=str(root),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        environment={"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                     "fast_decode": fast_decode, "batch_size": batch_size},
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


def write_report(bundle: Path, manifest: BundleManifest, report: GateReport, status: Mapping[str, str]) -> None:
    """``gate.json``, ``gate.md`` and the manifest's gate summary / recommendations, each atomically."""
    atomic_write_json(bundle / GATE_JSON, _finite(report.to_dict()))
    atomic_write_text(bundle / GATE_MD, format_markdown(report))
    arts = []
    by_name = {r.name: r for r in report.results}
    for a in manifest.artifacts:
        r = by_name.get(a.name)
        if r is not None and r.status != "skipped":
            gate = {"status": r.status, "top1": r.metrics["top1"], "delta_points": r.metrics["delta"] * 100,
                    "agreement": r.metrics["agreement"], "images_per_s": round(r.images_per_s, 1)}
            a = dataclasses.replace(a, details={**dict(a.details), "gate": gate})
        arts.append(a)
    summary = {
        "passed": report.passed,
        "created": report.created,
        "report": GATE_MD,
        "images": report.reference["n"],
        "reference_top1": report.reference["top1"],
        "thresholds": dataclasses.asdict(report.thresholds),
        "artifacts": {n: {"status": s, **({"reason": by_name[n].reason} if n in by_name and by_name[n].reason else {})} for n, s in status.items()},
        "notes": report.notes,
    }
    write_manifest(bundle, manifest.replace(artifacts=tuple(arts), recommended=report.recommended, gate=_finite(summary)))


def _finite(obj: Any) -> Any:
    """JSON has no NaN: classes without validation images get ``null``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- presentation


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _rows(report: GateReport) -> list[list[str]]:
    ref = report.reference
    lo, hi = ref["top1_interval"]
    rows = [["fastai learner (reference)", "fp32", f"{_pct(ref['top1'])} [{lo * 100:.1f}, {hi * 100:.1f}]", "-", "-", "-", "-", "-", "reference"]]
    for r in report.results:
        if r.status == "skipped":
            rows.append([r.name, r.precision, "-", "-", "-", "-", "-", "-", "skipped"])
            continue
        m = r.metrics
        lo, hi = m["top1_interval"]
        dlo, dhi = m["delta_interval"]
        rows.append([
            r.name, r.precision,
            f"{_pct(m['top1'])} [{lo * 100:.1f}, {hi * 100:.1f}]",
            f"{m['delta'] * 100:+.2f} [{dlo * 100:+.1f}, {dhi * 100:+.1f}]",
            f"{m['agreement'] * 100:.2f}%",
            f"{m['max_abs_dprob']:.4f}",
            f"{m['mean_abs_dprob']:.5f}",
            f"{r.images_per_s:.0f}",
            {"pass": "PASS", "info": "info"}.get(r.status, "FAIL (not recommended)" if r.precision == "int8" else "FAIL"),
        ])
    return rows


HEADER = ["artifact", "prec", "top-1 [95% CI]", "Δ points [95% CI]", "agree", "max|Δp|", "mean|Δp|", "img/s", "verdict"]


def format_table(report: GateReport) -> str:
    """The plain-text table printed by ``convert`` and ``verify``."""
    rows = [HEADER] + _rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [f"accuracy gate: {report.reference['n']} validation images, reference = fastai learner"]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(f"gate {'PASSED' if report.passed else 'FAILED'}; recommended: " + ", ".join(f"{b} -> {n}" for b, n in report.recommended.items()))
    return "\n".join(lines)


def format_markdown(report: GateReport) -> str:
    """``gate.md``: verdict, thresholds, the table, per-class deltas and notes."""
    t = report.thresholds
    out = [
        "# Accuracy gate",
        "",
        f"**{'PASSED' if report.passed else 'FAILED'}** — {report.created}, {report.reference['n']} validation images from `{report.data_root}`.",
        "",
        "Reference: the fastai learner's own predictions (`reference.json`, fastai pipeline). Candidates: each artifact",
        "fed the same image files through the kimchi-edge runtime preprocessing.",
        "",
        f"Thresholds: FP32/FP16 agree ≥ {t.min_agreement * 100:g}% and lose ≤ {t.max_loss_points:g} points; "
        f"INT8 loses ≤ {t.int8_max_loss_points:g} points (else not recommended).",
        "Intervals (95%): Wilson for accuracy and agreement; for Δ, Wilson intervals of the images only one side",
        "gets right, combined by MOVER (paired: images both get right or both get wrong cancel).",
        "",
        "| " + " | ".join(h.replace("|", "\\|") for h in HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in _rows(report)]
    scored = [r for r in report.results if r.status not in ("skipped", "info")]
    if scored:
        out += ["", "## Per-class top-1 (reference) and Δ points per artifact", "",
                "| class | n | reference | " + " | ".join(r.name for r in scored) + " |",
                "|---|---|---|" + "---|" * len(scored)]
        for lab, pc in scored[0].metrics["per_class"].items():
            cells = []
            for r in scored:
                d = r.metrics["per_class"][lab]["delta"]
                cells.append("-" if d != d else f"{d * 100:+.1f}")
            ra = pc["reference_top1"]
            out.append(f"| {lab} | {pc['n']} | {'-' if ra != ra else _pct(ra)} | " + " | ".join(cells) + " |")
    out += ["", "## Recommended artifact per backend", ""]
    out += [f"- {b}: `{n}`" for b, n in report.recommended.items()] or ["- none"]
    if report.notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    rt = [f"- {r.name}: {r.runtime}" for r in scored if r.runtime]
    if rt:
        out += ["", "## Where it ran", ""] + rt
    return "\n".join(out) + "\n"
