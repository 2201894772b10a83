"""Write a bundle out for a serving system.  Target: ``triton``, a Triton Inference Server model repository.

  kimchi-edge export triton runs/food10/bundle triton_repo
  kimchi-edge export triton BUNDLE triton_repo --name food10 --max-batch-size 16
  kimchi-edge export triton BUNDLE triton_repo --classify-with python   # a tritonserver without the onnxruntime backend

The repository holds the gated ONNX (onnxruntime backend), the gated TensorRT engine when the bundle has one
(tensorrt_plan), the bundle's preprocessing as a Python-backend step that imports kimchi_edge.runtime.preprocess, a
postprocessing step (probabilities + label) and the ensemble NAME a client calls with encoded image bytes.  Only
artifacts the accuracy gate passed are exported, unless --allow-ungated.  Serving and a client: docs/TRITON.md.
Needs only the runtime install (no torch, no fastai, no Triton).
"""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    """Declare ``export`` and its targets (``triton``)."""
    from kimchi_edge.runtime.cliutil import add_output_args, positive_int

    from .triton import CLASSIFY_WITH, DEVICES, TritonOptions

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    p = targets.add_parser("triton", help="a Triton Inference Server model repository (ONNX/TensorRT + preprocessing ensemble)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TritonOptions()
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder (with manifest.json and the gate's verdicts)")
    p.add_argument("out", metavar="OUT", help="model repository folder (created when missing; other models in it are kept)")
    p.add_argument("--name", default=defaults.name,
                   help="the pipeline's model name; steps are NAME_preprocess, NAME_onnx ... (default: %(default)s)")
    p.add_argument("--max-batch-size", type=positive_int, default=defaults.max_batch_size, metavar="N",
                   help="max_batch_size of every model (capped by a TensorRT engine's profile; default: %(default)s)")
    p.add_argument("--max-queue-delay-us", type=int, default=defaults.max_queue_delay_us, metavar="US",
                   help="dynamic batching: how long a request may wait for others (default: %(default)s)")
    p.add_argument("--instances", type=positive_int, default=defaults.instances, metavar="N",
                   help="instance_group count of every model (default: %(default)s)")
    p.add_argument("--device", choices=DEVICES, default=defaults.device,
                   help="where the onnxruntime model runs: auto = KIND_AUTO when the gate passed the ONNX on CUDA, "
                        "else KIND_CPU (default: %(default)s)")
    p.add_argument("--classify-with", choices=CLASSIFY_WITH, default=defaults.classify_with,
                   help="the model the pipeline classifies with; python = ONNX Runtime inside the Python backend, "
                        "for a server without the onnxruntime backend (default: %(default)s)")
    p.add_argument("--artifact", default=None, metavar="NAME", help="the ONNX artifact to export (default: the runtime's choice)")
    p.add_argument("--engine", default=None, metavar="NAME", help="the TensorRT engine to export (default: the best gated one)")
    p.add_argument("--python-env", default="", metavar="PATH",
                   help="EXECUTION_ENV_PATH of the Python steps: a conda-pack archive or environment with kimchi-edge "
                        "(default: the Python the server's Python backend runs)")
    p.add_argument("--allow-ungated", action="store_true",
                   help="also export an artifact the accuracy gate did not pass (failed, skipped, never gated)")
    p.add_argument("--force", action="store_true", help="replace model folders of the same names in OUT")
    add_output_args(p, json_help="the export record (models, artifacts, gate verdicts, notes)")
    p.set_defaults(_run_target=_run_triton)


def run(args: argparse.Namespace) -> int:
    return int(args._run_target(args) or 0)


def _run_triton(args: argparse.Namespace) -> int:
    from kimchi_edge.runtime.cliutil import emit, progress_log
    from kimchi_edge.runtime.manifest import read_manifest

    from .triton import (
        EXPORT_RECORD,
        TritonOptions,
        describe,
        export_record,
        export_triton,
    )

    options = TritonOptions(name=args.name, max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                            instances=args.instances, device=args.device, classify_with=args.classify_with,
                            artifact=args.artifact, engine=args.engine, allow_ungated=args.allow_ungated,
                            python_env=args.python_env)
    plan = export_triton(args.bundle, args.out, options, overwrite=args.force)
    if args.json:  # the text report says it already; with --json the warning still reaches a person, on stderr
        log = progress_log(args)
        for line in plan.ungated:
            log(f"UNGATED: {line}; exported only because --allow-ungated was given")
    doc = {"out": str(args.out), **export_record(plan, read_manifest(args.bundle))}
    emit(args, doc, "\n".join(describe(plan, args.out)) + f"\nrecord: {args.out}/{plan.pipeline}/{EXPORT_RECORD}; "
         "serve it and call it: docs/TRITON.md")
    return 0
