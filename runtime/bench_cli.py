"""Benchmark a bundle from image bytes to label: latency percentiles, throughput, per-stage split, cold start.

Example::

    kimchi-edge bench runs/food10/bundle --images ../shared/data/food10/valid/kimchi --batch-sizes 1,8,32
    kimchi-edge bench runs/food10/bundle --json bench.json

Each batch size is warmed up, then timed ``--iterations`` times: p50/p90/p99 latency per batch,
images per second, and the mean time per image spent decoding, preprocessing and in inference.  The
images are real files when ``--images`` is given (read into memory first: disk speed is not measured),
else one generated photo-like 1280x960 JPEG.  Cold start (import + bundle load + first prediction) and
peak memory are measured in a fresh Python process, as a user's first call would see them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

#: Run in a fresh interpreter: import, load and first prediction, then memory.  Prints one JSON line.
COLD_START = r"""
import json, sys, time
t0 = time.perf_counter()
import kimchi_edge.runtime as runtime
t1 = time.perf_counter()
bundle, backend, artifact, precision, threads, image = sys.argv[1:7]
clf = runtime.Classifier.from_bundle(bundle, backend=backend, artifact=artifact or None,
                                     precision=precision or None, threads=int(threads) if threads else None)
t2 = time.perf_counter()
pred = clf.predict(image)
t3 = time.perf_counter()
mem = {}
try:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                mem[line.split(":")[0]] = int(line.split()[1]) / 1024
except OSError:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mem["VmHWM"] = peak / (1024 * 1024 if sys.platform == "darwin" else 1024)
heavy = sorted(m for m in ("torch", "fastai", "tensorrt") if m in sys.modules)
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3, "first_predict_ms": (t3 - t2) * 1e3,
                  "total_ms": (t3 - t0) * 1e3, "rss_mb": mem.get("VmRSS"), "peak_rss_mb": mem.get("VmHWM"),
                  "label": pred.label, "heavy_modules": heavy}, ensure_ascii=False))
"""


def batch_sizes(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]`` (argparse type)."""
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,8,32, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,8,32, got {text!r}")
    return sizes


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def add_args(parser: argparse.ArgumentParser) -> None:
    """Declare the ``bench`` options."""
    from .cliutil import add_model_args, positive_int

    parser.add_argument("bundle", metavar="BUNDLE", help="bundle folder (with manifest.json)")
    parser.add_argument("--images", metavar="DIR", default=None, help="folder of real images (default: one generated photo-like JPEG)")
    parser.add_argument("--max-images", type=positive_int, default=64, help="use at most this many files from --images (default: %(default)s)")
    parser.add_argument("--warmup", type=_non_negative, default=3, help="untimed runs per batch size (default: %(default)s)")
    parser.add_argument("--iterations", type=positive_int, default=20, help="timed runs per batch size (default: %(default)s)")
    parser.add_argument("--batch-sizes", type=batch_sizes, default=[1, 8, 32], help="comma-separated (default: 1,8,32)")
    parser.add_argument("--no-cold-start", dest="cold_start", action="store_false", help="skip the fresh-process cold-start measurement")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the results as UTF-8 JSON to OUT")
    add_model_args(parser)


def photo_like_jpeg(width: int = 1280, height: int = 960, seed: int = 0, quality: int = 90) -> bytes:
    """A deterministic JPEG that decodes like a photo: smooth colour regions, shapes, edges and sensor noise.

    A flat or random-noise image would make JPEG decoding unrealistically cheap or expensive.
    """
    import io

    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(40, 220, (6, 8, 3), dtype=np.uint8), "RGB")
    im = coarse.resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(24):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 20, width // 4)), int(rng.integers(height // 20, height // 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(2))
    arr = np.asarray(im, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min/max of ``values``."""
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}


def load_images(folder: str | None, limit: int, clf: Any) -> tuple[list[bytes], str]:
    """Image bytes to benchmark with and a description; unreadable files are skipped with a warning."""
    from pathlib import Path

    from .errors import InvalidInputError, UsageError
    from .predict_cli import IMAGE_SUFFIXES

    if folder is None:
        data = photo_like_jpeg()
        return [data], f"1 generated photo-like 1280x960 JPEG ({len(data) / 1024:.0f} KB)"
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"--images {folder}: not a folder")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    images, skipped = [], 0
    for f in files:
        data = f.read_bytes()
        try:
            clf.prepare(data)
        except InvalidInputError as exc:
            skipped += 1
            print(f"kimchi-edge bench: skipping {f}: {exc}", file=sys.stderr)
            continue
        images.append(data)
    if not images:
        raise UsageError(f"--images {folder}: no readable image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    mb = sum(len(d) for d in images) / 1e6
    return images, f"{len(images)} files from {folder} ({mb:.1f} MB{f', {skipped} unreadable skipped' if skipped else ''})"


def cold_start(args: argparse.Namespace, image_path: str) -> dict[str, Any]:
    """Run :data:`COLD_START` in a fresh interpreter and return its measurements."""
    import json
    import os
    import subprocess
    from pathlib import Path

    from .errors import KimchiEdgeError

    src_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src_root, os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-c", COLD_START, str(args.bundle), args.backend, args.artifact or "", args.precision or "",
           str(args.threads or ""), image_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise KimchiEdgeError(f"the cold-start process failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_batch(clf: Any, images: list[bytes], batch: int, warmup: int, iterations: int) -> dict[str, Any]:
    """Time ``predict_batch`` on ``batch`` images (cycling through ``images``)."""
    import time

    items = [images[i % len(images)] for i in range(batch)]
    for _ in range(warmup):
        clf.predict_batch(items, top_k=1, batch_size=batch)
    latencies, stages = [], {"decode": 0.0, "preprocess": 0.0, "infer": 0.0}
    for _ in range(iterations):
        t0 = time.perf_counter()
        preds = clf.predict_batch(items, top_k=1, batch_size=batch)
        latencies.append((time.perf_counter() - t0) * 1e3)
        for k in stages:
            stages[k] += preds[0].timings_ms[k]  # already per image
    lat = percentiles(latencies)
    return {
        "batch_size": batch,
        "latency_ms": lat,
        "ms_per_image": lat["p50"] / batch,
        "images_per_s": batch * iterations / (sum(latencies) / 1e3),
        "stage_ms_per_image": {k: v / iterations for k, v in stages.items()},
    }


def run(args: argparse.Namespace) -> int:
    """Measure and print (and with ``--json`` save) the benchmark."""
    import os
    import platform
    import tempfile

    from .cliutil import classifier_from_args
    from .fsutil import atomic_write_json

    with classifier_from_args(args) as clf:
        info = clf.info
        images, described = load_images(args.images, args.max_images, clf)
        providers = ",".join(info.get("providers", [])) or "-"
        threads = info.get("threads")
        print(f"kimchi-edge bench: {args.bundle}: {info['backend']} ({providers}), artifact {info['artifact']} "
              f"({info['precision']}){f', {threads} threads' if threads else ''}")
        print(f"images: {described}")
        for note in info["notes"]:
            print(f"note: {note}")
        cold = None
        if args.cold_start:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "image")
                with open(path, "wb") as f:
                    f.write(images[0])
                cold = cold_start(args, path)
            print(f"cold start (fresh process): import {cold['import_ms']:.0f} ms, load {cold['load_ms']:.0f} ms, "
                  f"first predict {cold['first_predict_ms']:.0f} ms, total {cold['total_ms']:.0f} ms; "
                  f"peak RSS {cold['peak_rss_mb'] or float('nan'):.0f} MB")
        results = [bench_batch(clf, images, b, args.warmup, args.iterations) for b in args.batch_sizes]

    from .predict_cli import format_table

    rows = [[str(r["batch_size"]), *(f"{r['latency_ms'][p]:.2f}" for p in ("p50", "p90", "p99")), f"{r['ms_per_image']:.2f}",
             f"{r['images_per_s']:.1f}", *(f"{r['stage_ms_per_image'][k]:.2f}" for k in ("decode", "preprocess", "infer"))]
            for r in results]
    header = ["batch", "p50 ms", "p90 ms", "p99 ms", "ms/img", "img/s", "decode", "preprocess", "infer"]
    print()
    print(format_table(rows, header, ">" * len(header)))
    print(f"(latency per batch over {args.iterations} runs after {args.warmup} warm-up; decode/preprocess/infer: mean ms per image)")
    if args.json:
        atomic_write_json(args.json, {
            "bundle": str(args.bundle),
            "backend": {k: v for k, v in info.items() if k not in ("labels", "bundle")},
            "images": described,
            "warmup": args.warmup,
            "iterations": args.iterations,
            "cold_start": cold,
            "results": results,
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                        "processor": platform.processor() or platform.machine()},
        })
        print(f"wrote {args.json}")
    return 0
