"""Options the runtime subcommands share (``--backend``, ``--artifact``, ``--threads`` ...).

The ``kimchi-edge`` command itself (its registry of subcommands) lives in :mod:`kimchi_edge.cli`: the light
runtime package knows nothing about training or conversion.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options every runtime subcommand shares: which backend/artifact/precision, CPU threads."""
    g = parser.add_argument_group("model")
    g.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                   help="auto: a compatible TensorRT engine if the bundle has one, else ONNX Runtime (default: %(default)s)")
    g.add_argument("--artifact", default=None, metavar="NAME", help="force an artifact by name (onnx-fp32, onnx-int8, trt-fp16 ...)")
    g.add_argument("--precision", default=None, choices=["fp32", "fp16", "int8"], help="prefer this precision (default: the bundle's recommendation)")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N", help="ONNX Runtime CPU threads (default: all cores)")


def classifier_from_args(args: argparse.Namespace, **kwargs):
    """``Classifier.from_bundle(args.bundle, ...)`` with the options of :func:`add_model_args`."""
    from .classifier import Classifier

    return Classifier.from_bundle(args.bundle, backend=args.backend, artifact=args.artifact, precision=args.precision,
                                  threads=args.threads, **kwargs)
