"""One measurement in a fresh interpreter: ``python -m kimchi_edge.bench.worker CONFIG.json OUT.json``.

Run by :mod:`kimchi_edge.bench.compare`, one process per inference path, so that import time, load time and
peak memory belong to that path alone.  Nothing heavy is imported before the clock starts: the
module imports the standard library only; each path imports its own stack inside ``load()``, and
:mod:`kimchi_edge.runtime.sysinfo` (percentiles, memory, load average) is imported on first use, after it.
It needs only the installed package: no repository checkout, no ``PYTHONPATH``, any working directory.

Kinds (``config["kind"]``):

* ``path``: one inference path (``fastai``, ``torch-eager``, ``torchscript``, ``ort-fp32``,
  ``ort-int8``, ``ort-int8-qdq-s8``) timed from image bytes to label at batch 1 (per stage), on phone-size photos, and at
  larger batches; cold start; peak RSS; the label of every image.
* ``peak``: dense float32 matmul throughput (numpy and torch) at the configured thread count.
* ``profile``: ONNX Runtime's profiler on the bundle's ONNX artifacts: kernel time per op and per kind of Conv layer.
* ``experiments``: ONNX Runtime and preprocessing variants timed side by side in one process.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()
_T0_WALL = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

PATHS = ("fastai", "torch-eager", "torchscript", "ort-fp32", "ort-int8", "ort-int8-vnni", "ort-int8-qdq-s8")
#: ONNX Runtime path -> the bundle's artifact it runs (``onnx-int8``: the INT8 for ONNX Runtime on CPU; ``onnx-int8-vnni``:
#: the same with 8-bit weights, built on CPUs with VNNI; ``onnx-int8-qdq-s8``: the symmetric INT8 QDQ made for TensorRT,
#: run on ONNX Runtime's CPU kernels for comparison)
ORT_ARTIFACTS = {"ort-fp32": "onnx-fp32", "ort-int8": "onnx-int8", "ort-int8-vnni": "onnx-int8-vnni", "ort-int8-qdq-s8": "onnx-int8-qdq-s8"}


# --------------------------------------------------------------------------- machine state


def _sysinfo() -> Any:
    """:mod:`kimchi_edge.runtime.sysinfo`, imported on first use: after a path's ``load()``, so that importing the
    runtime package counts in that path's cold start, never before its clock."""
    from kimchi_edge.runtime import sysinfo

    return sysinfo


def _cpu_busy_ticks() -> int | None:
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
        v = [int(x) for x in parts]
        # user nice system idle iowait irq softirq steal
        return v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    except (OSError, ValueError, IndexError):
        return None


def _self_ticks() -> int | None:
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


class Phase:
    """Wall time, load average, and how many cores *other* processes used while a phase ran."""

    def __init__(self) -> None:
        self.load_start = _sysinfo().loadavg()
        self.t = time.perf_counter()
        self.busy, self.mine = _cpu_busy_ticks(), _self_ticks()
        self.cpu = time.process_time()

    def done(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t
        out: dict[str, Any] = {"wall_s": wall, "loadavg_start": self.load_start, "loadavg_end": _sysinfo().loadavg(),
                               "cores_used_by_this_process": (time.process_time() - self.cpu) / wall if wall else None}
        busy, mine = _cpu_busy_ticks(), _self_ticks()
        if None not in (busy, mine, self.busy, self.mine) and wall > 0:
            hz = os.sysconf("SC_CLK_TCK")
            out["cores_used_by_other_processes"] = max(0.0, ((busy - self.busy) - (mine - self.mine)) / hz / wall)
        return out


# --------------------------------------------------------------------------- paths
#
# Each path: load() -> None (imports inside), one(data) -> (label, {stage: ms}), many(list) -> labels.
# Stages: decode, preprocess, infer, post (softmax/argmax/label); fastai reports decode (timed apart,
# on the same bytes), infer (forward hooks on learn.model) and the rest as "fastai pipeline".


class FastaiPath:
    """``load_learner`` + ``learn.predict``: what a fastai user runs today."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg

    def load(self) -> dict[str, float]:
        t0 = time.perf_counter()
        import torch
        from fastai.vision.all import load_learner

        from kimchi_edge.runtime.preprocess import decode_image

        t1 = time.perf_counter()
        torch.set_num_threads(self.cfg["threads"])
        learn = load_learner(str(Path(self.cfg["run_dir"]) / "learner.pkl"), cpu=True)
        t2 = time.perf_counter()
        self.torch, self.learn, self.decode_image = torch, learn, decode_image
        self.vocab = [str(v) for v in learn.dls.vocab]
        self._fwd: list[float] = []
        model = learn.model
        model.register_forward_pre_hook(lambda m, i: self._fwd.append(time.perf_counter()))
        model.register_forward_hook(lambda m, i, o: self._fwd.append(time.perf_counter()))
        self.bar = self.cfg.get("fastai_progress_bar", False)
        self.predict_kwargs: dict[str, Any] = {}
        self.note = ""
        return {"import_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3}

    def check(self, data: bytes) -> None:
        """Plain ``learn.predict(bytes)``, as a fastai user calls it; ``rm_type_tfms=0`` only if that raises.

        fastai's ``test_dl`` decides from the type annotation of the learner's decoder
        (``kimchi_edge.train.data.PILImageUpright.create``) whether an item still needs decoding; when that inference
        fails (``TypeError`` for a ``typing.Any`` annotation, ``AssertionError`` for a type it does not list),
        keeping every type transform (``rm_type_tfms=0``, as ``kimchi-edge convert`` does) runs the same decoder.
        """
        try:
            with self._ctx():
                self.learn.predict(data)
        except (TypeError, AssertionError) as exc:
            self.predict_kwargs = {"rm_type_tfms": 0}
            first = " ".join(str(exc).split())[:160]
            self.note = f"learn.predict(bytes) raised {type(exc).__name__} ({first}); timed with rm_type_tfms=0"

    def _ctx(self):
        from contextlib import nullcontext

        return nullcontext() if self.bar else self.learn.no_bar()

    def one(self, data: bytes) -> tuple[str, dict[str, float]]:
        self._fwd.clear()
        t0 = time.perf_counter()
        with self._ctx():
            label, _, probs = self.learn.predict(data, **self.predict_kwargs)
        t1 = time.perf_counter()
        self.last_probs = [float(v) for v in probs]
        infer = (self._fwd[1] - self._fwd[0]) * 1e3 if len(self._fwd) >= 2 else float("nan")
        d0 = time.perf_counter()
        self.decode_image(data)
        decode = (time.perf_counter() - d0) * 1e3
        total = (t1 - t0) * 1e3
        return str(label), {"decode": decode, "fastai pipeline": total - decode - infer, "infer": infer, "total": total}

    def many(self, items: list[bytes]) -> list[str]:
        dl = self.learn.dls.test_dl(items, bs=len(items), num_workers=0, **self.predict_kwargs)
        with self._ctx():
            probs, _ = self.learn.get_preds(dl=dl)
        return [self.vocab[i] for i in probs.argmax(1).tolist()]


class TorchPath:
    """``learn.model`` (eager) or the bundle's TorchScript, fed by the runtime's preprocessing."""

    def __init__(self, cfg: dict[str, Any], scripted: bool):
        self.cfg, self.scripted = cfg, scripted

    def load(self) -> dict[str, float]:
        t0 = time.perf_counter()
        import numpy as np
        import torch

        from kimchi_edge.runtime.manifest import read_manifest
        from kimchi_edge.runtime.preprocess import Preprocessor

        if not self.scripted:
            from fastai.learner import load_learner
        t1 = time.perf_counter()
        torch.set_num_threads(self.cfg["threads"])
        bundle = Path(self.cfg["bundle"])
        manifest = read_manifest(bundle)
        self.labels = list(manifest.labels)
        self.pre = Preprocessor(manifest.preprocessing, fast_decode=self.cfg.get("fast_decode", True))
        if self.scripted:
            art = manifest.artifact("torchscript")
            self.model = torch.jit.load(str(bundle / art.file), map_location="cpu").eval()
        else:
            self.model = load_learner(str(Path(self.cfg["run_dir"]) / "learner.pkl"), cpu=True).model.eval()
        t2 = time.perf_counter()
        self.np, self.torch = np, torch
        return {"import_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3}

    def _forward(self, x: Any) -> Any:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(x))

    def one(self, data: bytes) -> tuple[str, dict[str, float]]:
        t0 = time.perf_counter()
        im = self.pre.decode(data)
        t1 = time.perf_counter()
        x = self.pre.normalize(self.pre.transform(im)[None])
        t2 = time.perf_counter()
        logits = self._forward(x)
        t3 = time.perf_counter()
        label = self.labels[int(logits[0].argmax())]
        t4 = time.perf_counter()
        self.last_probs = self.torch.softmax(logits[0].float(), 0).tolist()
        return label, {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3, "infer": (t3 - t2) * 1e3,
                       "post": (t4 - t3) * 1e3, "total": (t4 - t0) * 1e3}

    def many(self, items: list[bytes]) -> list[str]:
        x = self.pre.normalize(self.np.stack([self.pre(d) for d in items]))
        logits = self._forward(x)
        return [self.labels[i] for i in logits.argmax(1).tolist()]

    def flop_count(self) -> int | None:
        """FLOPs of one 224x224 forward by ``torch.utils.flop_counter`` (a cross-check of the ONNX count)."""
        try:
            from torch.utils.flop_counter import FlopCounterMode
        except ImportError:
            return None
        s = self.pre.spec
        x = self.torch.zeros(1, 3, s.height, s.width)
        counter = FlopCounterMode(display=False)
        with counter, self.torch.inference_mode():
            self.model(x)
        return int(counter.get_total_flops())


class OrtPath:
    """``kimchi_edge.runtime.Classifier`` on the bundle's ONNX artifact (ONNX Runtime, CPU)."""

    def __init__(self, cfg: dict[str, Any], artifact: str):
        self.cfg, self.artifact = cfg, artifact

    def load(self) -> dict[str, float]:
        t0 = time.perf_counter()
        import kimchi_edge.runtime as runtime

        t1 = time.perf_counter()
        self.clf = runtime.Classifier.from_bundle(self.cfg["bundle"], backend="onnxruntime", artifact=self.artifact,
                                                  threads=self.cfg["threads"], fast_decode=self.cfg.get("fast_decode", True),
                                                  allow_ungated=True)  # measured side by side; the report shows each gate verdict
        t2 = time.perf_counter()
        return {"import_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3}

    def one(self, data: bytes) -> tuple[str, dict[str, float]]:
        t0 = time.perf_counter()
        pred = self.clf.predict(data, top_k=1)
        total = (time.perf_counter() - t0) * 1e3
        self.last_probs = [float(v) for v in pred.probabilities]
        st = pred.timings_ms
        return pred.label, {"decode": st["decode"], "preprocess": st["preprocess"], "infer": st["infer"],
                            "post": total - st["decode"] - st["preprocess"] - st["infer"], "total": total}

    def many(self, items: list[bytes]) -> list[str]:
        return [p.label for p in self.clf.predict_batch(items, top_k=1, batch_size=len(items))]

    def info(self) -> dict[str, Any]:
        return {k: v for k, v in self.clf.info.items() if k not in ("labels", "bundle")}


def make_path(cfg: dict[str, Any]) -> Any:
    name = cfg["path"]
    if name == "fastai":
        return FastaiPath(cfg)
    if name in ("torch-eager", "torchscript"):
        return TorchPath(cfg, scripted=name == "torchscript")
    if name.startswith("ort-"):
        return OrtPath(cfg, cfg.get("artifact") or ORT_ARTIFACTS[name])
    raise SystemExit(f"unknown path {name!r}; expected one of {PATHS}")


def _read(files: list[str]) -> list[bytes]:
    return [Path(f).read_bytes() for f in files]


def _series(p: Any, images: list[bytes], warmup: int, passes: int = 1) -> dict[str, Any]:
    for i in range(warmup):
        p.one(images[i % len(images)])
    phase = Phase()
    labels: list[str] = []
    probs: list[list[float]] = []
    stages: dict[str, list[float]] = {}
    for k in range(passes):
        for data in images:
            label, st = p.one(data)
            if k == 0:
                labels.append(label)
                probs.append(p.last_probs)
            for key, v in st.items():
                stages.setdefault(key, []).append(v)
    percentiles = _sysinfo().percentiles
    return {"labels": labels, "probabilities": probs, "latency_ms": percentiles(stages["total"]),
            "stages_ms": {k: percentiles(v) for k, v in stages.items() if k != "total"},
            "stage_samples_ms": {k: v for k, v in stages.items()},
            "machine": phase.done()}


def run_path(cfg: dict[str, Any]) -> dict[str, Any]:
    start_ms = (_T0_WALL - cfg["spawned_at"]) * 1e3 if cfg.get("spawned_at") else None
    p = make_path(cfg)
    cold = p.load()
    first = _read(cfg["images"][:1])[0]
    if hasattr(p, "check"):  # not timed: the first prediction below is
        p.check(first)
    t0 = time.perf_counter()
    p.one(first)
    cold["first_predict_ms"] = (time.perf_counter() - t0) * 1e3
    cold["interpreter_start_ms"] = start_ms
    cold["ready_ms"] = (time.perf_counter() - _T0) * 1e3 + (start_ms or 0.0)
    mem_ready = _sysinfo().memory_mb()
    out: dict[str, Any] = {"path": cfg["path"], "cold_start": cold, "memory_ready_mb": mem_ready, "threads": cfg["threads"]}
    if hasattr(p, "info"):
        out["info"] = p.info()
    if getattr(p, "note", ""):
        out["note"] = p.note
    images = _read(cfg["images"])
    out["images_bytes_mb"] = sum(map(len, images)) / 2**20
    out["batch1"] = _series(p, images, cfg["warmup"])
    if cfg.get("light"):  # batch-1 series only
        out["memory_end_mb"] = _sysinfo().memory_mb()
        return out
    if cfg.get("phone_images"):
        phone = _read(cfg["phone_images"])
        out["phone"] = _series(p, phone, min(2, cfg["warmup"]), passes=cfg.get("phone_passes", 2))
    out["memory_after_batch1_mb"] = _sysinfo().memory_mb()
    batches = {}
    for b in cfg["batch_sizes"]:
        items = [images[i % len(images)] for i in range(b)]
        p.many(items)  # warm-up (allocations for this batch size)
        phase = Phase()
        times = []
        for _ in range(max(1, cfg["batch_iterations"].get(str(b), 2))):
            t0 = time.perf_counter()
            labels = p.many(items)
            times.append((time.perf_counter() - t0) * 1e3)
        batches[str(b)] = {"batch_size": b, "latency_ms": _sysinfo().percentiles(times), "images_per_s": b * len(times) / (sum(times) / 1e3),
                           "labels_match_batch1": sum(a == c for a, c in zip(labels, out["batch1"]["labels"])) / b,
                           "machine": phase.done()}
    out["batches"] = batches
    out["memory_end_mb"] = _sysinfo().memory_mb()
    if cfg["path"] == "torch-eager" and hasattr(p, "flop_count"):
        out["torch_flop_counter_flops"] = p.flop_count()
    return out


# --------------------------------------------------------------------------- matmul peak


def run_peak(cfg: dict[str, Any]) -> dict[str, Any]:
    """Dense float32 matmul GFLOP/s (numpy's BLAS and torch) at ``threads`` threads."""
    import numpy as np
    import torch

    torch.set_num_threads(cfg["threads"])
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {}
    for n, reps in cfg.get("sizes", [[2048, 12], [4096, 3]]):
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        flop = 2.0 * n ** 3
        for lib, fn in (("numpy", lambda: a @ b), ("torch", lambda: torch.mm(ta, tb))):
            fn()
            phase = Phase()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            ts.sort()
            results[f"{lib}-{n}"] = {"lib": lib, "n": n, "reps": reps, "gflops_median": flop / ts[len(ts) // 2] / 1e9,
                                     "gflops_best": flop / ts[0] / 1e9, "machine": phase.done()}
    blas = "unknown"
    try:
        cfgs = np.show_config(mode="dicts")
        blas = cfgs.get("Build Dependencies", {}).get("blas", {}).get("name", "unknown")
    except Exception:  # older numpy: no dicts mode
        pass
    best = max(results.values(), key=lambda r: r["gflops_median"])
    return {"results": results, "numpy_blas": blas, "torch_mkldnn": bool(torch.backends.mkldnn.is_available()),
            "peak_gflops": best["gflops_median"], "peak_from": f"{best['lib']} {best['n']}x{best['n']} (median of {best['reps']})",
            "copy_gbps": copy_bandwidth()}


def copy_bandwidth(mb: int = 256, reps: int = 7) -> dict[str, float]:
    """Main-memory bandwidth as one thread of numpy sees it: a ``mb`` MB float32 copy, bytes read + written per second."""
    import numpy as np

    a = np.ones(mb * 2**20 // 4, dtype=np.float32)
    b = np.empty_like(a)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return {"mb": mb, "median": 2 * a.nbytes / ts[len(ts) // 2] / 1e9, "best": 2 * a.nbytes / ts[0] / 1e9}


#: ONNX Runtime's names for the float kernels that run a model's Conv nodes (plain, fused with an activation, NHWC)...
FLOAT_CONV_KERNELS = ("Conv", "FusedConv", "NhwcConv", "NhwcFusedConv")
#: ...and every Conv kernel, quantized ones included
CONV_KERNELS = (*FLOAT_CONV_KERNELS, "QLinearConv", "ConvInteger")


def run_profile(cfg: dict[str, Any]) -> dict[str, Any]:
    """Where ONNX Runtime's inference time goes, per kind of Conv (:func:`kimchi_edge.bench.flops.conv_layers`).

    Each artifact runs ``warmup + runs`` times at batch 1 on one preprocessed real photo with ONNX Runtime's profiler on;
    per node the median kernel time of the last ``runs`` calls is kept.  The Conv kernels are attributed to a kind of
    layer by :func:`profile_summary` (an INT8 kernel to the FP32 layer of the same name); where that fails, only the
    per-op totals are reported.
    """
    from kimchi_edge.runtime.manifest import read_manifest
    from kimchi_edge.runtime.preprocess import Preprocessor

    from .flops import conv_layers

    bundle = Path(cfg["bundle"])
    manifest = read_manifest(bundle)
    x = Preprocessor(manifest.preprocessing)(Path(cfg["images"][0]).read_bytes())[None]
    layers = conv_layers(bundle / manifest.artifact("onnx-fp32").file)
    runs, warmup = int(cfg.get("runs", 40)), int(cfg.get("warmup", 10))
    out: dict[str, Any] = {"threads": cfg["threads"], "runs": runs, "layers": [{k: v for k, v in c.items() if k != "output"} for c in layers],
                           "artifacts": {}}
    for name in cfg["artifacts"]:
        out["artifacts"][name] = profile_onnx(bundle / manifest.artifact(name).file, x, layers, threads=cfg["threads"], runs=runs, warmup=warmup)
    return out


def profile_onnx(path: str | Path, x: Any, layers: list[dict[str, Any]], *, threads: int, runs: int = 40, warmup: int = 10) -> dict[str, Any]:
    """One ONNX file under ONNX Runtime's profiler (CPU, batch ``x``): see :func:`run_profile` and :func:`profile_summary`."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="kimchi-bench-prof-") as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        walls = []
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            sess.run(None, feed)
            if i >= warmup:
                walls.append((time.perf_counter() - t0) * 1e3)
        events = json.loads(Path(sess.end_profiling()).read_text(encoding="utf-8"))
        del sess
    return profile_summary(events, layers, runs, walls)


def _dims(shape_entry: dict[str, list[int]] | None) -> list[int]:
    """``{"float": [1, 32, 112, 112]}`` (one entry of the profiler's ``input_type_shape``) -> ``[1, 32, 112, 112]``."""
    return list(next(iter(shape_entry.values()), [])) if shape_entry else []


def conv_kind_from_event(args: dict[str, Any]) -> str | None:
    """The kind (:func:`kimchi_edge.bench.flops.conv_kind`) of a float Conv kernel, from its own profiler event (None when
    not readable).

    ONNX Runtime lists a float Conv's inputs as (X, W, B...), NCHW (NHWC for its ``Nhwc*`` kernels).  Only the kind is
    read here: in its NCHWc layout the shapes are padded to whole channel blocks (a 4-channel 1x1 conv reports 8), so
    MACs come from the graph instead.
    """
    from .flops import conv_kind

    ins = args.get("input_type_shape") or []
    if args.get("op_name") not in FLOAT_CONV_KERNELS or len(ins) < 2:
        return None
    x, w = _dims(ins[0]), _dims(ins[1])
    if len(x) != 4 or len(w) != 4:
        return None
    return conv_kind(w, x[3] if args["op_name"].startswith("Nhwc") else x[1])


def profile_summary(events: list[dict[str, Any]], layers: list[dict[str, Any]], runs: int, walls: list[float]) -> dict[str, Any]:
    """Per-node medians of the last ``runs`` kernel times -> totals per op and per Conv kind (see :func:`run_profile`).

    A float Conv kernel's kind is read from its own event's shapes (:func:`conv_kind_from_event`); a quantized one's
    (``QLinearConv``: its weights are pre-packed, so the event has no weight shape) from the FP32 layer of the same name in
    ``layers`` (the quantizer keeps node names; ONNX Runtime's QDQ fusion appends ``_token_N``).  MACs and bytes per kind
    are the graph's (``layers``), and the kernels counted per kind must equal the graph's layers per kind.  When a Conv
    kernel can be attributed to no kind, or the counts differ, nothing is attributed (``kinds_error`` says why) rather
    than guessed.
    """
    import re
    import statistics

    per_node: dict[str, list[float]] = {}
    args_of: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        per_node.setdefault(name, []).append(e["dur"] / 1e3)
        args_of[name] = e.get("args", {})
    node_ms = {n: statistics.median(v[-runs:]) for n, v in per_node.items()}
    by_op: dict[str, float] = {}
    for n, ms in node_ms.items():
        op = args_of[n].get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + ms
    result: dict[str, Any] = {"wall_ms": statistics.median(walls), "kernel_ms": sum(node_ms.values()),
                              "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}
    kind_of = {layer["name"]: layer["kind"] for layer in layers}
    kinds: dict[str, dict[str, float]] = {}
    for n in per_node:
        if args_of[n].get("op_name") not in CONV_KERNELS:
            continue
        kind = conv_kind_from_event(args_of[n]) or kind_of.get(re.sub(r"_token_\d+$", "", n))
        if kind is None:
            result["kinds_error"] = f"{args_of[n].get('op_name')} kernel {n} matches no Conv of the FP32 graph: not attributed"
            return result
        k = kinds.setdefault(kind, {"ms": 0.0, "layers": 0, "macs": 0, "min_bytes": 0})
        k["ms"] += node_ms[n]
        k["layers"] += 1
    graph = {}
    for layer in layers:  # MACs and bytes of each kind: exact, from the graph
        g = graph.setdefault(layer["kind"], {"layers": 0, "macs": 0, "min_bytes": 0})
        g["layers"] += 1
        g["macs"] += layer["macs"]
        g["min_bytes"] += layer["min_bytes"]
    ran = {k: v["layers"] for k, v in kinds.items()}
    if ran != {k: g["layers"] for k, g in graph.items()}:
        result["kinds_error"] = f"Conv kernels per kind {ran} differ from the FP32 graph's {({k: g['layers'] for k, g in graph.items()})}: not attributed"
        return result
    for k, v in kinds.items():
        v["macs"], v["min_bytes"] = graph[k]["macs"], graph[k]["min_bytes"]
    result["kinds"] = kinds
    result["other_ms"] = result["kernel_ms"] - sum(k["ms"] for k in kinds.values())
    return result


# --------------------------------------------------------------------------- entry point


def main(argv: list[str]) -> int:
    cfg = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    kind = cfg.get("kind", "path")
    if kind == "path":
        result = run_path(cfg)
    elif kind == "peak":
        result = run_peak(cfg)
    elif kind == "profile":
        result = run_profile(cfg)
    elif kind == "experiments":
        from .experiments import run_experiments

        result = run_experiments(cfg)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    out = Path(argv[1])
    part = out.with_name(out.name + ".part")
    part.write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
    part.replace(out)  # complete or absent: a crash while tearing down (see experiments.py) cannot leave half a file
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

