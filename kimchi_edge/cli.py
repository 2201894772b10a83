"""The ``kimchi-edge`` command: one parser, subcommands loaded lazily from their own modules.

Each subcommand module exposes ``add_args(parser)`` and ``run(args) -> int`` and imports nothing heavy
at module level, so ``kimchi-edge --help`` and the runtime subcommands work on a machine that has only
the runtime installed.  A subcommand whose module cannot be imported is listed with the reason.

The registry lives here, at the top of the package, so that :mod:`kimchi_edge.runtime` never refers to the
training or conversion stages.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from .runtime.errors import KimchiEdgeError

#: name -> (module, one-line help).  Modules under kimchi_edge.runtime need only the base install.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("kimchi_edge.train.quickstart_cli", "train -> convert -> gate on the built-in sample, then how to open the demo"),
    "train": ("kimchi_edge.train.cli", "train a fastai image classifier on a folder-per-class dataset"),
    "convert": ("kimchi_edge.convert.cli", "learner -> model bundle (TorchScript, ONNX, INT8, TensorRT) + accuracy gate"),
    "verify": ("kimchi_edge.convert.verify_cli", "run the accuracy gate on a bundle (no fastai/torch needed)"),
    "info": ("kimchi_edge.runtime.info_cli", "what a bundle holds: model, artifacts, gate verdicts, verification set"),
    "predict": ("kimchi_edge.runtime.predict_cli", "classify images with a bundle"),
    "serve": ("kimchi_edge.runtime.serve_cli", "HTTP server for a bundle (POST /predict)"),
    "bench": ("kimchi_edge.runtime.bench_cli", "benchmark a bundle (latency percentiles, per-stage split); --compare RUN_DIR: fastai vs the bundle -> BENCHMARKS.md"),
    "build-engine": ("kimchi_edge.convert.build_engine_cli", "build a TensorRT engine for this GPU from a bundle's ONNX"),
    "demo": ("kimchi_edge.mobile_demo.cli", "Streamlit camera demo (phone snapshot, live webcam, upload)"),
    "sample": ("kimchi_edge.train.sample_cli", "write the built-in sample dataset (folder per class) to a folder"),
    "export": ("kimchi_edge.convert.triton_cli", "write a bundle out for a serving system: triton (Triton Inference Server model repository)"),
}


def _load(module: str):
    try:
        return importlib.import_module(module), None
    except ModuleNotFoundError as exc:
        return None, exc


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="kimchi-edge",
        description="Take a fastai image classifier to the edge and prove it still classifies like the original.",
    )
    parser.add_argument("--version", action="version", version=f"kimchi-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod, err = _load(module)
        if mod is None:
            p = sub.add_parser(name, help=f"{help_text} [unavailable: {err}]", add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(_missing=(name, module, err))
            continue
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
        mod.add_args(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kimchi-edge`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        name, module, err = args._missing
        print(f"kimchi-edge {name}: not available in this install ({err}).", file=sys.stderr)
        return 2
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KimchiEdgeError as exc:
        print(f"kimchi-edge {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"kimchi-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `kimchi-edge predict ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
