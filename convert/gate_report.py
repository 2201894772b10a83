"""The gate's report: ``gate.json``, ``gate.md``, the printed table and the manifest's :class:`GateSummary`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from kimchi_edge.runtime.fsutil import atomic_write_json, atomic_write_text
from kimchi_edge.runtime.manifest import (
    GATE_JSON,
    GATE_MD,
    ArtifactGate,
    BundleManifest,
    GateSummary,
    GateVerdict,
    to_dict,
    write_manifest,
)

from .gate_policy import ArtifactResult, Thresholds, passed_providers

__all__ = ["GateReport", "format_markdown", "format_table", "write_report"]


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
    fast_decode_passed: bool = False

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


def write_report(bundle: Path, manifest: BundleManifest, report: GateReport, status: Mapping[str, str]) -> None:
    """``gate.json``, ``gate.md`` and the manifest's gate summary / recommendations, each atomically."""
    atomic_write_json(bundle / GATE_JSON, _finite(report.to_dict()))
    atomic_write_text(bundle / GATE_MD, format_markdown(report))
    arts = []
    by_name = {r.name: r for r in report.results}
    for a in manifest.artifacts:
        r = by_name.get(a.name)
        if r is not None and r.status != "skipped":
            gate = ArtifactGate(status=r.status, top1=r.metrics["top1"], delta_points=r.metrics["delta"] * 100,
                                agreement=r.metrics["agreement"], images_per_s=round(r.images_per_s, 1))
            a = dataclasses.replace(a, details={**dict(a.details), "gate": to_dict(gate)})
        arts.append(a)
    summary = GateSummary(
        passed=report.passed,
        created=report.created,
        report=GATE_MD,
        images=report.reference["n"],
        reference_top1=report.reference["top1"],
        thresholds=dataclasses.asdict(report.thresholds),
        artifacts={n: _verdict(manifest, n, s, by_name.get(n), [r for r in report.results if r.artifact == n and r.backend])
                   for n, s in status.items()},
        notes=tuple(report.notes),
        fast_decode=report.fast_decode_passed,
    )
    write_manifest(bundle, manifest.replace(artifacts=tuple(arts), recommended=report.recommended, gate=summary))


def _verdict(manifest: BundleManifest, name: str, status: str, r: ArtifactResult | None,
             rescored: Sequence[ArtifactResult] = ()) -> GateVerdict:
    """This run's verdict; where it passed again, the providers it passed on before are kept (other machines').

    ``rescored``: the rows scoring this artifact on another backend (``"onnx-int8 @ openvino"``).  They leave the status
    alone; the artifact's providers gain that backend where its row passed (and the artifact did) and lose it where
    its row failed here.  A row skipped here (backend not installed) keeps what an earlier run recorded.
    """
    earlier = manifest.gate.verdict(name) if manifest.gate else None
    if r is None or r.status == "skipped":  # not re-scored here: the last verdict stands
        return earlier if earlier is not None else GateVerdict(status, r.reason if r else "")
    providers = passed_providers(r)
    if providers and earlier is not None and earlier.passed:
        providers = tuple(dict.fromkeys(earlier.providers + providers))
    timed = {p: r.infer_ms_per_image for p in passed_providers(r)}
    for row in rescored:
        if row.status == "pass" and providers:
            providers = tuple(dict.fromkeys(providers + passed_providers(row)))
            timed.update({p: row.infer_ms_per_image for p in passed_providers(row)})
        elif row.status == "fail":
            providers = tuple(p for p in providers if p != row.backend)
    fastest = min(timed, key=timed.get) if len(timed) > 1 else ""
    return GateVerdict(r.status, r.reason, providers, fastest)


def _finite(obj: Any) -> Any:
    """JSON has no NaN: classes without validation images get ``null``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


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
            {"pass": "PASS", "info": "info"}.get(r.status, f"FAIL (not run on {r.backend})" if r.backend
                                                 else "FAIL (not recommended)" if r.precision == "int8" else "FAIL"),
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


def _quantization_section(report: GateReport) -> list[str]:
    """How each INT8 artifact was made: target, recipe, calibration candidates on the held-back training images,
    the layers kept in float and what that costs in speed."""
    rows = [r for r in report.results if r.quantization and not r.backend]
    if not rows:
        return []
    out = ["", "## INT8: target, calibration, layers kept in float", "",
           "Calibration method, with or without bias correction (each layer's bias absorbs the mean output shift its rounded "
           "weights cause), chosen by top-1 agreement with FP32 on training images held back from calibration "
           "(never the validation images above).", "",
           "| artifact | target | activations / weights | calibration | held-back agreement per method | kept in float | held-back ms/img without → with |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r.quantization
        cands = q.get("calibration_candidates") or {}
        def _score(c: Mapping[str, Any]) -> str:
            return f"{c['agreement'] * 100:.1f}%" + (f" (mean\|Δp\| {c['mean_abs_dprob']:.4f})" if "mean_abs_dprob" in c else "")

        scores = ", ".join(f"{m} {_score(c)}" + (f", with bias correction {_score(c['bias_correction'])}" if c.get("bias_correction") else "")
                           for m, c in cands.items() if c) or "not scored (too few calibration images to hold any back)"
        fb = q.get("fallback") or {}
        nodes = q.get("float_nodes") or []
        ms = fb.get("holdout_ms_per_image") or {}
        kept = (f"{len(nodes)}: " + ", ".join(f"`{n}`" for n in nodes)) if nodes else "none needed" if not fb.get("needed") else "none helped"
        if fb.get("needed"):
            kept += (f" (held-back agreement {fb.get('agreement_without', 0) * 100:.1f}% → {fb.get('agreement', 0) * 100:.1f}%"
                     + ("" if fb.get("reached") else f", still below {q.get('holdout_min_agreement', 0) * 100:g}%") + ")")
        cost = f"{ms['without']:.2f} → {ms['with']:.2f}" if ms else "-"
        out.append(f"| {r.name} | {q.get('target') or '-'} | {q.get('activations', '-')} / {q.get('weights', '-')} | "
                   f"{q.get('calibration_method', '-')}{' with bias correction' if q.get('bias_correction') else ''} "
                   f"({q.get('calibration_mode', '-')}; {q.get('calibration_images', '?')} images, "
                   f"{q.get('holdout_images', 0)} held back) | {scores} | {kept} | {cost} |")
    for r in rows:
        j = r.quantization.get("fp32_input_jitter") or {}
        if "agreement" in j:
            out.append("")
            out.append(f"The FP32 model against its own answers with each input pixel moved by one grey level "
                       f"(-1/0/+1; {j.get('images', '?')} training images, {j.get('draws', 1)} draws): {j['agreement'] * 100:.1f}% agreement, "
                       f"mean\|Δp\| {j['mean_abs_dprob']:.4f}; "
                       "the model's own sensitivity, which INT8's coarser rounding cannot be expected to beat.")
            break  # the same figure for every INT8 artifact of the bundle
    return out


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
        f"INT8 agrees ≥ {t.int8_min_agreement * 100:g}% and loses ≤ {t.int8_max_loss_points:g} points (else not recommended).",
        "Intervals (95%): Wilson for accuracy and agreement; for Δ, Wilson intervals of the images only one side",
        "gets right, combined by MOVER (paired: images both get right or both get wrong cancel).",
    ]
    backends = sorted({r.backend for r in report.results if r.backend})
    if backends:
        out += [(f"Rows `NAME @ {b}`: the same file run by {b}, same thresholds; they decide only whether the runtime may run "
                 f"NAME on {b} (the artifact's own verdict stays ONNX Runtime's).") for b in backends]
    out += [
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
    out += _quantization_section(report)
    out += ["", "## Recommended artifact per backend", ""]
    out += [f"- {b}: `{n}`" for b, n in report.recommended.items()] or ["- none"]
    if report.notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    rt = [f"- {r.name}: {r.runtime}" for r in scored if r.runtime]
    if rt:
        out += ["", "## Where it ran", ""] + rt
    return "\n".join(out) + "\n"
