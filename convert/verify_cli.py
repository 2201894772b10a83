"""Run the accuracy gate on a bundle: every artifact against the learner's reference predictions.

  kimchi-edge verify runs/food10/bundle                    # on the bundle's own verification set (any machine)
  kimchi-edge verify BUNDLE --images /media/sd/food10      # the full validation split, wherever it is now
  kimchi-edge verify BUNDLE --artifact onnx-int8 --artifact trt-fp16

Needs only the runtime (no fastai, no torch): runs on the target device.  TorchScript is scored only
where torch is installed.  Writes gate.md, gate.json and the gate summary in manifest.json; exits
non-zero when an FP32/FP16 artifact fails.
"""

from __future__ import annotations

import argparse

from kimchi_edge.runtime.cliutil import add_output_args

from .cli import add_gate_args, thresholds_from_args


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the examples in the description
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle folder (with manifest.json and reference.json)")
    parser.add_argument("--images", "--data", dest="images", metavar="DATA_ROOT",
                        help="score the full validation split, found under DATA_ROOT (default: the bundle's own "
                             "verification set, or the folder recorded at convert time when it has none)")
    parser.add_argument("--artifact", action="append", default=None, metavar="NAME",
                        help="score only this artifact (repeatable; default: all)")
    parser.add_argument("--no-write", action="store_true", help="print the table only; leave gate.md/gate.json/manifest.json alone")
    add_gate_args(parser)
    add_output_args(parser, json_help="the gate's verdict and figures per artifact")


def run(args: argparse.Namespace) -> int:
    from kimchi_edge.runtime.cliutil import emit, progress_log
    from kimchi_edge.runtime.errors import GateFailed

    from .cli import gate_doc
    from .gate import run_gate

    report = run_gate(
        args.bundle,
        data_root=args.images,
        artifacts=args.artifact,
        thresholds=thresholds_from_args(args),
        batch_size=args.batch_size,
        threads=args.threads,
        fast_decode=args.fast_decode,
        quiet=args.quiet,
        write=not args.no_write,
        data_option="--images",
        raise_on_failure=False,  # the verdict is printed (or emitted as JSON) first, then the failure
        log=progress_log(args),
    )
    scored = sum(1 for r in report.results if r.status in ("pass", "fail"))
    emit(args, {"bundle": report.bundle, "gate": gate_doc(report)},
         f"gate {'passed' if report.passed else 'failed'}: {scored} artifact(s) scored on {report.reference['n']} images"
         + ("" if args.no_write else f"; report: {report.bundle}/gate.md"))
    if not report.passed:
        failed = [f"{r.name} {r.reason}" for r in report.results if r.status == "fail" and r.precision != "int8"]
        raise GateFailed(f"accuracy gate failed: {'; '.join(failed) or report.notes[0]}"
                         + ("" if args.no_write else f" (see {report.bundle}/gate.md)"))
    return 0
