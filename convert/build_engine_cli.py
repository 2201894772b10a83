"""Build a TensorRT engine for *this* GPU from a bundle's ONNX and record it in the bundle's manifest.

Example (on the Jetson or GPU machine that will run it)::

    kimchi-edge build-engine runs/food10/bundle --fp16
    kimchi-edge build-engine runs/food10/bundle --int8     # from the bundle's TensorRT INT8 QDQ ONNX (onnx-int8-qdq-s8)

The build is ``kimchi_edge.convert.tensorrt.add_engines`` (Polygraphy; no torch needed).  Its manifest entry records
the TensorRT version, GPU, compute capability and the SHA-256 of the ONNX it came from, so the runtime
refuses a stale engine before deserialising it and says how to rebuild.  An engine that is already
compatible with this machine is kept unless ``--force``.  Then it is loaded and run once here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    """Declare the ``build-engine`` options."""
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle folder (with manifest.json)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="FP16 engine from onnx-fp32 (the default)")
    g.add_argument("--int8", dest="precision", action="store_const", const="int8", help="INT8 engine from the TensorRT INT8 QDQ ONNX (onnx-int8-qdq-s8, symmetric int8)")
    parser.set_defaults(precision="fp16")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch the engine accepts (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a compatible engine of this precision exists")
    parser.add_argument("--images", metavar="DATA_ROOT", default=None,
                        help="gate the engine on the full validation split under DATA_ROOT (default: the bundle's verification set)")
    parser.add_argument("--no-gate", action="store_true", help="build only; the engine is not used by default until verify passes it")
    from kimchi_edge.runtime.cliutil import add_output_args

    add_output_args(parser, json_help="the engine's manifest entry and the smoke-test result")


def _builder():
    """``kimchi_edge.convert.tensorrt`` after checking that engines can be built here (one line saying why not)."""
    from kimchi_edge.runtime.errors import MissingDependencyError

    try:
        from . import tensorrt as builder
    except ImportError as exc:
        raise MissingDependencyError(f"the engine builder convert.tensorrt is not importable ({exc}); "
                                     "reinstall kimchi-edge with: pip install 'kimchi-edge[tensorrt]'") from None
    reason = builder.tensorrt_unavailable_reason()
    if reason:
        raise MissingDependencyError(f"building an engine needs TensorRT and a CUDA GPU: {reason}; build on the device that will run it")
    return builder


def run(args: argparse.Namespace) -> int:
    """Build (or keep) the engine, then load it once with the TensorRT backend to prove it runs here."""
    import time


    from kimchi_edge.runtime.backends.tensorrt_backend import TensorRTBackend, engine_mismatches, installed_facts
    from kimchi_edge.runtime.errors import UsageError
    from kimchi_edge.runtime.cliutil import emit, progress_log
    from kimchi_edge.runtime.manifest import read_manifest, to_dict

    if args.max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {args.max_batch}")
    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)  # a bad bundle is reported before anything else
    builder = _builder()
    facts = installed_facts()
    name = f"trt-{args.precision}"
    existing = next((a for a in manifest.artifacts if a.name == name), None)
    if existing is not None and not args.force and not engine_mismatches(existing, manifest, facts) and (bundle / existing.file).is_file():
        art, took = existing, None
    else:
        t0 = time.perf_counter()
        manifest = builder.add_engines(bundle, (args.precision,), batch=(1, 1, args.max_batch),
                                       log=lambda msg: None if args.quiet else print(msg, file=sys.stderr))
        took = time.perf_counter() - t0
        art = manifest.artifact(name)
    built_with = ", ".join(f"{k} {v}" for k, v in art.built_with.items())
    say = progress_log(args)
    if took is None:
        say(f"{art.name} ({art.file}) is already built for this machine ({built_with}); use --force to rebuild")
    else:
        say(f"built {art.name}: {art.file} ({art.size_bytes / 1e6:.1f} MB; {built_with}) in {took:.0f} s")
    pre = manifest.preprocessing
    smoke = pre.example_batch(1)  # the bundle's own shape and dtype (float32 whenever training's batch resample ran)
    shape = smoke.shape
    with TensorRTBackend(bundle, manifest, art, installed=facts) as backend:
        logits = backend.infer(smoke)
    say(f"loaded and ran it here (input {tuple(shape)} {pre.dtype} -> logits {tuple(logits.shape)})")
    verdict = None if args.no_gate else _gate_engine(bundle, art, args, say)
    doc = {"bundle": str(bundle), "artifact": to_dict(art), "built": took is not None,
           "seconds": None if took is None else round(took, 1),
           "smoke_test": {"input": [list(shape), pre.dtype], "logits_shape": list(logits.shape)},
           "gate": verdict, "recommended": dict(read_manifest(bundle).recommended)}
    if verdict is None:
        text = (f"not gated yet: auto does not use {art.name} until it passes; score it with: "
                f"kimchi-edge verify {bundle} --artifact {art.name}")
    elif verdict["status"] == "pass":
        text = f"{art.name} passed the accuracy gate here and is recommended for tensorrt"
    else:
        fallback = doc["recommended"].get("tensorrt")
        text = (f"{art.name} FAILED the accuracy gate here ({verdict['reason']}); "
                + (f"tensorrt uses {fallback} instead" if fallback else "auto uses ONNX Runtime instead")
                + (f" (try: kimchi-edge build-engine {bundle} --fp16)" if art.precision == "int8" and not fallback else ""))
    emit(args, doc, text)
    return 1 if verdict is not None and verdict["status"] == "fail" and art.precision != "int8" else 0


def _gate_engine(bundle: Path, art, args: argparse.Namespace, say) -> dict | None:
    """Score the engine through the runtime on the verification set (or ``--images``); record and recommend it only if it passes."""
    from .gate import run_gate

    if args.images is None and not (bundle / "verification.json").is_file():
        say("the bundle has no verification set (converted with --no-verification-set); pass --images DATA_ROOT to gate the engine")
        return None
    report = run_gate(bundle, data_root=args.images, artifacts=[art.name], quiet=args.quiet or args.json,
                      raise_on_failure=False, check_fast_decode=False, log=say, data_option="--images")
    r = report.result(art.name)
    return {"status": r.status, "reason": r.reason, "images": report.reference["n"],
            **{k: r.metrics[k] for k in ("top1", "delta", "agreement") if k in r.metrics}}
