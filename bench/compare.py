"""fastai vs the exported model, side by side, in one run: ``python -m bench.compare RUN_DIR [BUNDLE]``.

Example::

    python -m bench.compare runs/bench-resnet18 --images /work/shared/data/food10/valid --out docs/

Every inference path runs in its own fresh interpreter (:mod:`kimchi_edge.bench.worker`), one after the other,
on the same image bytes read into memory:

1. ``fastai``: ``load_learner`` + ``learn.predict(bytes)`` (the baseline);
2. ``torch-eager``: ``learn.model`` fed by the runtime's preprocessing + normalisation;
3. ``torchscript``: the bundle's ``model.torchscript.pt``, same feed;
4. ``ort-fp32`` / 5. ``ort-int8``: ``runtime.Classifier`` on ``model.onnx`` / ``model.int8.onnx``;
   ``ort-int8-u8``: the same on an INT8 model re-quantized here with uint8 activations
   (:mod:`kimchi_edge.bench.quant`; what ONNX Runtime's CPU kernels fuse best), in a temporary bundle;
6. TensorRT FP16/INT8: only where TensorRT and a GPU are present (else the reason is reported).

Each reports batch-1 latency from image bytes to label (p50/p90/p99, split into decode, preprocess,
inference and the rest), the same on phone-size photos (made here by upscaling real photos to e.g.
3000x2250, JPEG quality 90, in a temporary folder), throughput at larger batches, cold start
(import + load, first prediction), memory, and every label (top-1 agreement with the baseline).
The same run measures this machine's dense float32 matmul throughput and the FP32 ONNX model's
FLOPs (counted from the graph), and times the variants that were tried (:mod:`kimchi_edge.bench.experiments`).

Writes ``OUT/bench_results.json``, ``OUT/BENCHMARKS.md`` and ``OUT/bench_latency.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
PATHS = ("fastai", "torch-eager", "torchscript", "ort-fp32", "ort-int8", "ort-int8-u8")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
RESULTS_NAME = "bench_results.json"
DOC_NAME = "BENCHMARKS.md"
CHART_NAME = "bench_latency.png"


# --------------------------------------------------------------------------- inputs


def select_images(folder: Path, limit: int) -> list[Path]:
    """``limit`` image files spread evenly over the sorted files of ``folder`` (so every class is in)."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"kimchi_edge.bench.compare: no image files under {folder}")
    if len(files) <= limit:
        return files
    step = len(files) / limit
    return [files[int(i * step)] for i in range(limit)]


def make_phone_photos(sources: Sequence[Path], out: Path, size: tuple[int, int], quality: int = 90) -> list[Path]:
    """Phone-size JPEGs: each source cropped to the target aspect, upscaled (bicubic), saved at ``quality``."""
    from PIL import Image

    from kimchi_edge.runtime.preprocess import decode_image

    out.mkdir(parents=True, exist_ok=True)
    made = []
    tw, th = size
    for i, src in enumerate(sources):
        im = decode_image(src, max_pixels=None)
        w, h = im.size
        if w / h > tw / th:  # too wide: crop width
            cw = int(h * tw / th)
            im = im.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
        else:
            ch = int(w * th / tw)
            im = im.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))
        path = out / f"phone_{i:02d}_{src.stem}.jpg"
        im.resize((tw, th), Image.BICUBIC).save(path, "JPEG", quality=quality)
        made.append(path)
    return made


def machine_description() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx_vnni") if x in have]
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {"cpu": model, "logical_cpus": os.cpu_count(), "cpus_usable": affinity, "cpu_flags": flags,
            "memory_gb": round(mem_gb, 1) if mem_gb else None, "platform": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "fastai", "onnxruntime-gpu", "onnxruntime", "onnx", "numpy", "Pillow", "timm", "torchvision"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def tensorrt_status() -> str | None:
    """``None`` when TensorRT engines could be built and run here, else why not."""
    try:
        from kimchi_edge.convert.tensorrt import tensorrt_unavailable_reason
    except ImportError as exc:  # runtime-only install
        return f"kimchi_edge.convert.tensorrt not importable ({exc})"
    return tensorrt_unavailable_reason()


# --------------------------------------------------------------------------- workers


def run_worker(cfg: dict[str, Any], threads: int, timeout: int, log: Any) -> dict[str, Any]:
    """Run one :mod:`kimchi_edge.bench.worker` measurement in a fresh interpreter and return its JSON."""
    with tempfile.TemporaryDirectory(prefix="kimchi-bench-w-") as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "result.json"
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
               "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
        cfg = {**cfg, "spawned_at": time.time()}
        cfg_path.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "kimchi_edge.bench.worker", str(cfg_path), str(out_path)], cwd=str(REPO), env=env,
                              capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            log(f"  failed ({seconds:.0f} s): {tail}")
            return {"error": tail, "stderr_tail": proc.stderr[-3000:], "seconds": seconds}
        result = json.loads(out_path.read_text(encoding="utf-8"))
        result["seconds"] = seconds
        return result


def slim(results: dict[str, Any]) -> None:
    """Keep the JSON readable: probabilities are summarised by the agreement figures, samples rounded to 1 µs."""
    for r in [*results["paths"].values(), *(results.get("one_thread") or {}).values()]:
        for series in ("batch1", "phone"):
            if series in r:
                r[series].pop("probabilities", None)
                r[series]["stage_samples_ms"] = {k: [round(x, 3) for x in v] for k, v in r[series].get("stage_samples_ms", {}).items()}


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One path's rounds -> one result: samples pooled, cold start and memory per round (median / max), labels of round 1."""
    from .worker import percentiles

    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[0] if rounds else {"error": "not run"}
    out = dict(ok[0])
    out["rounds"] = [{"error": r["error"]} if "error" in r else {
        "p50_ms": r["batch1"]["latency_ms"]["p50"], "infer_p50_ms": r["batch1"]["stages_ms"]["infer"]["p50"],
        "cold_ms": r["cold_start"]["import_ms"] + r["cold_start"]["load_ms"], "rss_ready_mb": r["memory_ready_mb"].get("VmHWM"),
        "other_cpus": r["batch1"]["machine"].get("cores_used_by_other_processes"), "loadavg": r["batch1"]["machine"].get("loadavg_start"),
        "seconds": r.get("seconds")} for r in rounds]
    out["seconds"] = sum(r.get("seconds", 0) for r in rounds)
    if len(ok) < len(rounds):
        out["round_errors"] = [r["error"] for r in rounds if "error" in r]
    if len(ok) == 1:
        return out
    for series in ("batch1", "phone"):
        if series not in out:
            continue
        pooled: dict[str, list[float]] = {}
        for r in ok:
            for k, v in r[series]["stage_samples_ms"].items():
                pooled.setdefault(k, []).extend(v)
        machines = [r[series]["machine"] for r in ok]
        out[series] = {**ok[0][series], "latency_ms": percentiles(pooled["total"]),
                       "stages_ms": {k: percentiles(v) for k, v in pooled.items() if k != "total"},
                       "stage_samples_ms": pooled,
                       "labels_same_every_round": all(r[series]["labels"] == ok[0][series]["labels"] for r in ok),
                       "machine": {**machines[0],
                                   "wall_s": sum(m["wall_s"] for m in machines),
                                   "cores_used_by_this_process": _mean([m.get("cores_used_by_this_process") for m in machines]),
                                   "cores_used_by_other_processes": _mean([m.get("cores_used_by_other_processes") for m in machines]),
                                   "rounds": machines}}
    cold = {}
    for k in ok[0]["cold_start"]:
        vals = sorted(r["cold_start"][k] for r in ok if r["cold_start"].get(k) is not None)
        cold[k] = vals[len(vals) // 2] if len(vals) % 2 else (sum(vals[len(vals) // 2 - 1: len(vals) // 2 + 1]) / 2 if vals else None)
    out["cold_start"] = {**cold, "per_round": [r["cold_start"] for r in ok]}
    for key in ("memory_ready_mb", "memory_after_batch1_mb", "memory_end_mb"):
        out[key] = {m: max(r[key].get(m, 0) for r in ok) for m in ok[0][key]}
    batches = {}
    for b, first in ok[0]["batches"].items():
        ips = [r["batches"][b]["images_per_s"] for r in ok if b in r["batches"]]
        batches[b] = {**first, "images_per_s": sum(ips) / len(ips), "images_per_s_rounds": ips}
    out["batches"] = batches
    return out


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def calibration_images(run_dir: Path, count: int) -> list[str]:
    """``count`` training images of the run, evenly spread over ``split.json``'s train list (sorted by class)."""
    split = run_dir / "split.json"
    if count <= 0 or not split.is_file():
        return []
    s = json.loads(split.read_text(encoding="utf-8"))
    root = Path(s.get("data_root", ""))
    items = s.get("train", [])
    step = max(1, len(items) // count)
    return [str(root / it["file"]) for it in items[::step][:count] if (root / it["file"]).is_file()]


def agreement(series: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Top-1 agreement and probability differences of one series against the baseline's."""
    labels, ref = series["labels"], reference["labels"]
    n = min(len(labels), len(ref))
    same = sum(a == b for a, b in zip(labels[:n], ref[:n]))
    out: dict[str, Any] = {"agree": same, "n": n, "rate": same / n if n else None,
                           "distinct_baseline_labels": len(set(ref[:n]))}
    pa, pb = series.get("probabilities"), reference.get("probabilities")
    if pa and pb:
        diffs = [max(abs(x - y) for x, y in zip(a, b)) for a, b in zip(pa[:n], pb[:n]) if len(a) == len(b)]
        if diffs:
            out["max_abs_dprob"] = max(diffs)
            out["mean_max_abs_dprob"] = sum(diffs) / len(diffs)
    return out


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder of kimchi-edge train (learner.pkl)")
    p.add_argument("bundle", metavar="BUNDLE", nargs="?", help="bundle of kimchi-edge convert (default RUN_DIR/bundle)")
    p.add_argument("--images", metavar="DIR", required=True, help="real images (e.g. food10/valid); read into memory first")
    p.add_argument("--out", metavar="DIR", default="docs", help="where BENCHMARKS.md, bench_latency.png and bench_results.json go (default docs/)")
    p.add_argument("--max-images", type=int, default=60, help="images for the batch-1 series and agreement (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2,
                   help="run every path this many times, alternating the order (ABC, CBA, ...), and pool the samples "
                        "(default %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed predictions before each series (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads / ORT intra-op threads (default %(default)s)")
    p.add_argument("--phone-photos", type=int, default=4, help="phone-size photos made by upscaling (0: none; default %(default)s)")
    p.add_argument("--phone-size", default="3000x2250", help="WIDTHxHEIGHT of the phone photos (default %(default)s)")
    p.add_argument("--phone-passes", type=int, default=2, help="timed passes over the phone photos (default %(default)s)")
    p.add_argument("--batch-sizes", default="8,32", help="throughput batch sizes (default %(default)s)")
    p.add_argument("--batch-images", type=int, default=32, help="images timed per batch size (default %(default)s)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    p.add_argument("--no-experiments", dest="experiments", action="store_false", help="skip the variants that were tried")
    p.add_argument("--no-one-thread-round", dest="one_thread_round", action="store_false",
                   help="skip the extra batch-1 round of every path at 1 thread (steadier ratios on a shared CPU)")
    p.add_argument("--calib", type=int, default=64,
                   help="training images to calibrate the re-quantized INT8 models with (ort-int8-u8; the speed-only "
                        "variants use the first 16) (default %(default)s)")
    p.add_argument("--fastai-progress-bar", action="store_true", help="leave fastai's progress bar on in learn.predict (off by default: it only adds time)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per worker process (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    run_dir = Path(args.run_dir)
    bundle = Path(args.bundle) if args.bundle else run_dir / "bundle"
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad:
        print(f"kimchi_edge.bench.compare: unknown path(s) {bad}; choose from {', '.join(PATHS)}", file=sys.stderr)
        return 2
    if "fastai" in paths or "torch-eager" in paths:
        if not (run_dir / "learner.pkl").is_file():
            print(f"kimchi_edge.bench.compare: {run_dir / 'learner.pkl'} not found (RUN_DIR must be a kimchi-edge train run folder)", file=sys.stderr)
            return 2
    if not (bundle / "manifest.json").is_file():
        print(f"kimchi_edge.bench.compare: {bundle / 'manifest.json'} not found; run kimchi-edge convert {run_dir} first", file=sys.stderr)
        return 2
    try:
        pw, ph = (int(v) for v in args.phone_size.lower().split("x"))
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        print("kimchi_edge.bench.compare: --phone-size is WIDTHxHEIGHT and --batch-sizes comma-separated integers", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from kimchi_edge.runtime.manifest import read_manifest

    manifest = read_manifest(bundle)
    images = select_images(Path(args.images), args.max_images)
    started = datetime.now(timezone.utc)
    t_all = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python -m bench.compare " + " ".join(sys.argv[1:] if argv is None else list(argv)),
        "started": started.isoformat(timespec="seconds"),
        "machine": machine_description(), "versions": versions(), "loadavg_start": loadavg(),
        "run_dir": str(run_dir), "bundle": str(bundle), "architecture": manifest.model.architecture,
        "labels": len(manifest.labels), "input": [manifest.preprocessing.height, manifest.preprocessing.width],
        "preprocessing": {"resize": [manifest.preprocessing.resize_height, manifest.preprocessing.resize_width],
                          "method": manifest.preprocessing.resize_method, "batch_resize": manifest.preprocessing.batch_resize,
                          "dtype": manifest.preprocessing.dtype, "layout": manifest.preprocessing.layout},
        "threads": args.threads, "images": {"folder": str(args.images), "count": len(images),
                                            "mb": sum(f.stat().st_size for f in images) / 2**20},
        "warmup": args.warmup, "rounds": args.rounds, "batch_sizes": batch_sizes, "paths": {}, "gates": manifest.gate,
    }
    log(f"kimchi_edge.bench.compare: {len(images)} images from {args.images}; {args.threads} threads; load average {results['loadavg_start']}")

    # FLOPs from the graph
    try:
        from .flops import macs_from_onnx

        results["flops"] = macs_from_onnx(bundle / manifest.artifact("onnx-fp32").file, batch=1)
        log(f"FP32 ONNX: {results['flops']['flops'] / 1e9:.3f} GFLOP per image (Conv/Gemm/MatMul, from shape inference)")
    except Exception as exc:  # onnx missing or an odd graph: the rest still runs
        results["flops"] = {"error": f"{type(exc).__name__}: {exc}"}

    with tempfile.TemporaryDirectory(prefix="kimchi-bench-phone-") as tmp:
        phone: list[Path] = []
        if args.phone_photos > 0:
            step = max(1, len(images) // args.phone_photos)
            phone = make_phone_photos(images[::step][: args.phone_photos], Path(tmp), (pw, ph))
            results["phone_photos"] = {"count": len(phone), "size": [pw, ph], "quality": 90,
                                       "mb_each": [round(p.stat().st_size / 2**20, 2) for p in phone],
                                       "made_from": [str(images[::step][i]) for i in range(len(phone))]}
        common = {"run_dir": str(run_dir), "bundle": str(bundle), "threads": args.threads}
        calib = calibration_images(run_dir, args.calib)
        u8_bundle, u8_model = None, None
        if "ort-int8-u8" in paths or args.experiments:
            if calib:
                from .quant import U8_ARTIFACT, bundle_with_artifact, requantize

                log(f"re-quantizing the FP32 model with uint8 activations ({len(calib)} calibration images) ...")
                u8_model = Path(tmp) / "model.int8-u8.onnx"
                try:
                    q = requantize(bundle / manifest.artifact("onnx-fp32").file, u8_model, calib, manifest.preprocessing)
                    u8_bundle = bundle_with_artifact(bundle, u8_model, Path(tmp) / "bundle-u8", details=q)
                    results["int8_u8"] = {**q, "artifact": U8_ARTIFACT}
                except Exception as exc:  # quantization is an extra: the paths still run
                    results["int8_u8"] = {"error": f"{type(exc).__name__}: {exc}"}
                    u8_model = None
            else:
                results["int8_u8"] = {"error": f"no training images found through {run_dir / 'split.json'} to calibrate with"}
        log("matmul peak ...")
        peaks = [run_worker({**common, "kind": "peak"}, args.threads, args.timeout, log)]
        batch_iters = {str(b): max(2, args.batch_images // b) for b in batch_sizes}
        per_path: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        for rnd in range(args.rounds):
            order = paths if rnd % 2 == 0 else paths[::-1]  # ABC CBA: drifting load hits every path alike
            for name in order:
                log(f"{name} (round {rnd + 1}/{args.rounds}) ...")
                if name == "ort-int8-u8" and u8_bundle is None:
                    per_path[name].append({"error": f"not built: {results['int8_u8'].get('error')}"})
                    continue
                extra = {"bundle": str(u8_bundle), "artifact": "onnx-int8-u8"} if name == "ort-int8-u8" else {}
                cfg = {**common, **extra, "kind": "path", "path": name, "images": [str(f) for f in images],
                       "phone_images": [str(p) for p in phone], "phone_passes": args.phone_passes, "warmup": args.warmup,
                       "batch_sizes": batch_sizes, "batch_iterations": batch_iters,
                       "fastai_progress_bar": args.fastai_progress_bar}
                r = run_worker(cfg, args.threads, args.timeout, log)
                per_path[name].append(r)
                if "error" not in r:
                    b1 = r["batch1"]
                    log(f"  p50 {b1['latency_ms']['p50']:.1f} ms, infer p50 {b1['stages_ms']['infer']['p50']:.1f} ms, "
                        f"cold {r['cold_start']['import_ms'] + r['cold_start']['load_ms']:.0f} ms, "
                        f"RSS {r['memory_ready_mb'].get('VmHWM', float('nan')):.0f} MB ({r['seconds']:.0f} s)")
        for name in paths:
            results["paths"][name] = merge_rounds(per_path[name])
        if args.one_thread_round and args.threads != 1:
            # OpenMP/ORT threads that spin or wait for a descheduled sibling make multi-threaded timings on a shared CPU
            # depend on the other jobs; at 1 thread a path just gets its share of one CPU, so the ratios are steadier.
            results["one_thread"] = {}
            for name in paths:
                if "error" in results["paths"][name]:
                    continue
                log(f"{name} (1 thread) ...")
                extra = {"bundle": str(u8_bundle), "artifact": "onnx-int8-u8"} if name == "ort-int8-u8" else {}
                r = run_worker({**common, **extra, "threads": 1, "kind": "path", "path": name, "light": True,
                                "images": [str(f) for f in images], "warmup": args.warmup, "batch_sizes": [],
                                "batch_iterations": {}}, 1, args.timeout, log)
                if "error" not in r:
                    log(f"  p50 {r['batch1']['latency_ms']['p50']:.1f} ms, infer p50 {r['batch1']['stages_ms']['infer']['p50']:.1f} ms")
                    r["batch1"].pop("probabilities", None)
                results["one_thread"][name] = r
        if args.experiments:
            log("experiments (variants side by side) ...")
            results["experiments"] = run_worker({**common, "kind": "experiments", "images": [str(f) for f in images[:8]],
                                                 "phone_images": [str(p) for p in phone], "calibration_images": calib,
                                                 "u8_model": str(u8_model) if u8_model else None,
                                                 "batch_sizes": batch_sizes}, args.threads, args.timeout, log)
        log("matmul peak (again) ...")
        peaks.append(run_worker({**common, "kind": "peak"}, args.threads, args.timeout, log))
    results["peak"] = peaks
    results["tensorrt"] = tensorrt_status() or "available"
    results["loadavg_end"] = loadavg()
    results["seconds"] = time.perf_counter() - t_all

    # agreement with the baseline
    base = results["paths"].get("fastai", {})
    for name, r in results["paths"].items():
        if "error" in r or "error" in base or not base:
            continue
        r["agreement"] = agreement(r["batch1"], base["batch1"])
        if "phone" in r and "phone" in base:
            r["phone_agreement"] = agreement(r["phone"], base["phone"])
    results["images"]["files"] = [str(f) for f in images]
    slim(results)

    from .report import write_report

    written = write_report(results, out_dir)
    from kimchi_edge.runtime.fsutil import atomic_write_json

    atomic_write_json(out_dir / RESULTS_NAME, results)
    log(f"wrote {out_dir / RESULTS_NAME}, " + ", ".join(str(w) for w in written) + f" ({results['seconds']:.0f} s)")
    failed = [n for n, r in results["paths"].items() if "error" in r or r.get("round_errors")]
    if failed:
        print(f"kimchi_edge.bench.compare: failed: {', '.join(failed)} (see {out_dir / RESULTS_NAME})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
