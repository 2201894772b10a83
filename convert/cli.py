"""Turn a training run into a model bundle, then run the accuracy gate on it.

  kimchi-edge convert runs/food10                 # -> runs/food10/bundle
  kimchi-edge convert runs/food10 --fp16          # also a TensorRT FP16 engine (when TensorRT + GPU)
  kimchi-edge convert runs/food10 --data /new/place/of/food10

Writes model.onnx (FP32, NHWC RGB 0-255 input, normalisation inside), model.int8.onnx (INT8 QDQ for
ONNX Runtime on CPU, uint8 activations) and model.int8-qdq-s8.onnx (symmetric INT8 QDQ for TensorRT), both
calibrated on training images, model.torchscript.pt, reference.json (the learner's own
predictions), manifest.json, gate.md and gate.json.  Exits non-zero when an FP32 artifact fails the
gate.  learner.pkl is a pickle: convert only learners you trust.
"""

from __future__ import annotations

import argparse


def add_gate_args(parser: argparse.ArgumentParser) -> None:
    """Threshold options shared by ``convert`` and ``verify``."""
    g = parser.add_argument_group("accuracy gate")
    g.add_argument("--min-agreement", type=float, default=99.5, metavar="PCT",
                   help="FP32/FP16 artifacts must agree with the learner's top-1 on at least PCT %% of images (default 99.5)")
    g.add_argument("--max-loss", type=float, default=0.5, metavar="POINTS",
                   help="FP32/FP16 artifacts may lose at most POINTS of top-1 accuracy (default 0.5)")
    g.add_argument("--int8-max-loss", type=float, default=1.0, metavar="POINTS",
                   help="INT8 artifacts losing more are not recommended (default 1.0)")
    g.add_argument("--int8-min-agreement", type=float, default=98.0, metavar="PCT",
                   help="INT8 artifacts must also agree with the learner's top-1 on at least PCT %% of images (default 98)")
    g.add_argument("--fast-decode", action="store_true",
                   help="score with the runtime's reduced-scale JPEG decoding instead of full-size decoding")
    g.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per inference call (default 16)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all cores)")


def thresholds_from_args(args: argparse.Namespace):
    from kimchi_edge.runtime.errors import UsageError

    from .gate import Thresholds

    for flag, value in (("--min-agreement", args.min_agreement), ("--int8-min-agreement", args.int8_min_agreement)):
        if not 0 <= value <= 100:
            raise UsageError(f"{flag} {value}: expected a percentage between 0 and 100")
    if args.max_loss < 0 or args.int8_max_loss < 0:
        raise UsageError("--max-loss and --int8-max-loss are accuracy points and cannot be negative")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: expected at least 1")
    return Thresholds(min_agreement=args.min_agreement / 100.0, max_loss_points=args.max_loss,
                      int8_max_loss_points=args.int8_max_loss, int8_min_agreement=args.int8_min_agreement / 100.0)


def gate_doc(report) -> dict:
    """The gate's verdict as the ``--json`` output of ``convert`` and ``verify`` (the figures, not the prose)."""
    if report is None:
        return {"passed": None, "artifacts": {}}
    arts = {}
    for r in report.results:
        m = r.metrics or {}
        arts[r.name] = {"status": r.status, "reason": r.reason, "precision": r.precision,
                        **{k: m[k] for k in ("top1", "delta", "agreement", "max_abs_dprob") if k in m},
                        "images_per_s": round(r.images_per_s, 1)}
    return {"passed": report.passed, "images": report.reference["n"], "reference_top1": report.reference["top1"],
            "artifacts": arts, "recommended": dict(report.recommended), "notes": list(report.notes)}


def add_args(parser: argparse.ArgumentParser) -> None:
    from kimchi_edge.runtime.cliutil import add_output_args

    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the examples in the description
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by kimchi-edge train (learner.pkl, model_meta.json, split.json)")
    parser.add_argument("--out", metavar="DIR", help="bundle folder (default RUN_DIR/bundle; a previous bundle is replaced when the new one is complete)")
    parser.add_argument("--data", metavar="ROOT", help="where the images of split.json are now, if they moved")
    parser.add_argument("--no-int8", action="store_true", help="do not build the INT8 ONNX models (onnx-int8 for ONNX Runtime on CPU, onnx-int8-vnni for CPUs with VNNI "
                        "where convert runs on one, onnx-int8-qdq-s8 for TensorRT)")
    parser.add_argument("--calib", type=int, default=None, metavar="N",
                        help="INT8 calibration images, drawn from the training split, stratified by class (default min(200, train))")
    parser.add_argument("--calibration", "--calib-method", dest="calib_method", choices=("auto", "minmax", "entropy", "percentile"),
                        default="auto", help="INT8 calibration method; auto (default): each one calibrated on the calibration images "
                        "minus a held-back quarter (>= 16) and the one agreeing best with FP32 on those kept")
    parser.add_argument("--no-torchscript", action="store_true", help="do not write the TorchScript model")
    parser.add_argument("--no-ort", action="store_true", help="do not write the ONNX Runtime mobile-format model (model.ort)")
    parser.add_argument("--fp16", action="store_true", help="build a TensorRT FP16 engine (needs TensorRT and a GPU; skipped with one line otherwise)")
    parser.add_argument("--int8", action="store_true", help="build a TensorRT INT8 engine from the TensorRT INT8 QDQ model, onnx-int8-qdq-s8 (needs TensorRT and a GPU)")
    parser.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache (default: beside the bundle)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17, default 18)")
    parser.add_argument("--exporter", choices=("auto", "dynamo", "legacy"), default="auto",
                        help="ONNX exporter: auto = torch.export-based (dynamo), legacy only if that fails (default)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import this module or .py file before loading the learner (functions its pickle needs); repeatable")
    parser.add_argument("--no-gate", action="store_true", help="skip the accuracy gate (run kimchi-edge verify later)")
    v = parser.add_argument_group("verification set (travels with the bundle; verify and build-engine gate on it on the target)")
    v.add_argument("--verification-images", type=int, default=200, metavar="N",
                   help="validation images copied into the bundle, stratified by class (default 200)")
    v.add_argument("--verification-mb", type=float, default=25.0, metavar="MB", help="size limit of those copies (default 25)")
    v.add_argument("--no-verification-set", action="store_true", help="leave the verification set out of the bundle")
    add_gate_args(parser)
    add_output_args(parser, json_help="the bundle, the gate's verdict per artifact and the recommendation")


def run(args: argparse.Namespace) -> int:
    from kimchi_edge.runtime.cliutil import emit, progress_log

    from .bundle import bundle_from_run

    thresholds = thresholds_from_args(args)
    engines = tuple(p for p, on in (("fp16", args.fp16), ("int8", args.int8)) if on)
    result = bundle_from_run(
        args.run_dir,
        args.out,
        data_root=args.data,
        int8=not args.no_int8,
        calib=args.calib,
        calib_method=args.calib_method,
        torchscript=not args.no_torchscript,
        ort=not args.no_ort,
        engines=engines,
        timing_cache=args.timing_cache,
        opset=args.opset,
        exporter=args.exporter,
        imports=args.imports,
        gate=not args.no_gate,
        thresholds=thresholds,
        batch_size=args.batch_size,
        threads=args.threads,
        fast_decode=args.fast_decode,
        verification_images=0 if args.no_verification_set else args.verification_images,
        verification_mb=args.verification_mb,
        quiet=args.quiet or args.json,  # fastai's own bars write to stdout: nothing but the JSON goes there
        log=progress_log(args),
    )
    rec = ", ".join(f"{b}: {n}" for b, n in result.manifest.recommended.items())
    verdict = "gate passed" if result.gate and result.gate.passed else ("gate not run" if result.gate is None else "gate failed")
    doc = {"bundle": str(result.path), "gate": gate_doc(result.gate), "recommended": dict(result.manifest.recommended),
           "artifacts": [a.name for a in result.manifest.artifacts], "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
           "notes": result.notes}
    emit(args, doc, f"bundle: {result.path} ({verdict}; {result.seconds.get('total', 0):.0f} s; recommended {rec})")
    return 0
