"""What a bundle holds, at a glance: model, preprocessing, artifacts, gate verdicts, verification set.

  kimchi-edge info runs/food10/bundle
  kimchi-edge info runs/food10/bundle --json | jq .gate

Reads only JSON (``manifest.json``, ``reference.json``): loads no model, needs no ONNX Runtime, so it
works on any machine the bundle is copied to.  Artifact files are hashed only with ``--check``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_args(parser: argparse.ArgumentParser) -> None:
    """Declare the ``info`` options."""
    from .cliutil import add_output_args

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle folder (with manifest.json)")
    parser.add_argument("--check", action="store_true", help="also check every artifact's SHA-256 against the manifest")
    add_output_args(parser, json_help="the manifest, the gate's verdicts and the verification set")


def bundle_info(bundle: str | Path, *, check: bool = False) -> dict[str, Any]:
    """The facts ``kimchi-edge info`` shows, as a JSON-able dict."""
    from .errors import BundleError
    from .manifest import REFERENCE_NAME, ReferenceFile, artifact_gate, read_manifest, read_typed, to_dict, verify_artifact

    bundle = Path(bundle)
    m = read_manifest(bundle)
    arts = []
    for a in m.artifacts:
        entry: dict[str, Any] = {"name": a.name, "file": a.file, "format": a.format, "precision": a.precision,
                                 "input": a.input, "size_bytes": a.size_bytes, "sha256": a.sha256}
        g = artifact_gate(a)
        verdict = m.gate.verdict(a.name) if m.gate else None
        entry["gate"] = {**(to_dict(g) if g else {}), **({"status": verdict.status, "reason": verdict.reason} if verdict else {})} or None
        if check:
            try:
                verify_artifact(bundle, a)
                entry["file_ok"] = True
            except BundleError as exc:
                entry["file_ok"], entry["file_error"] = False, str(exc)
        arts.append(entry)
    verification: dict[str, Any] | None = None
    if (bundle / REFERENCE_NAME).is_file():
        ref: ReferenceFile = read_typed(ReferenceFile, bundle / REFERENCE_NAME)
        per_class = {lab: 0 for lab in ref.labels}
        for it in ref.items:
            per_class[it.label] = per_class.get(it.label, 0) + 1
        right = sum(it.prediction == it.label for it in ref.items)
        verification = {"file": REFERENCE_NAME, "images": len(ref.items), "data_root": ref.data_root,
                        "reference_top1": right / len(ref.items) if ref.items else None, "per_class": per_class,
                        "source": dict(ref.source), "bundled": None}
        from .manifest import VERIFICATION_NAME, VerificationSet

        if (bundle / VERIFICATION_NAME).is_file():
            vs: VerificationSet = read_typed(VerificationSet, bundle / VERIFICATION_NAME)
            verification["bundled"] = {"file": VERIFICATION_NAME, "images": len(vs.images),
                                       "bytes": sum(v.size_bytes for v in vs.images)}
    pre = m.preprocessing
    return {
        "bundle": str(bundle),
        "model": {"architecture": m.model.architecture, "pretrained": m.model.pretrained, "labels": list(m.labels),
                  "framework": dict(m.model.framework)},
        "input": {"name": m.input_name, "shape": [pre.height, pre.width], "layout": pre.layout, "dtype": pre.dtype},
        "preprocessing": to_dict(pre),
        "artifacts": arts,
        "recommended": dict(m.recommended),
        "gate": to_dict(m.gate) if m.gate else None,
        "gate_in_words": m.gate.in_words() if m.gate else ["the accuracy gate has not run on this bundle (kimchi-edge verify BUNDLE)"],
        "verification": verification,
        "created": m.created,
        "format_version": m.format_version,
    }


def format_info(info: dict[str, Any]) -> str:
    """The human view of :func:`bundle_info`."""
    from .predict_cli import format_table

    mdl, inp, pre = info["model"], info["input"], info["preprocessing"]
    labels = mdl["labels"]
    lines = [
        f"bundle   {info['bundle']}  (created {info['created'] or '?'})",
        f"model    {mdl['architecture']}, {len(labels)} classes: " + ", ".join(labels[:12]) + (" …" if len(labels) > 12 else ""),
        f"input    {inp['name']} {inp['layout']} {inp['dtype']} {inp['shape'][0]}×{inp['shape'][1]} RGB 0-255; "
        f"resize {pre['resize_method']} to {pre['resize_height']}×{pre['resize_width']}"
        + (f", then batch crop {pre['batch_crop']:g} + resample" if pre["batch_resize"] else "")
        + f"; mean {tuple(round(v, 4) for v in pre['mean'])} std {tuple(round(v, 4) for v in pre['std'])} (inside the model)",
        "",
    ]
    rows = []
    for a in info["artifacts"]:
        g = a.get("gate") or {}
        figures = (f"top-1 {g['top1'] * 100:.1f}%, Δ {g['delta_points']:+.2f} pts, agree {g['agreement'] * 100:.2f}%"
                   if "top1" in g else "")
        status = {"pass": "PASS", "fail": "FAIL", "skipped": "not scored"}.get(g.get("status", ""), "never gated")
        ok = "" if "file_ok" not in a else (" file ok" if a["file_ok"] else " FILE MODIFIED/MISSING")
        rows.append([a["name"], a["precision"], a["file"], f"{a['size_bytes'] / 1e6:.1f} MB", status + ok, figures])
    lines.append(format_table(rows, ["artifact", "prec", "file", "size", "gate", "figures"], "<<<><<"))
    lines.append("")
    lines += info["gate_in_words"]
    rec = ", ".join(f"{b} → {n}" for b, n in info["recommended"].items()) or "none"
    lines.append(f"recommended: {rec}")
    v = info["verification"]
    if v:
        top1 = f"{v['reference_top1']:.1%}" if v["reference_top1"] is not None else "?"
        smallest = min(v["per_class"].items(), key=lambda kv: kv[1]) if v["per_class"] else ("-", 0)
        lines.append(f"validation split: {v['images']} images under {v['data_root']} "
                     f"(fastai learner {top1} right; smallest class {smallest[0]}: {smallest[1]} images)")
        b = v.get("bundled")
        lines.append(f"verification set in the bundle: {b['images']} of them ({b['bytes'] / 1e6:.1f} MB; kimchi-edge verify "
                     "BUNDLE uses it)" if b else "verification set in the bundle: none (kimchi-edge verify needs --images)")
    else:
        lines.append("verification set: none (no reference.json; re-run kimchi-edge convert)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the bundle's facts; exit 1 with ``--check`` when an artifact file is missing or modified."""
    from .cliutil import emit

    info = bundle_info(args.bundle, check=args.check)
    emit(args, info, format_info(info))
    return 1 if args.check and not all(a.get("file_ok", True) for a in info["artifacts"]) else 0
