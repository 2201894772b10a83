"""Results of :mod:`kimchi_edge.bench.compare` -> ``BENCHMARKS.md`` and ``bench_latency.png`` (generated, never typed).

Deciding (:func:`goals`, :func:`pre_share`, :func:`peak_gflops`) is apart from telling: :func:`markdown` joins one
function per section of the document, in reading order.  Re-render a saved run without measuring::

    python -m kimchi_edge.bench.report docs/bench_results.json --out docs/
"""

from __future__ import annotations

import collections
import math
from pathlib import Path
from typing import Any

from kimchi_edge.runtime.errors import KimchiEdgeError, require
from kimchi_edge.runtime.fsutil import atomic_write_bytes

from . import EXTRA

#: The command that measures and writes these files.
COMMAND = "kimchi-edge bench --compare"
#: What the same command was called before it moved into ``kimchi-edge bench`` (found in older results).
LEGACY_COMMANDS = ("python -m bench.compare", "python -m kimchi_edge.bench.compare")
RESULTS_NAME = "bench_results.json"
DOC_NAME = "BENCHMARKS.md"
CHART_NAME = "bench_latency.png"

TITLES = {
    "fastai": "fastai `learn.predict`",
    "torch-eager": "torch eager (`learn.model`)",
    "torchscript": "TorchScript",
    "ort-fp32": "ONNX Runtime FP32 (`runtime.Classifier`)",
    "ort-int8": "ONNX Runtime INT8, bundle's `onnx-int8` (`runtime.Classifier`)",
    "ort-int8-vnni": "ONNX Runtime INT8, bundle's `onnx-int8-vnni`, 8-bit weights for VNNI CPUs (`runtime.Classifier`)",
    "ort-int8-qdq-s8": "ONNX Runtime INT8, bundle's `onnx-int8-qdq-s8`, made for TensorRT (`runtime.Classifier`)",
}
SHORT = {"fastai": "fastai", "torch-eager": "torch eager", "torchscript": "TorchScript", "ort-fp32": "ORT FP32", "ort-int8": "ORT INT8 (onnx-int8)",
         "ort-int8-vnni": "ORT INT8 (onnx-int8-vnni)", "ort-int8-qdq-s8": "ORT INT8 (onnx-int8-qdq-s8)"}
RUNTIME_PATHS = ("ort-fp32", "ort-int8", "ort-int8-vnni", "ort-int8-qdq-s8")
#: results written before the bundle had one INT8 file per target: ``ort-int8`` was the bundle's symmetric s8 file and
#: ``ort-int8-u8`` a uint8 model the benchmark re-quantized itself; they keep rendering as they were measured
LEGACY_TITLES = {**TITLES, "ort-int8": "ONNX Runtime INT8, bundle's QDQ s8 (`runtime.Classifier`)",
                 "ort-int8-u8": "ONNX Runtime INT8, QDQ u8 re-quantized here (`runtime.Classifier`)"}
LEGACY_SHORT = {**SHORT, "ort-int8": "ORT INT8 (bundle, s8)", "ort-int8-u8": "ORT INT8 (u8, re-quantized)"}
LEGACY_RUNTIME_PATHS = ("ort-fp32", "ort-int8", "ort-int8-u8")


def _legacy(results: dict[str, Any]) -> bool:
    return "int8_artifacts" not in results


def title(results: dict[str, Any], name: str) -> str:
    return (LEGACY_TITLES if _legacy(results) else TITLES).get(name, name)


def short(results: dict[str, Any], name: str) -> str:
    return (LEGACY_SHORT if _legacy(results) else SHORT).get(name, name)


def runtime_paths(results: dict[str, Any]) -> tuple[str, ...]:
    return LEGACY_RUNTIME_PATHS if _legacy(results) else RUNTIME_PATHS
GOALS = {"speedup": 6.0, "agreement": 0.99, "peak_fraction": 0.70, "int8_speedup": 2.0, "cold_ms": 1000.0, "rss_mb": 200.0}
#: series -> (what it is, the most decode + preprocess may take of bytes -> label)
PRE_SHARE_GOALS = {"batch1": ("the benchmark's photos", 0.15), "phone": ("a phone photo", 0.30)}


def f(x: Any, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.{nd}f}"


def pct(x: Any, nd: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{nd}f} %"


def _ok(paths: dict[str, Any], name: str) -> dict[str, Any] | None:
    r = paths.get(name)
    return r if r and "error" not in r else None


def _stage(r: dict[str, Any], series: str, stage: str, q: str = "p50") -> float | None:
    st = r.get(series, {}).get("stages_ms", {})
    return st[stage][q] if stage in st else None


def pre_share(r: dict[str, Any], series: str) -> float | None:
    """Median over images of (decode + preprocess) / (bytes -> label) for one series."""
    s = r.get(series, {}).get("stage_samples_ms", {})
    pre = s.get("preprocess") or s.get("fastai pipeline")
    if not s.get("decode") or not pre or not s.get("total"):
        return None
    shares = sorted((d + p) / t for d, p, t in zip(s["decode"], pre, s["total"]) if t > 0)
    return shares[len(shares) // 2] if shares else None


def peak_gflops(results: dict[str, Any]) -> tuple[float | None, str]:
    best, where = None, ""
    for i, p in enumerate(results.get("peak", [])):
        if "error" in p:
            continue
        if best is None or p["peak_gflops"] > best:
            best, where = p["peak_gflops"], f"{p['peak_from']}, {'before' if i == 0 else 'after'} the paths"
    return best, where


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with the measured figure, met or not, and by how much it was missed."""
    paths = results["paths"]
    base = _ok(paths, "fastai")
    rows: list[dict[str, Any]] = []
    for name in runtime_paths(results):
        r = _ok(paths, name)
        if not r or not base:
            continue
        sp = base["batch1"]["latency_ms"]["p50"] / r["batch1"]["latency_ms"]["p50"]
        ag = r.get("agreement", {}).get("rate")
        met = sp >= GOALS["speedup"] and (ag or 0) >= GOALS["agreement"]
        miss = []
        if sp < GOALS["speedup"]:
            need = 1 - sp / GOALS["speedup"]
            miss.append(f"{sp:.2f}x is {GOALS['speedup'] - sp:.2f}x short (image->label must get {100 * need:.0f} % faster)")
        if ag is not None and ag < GOALS["agreement"]:
            miss.append(f"agreement {pct(ag)} is {100 * (GOALS['agreement'] - ag):.1f} points short")
        one = (results.get("one_thread") or {})
        r1, b1 = one.get(name), one.get("fastai")
        sp1 = None
        if r1 and b1 and "error" not in r1 and "error" not in b1:
            sp1 = b1["batch1"]["latency_ms"]["p50"] / r1["batch1"]["latency_ms"]["p50"]
        a = r.get("agreement", {})
        caveat = ""
        if a.get("distinct_baseline_labels", 99) < 3:
            caveat = (f" — but the baseline gives only {a['distinct_baseline_labels']} distinct label(s) to these images, so agreement "
                      f"is nearly vacuous; max |Δp| vs fastai {f(a.get('max_abs_dprob'), 4)}")
        rows.append({"goal": f"bytes->label batch 1 >= 6x faster than learn.predict, >= 99 % top-1 agreement ({short(results, name)})",
                     "measured": f"{results['threads']} threads: {sp:.2f}x (p50 {f(r['batch1']['latency_ms']['p50'])} vs "
                                 f"{f(base['batch1']['latency_ms']['p50'])} ms)"
                                 + (f"; 1 thread: {sp1:.2f}x" if sp1 else "")
                                 + f"; agreement {pct(ag)} ({a.get('agree')}/{a.get('n')}){caveat}",
                     "met": met and (sp1 is None or sp1 >= GOALS["speedup"]),
                     "miss": "; ".join(miss + ([f"at 1 thread {sp1:.2f}x is {GOALS['speedup'] - sp1:.2f}x short"]
                                               if sp1 is not None and sp1 < GOALS["speedup"] else []))})
    peak, _ = peak_gflops(results)
    flops = results.get("flops", {}).get("flops")
    r = _ok(paths, "ort-fp32")
    if r and peak and flops:
        infer = r["batch1"]["stages_ms"]["infer"]["p50"]
        got = flops / (infer / 1e3) / 1e9
        frac = got / peak
        b32 = _batch_infer(results, "fp32", 32)
        extra = ""
        if b32:
            extra = f"; batch 32: {flops / (b32 / 1e3) / 1e9:.0f} GFLOP/s = {pct(flops / (b32 / 1e3) / 1e9 / peak)}"
        rows.append({"goal": "ORT FP32 achieves >= 70 % of the measured matmul peak",
                     "measured": f"batch 1: {got:.0f} GFLOP/s = {pct(frac)} of {peak:.0f} GFLOP/s{extra}",
                     "met": frac >= GOALS["peak_fraction"],
                     "miss": "" if frac >= GOALS["peak_fraction"] else "; ".join(
                         x for x in (f"{100 * (GOALS['peak_fraction'] - frac):.1f} points short at batch 1 (inference would need "
                                     f"{infer * frac / GOALS['peak_fraction']:.1f} ms instead of {infer:.1f})", peak_explanation(results)) if x)})
    int8_row = int8_speed_goal(results)
    if int8_row:
        rows.append(int8_row)
    for series, (what, goal) in PRE_SHARE_GOALS.items():
        for name in runtime_paths(results):
            r = _ok(paths, name)
            share = pre_share(r, series) if r and series in r else None
            if share is None:
                continue
            d, p = _stage(r, series, "decode"), _stage(r, series, "preprocess")
            rows.append({"goal": f"decode+preprocess <= {100 * goal:.0f} % of image->label on {what} ({short(results, name)})",
                         "measured": f"{pct(share)} (decode {f(d)} + preprocess {f(p)} of {f(r[series]['latency_ms']['p50'])} ms, p50)",
                         "met": share <= goal,
                         "miss": "" if share <= goal else f"{100 * (share - goal):.1f} points over"
                                 + (f"; decode alone is {pct(d / r[series]['latency_ms']['p50'])} of it" if d else "")})
    for name in runtime_paths(results):
        r = _ok(paths, name)
        if not r:
            continue
        cold = r["cold_start"]["import_ms"] + r["cold_start"]["load_ms"]
        rss = r["memory_ready_mb"].get("VmHWM")
        met = cold <= GOALS["cold_ms"] and (rss or 0) <= GOALS["rss_mb"]
        miss = []
        if cold > GOALS["cold_ms"]:
            miss.append(f"cold start {cold - GOALS['cold_ms']:.0f} ms over")
        if rss and rss > GOALS["rss_mb"]:
            miss.append(f"RSS {rss - GOALS['rss_mb']:.0f} MB over")
        rows.append({"goal": f"runtime cold start (import + bundle load) <= 1 s and RSS <= 200 MB ({short(results, name)})",
                     "measured": f"import {f(r['cold_start']['import_ms'], 0)} + load {f(r['cold_start']['load_ms'], 0)} = {f(cold, 0)} ms; "
                                 f"peak RSS {f(rss, 0)} MB after the first prediction",
                     "met": met, "miss": "; ".join(miss)})
    return rows


def _batch_infer(results: dict[str, Any], precision: str, b: int) -> float | None:
    """ORT tensor -> logits ms per image at batch ``b`` from the experiments (None when absent)."""
    ex = results.get("experiments", {})
    if not ex or "error" in ex:
        return None
    ms = ex["ort"]["batches"]["ms"].get(f"{precision} batch {b}")
    return ms["p50"] / b if ms else None


# --------------------------------------------------------------------------- chart


def write_chart(results: dict[str, Any], path: Path) -> Path:
    """``bench_latency.png``: per path, the median of each stage and p50/p90/p99 of the total.

    Raises:
        MissingDependencyError: matplotlib is not installed (the message names the extra, :data:`kimchi_edge.bench.EXTRA`).
    """
    matplotlib = require("matplotlib", extra=EXTRA, purpose="the benchmark chart")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [(n, r) for n, r in results["paths"].items() if "error" not in r]
    th = results["threads"]
    series = [("batch1", f"food10 photos ({results['images']['count']}, ~512 px), batch 1, {th} threads", paths)]
    if any("phone" in r for _, r in paths):
        size = results.get("phone_photos", {}).get("size", ["?", "?"])
        series.append(("phone", f"phone-size photos ({size[0]}x{size[1]} JPEG), batch 1, {th} threads", paths))
    one = [(n, r) for n, r in (results.get("one_thread") or {}).items() if "error" not in r]
    if one:
        series.append(("batch1", "food10 photos, batch 1, 1 thread (steadier on a shared CPU)", one))
    fig, axes = plt.subplots(1, len(series), figsize=(6.0 * len(series), 0.7 * len(paths) + 2.2), squeeze=False)
    colours = {"decode": "#4e79a7", "preprocess": "#f28e2b", "fastai pipeline": "#f28e2b", "infer": "#59a14f", "post": "#bab0ac"}
    for ax, (key, title, items) in zip(axes[0], series):
        rows = [r for _, r in items][::-1]
        names = [f"{short(results, n)}\np50 {r[key]['latency_ms']['p50']:.1f} ms" if key in r else short(results, n)
                 for n, r in items][::-1]
        seen = set()
        for y, r in enumerate(rows):
            left = 0.0
            st = r.get(key, {}).get("stages_ms", {})
            for stage in ("decode", "preprocess", "fastai pipeline", "infer", "post"):
                if stage not in st:
                    continue
                w = max(0.0, st[stage]["p50"])
                label = None
                lab = "preprocess (fastai: + pipeline overhead)" if stage in ("preprocess", "fastai pipeline") else stage
                if lab not in seen:
                    label, _ = lab, seen.add(lab)
                ax.barh(y, w, left=left, color=colours[stage], label=label, height=0.6)
                left += w
            lat = r.get(key, {}).get("latency_ms")
            if lat:
                ax.errorbar([lat["p50"]], [y], xerr=[[0], [lat["p99"] - lat["p50"]]], fmt="k|", capsize=4, ms=14)
                ax.plot([lat["p90"]], [y], "k.", ms=6)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("ms per image, image bytes -> label")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        ax.margins(x=0.15)
    load = results.get("loadavg_start", [])
    fig.suptitle(f"{results['architecture']} {results['input'][0]}x{results['input'][1]}, "
                 f"{results['machine']['cpu']} ({results['machine']['cpus_usable']} CPUs), load average at start {load[0] if load else '?'}\n"
                 "bars: median of each stage; black: | p50 of the total, whisker to p99, dot p90",
                 fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------- markdown


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"] + ["| " + " | ".join(r) + " |" for r in rows]


def summary(results: dict[str, Any]) -> list[str]:
    """A few sentences computed from this run's figures (nothing typed by hand)."""
    paths = results["paths"]
    base = _ok(paths, "fastai")
    out: list[str] = []
    if base:
        b = base["batch1"]["latency_ms"]["p50"]
        one = results.get("one_thread") or {}
        ob = one.get("fastai") if one.get("fastai") and "error" not in one["fastai"] else None
        for name in runtime_paths(results):
            r = _ok(paths, name)
            if r:
                o = one.get(name) if one.get(name) and "error" not in one[name] else None
                at1 = (f"; at 1 thread {f(o['batch1']['latency_ms']['p50'])} ms, "
                       f"{ob['batch1']['latency_ms']['p50'] / o['batch1']['latency_ms']['p50']:.2f}x") if o and ob else ""
                out.append(f"{short(results, name)}: {f(r['batch1']['latency_ms']['p50'])} ms p50 from bytes to label, "
                           f"{b / r['batch1']['latency_ms']['p50']:.2f}x faster than `learn.predict` ({f(b)} ms){at1}")
    ex = results.get("experiments") or {}
    if ex and "error" not in ex:
        fused = ex["ort"].get("fused_ops", {})
        for label, v in fused.items():
            total = v["QLinearConv"] + v["Conv"]
            out.append(f"{label}: ONNX Runtime runs {v['QLinearConv']} of {total} convolutions as integer kernels "
                       f"({v['Relu']} Relu and {v['QuantizeLinear'] + v['DequantizeLinear']} Q/DQ nodes left in float)")
        ms = ex["ort"]["batch1"]["ms"]
        fp_def = next((v for k, v in ms.items() if k.startswith("fp32: runtime default")), None)
        for k in ("fp32: 1 intra-op thread", "fp32: thread spinning off"):
            if fp_def and k in ms and ms[k]["p50"] < 0.9 * fp_def["p50"]:
                other = ex["ort"]["batch1"]["machine"].get("cores_used_by_other_processes")
                out.append(f"`{k.split(': ', 1)[1]}` took {ms[k]['p50'] / fp_def['p50']:.2f}x the time of the {results['threads']}-thread "
                           f"default while other processes used {f(other, 1)} CPUs: threads that spin, or wait for a descheduled "
                           "sibling, lose on a shared CPU — here every variant's session keeps its own thread pool in one process, "
                           "so this bounds what the setting does for the runtime's one session rather than measuring it (the "
                           "batch-1 paths, one session per process, are the figures to use); on an idle CPU the default is "
                           "expected to win (not measured here)")
    for name in ("ort-fp32",):
        r = _ok(paths, name)
        if r and "phone" in r:
            sh = pre_share(r, "phone")
            out.append(f"phone-size photo through {short(results, name)}: decode + preprocess are {pct(sh)} of bytes -> label")
    if not out:
        return []
    return ["## Summary (computed from this run)", ""] + [f"* {line}." for line in out] + [""]


def reproduce_command(results: dict[str, Any]) -> str:
    """The command line that made ``results``, under today's command name.

    Runs recorded before the command moved into ``kimchi-edge bench --compare`` say ``python -m bench.compare``
    or ``python -m kimchi_edge.bench.compare``; the options are the same.
    """
    command = results["command"]
    for old in LEGACY_COMMANDS:
        if command == old or command.startswith(old + " "):
            return COMMAND + command[len(old):]
    return command


def markdown(results: dict[str, Any], chart: str | None) -> str:
    """``BENCHMARKS.md`` of one run: the sections below, in reading order."""
    sections = (
        title_section(results),
        machine_section(results),
        summary(results),
        method_section(results),
        results_section(results, chart),
        one_thread_section(results),
        phone_section(results),
        goals_section(results),
        compute_section(results),
        profile_section(results),
        experiments_section(results),
        gpu_section(results),
        load_section(results),
    )
    return "\n".join(line for lines in sections for line in lines) + "\n"


def title_section(results: dict[str, Any]) -> list[str]:
    """Title, the generated-file banner, the command that made it, the model."""
    L: list[str] = []
    L += ["# Benchmarks: fastai vs the exported model, side by side", "",
          "<!-- GENERATED by `kimchi-edge bench --compare` — do not edit by hand; re-run the command instead. -->", "",
          f"Generated {results['started']} by", "", "```", reproduce_command(results), "```", "",
          f"Model: `{results['architecture']}` ({results['labels']} classes), input {results['input'][0]}x{results['input'][1]}, "
          f"preprocessing: resize {results['preprocessing']['resize'][0]}x{results['preprocessing']['resize'][1]} "
          f"({results['preprocessing']['method']}){' + fastai batch resample' if results['preprocessing']['batch_resize'] else ''}. "
          f"Run folder `{results['run_dir']}`, bundle `{results['bundle']}`.", ""]
    return L


def machine_section(results: dict[str, Any]) -> list[str]:
    """CPU, memory, versions, threads and how busy the machine was."""
    paths = results["paths"]
    m = results["machine"]
    L: list[str] = []
    loads = [r["batch1"]["machine"] for r in paths.values() if "error" not in r]
    others = [x.get("cores_used_by_other_processes") for x in loads if x.get("cores_used_by_other_processes") is not None]
    L += ["## Machine", "",
          f"* CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['cpus_usable']} usable by this process), flags {', '.join(m['cpu_flags']) or '—'}; "
          f"{m['memory_gb']} GB RAM; {m['platform']}, Python {m['python']}.",
          "* Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
          f"* Threads: `torch.set_num_threads({results['threads']})`, ONNX Runtime `intra_op_num_threads={results['threads']}` "
          f"(inter-op 1), `OMP/MKL/OPENBLAS_NUM_THREADS={results['threads']}`.",
          f"* Load average (1/5/15 min): {results['loadavg_start']} at the start, {results['loadavg_end']} at the end of the run "
          f"({results['seconds']:.0f} s in all)."
          + (f" While the batch-1 series ran, other processes used {min(others):.1f}-{max(others):.1f} of the "
             f"{m['logical_cpus']} CPUs (from `/proc/stat`): this CPU is shared, so absolute times are inflated "
             "and noisy; the ratios measured in this one run are the figures to trust." if others else ""), ""]
    return L


def method_section(results: dict[str, Any]) -> list[str]:
    """How each path is measured (processes, rounds, what fastai/torch/ONNX Runtime run, cold start, agreement)."""
    paths = results["paths"]
    L: list[str] = []
    L += ["## How it is measured", "",
          f"* Every path runs in its own fresh Python process, one after the other, on the same "
          f"{results['images']['count']} real images ({results['images']['mb']:.1f} MB, evenly spread over the sorted files of "
          f"`{results['images']['folder']}`) read into memory first: disk is not measured.",
          f"* Batch 1 = one image's **bytes -> label**: decode, preprocess, inference, post-processing (softmax/argmax/label). "
          f"{results['warmup']} warm-up predictions are excluded; then every image is timed once. Every path runs "
          f"{results.get('rounds', 1)} time(s), in alternating order (A B C ... C B A), so load that drifts during the run hits all "
          "paths alike; p50/p90/p99 are over the pooled samples, `p50 per round` shows the spread. Cold start is the median "
          "over rounds, RSS the maximum.",
          "* fastai: `load_learner(learner.pkl, cpu=True)` then `learn.predict(image_bytes)` (progress bar off, which "
          "only makes fastai faster)"
          + (f" — **{fa['note']}**, which keeps the learner's own decoder (`kimchi_edge.train.data.PILImageUpright.create`) in the "
             "pipeline, as `kimchi-edge convert` does: the same work a working `learn.predict(bytes)` would do"
             if (fa := paths.get("fastai", {})).get("note") else "")
          + ". Its inference is timed with forward hooks on `learn.model`; its decode is timed separately on the same bytes "
          "with the same decoder (`PILImageUpright` = `kimchi_edge.runtime.preprocess.decode_image`); the rest is fastai's pipeline "
          "(test DataLoader, `Resize`, batch transforms, decoding the result).",
          "* torch eager / TorchScript: the runtime's `Preprocessor` (decode, geometry) + `Preprocessor.normalize`, then the model under "
          "`torch.inference_mode()`. Eager needs `learn.model`, i.e. fastai to unpickle the learner: its cold start includes that.",
          "* ONNX Runtime: `runtime.Classifier.from_bundle(bundle, backend='onnxruntime', artifact=..., threads=...)`, `predict(bytes)`; "
          f"{results['preprocessing'].get('dtype', 'uint8')} {results['preprocessing'].get('layout', 'NHWC')} input (pixel values 0-255), "
          "normalisation inside the graph; default `fast_decode=True` (reduced-scale JPEG decode for large photos).",
          *([f"* `ort-int8-u8`: the bundle's FP32 model re-quantized by this command (`kimchi_edge.bench.quant`): QDQ, "
             f"{results['int8_u8']['activations']} activations, {results['int8_u8']['weights']} weights, "
             f"{results['int8_u8']['calibration']} calibration on {results['int8_u8']['calibration_images']} training images, "
             "put in a temporary copy of the bundle and run by `runtime.Classifier` like the others. The bundle's own INT8 file uses "
             "symmetric int8 activations (for TensorRT); see *What was tried* for why that matters on this CPU."]
            if results.get("int8_u8") and "error" not in results["int8_u8"] else []),  # results from before INT8 per target
          *[f"* `{name}` (the bundle's own file, as `kimchi-edge convert` wrote it; nothing is re-quantized for these rows): "
            f"for {q.get('target') or 'ONNX Runtime and TensorRT (written before INT8 was made per target)'}; QDQ, "
            f"{q.get('activations', 'int8 symmetric')} activations, {q.get('weights', 'int8 symmetric per-channel')} weights, "
            f"{q.get('calibration_method', 'minmax')} calibration ({q.get('calibration_mode', 'fixed')}) on "
            f"{q.get('calibration_images', '?')} training images"
            + ("; bias correction (each layer's bias absorbs the mean shift its rounded weights cause)" if q.get("bias_correction") else "")
            + (f"; {len(q['float_nodes'])} layer(s) kept in float" if q.get("float_nodes") else "") + "."
            for name, q in (results.get("int8_artifacts") or {}).items()],
          "* Cold start: in-process import time of the path's stack + load time (learner / TorchScript / bundle), measured from a clock "
          "started before any heavy import; `first` = first prediction. RSS: `VmHWM` (peak resident set) of that process after the first "
          "prediction; `peak` = `VmHWM` at the end (includes batch 32 and the images held in memory).",
          f"* Batch 8/32: the same bytes -> labels pipeline on {', '.join(str(b) for b in results['batch_sizes'])} images per call "
          "(fastai: `learn.get_preds(dl=learn.dls.test_dl(items, bs=N))`; runtime: `Classifier.predict_batch`).",
          "* Agreement: top-1 label of each path vs `learn.predict` on the same images.", ""]
    return L


def results_section(results: dict[str, Any], chart: str | None) -> list[str]:
    """The main table (batch 1, every path), the baseline's label caveat, footnotes and the chart."""
    paths = results["paths"]
    base = _ok(paths, "fastai")
    L: list[str] = []
    header = ["path", "p50 ms", "p90 ms", "p99 ms", "p50 per round", "vs fastai", "decode", "preprocess", "infer", "other",
              *[f"img/s b{b}" for b in results["batch_sizes"]], "import+load ms", "first ms", "RSS MB", "peak RSS MB", "top-1 agreement", "max |Δp|"]
    rows = []
    for name, r in paths.items():
        if "error" in r:
            rows.append([title(results, name), f"failed: {r['error'][:80]}", *[""] * (len(header) - 2)])
            continue
        b1 = r["batch1"]
        st = b1["stages_ms"]
        speed = base["batch1"]["latency_ms"]["p50"] / b1["latency_ms"]["p50"] if base else None
        pre = st.get("preprocess") or st.get("fastai pipeline")
        other = st.get("post")
        ag = r.get("agreement")
        cold = r["cold_start"]
        rows.append([
            title(results, name), f(b1["latency_ms"]["p50"]), f(b1["latency_ms"]["p90"]), f(b1["latency_ms"]["p99"]),
            " / ".join(f(x.get("p50_ms")) for x in r.get("rounds", [])) or "—",
            "1.00x" if name == "fastai" else (f"{speed:.2f}x" if speed else "—"),
            f(st["decode"]["p50"], 2), f(pre["p50"], 2) + (" ¹" if "fastai pipeline" in st else ""), f(st["infer"]["p50"]),
            f(other["p50"], 2) if other else "—",
            *[f(r["batches"].get(str(b), {}).get("images_per_s")) for b in results["batch_sizes"]],
            f(cold["import_ms"] + cold["load_ms"], 0) + (" ²" if name == "torch-eager" else ""), f(cold["first_predict_ms"], 0),
            f(r["memory_ready_mb"].get("VmHWM"), 0), f(r["memory_end_mb"].get("VmHWM"), 0),
            "baseline" if name == "fastai" else (f"{pct(ag['rate'])} ({ag['agree']}/{ag['n']})" if ag else "—"),
            "—" if name == "fastai" or not ag else f(ag.get("max_abs_dprob"), 4),
        ])
    trt = results.get("tensorrt")
    for prec in ("FP16", "INT8"):
        rows.append([f"TensorRT {prec}", f"not measured: {trt}" if trt != "available" else "not run by this command", *[""] * (len(header) - 2)])
    L += ["## Results (batch 1 = image bytes -> label, ms per image)", ""]
    L += _table(header, rows)
    if base:
        counts = collections.Counter(base["batch1"]["labels"])
        top, k = counts.most_common(1)[0]
        warn = ""
        if len(counts) < 3:
            warn = (f"**Caveat: the baseline learner gives {len(counts)} distinct label(s) to these {len(base['batch1']['labels'])} images "
                    f"(`{top}` to {k}): it is barely better than a constant, so top-1 agreement proves little here. "
                    "`max |Δp|` (largest difference of any class probability vs `learn.predict`, over all images) is the figure "
                    "that shows fidelity. Re-run this command on a trained learner for a meaningful agreement rate.** ")
        L += ["", warn + f"Labels given by the baseline: {len(counts)} distinct; most frequent `{top}` ({k}/{len(base['batch1']['labels'])})."]
    L += ["", "Stage columns are medians (ms); their sum differs slightly from the p50 of the total. "
          "¹ fastai: preprocessing plus its pipeline overhead (total − decode − inference). "
          "² includes importing fastai and unpickling the learner (the only source of `learn.model`).", ""]
    if chart:
        L += [f"![latency per path]({chart})", ""]
    return L


def one_thread_section(results: dict[str, Any]) -> list[str]:
    """The extra batch-1 round at 1 thread (steadier ratios on a shared CPU); empty when not run."""
    one = results.get("one_thread") or {}
    if not one:
        return []
    b1one = one.get("fastai") if one.get("fastai") and "error" not in one.get("fastai") else None
    rows = []
    for name, r in one.items():
        if "error" in r:
            rows.append([title(results, name), f"failed: {r['error'][:80]}", "", "", "", "", ""])
            continue
        lat, st = r["batch1"]["latency_ms"], r["batch1"]["stages_ms"]
        pre = st.get("preprocess") or st.get("fastai pipeline")
        rows.append([title(results, name), f(lat["p50"]), f(lat["p90"]), f(st["decode"]["p50"] + pre["p50"], 1), f(st["infer"]["p50"]),
                     "1.00x" if name == "fastai" else (f"{b1one['batch1']['latency_ms']['p50'] / lat['p50']:.2f}x" if b1one else "—"),
                     f"{b1one['batch1']['stages_ms']['infer']['p50'] / st['infer']['p50']:.2f}x" if b1one and name != "fastai" else "—"])
    L = ["### The same at 1 thread (one more round, batch-1 series only)", "",
         f"With {results['threads']} threads, OpenMP (torch) and ONNX Runtime threads spin or wait for a sibling that another "
         "job has descheduled, so on a shared CPU multi-threaded times depend on the other jobs (see the `p50 per round` "
         "column). At 1 thread a path simply gets its share of one CPU: these ratios are the steadier ones.", ""]
    L += _table(["path", "p50 ms", "p90 ms", "decode+preprocess ms", "infer ms", "vs fastai (bytes -> label)", "vs fastai (infer)"], rows)
    return L + [""]


def phone_section(results: dict[str, Any]) -> list[str]:
    """Batch 1 on phone-size photos: decode and preprocess share; empty when none were made."""
    paths = results["paths"]
    L: list[str] = []
    pp = results.get("phone_photos")
    if pp:
        L += [f"### Phone-size photos ({pp['count']} photos, {pp['size'][0]}x{pp['size'][1]} JPEG quality {pp['quality']}, "
              f"{min(pp['mb_each']):.1f}-{max(pp['mb_each']):.1f} MB each)", "",
              "Made from food10 photos (centre-cropped to 4:3, upscaled bicubic) in a temporary folder; each timed "
              f"{next((r['phone']['latency_ms']['n'] // max(1, pp['count']) for r in paths.values() if 'phone' in r), '?')} times.", ""]
        rows = []
        for name, r in paths.items():
            if "error" in r or "phone" not in r:
                continue
            ph = r["phone"]
            st = ph["stages_ms"]
            pre = st.get("preprocess") or st.get("fastai pipeline")
            ag = r.get("phone_agreement")
            rows.append([title(results, name), f(ph["latency_ms"]["p50"]), f(ph["latency_ms"]["p99"]), f(st["decode"]["p50"]),
                         f(pre["p50"]) + (" ¹" if "fastai pipeline" in st else ""), f(st["infer"]["p50"]), pct(pre_share(r, "phone")),
                         "baseline" if name == "fastai" else (f"{ag['agree']}/{ag['n']}" if ag else "—")])
        L += _table(["path", "p50 ms", "p99 ms", "decode", "preprocess", "infer", "decode+preprocess share", "same label as fastai"], rows)
        L += ["", f"fastai decodes the full {pp['size'][0] * pp['size'][1] / 1e6:.2f} MP photo; the runtime's `Preprocessor` (used here "
              "by torch eager, TorchScript and ONNX Runtime) lets libjpeg decode at 1/2, 1/4 or 1/8 scale as long as the result still "
              "covers the resize target (`fast_decode=True`, the default). That changes pixels slightly, hence the agreement column.", ""]
    return L


def goals_section(results: dict[str, Any]) -> list[str]:
    """Each goal of :func:`goals`: measured, met or missed, and by how much."""
    paths = results["paths"]
    L: list[str] = []
    L += ["## Goals", ""]
    grows = [[g["goal"], g["measured"], "**met**" if g["met"] else "**missed**", g["miss"] or "—"] for g in goals(results)]
    L += _table(["goal", "measured in this run", "", "missed by"], grows, "llll")
    if _ok(paths, "ort-int8-u8"):  # results from before INT8 per target
        L += ["", "`ORT INT8 (u8, re-quantized)` is **not in the bundle**: this command builds it (see *How it is measured*) to show "
              "what `kimchi-edge convert` would gain by writing an ONNX Runtime INT8 artifact with uint8 activations; the bundle's "
              "own artifacts are the FP32 and INT8 (s8) rows."]
    if _ok(paths, "ort-int8-qdq-s8"):
        L += ["", "`ORT INT8 (onnx-int8-qdq-s8)` is the bundle's INT8 file for TensorRT run on ONNX Runtime's CPU kernels, for "
              "comparison: the runtime never picks it for ONNX Runtime by itself (it runs `onnx-int8`, made for this backend)."]
    L += [""]
    return L


KIND_WORDS = {"1x1": "1x1 convs", "depthwise": "depthwise convs", "grouped": "grouped convs", "kxk": "dense kxk convs (stem)"}


def profiles(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``threads -> profile`` of the ONNX Runtime profiler runs that worked (``{}`` for runs from before it existed)."""
    return {t: p for t, p in (results.get("profile") or {}).items() if p and "error" not in p}


def copy_gbps(results: dict[str, Any]) -> float | None:
    """The best median of the memory-copy bandwidth measurements (GB/s read + written), or None."""
    vals = [p["copy_gbps"]["median"] for p in results.get("peak", []) if "error" not in p and p.get("copy_gbps")]
    return max(vals) if vals else None


def kind_rows(prof: dict[str, Any], art: str) -> dict[str, dict[str, float]]:
    """Per Conv kind of one artifact's profile: ms, layers, GFLOP/s (FP32-equivalent) and FLOP/byte ({} when not attributed)."""
    a = prof["artifacts"].get(art) or {}
    out = {}
    for kind, k in (a.get("kinds") or {}).items():
        out[kind] = {**k, "gflops": 2 * k["macs"] / (k["ms"] / 1e3) / 1e9 if k["ms"] else float("nan"),
                     "intensity": 2 * k["macs"] / k["min_bytes"] if k["min_bytes"] else float("nan")}
    return out


def peak_explanation(results: dict[str, Any]) -> str:
    """Why ORT FP32 sits where it does against the matmul peak, from the profile at the run's threads ('' without one)."""
    prof = profiles(results).get(str(results["threads"]))
    peak, _ = peak_gflops(results)
    rows = kind_rows(prof, "onnx-fp32") if prof else {}
    if not rows or not peak or "1x1" not in rows:
        return ""
    total_macs = sum(k["macs"] for k in rows.values())
    kernel = prof["artifacts"]["onnx-fp32"]["kernel_ms"]
    fast = rows["1x1"]
    whole_now = 2 * total_macs / (kernel / 1e3) / 1e9
    parts = [f"in ONNX Runtime's profile (kernel time, {results['threads']} threads) the model's kernels together run at "
             f"{pct(whole_now / peak)} of the peak; the 1x1 convs ({pct(fast['macs'] / total_macs)} of the FLOPs) at {fast['gflops']:.0f} GFLOP/s = "
             f"{pct(fast['gflops'] / peak)}"]
    slow = rows.get("depthwise")
    if slow:
        bw = copy_gbps(results)
        roof = (f"; limited by memory alone (a copy moves {bw:.0f} GB/s here) they could do ~{bw * slow['intensity']:.0f} at that "
                f"intensity, so they reach {pct(slow['gflops'] / (bw * slow['intensity']))} of even that bound") if bw else ""
        at_fast = slow["macs"] * 2 / (fast["gflops"] * 1e9) * 1e3
        whole = 2 * total_macs / ((kernel - slow["ms"] + at_fast) / 1e3) / 1e9
        parts.append(f"the depthwise convs ({pct(slow['macs'] / total_macs)} of the FLOPs, {slow['intensity']:.1f} FLOP/byte against "
                     f"{fast['intensity']:.1f} for the 1x1) run at {slow['gflops']:.0f} GFLOP/s and take {pct(slow['ms'] / kernel)} of the "
                     f"kernel time{roof}; were they as fast as the 1x1 convs, the model would reach {pct(whole / peak)} of the peak")
    return "; ".join(parts)


def int8_speed_goal(results: dict[str, Any]) -> dict[str, Any] | None:
    """The goal 'the bundle's INT8 for ONNX Runtime on CPU infers >= 2x faster than its FP32', with the profile's reason."""
    from .worker import ORT_ARTIFACTS

    paths = results["paths"]
    # the INT8 the runtime runs here: the VNNI file where it was built and measured, else the portable one
    path = "ort-int8-vnni" if _ok(paths, "ort-int8-vnni") else "ort-int8"
    art = ORT_ARTIFACTS[path]
    r8, r32 = _ok(paths, path), _ok(paths, "ort-fp32")
    if _legacy(results) or not r8 or not r32:
        return None
    i8, i32 = r8["batch1"]["stages_ms"]["infer"]["p50"], r32["batch1"]["stages_ms"]["infer"]["p50"]
    sp = i32 / i8
    one = results.get("one_thread") or {}
    o8, o32 = one.get(path), one.get("ort-fp32")
    sp1 = None
    if o8 and o32 and "error" not in o8 and "error" not in o32:
        sp1 = o32["batch1"]["stages_ms"]["infer"]["p50"] / o8["batch1"]["stages_ms"]["infer"]["p50"]
    met = sp >= GOALS["int8_speedup"] and (sp1 is None or sp1 >= GOALS["int8_speedup"])
    miss = []
    if not met:
        low = min(x for x in (sp, sp1) if x is not None)
        miss.append(f"{low:.2f}x is {GOALS['int8_speedup'] - low:.2f}x short")
        prof = profiles(results).get(str(results["threads"]))
        k32, k8 = (kind_rows(prof, "onnx-fp32"), kind_rows(prof, art)) if prof else ({}, {})
        if k32 and set(k32) == set(k8):
            per = ", ".join(f"{KIND_WORDS.get(k, k)} {k32[k]['ms'] / k8[k]['ms']:.2f}x" for k in sorted(k32, key=lambda k: -k32[k]["ms"]))
            miss.append(f"INT8 speed-up per kind of layer in the profile: {per}")
            if "depthwise" in k8:
                tot32 = prof["artifacts"]["onnx-fp32"]["kernel_ms"]
                bound = tot32 / (k8["depthwise"]["ms"] + (tot32 - k32["depthwise"]["ms"]) / 2)
                miss.append(f"with the depthwise convs at their INT8 time and every other kernel exactly 2x faster than FP32, the "
                            f"whole would be {bound:.2f}x")
    return {"goal": f"ORT INT8 ({art}, the bundle's INT8 for this backend and CPU) inference >= 2x faster than the bundle's FP32",
            "measured": f"{results['threads']} threads: {sp:.2f}x ({f(i8, 2)} vs {f(i32, 2)} ms infer p50)"
                        + (f"; 1 thread: {sp1:.2f}x" if sp1 else ""),
            "met": met, "miss": "; ".join(miss)}


def profile_section(results: dict[str, Any]) -> list[str]:
    """Where ONNX Runtime's inference time goes, per kind of Conv layer, from its profiler (nothing for older runs)."""
    profs = profiles(results)
    if not profs:
        failed = [f"{t} thread(s): {p.get('error')}" for t, p in (results.get("profile") or {}).items() if p and "error" in p]
        return ["## Where the inference time goes", "", f"The profiler run failed: {'; '.join(failed)}.", ""] if failed else []
    peak, _ = peak_gflops(results)
    bw = copy_gbps(results)
    L = ["## Where the inference time goes (ONNX Runtime's profiler, per kind of layer)", "",
         "The bundle's ONNX files, batch 1 on one preprocessed photo, one process per thread count; per node the median kernel "
         "time of the timed calls (the profiler itself adds a little: compare `kernels` with `wall`). A float Conv kernel's kind "
         "comes from its own shapes, an INT8 one's from the FP32 layer of the same name; the kernels counted per kind must equal "
         "the graph's layers per kind, else nothing is attributed. MACs are the graph's; GFLOP/s for INT8 are FP32-equivalent; "
         "FLOP/byte is the layer's FLOPs over the fewest float32 bytes it must move (input, output and weights once).", ""]
    if bw:
        L += [f"* Memory copy bandwidth (numpy, one thread, 256 MB, bytes read + written): **{bw:.0f} GB/s**.", ""]
    for threads, prof in profs.items():
        same_threads = threads == str(results["threads"])  # the matmul peak was measured at the run's thread count only
        rows = []
        base = kind_rows(prof, "onnx-fp32")
        for art, a in prof["artifacts"].items():
            kinds = kind_rows(prof, art)
            if not kinds:
                rows.append([f"`{art}`", a.get("kinds_error", "—"), "", f(a["kernel_ms"], 2), "", "", "", "", "", ""])
                continue
            total_macs = sum(k["macs"] for k in kinds.values())
            for kind in sorted(kinds, key=lambda k: -kinds[k]["ms"]):
                k = kinds[kind]
                vs = f"{base[kind]['ms'] / k['ms']:.2f}x" if art != "onnx-fp32" and kind in base else "—"
                rows.append([f"`{art}`", KIND_WORDS.get(kind, kind), str(k["layers"]), f(k["ms"], 2), pct(k["ms"] / a["kernel_ms"]),
                             pct(k["macs"] / total_macs), f(k["gflops"], 0), pct(k["gflops"] / peak) if peak and same_threads else "—",
                             f(k["intensity"], 1), vs])
            top = ", ".join(f"{op} {f(ms, 2)}" for op, ms in list(a["by_op"].items())[:4])
            rows.append([f"`{art}`", f"everything else (kernels {f(a['kernel_ms'], 2)} ms, wall {f(a['wall_ms'], 2)} ms; top ops: {top})", "",
                         f(a.get("other_ms"), 2), pct(a["other_ms"] / a["kernel_ms"]) if a.get("other_ms") is not None else "—", "", "", "", "", ""])
        L += [f"{threads} thread{'s' if threads != '1' else ''}, {prof['runs']} timed calls"
              + ("" if same_threads else " (no `of peak`: the matmul peak was measured at the run's thread count only)") + ":", ""]
        L += _table(["model", "layers", "n", "ms", "of kernel time", "of FLOPs", "GFLOP/s", "of peak", "FLOP/byte", "vs FP32"], rows)
        L += [""]
    why = peak_explanation(results)
    if why:
        L += [f"* ORT FP32 against the matmul peak: {why}.", ""]
    return L


def compute_section(results: dict[str, Any]) -> list[str]:
    """FLOPs per image, the matmul peak, and the fraction of it each ONNX Runtime model reaches."""
    paths = results["paths"]
    peak, peak_where = peak_gflops(results)
    flops = results.get("flops", {})
    L: list[str] = []
    L += ["## Compute: matmul peak and the model's FLOPs", ""]
    if "error" not in flops and flops:
        tflops = _ok(paths, "torch-eager")
        tf = tflops.get("torch_flop_counter_flops") if tflops else None
        L += [f"* FLOPs per image, counted from the FP32 ONNX graph with ONNX shape inference (Conv/Gemm/MatMul MACs x 2; "
              f"element-wise ops, pooling and activations not counted): **{flops['flops'] / 1e9:.3f} GFLOP** "
              f"({', '.join(f'{k} {v / 1e9:.3f} GMAC' for k, v in flops['by_op'].items())}; {flops['nodes_counted']} nodes"
              f"{', unresolved: ' + ', '.join(flops['nodes_unresolved']) if flops['nodes_unresolved'] else ''})."
              + (f" `torch.utils.flop_counter` on `learn.model`: {tf / 1e9:.3f} GFLOP." if tf else "")]
    else:
        L += [f"* FLOPs: not counted ({flops.get('error', 'no result')})."]
    for i, p in enumerate(results.get("peak", [])):
        if "error" in p:
            L += [f"* matmul peak ({'before' if i == 0 else 'after'}): failed: {p['error']}"]
            continue
        parts = ", ".join(f"{v['lib']} {v['n']}: {v['gflops_median']:.0f} (best {v['gflops_best']:.0f})" for v in p["results"].values())
        L += [f"* Dense float32 matmul, {results['threads']} threads, {'before' if i == 0 else 'after'} the paths "
              f"(GFLOP/s, median of repeats): {parts}; numpy BLAS: {p['numpy_blas']}."]
    if peak:
        L += [f"* Peak used below: **{peak:.0f} GFLOP/s** ({peak_where}): the best of the measurements, so fractions are not flattered."]
    if peak and "error" not in flops and flops:
        rows = []
        legacy = (("ORT INT8 bundle s8 (FP32-equivalent GOP/s)", _ok(paths, "ort-int8"), "int8"),
                  ("ORT INT8 u8 (FP32-equivalent GOP/s)", _ok(paths, "ort-int8-u8"), "int8-u8"))
        current = (("ORT INT8 onnx-int8 (FP32-equivalent GOP/s)", _ok(paths, "ort-int8"), "int8"),
                   ("ORT INT8 onnx-int8-vnni (FP32-equivalent GOP/s)", _ok(paths, "ort-int8-vnni"), "int8-vnni"),
                   ("ORT INT8 onnx-int8-qdq-s8 (FP32-equivalent GOP/s)", _ok(paths, "ort-int8-qdq-s8"), "int8-qdq-s8"))
        for label, r, prec in (("ORT FP32", _ok(paths, "ort-fp32"), "fp32"), *(legacy if _legacy(results) else current)):
            if not r:
                continue
            infer = r["batch1"]["stages_ms"]["infer"]["p50"]
            g1 = flops["flops"] / (infer / 1e3) / 1e9
            cells = [label, f(infer, 2), f(g1, 0), pct(g1 / peak)]
            for b in results["batch_sizes"]:
                ms = _batch_infer(results, prec, b)
                cells += [f(ms, 2), pct(flops["flops"] / (ms / 1e3) / 1e9 / peak) if ms else "—"]
            rows.append(cells)
        hdr = ["model", "infer ms (b1)", "GFLOP/s (b1)", "of peak (b1)"]
        for b in results["batch_sizes"]:
            hdr += [f"ms/img b{b}", f"of peak b{b}"]
        L += [""] + _table(hdr, rows)
        L += ["", "Batch 1 inference is the batch-1 series' `infer` stage median; batch 8/32 are tensor -> logits per image from the "
              "experiments process (interleaved).", ""]
    return L


def experiments_section(results: dict[str, Any]) -> list[str]:
    """What was tried (:mod:`kimchi_edge.bench.experiments`): ONNX Runtime, preprocessing, torch and memory variants."""
    ex = results.get("experiments")
    L = ["## What was tried, and its measured effect", ""]
    if not ex or "error" in ex:
        return L + [(f"The experiments process failed: {ex['error']}." if ex else "Not run (`--no-experiments`)."), ""]
    if ex.get("exit_error"):
        L += [f"Note: {ex['exit_error']}; the figures below were complete before it.", ""]
    L += _ort_variants(ex["ort"])
    L += _preprocess_variants(results, ex.get("preprocess", {}))
    L += _torch_variants(ex.get("torch", {}))
    L += _memory_variants(ex.get("memory", {}))
    return L + [""]


def _ort_variants(ort: dict[str, Any]) -> list[str]:
    """ONNX Runtime variants at batch 1 against the runtime's default, re-quantized models, fused op counts."""
    L: list[str] = []
    b1 = ort["batch1"]
    ms = b1["ms"]
    fp_def = next((v for k, v in ms.items() if k.startswith("fp32: runtime default")), None)
    i8_def = next((v for k, v in ms.items() if k.startswith("int8: runtime default")), None)
    rows = []
    for k, v in ms.items():
        ref = fp_def if k.startswith("fp32") else i8_def
        rows.append([k, f(v["p50"], 2), f(v["p90"], 2), f"{v['p50'] / ref['p50']:.2f}x" if ref else "—"])
    mach = b1["machine"]
    L += [f"ONNX Runtime, tensor -> logits at batch 1 on one preprocessed food10 photo, all variants in one process, interleaved "
          f"({b1['rounds']} rounds x {b1['iters']} runs each; other processes used "
          f"{f(mach.get('cores_used_by_other_processes'), 1)} CPUs meanwhile). Ratio < 1 = faster than the runtime's default.", ""]
    L += _table(["variant", "p50 ms", "p90 ms", "vs default"], rows)
    for k, q in ort.get("requantized", {}).items():
        L += [f"* re-quantized here for the comparison: {k}, {q['calibration_images']} calibration images (training split), "
              f"{q['seconds']:.0f} s; speed only (accuracy not scored)."]
    fused = ort.get("fused_ops", {})
    if fused:
        keys = list(next(iter(fused.values())).keys())
        L += ["", "What ONNX Runtime really runs after its graph optimisations (op counts of the optimised INT8 graphs):", ""]
        L += _table(["model", *keys], [[k, *[str(v[c]) for c in keys]] for k, v in fused.items()])
    for n in ort.get("notes", []):
        L += [f"* {n}"]
    return L


def _preprocess_variants(results: dict[str, Any], pre: dict[str, Any]) -> list[str]:
    """Decode / resample / transform variants; sparse-vs-dense resample and reduced-scale decode notes."""
    L: list[str] = []
    if not pre:
        return L
    rows = []
    for block in ("decode", "resample", "transform"):
        for k, v in pre.get(block, {}).get("ms", {}).items():
            rows.append([k, f(v["p50"], 2), f(v["p90"], 2)])
    L += ["", "Preprocessing, same process, interleaved:", ""]
    L += _table(["variant", "p50 ms", "p90 ms"], rows)
    if "resample_max_abs_diff" in pre:
        L += ["", f"* Sparse taps vs dense matrices, both rounded to uint8: max |difference| {pre['resample_max_abs_diff']} (levels; "
              f"float rounding at exact .5 values), {pre['resample_taps'][0]}/{pre['resample_taps'][1]} taps per output row/column. "
              "The match with fastai's own pipeline is what `tests/runtime/test_preprocess_vs_fastai.py` checks."]
    if "phone_size" in pre:
        L += [f"* Reduced-scale decode: a {pre['phone_size'][0]}x{pre['phone_size'][1]} JPEG decodes at "
              f"{pre['phone_decoded_size_fast'][0]}x{pre['phone_decoded_size_fast'][1]} (the smallest libjpeg scale covering the "
              f"{results['preprocessing']['resize'][0]} px resize target)."]
    return L


def _torch_variants(tex: dict[str, Any]) -> list[str]:
    """TorchScript at the configured threads vs 1 thread, or why it was skipped."""
    L: list[str] = []
    if tex.get("ms"):
        L += ["", f"torch, tensor -> logits at batch 1, interleaved ({tex['rounds']} rounds x {tex['iters']} runs; other processes used "
              f"{f(tex['machine'].get('cores_used_by_other_processes'), 1)} CPUs meanwhile):", ""]
        L += _table(["variant", "p50 ms", "p90 ms"], [[k, f(v["p50"], 1), f(v["p90"], 1)] for k, v in tex["ms"].items()])
    elif tex.get("skipped"):
        L += ["", f"* torch thread experiment skipped: {tex['skipped']}"]
    return L


def _memory_variants(mem: dict[str, Any]) -> list[str]:
    """Load time and memory of one ONNX Runtime session per model and optimisation level."""
    L: list[str] = []
    if not mem:
        return L
    L += ["", "Memory and load time of one ONNX Runtime session (fresh process each: import onnxruntime, load, one batch-1 run; "
          "no `runtime` import):", ""]
    L += _table(["model, optimisation level", "import ms", "load ms", "RSS MB", "peak RSS MB"],
                [[k, *(["failed: " + v["error"], "", "", ""] if "error" in v else
                       [f(v["import_ms"], 0), f(v["load_ms"], 0), f(v["rss_mb"], 0), f(v["peak_rss_mb"], 0)])]
                 for k, v in mem.items()])
    return L


def gpu_section(results: dict[str, Any]) -> list[str]:
    """What a GPU run would add, and how to measure it."""
    L: list[str] = []
    L += ["## GPU", "",
          f"No GPU in this run ({results.get('tensorrt')}): TensorRT FP16/INT8, torch/TorchScript on CUDA and fastai training "
          "throughput with/without mixed precision and channels_last are **not measured here**. On a machine with TensorRT and a GPU, "
          "build engines with `kimchi-edge build-engine BUNDLE --fp16` / `--int8` and time them with "
          "`kimchi-edge bench BUNDLE --backend tensorrt`.", ""]
    return L


def load_section(results: dict[str, Any]) -> list[str]:
    """Load average and CPUs used by this path and by other processes during each batch-1 series."""
    paths = results["paths"]
    L: list[str] = []
    L += ["## Load during each path (batch-1 series, all rounds)", ""]
    rows = []
    for name, r in paths.items():
        if "error" in r:
            continue
        mach = r["batch1"]["machine"]
        if mach.get("rounds"):
            mach = {**mach, "loadavg_start": " / ".join(str((m.get("loadavg_start") or [""])[0]) for m in mach["rounds"])}
        n = r["batch1"]["latency_ms"]["n"]
        cpu_ms = mach["cores_used_by_this_process"] * mach["wall_s"] * 1e3 / n if mach.get("cores_used_by_this_process") else None
        rows.append([title(results, name), str(mach.get("loadavg_start")), f(mach.get("cores_used_by_this_process"), 2),
                     f(mach.get("cores_used_by_other_processes"), 2), f(cpu_ms, 1), f(mach.get("wall_s"), 1), f(r.get("seconds"), 0)])
    L += _table(["path", "1-min load average at start (per round)" if results.get("rounds", 1) > 1 else "load average at start", "CPUs used by this path", "CPUs used by other processes", "CPU ms per image",
                 "series s", "process s"], rows)
    L += ["", "CPU ms per image (CPU time of the path's process / images, all its threads) is less sensitive to other processes "
          "than wall time, but includes threads spinning while they wait for work.", ""]
    L += [""]
    return L


def write_report(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write :data:`CHART_NAME` and :data:`DOC_NAME` of ``results`` into ``out_dir``.

    Returns:
        The files written (chart, then markdown).

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = write_chart(results, out_dir / CHART_NAME)
    doc = out_dir / DOC_NAME
    atomic_write_bytes(doc, markdown(results, chart.name).encode("utf-8"))
    return [chart, doc]


def main(argv: list[str] | None = None) -> int:
    """Re-render BENCHMARKS.md and the chart of a saved run, without measuring anything."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m kimchi_edge.bench.report", description=main.__doc__)
    p.add_argument("results", metavar="RESULTS", help=f"{RESULTS_NAME} written by {COMMAND}")
    p.add_argument("--out", metavar="DIR", default=None, help=f"folder for {DOC_NAME} and {CHART_NAME} (default: beside RESULTS)")
    args = p.parse_args(argv)
    try:
        results = json.loads(Path(args.results).read_text(encoding="utf-8"))
        written = write_report(results, Path(args.out) if args.out else Path(args.results).parent)
    except (OSError, ValueError) as exc:
        print(f"kimchi_edge.bench.report: error: {args.results}: {exc}", file=sys.stderr)
        return 1
    except KimchiEdgeError as exc:
        print(f"kimchi_edge.bench.report: error: {exc}", file=sys.stderr)
        return exc.exit_code
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
