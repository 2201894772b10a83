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
    g.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "openvino"],
                   help="auto: a compatible TensorRT engine if the bundle has one; else OpenVINO where it is installed (x86-64) "
                        "and the gate passed the artifact on it; else ONNX Runtime (default: %(default)s)")
    g.add_argument("--artifact", default=None, metavar="NAME", help="force an artifact by name (onnx-fp32, onnx-int8, trt-fp16 ...)")
    g.add_argument("--precision", default=None, choices=["fp32", "fp16", "int8"], help="prefer this precision (default: the bundle's recommendation)")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N", help="ONNX Runtime / OpenVINO CPU threads (default: all cores)")
    g.add_argument("--allow-ungated", action="store_true",
                   help="also run an artifact or execution provider the accuracy gate did not pass (failed, skipped, "
                        "never gated); by default only what passed runs")


def classifier_from_args(args: argparse.Namespace, **kwargs):
    """``Classifier.from_bundle(args.bundle, ...)`` with the options of :func:`add_model_args`."""
    from .classifier import Classifier

    return Classifier.from_bundle(args.bundle, backend=args.backend, artifact=args.artifact, precision=args.precision,
                                  threads=args.threads, allow_ungated=getattr(args, "allow_ungated", False), **kwargs)


# --------------------------------------------------------------------------- output: the same on every command


def add_output_args(parser: argparse.ArgumentParser, *, json_help: str = "the result") -> None:
    """``--quiet`` and ``--json``, worded and behaving the same on every subcommand.

    ``--quiet``: nothing on stdout or stderr but errors (the exit status carries the verdict).
    ``--json``: one UTF-8 JSON object on stdout (``json_help``); progress and notes go to stderr.
    """
    g = parser.add_argument_group("output")
    g.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors; the exit status tells the verdict")
    g.add_argument("--json", action="store_true",
                   help=f"print {json_help} as one UTF-8 JSON object on stdout; progress goes to stderr")


def progress_log(args: argparse.Namespace):
    """Where a command's progress and info lines go: nowhere with ``--quiet``, stderr with ``--json``, else stdout."""
    import sys

    if getattr(args, "quiet", False):
        return lambda msg: None
    if getattr(args, "json", False):
        return lambda msg: print(msg, file=sys.stderr, flush=True)
    return lambda msg: print(msg, flush=True)


def write_stdout(text: str) -> None:
    """Write UTF-8 text to stdout whatever the locale says (Korean labels must survive ``> file``)."""
    import sys

    buf = getattr(sys.stdout, "buffer", None)
    if buf is None:  # e.g. replaced by a StringIO in tests
        sys.stdout.write(text)
        return
    sys.stdout.flush()
    buf.write(text.encode("utf-8"))
    buf.flush()


def emit(args: argparse.Namespace, doc: dict, text: str = "") -> None:
    """A command's result: ``doc`` as JSON with ``--json``, ``text`` otherwise, nothing with ``--quiet``."""
    import json

    if getattr(args, "json", False):
        write_stdout(json.dumps(doc, ensure_ascii=False, indent=2, default=str) + "\n")
    elif text and not getattr(args, "quiet", False):
        write_stdout(text.rstrip("\n") + "\n")
