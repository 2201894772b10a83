"""Benchmark a bundle from image bytes to label, or compare it with fastai side by side (--compare).

Examples:

    kimchi-edge bench runs/food10/bundle --images ../shared/data/food10/valid/kimchi --batch-sizes 1,8,32
    kimchi-edge bench runs/food10/bundle --json > bench.json
    kimchi-edge bench --compare runs/food10 --images ../shared/data/food10/valid --out docs/

kimchi-edge bench BUNDLE (needs only the runtime): each batch size is warmed up, then timed --iterations
times: p50/p90/p99 latency per batch, images per second, and the mean time per image spent decoding,
preprocessing and in inference.  The images are real files when --images is given (read into memory
first: disk speed is not measured), else one generated photo-like 1280x960 JPEG.  Cold start (import +
bundle load + first prediction) and peak memory are measured in a fresh Python process, as a user's
first call would see them.

kimchi-edge bench --compare RUN_DIR [BUNDLE] (needs pip install 'kimchi-edge[convert]'): fastai's
learn.predict against torch eager, TorchScript and ONNX Runtime FP32/INT8 on the same real images,
every path in its own fresh process, each run --rounds times; writes BENCHMARKS.md, bench_latency.png
and bench_results.json into --out (default: the current folder).  This is how docs/BENCHMARKS.md is made.

--json prints the result as one UTF-8 JSON object on stdout (progress lines then go to stderr);
--quiet prints nothing but errors.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

#: Run in a fresh interpreter: import, load and first prediction, then memory.  Prints one JSON line.
COLD_START = r"""
import json, sys, time
t0 = time.perf_counter()
import kimchi_edge.runtime as runtime
t1 = time.perf_counter()
bundle, backend, artifact, precision, threads, image, allow_ungated = sys.argv[1:8]
clf = runtime.Classifier.from_bundle(bundle, backend=backend, artifact=artifact or None,
                                     precision=precision or None, threads=int(threads) if threads else None,
                                     allow_ungated=allow_ungated == "1")
t2 = time.perf_counter()
pred = clf.predict(image)
t3 = time.perf_counter()
from kimchi_edge.runtime.sysinfo import memory_mb
mem = memory_mb()
heavy = sorted(m for m in ("torch", "fastai", "tensorrt") if m in sys.modules)
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3, "first_predict_ms": (t3 - t2) * 1e3,
                  "total_ms": (t3 - t0) * 1e3, "rss_mb": mem.get("VmRSS"), "peak_rss_mb": mem.get("VmHWM"),
                  "label": pred.label, "heavy_modules": heavy}, ensure_ascii=False))
"""

#: ``kimchi-edge bench BUNDLE`` defaults of the options ``--compare`` also has (its own are in ``CompareOptions``).
BUNDLE_DEFAULTS = {"max_images": 64, "warmup": 3, "iterations": 20, "batch_sizes": [1, 8, 32]}
#: dest -> option, for the options of one mode only (``None`` when not given).
BUNDLE_ONLY = {"iterations": "--iterations", "cold_start": "--no-cold-start", "artifact": "--artifact", "precision": "--precision"}
COMPARE_ONLY = {
    "out": "--out", "rounds": "--rounds", "phone_photos": "--phone-photos", "phone_size": "--phone-size",
    "phone_passes": "--phone-passes", "batch_images": "--batch-images", "paths": "--paths", "experiments": "--no-experiments",
    "one_thread_round": "--no-one-thread-round", "calib": "--calib", "fastai_progress_bar": "--fastai-progress-bar",
    "timeout": "--timeout",
}


def batch_sizes(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]`` (argparse type)."""
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,8,32, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,8,32, got {text!r}")
    return sizes


def image_size(text: str) -> tuple[int, int]:
    """``"3000x2250"`` -> ``(3000, 2250)`` (argparse type)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 3000x2250, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 3000x2250, got {text!r}")
    return w, h


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def add_args(parser: argparse.ArgumentParser) -> None:
    """Declare the ``bench`` options (``--compare`` ones in their own group)."""
    from pathlib import Path

    from kimchi_edge.bench import EXTRA
    from kimchi_edge.bench.compare import PATHS, CompareOptions

    from .cliutil import add_model_args, add_output_args, positive_int

    c = CompareOptions(run_dir=Path(), images=Path())  # the --compare defaults, for the help
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the examples in the description
    parser.add_argument("bundle", metavar="BUNDLE", nargs="?", default=None,
                        help="bundle folder (with manifest.json); with --compare: default RUN_DIR/bundle")
    parser.add_argument("--images", metavar="DIR", default=None,
                        help="folder of real images (default: one generated photo-like JPEG; --compare: required)")
    parser.add_argument("--max-images", type=positive_int, default=None, metavar="N",
                        help=f"use at most this many files from --images (default: {BUNDLE_DEFAULTS['max_images']}; "
                             f"--compare: {c.max_images}, spread over the sorted files)")
    parser.add_argument("--warmup", type=_non_negative, default=None, metavar="N",
                        help=f"untimed runs per batch size (default: {BUNDLE_DEFAULTS['warmup']}; --compare: per series, {c.warmup})")
    parser.add_argument("--iterations", type=positive_int, default=None, metavar="N",
                        help=f"timed runs per batch size (default: {BUNDLE_DEFAULTS['iterations']})")
    parser.add_argument("--batch-sizes", type=batch_sizes, default=None, metavar="B,B",
                        help=f"comma-separated (default: {','.join(map(str, BUNDLE_DEFAULTS['batch_sizes']))}; "
                             f"--compare: throughput sizes, {','.join(map(str, c.batch_sizes))})")
    parser.add_argument("--no-cold-start", dest="cold_start", action="store_const", const=False, default=None,
                        help="skip the fresh-process cold-start measurement")
    add_model_args(parser)
    add_output_args(parser, json_help="the measurements (with --compare: bench_results.json)")

    g = parser.add_argument_group(
        f"fastai vs the exported model (--compare; needs pip install 'kimchi-edge[{EXTRA}]')",
        f"--threads defaults to {c.threads} with --compare (the threads of the reference points);\n"
        "--backend, --artifact, --precision, --iterations and --no-cold-start do not apply.")
    g.add_argument("--compare", metavar="RUN_DIR", default=None,
                   help="run folder of kimchi-edge train (learner.pkl): time learn.predict, torch eager, TorchScript and "
                        "ONNX Runtime FP32/INT8 side by side and write BENCHMARKS.md, bench_latency.png, bench_results.json")
    g.add_argument("--out", type=Path, metavar="DIR", default=None, help="where the three files go (default: the current folder)")
    g.add_argument("--rounds", type=positive_int, default=None, metavar="N",
                   help=f"run every path N times, alternating the order (ABC, CBA, ...), samples pooled (default: {c.rounds})")
    g.add_argument("--phone-photos", type=_non_negative, default=None, metavar="N",
                   help=f"phone-size photos made by upscaling (0: none; default: {c.phone_photos})")
    g.add_argument("--phone-size", type=image_size, default=None, metavar="WxH",
                   help=f"size of the phone photos (default: {c.phone_size[0]}x{c.phone_size[1]})")
    g.add_argument("--phone-passes", type=positive_int, default=None, metavar="N",
                   help=f"timed passes over the phone photos (default: {c.phone_passes})")
    g.add_argument("--batch-images", type=positive_int, default=None, metavar="N",
                   help=f"images timed per batch size (default: {c.batch_images})")
    g.add_argument("--paths", type=_names, default=None, metavar="P,P", help=f"comma-separated subset of {','.join(PATHS)} (default: all)")
    g.add_argument("--no-experiments", dest="experiments", action="store_const", const=False, default=None,
                   help="skip the variants that were tried")
    g.add_argument("--no-one-thread-round", dest="one_thread_round", action="store_const", const=False, default=None,
                   help="skip the extra batch-1 round of every path at 1 thread (steadier ratios on a shared CPU)")
    g.add_argument("--calib", type=_non_negative, default=None, metavar="N",
                   help=f"training images to calibrate the re-quantized INT8 model (ort-int8-u8) with (default: {c.calib})")
    g.add_argument("--fastai-progress-bar", action="store_const", const=True, default=None,
                   help="leave fastai's progress bar on in learn.predict (off by default: it only adds time)")
    g.add_argument("--timeout", type=positive_int, default=None, metavar="S", help=f"seconds per worker process (default: {c.timeout})")


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


def load_images(folder: str | None, limit: int, clf: Any) -> tuple[list[bytes], str]:
    """Image bytes to benchmark with and a description; unreadable files are skipped with a message on stderr."""
    from pathlib import Path

    from .errors import InvalidInputError, UsageError
    from .sysinfo import IMAGE_SUFFIXES

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
    """Run :data:`COLD_START` in a fresh interpreter (in the image's folder) and return its measurements."""
    import json
    import os
    import subprocess
    from pathlib import Path

    from .errors import KimchiEdgeError

    cmd = [sys.executable, "-c", COLD_START, str(Path(args.bundle).resolve()), args.backend, args.artifact or "",
           args.precision or "", str(args.threads or ""), os.path.abspath(image_path),
           "1" if getattr(args, "allow_ungated", False) else "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(image_path)), timeout=600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise KimchiEdgeError(f"the cold-start process failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_batch(clf: Any, images: list[bytes], batch: int, warmup: int, iterations: int) -> dict[str, Any]:
    """Time ``predict_batch`` on ``batch`` images (cycling through ``images``)."""
    import time

    from .sysinfo import percentiles

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


# --------------------------------------------------------------------------- running


def run(args: argparse.Namespace) -> int:
    """``kimchi-edge bench BUNDLE`` or ``kimchi-edge bench --compare RUN_DIR``; see the module docstring."""
    from .cliutil import progress_log

    say = progress_log(args)  # stdout; stderr with --json (stdout carries the JSON); nowhere with --quiet
    if args.compare is not None:
        return run_compare(args, say)
    return run_bundle(args, say)


def _reject(args: argparse.Namespace, options: dict[str, str], where: str) -> None:
    """A usage error naming the ``options`` (dest -> flag) that were given although they apply only ``where``."""
    from .errors import UsageError

    given = [flag for dest, flag in options.items() if getattr(args, dest, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only {where}")


def run_bundle(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """Measure one bundle: cold start, then every batch size; print a table (or the JSON)."""
    import os
    import platform
    import tempfile

    from .cliutil import classifier_from_args, emit
    from .errors import UsageError
    from .predict_cli import format_table

    _reject(args, COMPARE_ONLY, "with --compare RUN_DIR")
    if args.bundle is None:
        raise UsageError("give the BUNDLE folder to benchmark (or --compare RUN_DIR to compare it with fastai)")
    opt = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in BUNDLE_DEFAULTS.items()}
    with classifier_from_args(args) as clf:
        info = clf.info
        images, described = load_images(args.images, opt["max_images"], clf)
        providers = ",".join(info.get("providers", [])) or "-"
        threads = info.get("threads")
        say(f"kimchi-edge bench: {args.bundle}: {info['backend']} ({providers}), artifact {info['artifact']} "
            f"({info['precision']}){f', {threads} threads' if threads else ''}")
        say(f"images: {described}")
        for note in info["notes"]:
            say(f"note: {note}")
        cold = None
        if args.cold_start is not False:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "image")
                with open(path, "wb") as f:
                    f.write(images[0])
                cold = cold_start(args, path)
            say(f"cold start (fresh process): import {cold['import_ms']:.0f} ms, load {cold['load_ms']:.0f} ms, "
                f"first predict {cold['first_predict_ms']:.0f} ms, total {cold['total_ms']:.0f} ms; "
                f"peak RSS {cold['peak_rss_mb'] or float('nan'):.0f} MB")
        results = [bench_batch(clf, images, b, opt["warmup"], opt["iterations"]) for b in opt["batch_sizes"]]

    doc = {
        "bundle": str(args.bundle),
        "backend": {k: v for k, v in info.items() if k not in ("labels", "bundle")},
        "images": described,
        "warmup": opt["warmup"],
        "iterations": opt["iterations"],
        "cold_start": cold,
        "results": results,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
    }
    rows = [[str(r["batch_size"]), *(f"{r['latency_ms'][p]:.2f}" for p in ("p50", "p90", "p99")), f"{r['ms_per_image']:.2f}",
             f"{r['images_per_s']:.1f}", *(f"{r['stage_ms_per_image'][k]:.2f}" for k in ("decode", "preprocess", "infer"))]
            for r in results]
    header = ["batch", "p50 ms", "p90 ms", "p99 ms", "ms/img", "img/s", "decode", "preprocess", "infer"]
    emit(args, doc, "\n" + format_table(rows, header, ">" * len(header)) + f"\n(latency per batch over {opt['iterations']} runs after "
         f"{opt['warmup']} warm-up; decode/preprocess/infer: mean ms per image)")
    return 0


def compare_options(args: argparse.Namespace) -> Any:
    """The :class:`~kimchi_edge.bench.compare.CompareOptions` of ``--compare`` and the options given with it."""
    import dataclasses
    from pathlib import Path

    from kimchi_edge.bench.compare import CompareOptions

    from .errors import UsageError

    _reject(args, BUNDLE_ONLY, "to kimchi-edge bench BUNDLE, not with --compare")
    if args.backend != "auto":
        raise UsageError("--backend does not apply with --compare (every path names its own)")
    if args.images is None:
        raise UsageError("--compare needs --images DIR: real photos (e.g. food10/valid), the same for every path")
    given = {}
    for f in dataclasses.fields(CompareOptions):
        value = getattr(args, f.name, None)
        if f.name in ("run_dir", "images", "bundle") or value is None:
            continue
        given[f.name] = tuple(value) if isinstance(value, list) else value
    return CompareOptions(run_dir=Path(args.compare), images=Path(args.images),
                          bundle=Path(args.bundle) if args.bundle else None, **given)


def run_compare(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """fastai vs the exported model (:func:`kimchi_edge.bench.compare.compare`); 1 when any path failed."""
    from kimchi_edge.bench.compare import compare

    from .cliutil import emit

    done = compare(compare_options(args), log=say)
    emit(args, done.results)  # the files and the progress lines are the human-readable result
    for name, why in done.failed.items():
        print(f"kimchi-edge bench: {name} failed: {why}", file=sys.stderr)
    if done.failed:
        print(f"kimchi-edge bench: {len(done.failed)} path(s) failed; details in {done.written[-1]}", file=sys.stderr)
    return 1 if done.failed else 0

