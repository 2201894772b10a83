"""What was tried to make the runtime faster, each variant timed side by side in ONE process.

Run by :mod:`kimchi_edge.bench.worker` (``kind: experiments``).  Variants of the same thing are interleaved
round by round (A B C A B C ...), so a burst of load from another process hits them all alike; the
report gives each variant's median and its ratio to the runtime's default.

* ONNX Runtime, tensor -> logits at batch 1 on a real preprocessed photo: graph optimisation level
  (ALL includes the NCHWc layout transform), 1 vs 2 intra-op threads, thread spinning off, IO binding
  with a pre-allocated output (buffer reuse), a float NCHW input without the uint8/normalisation
  prefix; INT8 as the bundle's own files (``onnx-int8`` for ONNX Runtime on CPU, ``onnx-int8-qdq-s8`` made for
  TensorRT), plus dedicated QDQ pairs and QOperator, re-quantized here from the FP32 model
  (:mod:`kimchi_edge.bench.quant`, speed only), and which ops ONNX Runtime really fused.
* ONNX Runtime at batch 8/32 (tensor -> logits, per image).
* Preprocessing: full-size vs reduced-scale JPEG decode (``fast_decode``) on a phone-size photo,
  and the batch resample as sparse taps (the runtime) vs dense matrix products through BLAS (what it
  did before).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from kimchi_edge.runtime.sysinfo import percentiles

from .worker import Phase

#: ONNX Runtime sessions kept alive until the process exits (see the end of :func:`ort_experiments`).
_SESSIONS: list[Any] = []


def _session(path: str | Path, threads: int, level: str = "ALL", spinning: bool = True) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = {
        "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _runner(sess: Any, feed: Any) -> Callable[[], Any]:
    name = sess.get_inputs()[0].name
    out = sess.get_outputs()[0].name
    return lambda: sess.run([out], {name: feed})


def _io_binding_runner(sess: Any, feed: Any) -> Callable[[], Any]:
    """Input bound once, output written into one pre-allocated buffer on every call."""
    import numpy as np
    import onnxruntime as ort

    n = feed.shape[0]
    classes = sess.get_outputs()[0].shape[-1]
    out = np.empty((n, classes), dtype=np.float32)
    binding = sess.io_binding()
    binding.bind_ortvalue_input(sess.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(feed))
    binding.bind_output(sess.get_outputs()[0].name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
    return lambda: sess.run_with_iobinding(binding)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, iters: int, warmup: int = 2) -> dict[str, Any]:
    """Time every function ``rounds x iters`` times, interleaving the functions round by round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    phase = Phase()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {"ms": {k: percentiles(v) for k, v in times.items()}, "machine": phase.done(), "rounds": rounds, "iters": iters}


def _float_input_model(fp32: Path, out: Path, height: int, width: int) -> None:
    """The FP32 model fed at its first Conv: float NCHW normalised input, no Cast/scale/Transpose prefix.

    ``Shape`` nodes that read the batch size from the uint8 input read it from the new input instead.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(fp32))
    g = model.graph
    image = g.input[0]
    first = next(n for n in g.node if n.op_type == "Conv")
    first.input[0] = "x"
    for n in g.node:
        if n.op_type == "Shape" and n.input[0] == image.name:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if attrs.get("start", 0) != 0 or attrs.get("end") != 1:
                raise ValueError("a Shape node reads more than the batch size of the uint8 input")
            n.input[0] = "x"
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
    if image.name in needed:
        raise ValueError(f"{image.name} is still needed after the first Conv")
    del g.node[:]
    g.node.extend(reversed(keep))
    g.input.remove(image)
    g.input.insert(0, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, height, width]))
    onnx.save(model, str(out))


def fused_ops(path: str | Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime really runs (after its optimisations) for an INT8 model."""
    import collections

    import onnx

    with tempfile.TemporaryDirectory(prefix="kimchi-bench-opt-") as tmp:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        counts = collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return {k: int(counts.get(k, 0)) for k in ("QLinearConv", "Conv", "QuantizeLinear", "DequantizeLinear", "Relu", "Transpose")}


def _int8_words(art: Any) -> str:
    """``"u8 activations, for onnxruntime-cpu"``: what an INT8 artifact is, from its manifest entry."""
    act = str(art.details.get("activations", "int8 symmetric"))  # bundles from before targets: the symmetric s8 recipe
    return f"{'u8' if act.startswith('uint8') else 's8'} activations" + (f", for {art.target}" if art.target else "")


def ort_experiments(cfg: dict[str, Any], tmp: Path) -> dict[str, Any]:
    import numpy as np

    from kimchi_edge.runtime import sysinfo
    from kimchi_edge.runtime.manifest import read_manifest
    from kimchi_edge.runtime.preprocess import Preprocessor

    bundle = Path(cfg["bundle"])
    manifest = read_manifest(bundle)
    spec = manifest.preprocessing
    fp32 = bundle / manifest.artifact("onnx-fp32").file
    int8 = bundle / manifest.artifact("onnx-int8").file
    names = {a.name for a in manifest.artifacts}
    qdq_s8 = bundle / manifest.artifact("onnx-int8-qdq-s8").file if "onnx-int8-qdq-s8" in names else None
    vnni = bundle / manifest.artifact("onnx-int8-vnni").file if "onnx-int8-vnni" in names and sysinfo.cpu_has_vnni() else None
    int8_what = _int8_words(manifest.artifact("onnx-int8"))
    pre = Preprocessor(spec)
    x1 = pre(Path(cfg["images"][0]).read_bytes())[None]
    th = cfg["threads"]
    notes: list[str] = []

    fns: dict[str, Callable[[], Any]] = {}
    fns[f"fp32: runtime default (ORT_ENABLE_ALL, {th} threads)"] = _runner(_session(fp32, th), x1)
    fns["fp32: ORT_ENABLE_EXTENDED (no NCHWc layout transform)"] = _runner(_session(fp32, th, "EXTENDED"), x1)
    fns["fp32: ORT_ENABLE_BASIC"] = _runner(_session(fp32, th, "BASIC"), x1)
    fns["fp32: ORT_DISABLE_ALL"] = _runner(_session(fp32, th, "DISABLE_ALL"), x1)
    fns["fp32: 1 intra-op thread"] = _runner(_session(fp32, 1), x1)
    fns["fp32: thread spinning off"] = _runner(_session(fp32, th, spinning=False), x1)
    fns["fp32: IO binding, pre-allocated output"] = _io_binding_runner(_session(fp32, th), x1)
    try:
        float_model = tmp / "float_input.onnx"
        _float_input_model(fp32, float_model, spec.height, spec.width)
        xf = pre.normalize(x1)
        fns["fp32: float NCHW input (no uint8/normalise/transpose prefix)"] = _runner(_session(float_model, th), xf)
    except Exception as exc:  # onnx.utils can fail on unusual graphs; the rest still runs
        notes.append(f"float-input variant skipped: {type(exc).__name__}: {exc}")
    fns[f"int8: runtime default (bundle onnx-int8, {int8_what}, ORT_ENABLE_ALL)"] = _runner(_session(int8, th), x1)
    fns["int8: onnx-int8, ORT_ENABLE_EXTENDED"] = _runner(_session(int8, th, "EXTENDED"), x1)
    fns["int8: onnx-int8, 1 intra-op thread"] = _runner(_session(int8, 1), x1)
    if vnni is not None:
        fns["int8: bundle onnx-int8-vnni (8-bit weights, for VNNI CPUs)"] = _runner(_session(vnni, th), x1)
        fns["int8: onnx-int8-vnni, 1 intra-op thread"] = _runner(_session(vnni, 1), x1)
    quant: dict[str, Any] = {}
    if qdq_s8 is not None:
        fns["int8: bundle onnx-int8-qdq-s8 (TensorRT's file, s8 activations)"] = _runner(_session(qdq_s8, th), x1)
        fns["int8: onnx-int8-qdq-s8, 1 intra-op thread"] = _runner(_session(qdq_s8, 1), x1)
    else:
        notes.append("the bundle has no onnx-int8-qdq-s8 (converted before INT8 was written per target)")
    calib = (cfg.get("calibration_images") or [])[:16]
    if calib:
        from .quant import requantize

        for fmt, act, ded, label in (("QDQ", "int8", True, "QDQ s8 + DedicatedQDQPair"),
                                     ("QOperator", "uint8", False, "QOperator (QLinearConv), u8 activations"),
                                     ("QOperator", "int8", False, "QOperator (QLinearConv), s8 activations")):
            path = tmp / f"int8_{fmt}_{act}_{int(ded)}.onnx"
            try:
                quant[label] = requantize(fp32, path, calib, spec, fmt=fmt, activations=act, dedicated_qdq=ded)
                fns[f"int8: {label} (re-quantized here)"] = _runner(_session(path, th), x1)
            except Exception as exc:
                notes.append(f"int8 {label} skipped: {type(exc).__name__}: {str(exc)[:200]}")
    else:
        notes.append("no calibration images: the re-quantized INT8 variants were skipped")
    fused = {}
    for label, path in ((f"bundle onnx-int8 ({int8_what})", int8), ("bundle onnx-int8-vnni (8-bit weights, for VNNI CPUs)", vnni),
                        ("bundle onnx-int8-qdq-s8 (for TensorRT)", qdq_s8)):
        if path:
            fused[label] = fused_ops(path)
    b1 = interleaved(fns, cfg.get("rounds", 3), cfg.get("iters", 8))

    # batches: tensor -> logits per image
    imgs = [pre(Path(f).read_bytes()) for f in cfg["images"][:8]]
    batch_fns: dict[str, Callable[[], Any]] = {}
    s32, s8 = _session(fp32, th), _session(int8, th)
    for b in cfg.get("batch_sizes", [8, 32]):
        xb = np.stack([imgs[i % len(imgs)] for i in range(b)])
        batch_fns[f"fp32 batch {b}"] = _runner(s32, xb)
        batch_fns[f"int8 batch {b}"] = _runner(s8, xb)
    batch_fns["fp32 batch 1"] = _runner(s32, x1)
    batch_fns["int8 batch 1"] = _runner(s8, x1)
    if vnni is not None:
        sv8 = _session(vnni, th)
        for b in cfg.get("batch_sizes", [8, 32]):
            xb = np.stack([imgs[i % len(imgs)] for i in range(b)])
            batch_fns[f"int8-vnni batch {b}"] = _runner(sv8, xb)
    if qdq_s8 is not None:
        sq8 = _session(qdq_s8, th)
        for b in cfg.get("batch_sizes", [8, 32]):
            xb = np.stack([imgs[i % len(imgs)] for i in range(b)])
            batch_fns[f"int8-qdq-s8 batch {b}"] = _runner(sq8, xb)
    batches = interleaved(batch_fns, cfg.get("batch_rounds", 2), cfg.get("batch_iters", 3), warmup=1)
    # The sessions live until the process ends: with onnxruntime 1.31.1 on an AVX2-only CPU, destroying the re-quantized
    # variants' sessions after the timing rounds crashed the process (SIGSEGV), which used to lose every experiment.
    # Kept, a crash can only come at exit, after the worker wrote its results (and ``run_worker`` says it happened).
    _SESSIONS.append((fns, batch_fns))
    return {"batch1": b1, "batches": batches, "requantized": quant, "fused_ops": fused, "notes": notes}


def _dense_resample(arr: Any, th: int, tw: int, spec: Any) -> Any:
    """The runtime's previous batch resample: dense matrix products through BLAS."""
    import numpy as np

    from kimchi_edge.runtime.preprocess import batch_resample_matrices

    rows, cols_t = batch_resample_matrices(th, tw, spec.height, spec.width, spec.batch_square, spec.batch_crop)
    y = np.tensordot(rows, arr.astype(np.float32), axes=(1, 0))
    y = np.einsum("hwc,wk->hkc", y, cols_t, optimize=True)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def preprocess_experiments(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    from kimchi_edge.runtime.manifest import read_manifest
    from kimchi_edge.runtime.preprocess import Preprocessor, batch_resample_taps, fastai_crop_box, resample

    spec = read_manifest(Path(cfg["bundle"])).preprocessing
    fast, full = Preprocessor(spec, fast_decode=True), Preprocessor(spec, fast_decode=False)
    food = Path(cfg["images"][0]).read_bytes()
    phone = Path(cfg["phone_images"][0]).read_bytes() if cfg.get("phone_images") else food
    fns: dict[str, Callable[[], Any]] = {
        "decode phone photo, full size": lambda: full.decode(phone),
        "decode phone photo, reduced-scale (fast_decode)": lambda: fast.decode(phone),
        "decode food10 photo (512 px)": lambda: fast.decode(food),
    }
    out: dict[str, Any] = {"decode": interleaved(fns, cfg.get("rounds", 3), cfg.get("pre_iters", 5))}
    with Image.open(Path(cfg["phone_images"][0]) if cfg.get("phone_images") else Path(cfg["images"][0])) as im0:
        out["phone_size"] = list(im0.size)
    out["phone_decoded_size_fast"] = list(fast.decode(phone).size)
    if spec.batch_resize:
        im = fast.decode(food)
        tw, th = spec.resize_width, spec.resize_height
        if spec.resize_method == "crop":
            im = im.crop(fastai_crop_box(im.width, im.height, tw, th))
        arr = np.asarray(im.resize((tw, th), Image.BILINEAR), dtype=np.uint8)
        taps = batch_resample_taps(th, tw, spec.height, spec.width, spec.batch_square, spec.batch_crop)
        rs = {
            f"batch resample: sparse taps (runtime, {spec.dtype} out)": lambda: resample(arr, taps, spec.dtype),
            "batch resample: dense BLAS matrix products (before, uint8 out)": lambda: _dense_resample(arr, th, tw, spec),
        }
        out["resample"] = interleaved(rs, cfg.get("rounds", 3), cfg.get("pre_iters", 5) * 2)
        a, b = resample(arr, taps, "uint8"), _dense_resample(arr, th, tw, spec)
        out["resample_max_abs_diff"] = int(np.abs(a.astype(int) - b.astype(int)).max())
        out["resample_taps"] = [int(taps[0][0].shape[1]), int(taps[1][0].shape[1])]
        full_pre = {
            "transform food10 photo (crop + PIL resize + resample)": lambda: fast.transform(fast.decode(food)),
        }
        out["transform"] = interleaved(full_pre, 1, cfg.get("pre_iters", 5) * 2)
    return out


#: A fresh interpreter: import ONNX Runtime, load one model at one optimisation level, run it once; memory.
#: No ``kimchi_edge.runtime`` import (it would add Pillow and the runtime to the figures): the memory probe,
#: :mod:`kimchi_edge.runtime.sysinfo`, is loaded from its file (argv[6]) on its own, after the measurements.
MEMORY_SNIPPET = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, onnxruntime as ort
t1 = time.perf_counter()
path, level, threads, h, w, sysinfo_file = sys.argv[1:7]
o = ort.SessionOptions()
o.log_severity_level = 3
o.intra_op_num_threads, o.inter_op_num_threads = int(threads), 1
o.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
t2 = time.perf_counter()
inp = s.get_inputs()[0]
s.run(None, {inp.name: np.zeros((1, int(h), int(w), 3), np.uint8 if "uint8" in inp.type else np.float32)})
import importlib.util
spec = importlib.util.spec_from_file_location("_kimchi_edge_sysinfo", sysinfo_file)
sysinfo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sysinfo)
mem = sysinfo.memory_mb()
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3, "rss_mb": mem.get("VmRSS"), "peak_rss_mb": mem.get("VmHWM")}))
"""


def memory_experiments(cfg: dict[str, Any]) -> dict[str, Any]:
    """Load time and memory of one ONNX Runtime session per model/optimisation level, each in a fresh process."""
    import json
    import subprocess
    import sys

    from kimchi_edge.runtime import sysinfo
    from kimchi_edge.runtime.manifest import read_manifest

    bundle = Path(cfg["bundle"])
    manifest = read_manifest(bundle)
    spec = manifest.preprocessing
    models = [("fp32", bundle / manifest.artifact("onnx-fp32").file), ("int8 bundle onnx-int8", bundle / manifest.artifact("onnx-int8").file)]
    if "onnx-int8-vnni" in {a.name for a in manifest.artifacts} and sysinfo.cpu_has_vnni():
        models.append(("int8 bundle onnx-int8-vnni", bundle / manifest.artifact("onnx-int8-vnni").file))
    if "onnx-int8-qdq-s8" in {a.name for a in manifest.artifacts}:
        models.append(("int8 bundle onnx-int8-qdq-s8", bundle / manifest.artifact("onnx-int8-qdq-s8").file))
    out: dict[str, Any] = {}
    for label, path in models:
        for level in ("ORT_ENABLE_ALL", "ORT_ENABLE_EXTENDED"):
            if label != "fp32" and level != "ORT_ENABLE_ALL":
                continue
            proc = subprocess.run([sys.executable, "-c", MEMORY_SNIPPET, str(path), level, str(cfg["threads"]), str(spec.height),
                                   str(spec.width), sysinfo.__file__], capture_output=True, text=True, timeout=300)
            key = f"{label}, {level}"
            if proc.returncode != 0:
                out[key] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
            else:
                out[key] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def torch_experiments(cfg: dict[str, Any]) -> dict[str, Any]:
    """TorchScript tensor -> logits at batch 1 with the configured threads vs 1 thread, interleaved.

    The fastai baseline and torch eager run the same kernels; this shows how much of their time is
    the thread count under the current load (OpenMP threads spin while a sibling is descheduled).
    """
    import torch

    from kimchi_edge.runtime.manifest import read_manifest
    from kimchi_edge.runtime.preprocess import Preprocessor

    bundle = Path(cfg["bundle"])
    manifest = read_manifest(bundle)
    if not any(a.name == "torchscript" for a in manifest.artifacts):
        return {"skipped": "the bundle has no TorchScript artifact"}
    pre = Preprocessor(manifest.preprocessing)
    x = torch.from_numpy(pre.normalize(pre(Path(cfg["images"][0]).read_bytes())[None]))
    model = torch.jit.load(str(bundle / manifest.artifact("torchscript").file), map_location="cpu").eval()
    th = cfg["threads"]

    def with_threads(n: int) -> Callable[[], Any]:
        def run() -> Any:
            torch.set_num_threads(n)
            with torch.inference_mode():
                return model(x)
        return run

    fns = {f"TorchScript: {th} threads (as in the paths)": with_threads(th), "TorchScript: 1 thread": with_threads(1)}
    out = interleaved(fns, cfg.get("rounds", 3), cfg.get("torch_iters", 4))
    torch.set_num_threads(th)
    return out


def run_experiments(cfg: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kimchi-bench-") as tmp:
        t0 = time.perf_counter()
        result = {"ort": ort_experiments(cfg, Path(tmp))}
        result["preprocess"] = preprocess_experiments(cfg)
        result["memory"] = memory_experiments(cfg)
        try:
            result["torch"] = torch_experiments(cfg)
        except ImportError as exc:  # runtime-only install
            result["torch"] = {"skipped": f"torch not importable: {exc}"}
        result["seconds"] = time.perf_counter() - t0
    return result
