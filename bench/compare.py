"""fastai vs the exported model, side by side, in one run: ``kimchi-edge bench --compare RUN_DIR [BUNDLE]``.

Example::

    kimchi-edge bench --compare runs/bench-resnet18 --images /work/shared/data/food10/valid --out docs/

(``python -m kimchi_edge.bench.compare RUN_DIR [BUNDLE] ...`` is the same command.)  It needs the extra
:data:`kimchi_edge.bench.EXTRA`, ``pip install 'kimchi-edge[convert]'`` (fastai and torch for the baseline paths and the matmul peak, onnx for the
FLOPs and the re-quantized experiment variants, matplotlib for the chart), and nothing else: it runs from the installed
package, in any working folder, without a repository checkout.

Every inference path runs in its own fresh interpreter (``python -m kimchi_edge.bench.worker``, in an empty
temporary folder), one after the other, on the same image bytes read into memory:

1. ``fastai``: ``load_learner`` + ``learn.predict(bytes)`` (the baseline);
2. ``torch-eager``: ``learn.model`` fed by the runtime's preprocessing + normalisation;
3. ``torchscript``: the bundle's ``model.torchscript.pt``, same feed;
4. ``ort-fp32`` / 5. ``ort-int8``: ``kimchi_edge.runtime.Classifier`` on ``model.onnx`` / ``model.int8.onnx`` (the
   bundle's INT8 for ONNX Runtime on CPU); ``ort-int8-qdq-s8``: the same on the bundle's ``model.int8-qdq-s8.onnx``
   (the symmetric INT8 QDQ made for TensorRT), to show what that recipe does on ONNX Runtime's CPU kernels;
6. TensorRT FP16/INT8: only where TensorRT and a GPU are present (else the reason is reported).

Each reports batch-1 latency from image bytes to label (p50/p90/p99, split into decode, preprocess,
inference and the rest), the same on phone-size photos (made here by upscaling real photos to e.g.
3000x2250, JPEG quality 90, in a temporary folder), throughput at larger batches, cold start
(import + load, first prediction), memory, and every label (top-1 agreement with the baseline).
The same run measures this machine's dense float32 matmul throughput and the FP32 ONNX model's
FLOPs (counted from the graph), and times the variants that were tried (:mod:`kimchi_edge.bench.experiments`).

Writes ``OUT/bench_results.json``, ``OUT/BENCHMARKS.md`` and ``OUT/bench_latency.png`` (``--out``; default: the
current folder).  :func:`compare` is the whole run; the command line lives in :mod:`kimchi_edge.runtime.bench_cli`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from kimchi_edge.runtime.errors import MissingDependencyError, UsageError
from kimchi_edge.runtime.sysinfo import IMAGE_SUFFIXES, loadavg, percentiles

from . import EXTRA
from .report import COMMAND, RESULTS_NAME
from .worker import PATHS  # the paths the worker can run (one list for both)

Log = Callable[[str], None]


def _silent(_line: str) -> None:
    pass


@dataclass(frozen=True)
class CompareOptions:
    """Everything one comparison run needs; the defaults are those of ``kimchi-edge bench --compare``.

    Attributes:
        run_dir: run folder of ``kimchi-edge train`` (``learner.pkl``, ``split.json``).
        images: folder of real images; ``max_images`` of them, spread evenly over its sorted files.
        bundle: bundle of ``kimchi-edge convert`` (``None``: ``run_dir/bundle``).
        out: where ``BENCHMARKS.md``, ``bench_latency.png`` and ``bench_results.json`` go.
        rounds: every path runs this many times in alternating order (ABC, CBA, ...), samples pooled.
        warmup: untimed predictions before each series.
        threads: ``torch.set_num_threads`` / ONNX Runtime intra-op threads.
        phone_photos: phone-size photos made by upscaling (0: none), ``phone_size`` (width, height),
            each timed ``phone_passes`` times.
        batch_sizes: throughput batch sizes, ``batch_images`` images timed per size.
        paths: the inference paths to run, a subset of :data:`PATHS`.
        experiments: also time the variants that were tried.
        one_thread_round: one more batch-1 round of every path at 1 thread.
        calib: training images to calibrate the re-quantized INT8 experiment variants with (speed only; the paths run the bundle's own INT8).
        fastai_progress_bar: leave fastai's progress bar on in ``learn.predict``.
        timeout: seconds per worker process.
    """

    run_dir: Path
    images: Path
    bundle: Path | None = None
    out: Path = Path(".")
    max_images: int = 60
    rounds: int = 2
    warmup: int = 5
    threads: int = 2
    phone_photos: int = 4
    phone_size: tuple[int, int] = (3000, 2250)
    phone_passes: int = 2
    batch_sizes: tuple[int, ...] = (8, 32)
    batch_images: int = 32
    paths: tuple[str, ...] = PATHS
    experiments: bool = True
    one_thread_round: bool = True
    calib: int = 64
    fastai_progress_bar: bool = False
    timeout: int = 1200

    @property
    def bundle_dir(self) -> Path:
        return self.bundle if self.bundle is not None else self.run_dir / "bundle"


@dataclass
class Comparison:
    """What :func:`compare` produced: the results (as written to ``bench_results.json``), the files, the failures."""

    results: dict[str, Any]
    written: list[Path] = field(default_factory=list)
    #: path name -> why it failed (one line), for every path with an error in any round
    failed: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- before measuring anything


def check_inputs(opts: CompareOptions) -> Any:
    """Paths, folders and files the run needs; returns the bundle's manifest.

    Raises:
        UsageError: an unknown path name, a missing learner, bundle or image folder, a bad size.
    """
    from kimchi_edge.runtime.manifest import read_manifest

    bad = [p for p in opts.paths if p not in PATHS]
    if bad or not opts.paths:
        raise UsageError(f"--paths: unknown path(s) {bad}; choose from {', '.join(PATHS)}" if bad else
                         f"--paths: no path given; choose from {', '.join(PATHS)}")
    if {"fastai", "torch-eager"} & set(opts.paths) and not (opts.run_dir / "learner.pkl").is_file():
        raise UsageError(f"{opts.run_dir / 'learner.pkl'} not found (RUN_DIR must be a kimchi-edge train run folder)")
    if not (opts.bundle_dir / "manifest.json").is_file():
        raise UsageError(f"{opts.bundle_dir / 'manifest.json'} not found; run kimchi-edge convert {opts.run_dir} first")
    if not opts.images.is_dir():
        raise UsageError(f"--images {opts.images}: not a folder")
    if min(opts.phone_size) < 1 or not opts.batch_sizes or min(opts.batch_sizes) < 1:
        raise UsageError("--phone-size is WIDTHxHEIGHT and --batch-sizes comma-separated integers, all positive")
    return read_manifest(opts.bundle_dir)


def missing_modules(paths: Sequence[str]) -> list[str]:
    """The top-level modules a run over ``paths`` needs that are not installed here."""
    needed = ["torch", "onnx", "matplotlib"]  # matmul peak and TorchScript; FLOPs and re-quantizing; the chart
    if {"fastai", "torch-eager"} & set(paths):
        needed.insert(0, "fastai")
    missing = []
    for name in needed:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def require_bench_extra(paths: Sequence[str]) -> None:
    """Raise one line naming the extra when a module the run needs is missing (before minutes of measuring).

    Raises:
        MissingDependencyError: e.g. "kimchi-edge bench --compare needs fastai and matplotlib, which are not installed
            here; install them with: pip install 'kimchi-edge[convert]'".
    """
    missing = missing_modules(paths)
    if missing:
        names = " and ".join(missing) if len(missing) < 3 else ", ".join(missing[:-1]) + " and " + missing[-1]
        raise MissingDependencyError(f"{COMMAND} needs {names}, which {'is' if len(missing) == 1 else 'are'} not installed here; "
                                     f"install {'it' if len(missing) == 1 else 'them'} with: pip install 'kimchi-edge[{EXTRA}]'")


def command_line(opts: CompareOptions) -> str:
    """The command that repeats this run (options that differ from the defaults only)."""
    defaults = {f.name: f.default for f in dataclasses.fields(CompareOptions) if f.default is not dataclasses.MISSING}
    parts = [COMMAND, str(opts.run_dir)] + ([str(opts.bundle)] if opts.bundle is not None else []) + ["--images", str(opts.images)]
    if opts.out != defaults["out"]:
        parts += ["--out", str(opts.out)]
    flags = {"experiments": "--no-experiments", "one_thread_round": "--no-one-thread-round", "fastai_progress_bar": "--fastai-progress-bar"}
    for f in dataclasses.fields(CompareOptions):
        value = getattr(opts, f.name)
        if f.name in ("run_dir", "images", "bundle", "out") or value == defaults[f.name]:
            continue
        if f.name in flags:
            parts.append(flags[f.name])
        elif f.name == "phone_size":
            parts += ["--phone-size", f"{value[0]}x{value[1]}"]
        elif isinstance(value, tuple):
            parts += [f"--{f.name.replace('_', '-')}", ",".join(str(v) for v in value)]
        else:
            parts += [f"--{f.name.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(p) if p != COMMAND else p for p in parts)


# --------------------------------------------------------------------------- inputs


def select_images(folder: Path, limit: int) -> list[Path]:
    """``limit`` image files spread evenly over the sorted files of ``folder`` (so every class is in).

    Raises:
        UsageError: no image file under ``folder``.
    """
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"--images {folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
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
        im = decode_image(src)
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


def tensorrt_status() -> str | None:
    """``None`` when TensorRT engines could be built and run here, else why not."""
    try:
        from kimchi_edge.convert.tensorrt import tensorrt_unavailable_reason
    except ImportError as exc:  # runtime-only install
        return f"kimchi_edge.convert.tensorrt not importable ({exc})"
    return tensorrt_unavailable_reason()


# --------------------------------------------------------------------------- workers


def run_worker(cfg: dict[str, Any], threads: int, timeout: int, log: Log) -> dict[str, Any]:
    """Run one :mod:`kimchi_edge.bench.worker` measurement in a fresh interpreter and return its JSON.

    The worker runs as ``sys.executable -m kimchi_edge.bench.worker`` in an empty temporary folder with the
    caller's environment (plus thread counts): it imports the installed package, never a checkout's folders,
    so every path in ``cfg`` must be absolute.
    """
    with tempfile.TemporaryDirectory(prefix="kimchi-bench-w-") as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "result.json"
        env = {**os.environ,
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
               "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
        cfg = {**cfg, "spawned_at": time.time()}
        cfg_path.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "kimchi_edge.bench.worker", str(cfg_path), str(out_path)], cwd=tmp, env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"  timed out after {timeout} s")
            return {"error": f"timed out after {timeout} s (--timeout)", "seconds": time.perf_counter() - t0}
        seconds = time.perf_counter() - t0
        code = proc.returncode
        died = (f"killed by signal {-code}" if code < 0 else f"exit status {code}") if code else "no result file"
        if code != 0 and out_path.is_file():  # it measured and wrote everything, then died tearing down (kept, and said)
            result = json.loads(out_path.read_text(encoding="utf-8"))
            result["seconds"] = seconds
            result["exit_error"] = f"the process died after writing its results ({died})"
            log(f"  {result['exit_error']}")
            return result
        if code != 0 or not out_path.is_file():
            tail = (proc.stderr.strip().splitlines() or [f"no output ({died})"])[-1]
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
    """``count`` training images of the run (absolute paths), evenly spread over ``split.json``'s train list."""
    from kimchi_edge.runtime.manifest import SPLIT_NAME, Split, read_typed

    path = run_dir / SPLIT_NAME
    if count <= 0 or not path.is_file():
        return []
    split = read_typed(Split, path)
    root = Path(split.data_root)  # absolute, as kimchi-edge train records it
    step = max(1, len(split.train) // count)
    files = [(root / it.file).resolve() for it in split.train[::step][:count]]
    return [str(f) for f in files if f.is_file()]


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




# --------------------------------------------------------------------------- the run


def compare(opts: CompareOptions, *, log: Log = _silent) -> Comparison:
    """Measure every path of ``opts`` side by side and write the report files into ``opts.out``.

    Args:
        opts: what to run (see :class:`CompareOptions`).
        log: called with one progress line at a time.

    Returns:
        The results, the files written and the paths that failed.

    Raises:
        UsageError: bad options or inputs, found before anything is measured.
        MissingDependencyError: a module of the bench extra is missing, found before anything is measured.
    """
    manifest = check_inputs(opts)
    require_bench_extra(opts.paths)
    run_dir, bundle = opts.run_dir.resolve(), opts.bundle_dir.resolve()  # workers run in an empty folder of their own
    images = select_images(opts.images.resolve(), opts.max_images)
    t_all = time.perf_counter()
    results = describe_run(opts, manifest, images)
    log(f"{COMMAND}: {len(images)} images from {opts.images}; {opts.threads} threads; load average {results['loadavg_start']}")
    results["flops"] = count_flops(bundle, manifest, log)
    common = {"run_dir": str(run_dir), "bundle": str(bundle), "threads": opts.threads}
    with tempfile.TemporaryDirectory(prefix="kimchi-bench-") as tmp:
        phone, phone_info = phone_photos(opts, images, Path(tmp) / "phone")
        if phone_info:
            results["phone_photos"] = phone_info
        calib = calibration_images(run_dir, opts.calib)
        results["int8_artifacts"] = int8_artifacts(manifest)
        log("matmul peak ...")
        peaks = [run_worker({**common, "kind": "peak"}, opts.threads, opts.timeout, log)]
        results["paths"] = measure_paths(opts, common, images, phone, manifest, log)
        if opts.one_thread_round and opts.threads != 1:
            results["one_thread"] = measure_one_thread(opts, common, images, results["paths"], log)
        results["profile"] = profile_inference(opts, common, images, manifest, log)
        if opts.experiments:
            log("experiments (variants side by side) ...")
            results["experiments"] = run_worker({**common, "kind": "experiments", "images": [str(f) for f in images[:8]],
                                                 "phone_images": [str(p) for p in phone], "calibration_images": calib,
                                                 "batch_sizes": list(opts.batch_sizes)}, opts.threads, opts.timeout, log)
        log("matmul peak (again) ...")
        peaks.append(run_worker({**common, "kind": "peak"}, opts.threads, opts.timeout, log))
    results["peak"] = peaks
    results["tensorrt"] = tensorrt_status() or "available"
    results["loadavg_end"] = loadavg()
    results["seconds"] = time.perf_counter() - t_all
    add_agreement(results)
    results["images"]["files"] = [str(f) for f in images]
    slim(results)
    written = write_files(results, opts.out)
    log("wrote " + ", ".join(str(w) for w in written) + f" ({results['seconds']:.0f} s)")
    return Comparison(results=results, written=written, failed=failures(results))


def describe_run(opts: CompareOptions, manifest: Any, images: Sequence[Path]) -> dict[str, Any]:
    """The head of ``bench_results.json``: command, machine, versions, model, images, settings; ``paths`` to fill."""
    from kimchi_edge.runtime.manifest import to_dict

    pre = manifest.preprocessing
    return {
        "command": command_line(opts),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(), "versions": versions(), "loadavg_start": loadavg(),
        "run_dir": str(opts.run_dir), "bundle": str(opts.bundle_dir), "architecture": manifest.model.architecture,
        "labels": len(manifest.labels), "input": [pre.height, pre.width],
        "preprocessing": {"resize": [pre.resize_height, pre.resize_width], "method": pre.resize_method, "batch_resize": pre.batch_resize,
                          "dtype": pre.dtype, "layout": pre.layout},
        "threads": opts.threads, "images": {"folder": str(opts.images), "count": len(images),
                                            "mb": sum(f.stat().st_size for f in images) / 2**20},
        "warmup": opts.warmup, "rounds": opts.rounds, "batch_sizes": list(opts.batch_sizes), "paths": {},
        "gates": to_dict(manifest.gate) if manifest.gate else {},
    }


def count_flops(bundle: Path, manifest: Any, log: Log) -> dict[str, Any]:
    """FLOPs of the FP32 ONNX model from its graph (``{"error": ...}`` when they cannot be counted)."""
    try:
        from .flops import macs_from_onnx

        flops = macs_from_onnx(bundle / manifest.artifact("onnx-fp32").file, batch=1)
    except Exception as exc:  # onnx missing or an odd graph: the rest still runs
        return {"error": f"{type(exc).__name__}: {exc}"}
    log(f"FP32 ONNX: {flops['flops'] / 1e9:.3f} GFLOP per image (Conv/Gemm/MatMul, from shape inference)")
    return flops


def phone_photos(opts: CompareOptions, images: Sequence[Path], folder: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """``opts.phone_photos`` phone-size JPEGs made from ``images`` in ``folder``, and their description."""
    if opts.phone_photos <= 0:
        return [], None
    step = max(1, len(images) // opts.phone_photos)
    sources = list(images[::step][: opts.phone_photos])
    phone = make_phone_photos(sources, folder, opts.phone_size)
    return phone, {"count": len(phone), "size": list(opts.phone_size), "quality": 90,
                   "mb_each": [round(p.stat().st_size / 2**20, 2) for p in phone],
                   "made_from": [str(sources[i]) for i in range(len(phone))]}


def int8_artifacts(manifest: Any) -> dict[str, dict[str, Any]]:
    """The bundle's INT8 ONNX artifacts as the report describes them: target, recipe, calibration, layers kept float."""
    keys = ("target", "activations", "weights", "calibration_method", "calibration_mode", "calibration_images", "bias_correction",
            "float_nodes")
    return {a.name: {"target": a.target, **{k: a.details[k] for k in keys if k in a.details and k != "target"}}
            for a in manifest.artifacts if a.format == "onnx" and a.precision == "int8"}


def _missing_artifact(name: str, manifest: Any) -> str:
    """Why an ONNX Runtime path cannot run on this bundle ('' when its artifact is there)."""
    from kimchi_edge.runtime.sysinfo import VNNI_FLAGS

    from .worker import ORT_ARTIFACTS

    art = ORT_ARTIFACTS.get(name)
    if art is None or art in {a.name for a in manifest.artifacts}:
        return ""
    if art == "onnx-int8-vnni":
        return f"the bundle has no {art} (built only by a convert on a CPU with VNNI: {'/'.join(VNNI_FLAGS)})"
    return f"the bundle has no {art} (converted before INT8 was written per target; re-convert it)"


def measure_paths(opts: CompareOptions, common: dict[str, Any], images: Sequence[Path], phone: Sequence[Path],
                  manifest: Any, log: Log) -> dict[str, Any]:
    """Every path ``opts.rounds`` times, in alternating order (ABC CBA: drifting load hits every path alike), merged."""
    batch_iters = {str(b): max(2, opts.batch_images // b) for b in opts.batch_sizes}
    per_path: dict[str, list[dict[str, Any]]] = {name: [] for name in opts.paths}
    for rnd in range(opts.rounds):
        for name in opts.paths if rnd % 2 == 0 else opts.paths[::-1]:
            log(f"{name} (round {rnd + 1}/{opts.rounds}) ...")
            missing = _missing_artifact(name, manifest)
            if missing:
                per_path[name].append({"error": missing})
                continue
            cfg = {**common, "kind": "path", "path": name, "images": [str(f) for f in images],
                   "phone_images": [str(p) for p in phone], "phone_passes": opts.phone_passes, "warmup": opts.warmup,
                   "batch_sizes": list(opts.batch_sizes), "batch_iterations": batch_iters,
                   "fastai_progress_bar": opts.fastai_progress_bar}
            r = run_worker(cfg, opts.threads, opts.timeout, log)
            per_path[name].append(r)
            if "error" not in r:
                b1 = r["batch1"]
                log(f"  p50 {b1['latency_ms']['p50']:.1f} ms, infer p50 {b1['stages_ms']['infer']['p50']:.1f} ms, "
                    f"cold {r['cold_start']['import_ms'] + r['cold_start']['load_ms']:.0f} ms, "
                    f"RSS {r['memory_ready_mb'].get('VmHWM', float('nan')):.0f} MB ({r['seconds']:.0f} s)")
    return {name: merge_rounds(per_path[name]) for name in opts.paths}


def measure_one_thread(opts: CompareOptions, common: dict[str, Any], images: Sequence[Path],
                       paths: dict[str, Any], log: Log) -> dict[str, Any]:
    """One more batch-1 round of every path that worked, at 1 thread.

    OpenMP/ORT threads that spin or wait for a descheduled sibling make multi-threaded timings on a shared CPU
    depend on the other jobs; at 1 thread a path just gets its share of one CPU, so the ratios are steadier.
    """
    out: dict[str, Any] = {}
    for name in opts.paths:
        if "error" in paths[name]:
            continue
        log(f"{name} (1 thread) ...")
        r = run_worker({**common, "threads": 1, "kind": "path", "path": name, "light": True,
                        "images": [str(f) for f in images], "warmup": opts.warmup, "batch_sizes": [],
                        "batch_iterations": {}}, 1, opts.timeout, log)
        if "error" not in r:
            log(f"  p50 {r['batch1']['latency_ms']['p50']:.1f} ms, infer p50 {r['batch1']['stages_ms']['infer']['p50']:.1f} ms")
            r["batch1"].pop("probabilities", None)
        out[name] = r
    return out


def profile_inference(opts: CompareOptions, common: dict[str, Any], images: Sequence[Path], manifest: Any,
                      log: Log) -> dict[str, Any]:
    """ONNX Runtime's profiler on the bundle's ONNX artifacts (FP32 and each INT8), at the run's threads and at 1 thread:
    kernel time per kind of Conv layer, the figures that say where the FLOP/s go (``{threads: result}``)."""
    names = ["onnx-fp32", *[a.name for a in manifest.artifacts if a.format == "onnx" and a.precision == "int8"]]
    out: dict[str, Any] = {}
    for threads in dict.fromkeys((opts.threads, 1)):
        log(f"profile of {', '.join(names)} ({threads} thread{'s' if threads > 1 else ''}) ...")
        out[str(threads)] = run_worker({**common, "threads": threads, "kind": "profile", "images": [str(images[0])], "artifacts": names},
                                       threads, opts.timeout, log)
    return out


def add_agreement(results: dict[str, Any]) -> None:
    """Top-1 agreement of every path with the fastai baseline (batch 1 and phone photos), in place."""
    base = results["paths"].get("fastai", {})
    for r in results["paths"].values():
        if "error" in r or "error" in base or not base:
            continue
        r["agreement"] = agreement(r["batch1"], base["batch1"])
        if "phone" in r and "phone" in base:
            r["phone_agreement"] = agreement(r["phone"], base["phone"])


def failures(results: dict[str, Any]) -> dict[str, str]:
    """Path name -> one line saying why, for each path that failed in any round."""
    out = {}
    for name, r in results["paths"].items():
        if "error" in r:
            out[name] = r["error"]
        elif r.get("round_errors"):
            out[name] = "; ".join(r["round_errors"])
    return out


def write_files(results: dict[str, Any], out: Path) -> list[Path]:
    """``bench_latency.png``, ``BENCHMARKS.md`` and ``bench_results.json`` in ``out``; returns them."""
    from kimchi_edge.runtime.fsutil import atomic_write_json

    from .report import write_report

    written = write_report(results, out)
    atomic_write_json(out / RESULTS_NAME, results)
    return [*written, out / RESULTS_NAME]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kimchi_edge.bench.compare RUN_DIR [BUNDLE] [options]`` = ``kimchi-edge bench --compare RUN_DIR [BUNDLE] [options]``."""
    from kimchi_edge.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if args and not args[0].startswith("-"):
        args = ["--compare", *args]
    return cli_main(["bench", *args])


if __name__ == "__main__":
    sys.exit(main())
