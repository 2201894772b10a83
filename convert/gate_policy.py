"""The gate's policy: what passes, what is recommended per backend (pure functions over measured figures).

* FP32/FP16 artifacts must agree with the reference on >= ``min_agreement`` of the images and lose
  <= ``max_loss_points``; otherwise the gate fails.
* INT8 artifacts may lose <= ``int8_max_loss_points`` (and agree >= ``int8_min_agreement``); otherwise they are
  not recommended and the full-precision artifact of the same backend is used instead.
* An ONNX artifact re-scored on OpenVINO (row ``"onnx-int8 @ openvino"``) is held to the same thresholds; the row
  never changes the artifact's own status (ONNX Runtime's), only whether ``"openvino"`` is among its providers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from kimchi_edge.runtime.manifest import BundleManifest

__all__ = ["ArtifactResult", "PREFERENCE", "Thresholds", "decide", "embedded_mismatch", "recommend"]

#: backend -> artifact names in order of preference (the first one that passes is recommended).  ``onnx-int8`` is the
#: INT8 quantized for ONNX Runtime on CPU, ``onnx-int8-vnni`` its 8-bit-weight twin for CPUs with VNNI (the runtime
#: passes over it to the next of its precision elsewhere); ``onnx-int8-qdq-s8`` (for TensorRT) is gated too but only
#: feeds INT8 engines.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnx-int8-vnni", "onnx-int8", "onnx-fp32"),
    "tensorrt": ("trt-int8", "trt-fp16"),
    "torchscript": ("torchscript",),
}


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits, in fractions (agreement) and accuracy points (losses)."""

    min_agreement: float = 0.995  # FP32/FP16: top-1 agreement with the reference
    max_loss_points: float = 0.5  # FP32/FP16: top-1 accuracy loss vs the reference
    int8_max_loss_points: float = 1.0  # INT8: top-1 accuracy loss vs the reference
    int8_min_agreement: float = 0.98  # INT8: top-1 agreement floor (accuracy alone let 87 % agreement pass)


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
    #: set on a row that re-scores artifact ``artifact`` on another backend (``backend="openvino"``); '' on the artifact's own row
    artifact: str = ""
    backend: str = ""
    #: INT8 ONNX: its target, recipe, calibration candidates and their held-back scores, layers kept in float
    quantization: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def embedded_mismatch(metadata: Mapping[str, str], manifest: BundleManifest) -> str:
    """Compare the labels/preprocessing embedded in an ONNX file with the manifest's ('' when they agree)."""
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


#: the INT8 details (``Artifact.details``, from :func:`kimchi_edge.convert.int8.int8_artifacts_from_onnx`) the report shows
QUANTIZATION_KEYS = ("target", "activations", "weights", "calibration_mode", "calibration_method", "bias_correction", "calibration_images",
                     "holdout_images", "holdout_min_agreement", "calibration_candidates", "calibration_seconds",
                     "float_nodes", "fallback", "fp32_input_jitter", "seconds")


def quantization_summary(target: str, details: Mapping[str, Any]) -> dict[str, Any]:
    """What the gate report says about how an INT8 artifact was made (``{}`` for details without a recipe)."""
    if "activations" not in details:
        return {}
    return {"target": target or details.get("target", ""), **{k: details[k] for k in QUANTIZATION_KEYS if k in details and k != "target"}}


def jitter_note(r: ArtifactResult, t: Thresholds, valid_jitter: Mapping[str, Any] | None = None) -> str | None:
    """For an INT8 artifact that failed: the reason when the FP32 model itself does not hold the agreement floor under a
    one-grey-level input jitter -- on the calibration and held-back training images (``fp32_input_jitter``) or on the
    gate's validation images (``valid_jitter``, :func:`kimchi_edge.convert.gate.fp32_jitter`; named first when below)."""
    if r.precision != "int8" or r.backend or r.status != "fail":
        return None
    j = (r.quantization or {}).get("fp32_input_jitter") or {}
    seen = []  # the gate's own images first: they are the ones the verdict is about
    if valid_jitter and "agreement" in valid_jitter:
        seen.append((valid_jitter["agreement"], f"{valid_jitter.get('images', '?')} validation images, the gate's own"))
    if "agreement" in j:
        seen.append((j["agreement"], f"{j.get('images', '?')} training images"))
    split = (r.quantization or {}).get("valid_jitter") or {}
    where_misses = ""
    if split.get("agreement_on_stable") is not None and split.get("agreement_on_flipped") is not None:
        where_misses = (f"; {r.name} agrees on {split['agreement_on_stable'] * 100:.1f}% of the {split['stable_images']} images "
                        f"whose FP32 answer no jitter draw moved and on {split['agreement_on_flipped'] * 100:.1f}% of the "
                        f"{split['flipped_images']} it moved")
    below = [a for a in seen if a[0] < t.int8_min_agreement - 1e-12]
    if not below:
        return (f"{r.name}: the FP32 model holds the {t.int8_min_agreement * 100:g}% INT8 floor under one grey level of input "
                f"jitter{where_misses}: the quantization is what misses it") if where_misses else None
    agreement, where = below[0]
    return (f"{r.name}: the FP32 model itself agrees only {agreement * 100:.1f}% with its own answers when each input pixel "
            f"moves by one grey level ({where}), below the "
            f"{t.int8_min_agreement * 100:g}% INT8 floor{where_misses}: post-training INT8, which rounds every activation far "
            "more coarsely, cannot be expected to reach it with this model; a better-trained model (more epochs or data, "
            "augmentation) or quantization-aware training is the fix, and FP32 stays the recommended artifact meanwhile")


def decide(r: ArtifactResult, t: Thresholds) -> None:
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


def judge_decode_variant(r: ArtifactResult, t: Thresholds) -> bool:
    """A preprocessing variant (e.g. reduced-scale JPEG decoding) of an FP32 artifact, held to the FP32 thresholds.

    Sets ``r.reason`` to the verdict in words; the row stays ``info`` in the table.  Returns whether it passed,
    i.e. whether the runtime may use the variant by default.
    """
    probe = ArtifactResult(name=r.name, format=r.format, precision="fp32", status="", metrics=r.metrics)
    decide(probe, t)
    r.reason = ("meets the FP32 thresholds: the runtime's default decoding" if probe.status == "pass"
                else f"misses the FP32 thresholds ({probe.reason}): the runtime decodes at full size by default")
    return probe.status == "pass"


def passed_providers(r: ArtifactResult) -> tuple[str, ...]:
    """Where a passing result ran: ONNX Runtime's first execution provider, ``"tensorrt"`` for an engine, or the
    backend of a re-scoring row (``"openvino"``)."""
    if r.status != "pass":
        return ()
    if r.backend:
        return (r.backend,)
    if r.format == "tensorrt":
        return ("tensorrt",)
    if r.format == "torchscript":
        return ("torch",)
    providers = list(r.runtime.get("providers") or [])
    return tuple(providers[:1])


def recommend(manifest: BundleManifest, status: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
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
        ok = [n for n in present if status.get(n) == "pass"]  # only what passed: never an unscored or skipped artifact
        if ok:
            rec[backend] = ok[0]
        for n in present:
            if status.get(n) == "fail":
                notes.append(
                    f"{n} failed the gate and is not recommended; {backend} uses {ok[0]} instead"
                    if ok else f"{n} failed the gate; no artifact is recommended for {backend}"
                )
    ranked = {n for prefs in PREFERENCE.values() for n in prefs}
    for a in manifest.artifacts:  # gated, never recommended: the INT8 QDQ an INT8 TensorRT engine is built from
        if a.name not in ranked and a.precision == "int8" and a.format == "onnx" and status.get(a.name) == "fail":
            notes.append(f"{a.name} (INT8 for {a.target or 'TensorRT'}) failed the gate on ONNX Runtime; an INT8 TensorRT "
                         "engine built from it is gated on its own before it is used")
    for backend, name in manifest.recommended.items():  # keep recommendations for backends we do not rank
        if backend not in PREFERENCE and name in by_name and status.get(name) == "pass":
            rec[backend] = name
    return rec, notes
