"""FP32 ONNX -> INT8 QDQ ONNX with ONNX Runtime static quantization, one artifact per target engine.

Calibration images come from the *training* split (never the validation images the gate scores on),
stratified by class, and go through :class:`kimchi_edge.runtime.preprocess.Preprocessor` — the same code that
feeds the model at inference time — so the calibrated ranges are those the deployed model sees.

Targets (:data:`RECIPES`): ``onnxruntime-cpu`` (``onnx-int8``: uint8 activations, 7-bit int8 weights — what ONNX
Runtime's x86-64 kernels run as integer convolutions on every CPU), ``onnxruntime-cpu-vnni`` (``onnx-int8-vnni``: the
same with full 8-bit weights, built and gated only on a CPU with VNNI-class dot products, which do not saturate) and
``tensorrt`` (``onnx-int8-qdq-s8``: symmetric int8 activations, the explicit-quantization graph TensorRT expects).
A slice of the calibration images is held back: each calibration method is scored by top-1 agreement with FP32 on
it, with and without bias correction (:func:`bias_correct`: each layer's bias absorbs the mean output shift its rounded
weights cause), and the best is kept; if even that misses the agreement floor, the most sensitive layers stay in float
(the fewest that reach it).  Everything in front of the network's first
Conv/MatMul/Gemm (cast, resample, normalisation, layout) stays in float.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kimchi_edge.runtime.fsutil import atomic_write_bytes
from kimchi_edge.runtime.manifest import TARGET_ORT_CPU, TARGET_ORT_CPU_VNNI, TARGET_TENSORRT, ModelMeta
from kimchi_edge.runtime.preprocess import Preprocessor

from .errors import ConversionError
from .onnx_export import INPUT_NAME, check_onnx_model, set_metadata

METHODS = ("minmax", "entropy", "percentile")
#: ``--calibration``: ``auto`` = every method, the best on the held-back images
CALIBRATION_CHOICES = ("auto",) + METHODS
CPU_TARGET = TARGET_ORT_CPU
VNNI_TARGET = TARGET_ORT_CPU_VNNI
TENSORRT_TARGET = TARGET_TENSORRT
#: held back from calibration to choose the method: this fraction of the calibration images, at least HOLDOUT_MIN
HOLDOUT_FRACTION = 0.25
HOLDOUT_MIN = 16
#: at most this many sensitive layers are kept in float
MAX_FLOAT_NODES = 8
#: held-back images the layer sensitivity is measured on
SENSITIVITY_IMAGES = 8
SQNR_CAP_DB = 60.0


def _progress(total: int, desc: str, quiet: bool) -> Any:
    from .progress import progress

    return progress(total=total, desc=desc, quiet=quiet, unit="img")


class ImageCalibrationReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over image files.

    Args:
        files: calibration images.
        preprocessor: the runtime's preprocessing for the bundle.
        input_name: the model input name.
        batch_size: images per calibration batch.
        quiet: no progress bar.
    """

    def __init__(self, files: Sequence[str | Path], preprocessor: Preprocessor, *, input_name: str = INPUT_NAME, batch_size: int = 16, quiet: bool = False):
        self.files = list(files)
        self.pre = preprocessor
        self.input_name = input_name
        self.batch_size = max(1, int(batch_size))
        self.quiet = quiet
        self._pos = 0
        self._bar = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos == 0 and self._bar is None:
            self._bar = _progress(len(self.files), "INT8 calibration", self.quiet)
        if self._pos >= len(self.files):
            if self._bar is not None:
                self._bar.close()
            return None
        chunk = self.files[self._pos : self._pos + self.batch_size]
        self._pos += len(chunk)
        batch = self.pre.batch(chunk)
        if self._bar is not None:
            self._bar.update(len(chunk))
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._pos = 0
        self._bar = None

    def __len__(self) -> int:
        return len(self.files)


def _float_prefix_nodes(model: Any) -> list[str]:
    """Names of the nodes in front of the network (cast, resample, normalisation, layout): kept in float.

    The network starts at its first convolution; a model without any starts at its first MatMul/Gemm.  So a
    resample written as matrix products in front of a CNN stays float too (nodes are in topological order).
    """
    ops = {n.op_type for n in model.graph.node}
    first = ("Conv", "ConvTranspose") if ops & {"Conv", "ConvTranspose"} else ("MatMul", "Gemm")
    out = []
    for node in model.graph.node:
        if node.op_type in first:
            break
        out.append(node.name)
    return [n for n in out if n]


@dataclass(frozen=True)
class Int8Recipe:
    """How one INT8 artifact is quantized, and which engine it is for (``Artifact.target``)."""

    artifact: str  # the artifact name in the manifest
    file: str  # its file in the bundle
    target: str  # CPU_TARGET | VNNI_TARGET | TENSORRT_TARGET
    activation_type: str  # "uint8" | "int8"
    symmetric_activations: bool
    reduce_range: bool  # 7-bit weights
    why: str
    #: built and gated only on a CPU with VNNI-class integer dot products (``sysinfo.cpu_has_vnni``), where it runs
    needs_vnni: bool = False

    def unbuildable_reason(self, vnni: bool | None = None) -> str:
        """'' when this CPU can build and gate the recipe (``vnni``: probed when None); else why not."""
        from kimchi_edge.runtime import sysinfo

        if self.needs_vnni and not (sysinfo.cpu_has_vnni() if vnni is None else vnni):
            return (f"{self.artifact} (INT8 for x86-64 CPUs with VNNI) not built: this CPU has no "
                    f"{'/'.join(sysinfo.VNNI_FLAGS)}, so its gate here would measure saturated kernels (onnx-int8, "
                    "7-bit weights, is built and runs everywhere; convert on such a CPU to get this one too)")
        return ""

    def settings(self) -> dict[str, Any]:
        """The recipe in words, for the manifest."""
        return {
            "target": self.target,
            "activations": f"{self.activation_type} {'symmetric' if self.symmetric_activations else 'asymmetric'}",
            "weights": "int8 symmetric per-channel" + (", 7-bit range (reduce_range)" if self.reduce_range else ""),
            "recipe": self.why,
        }


RECIPES: dict[str, Int8Recipe] = {
    CPU_TARGET: Int8Recipe(
        "onnx-int8", "model.int8.onnx", CPU_TARGET, "uint8", False, True,
        "ONNX Runtime on CPU: uint8 activations with int8 weights, the pair its x86-64 kernels (AVX2, AVX-512 VNNI) run "
        "as integer convolutions (symmetric int8 activations left 14 of 49 convolutions of EfficientNet-Lite0 in float "
        "and ran slower than FP32); 7-bit weights because AVX2 without VNNI multiplies u8 x s8 with vpmaddubsw, whose "
        "16-bit pair sums saturate with full-range weights (ONNX Runtime's guidance; VNNI does not need it)"),
    VNNI_TARGET: Int8Recipe(
        "onnx-int8-vnni", "model.int8-vnni.onnx", VNNI_TARGET, "uint8", False, False,
        "ONNX Runtime on x86-64 CPUs with AVX-512 VNNI, AVX-VNNI or AMX-INT8: the onnxruntime-cpu recipe with full 8-bit "
        "weights, which these CPUs' 32-bit integer dot products add without saturating (half the weight rounding "
        "error of 7 bits); picked only where the CPU has them", needs_vnni=True),
    TENSORRT_TARGET: Int8Recipe(
        "onnx-int8-qdq-s8", "model.int8-qdq-s8.onnx", TENSORRT_TARGET, "int8", True, True,
        "TensorRT explicit quantization: QDQ with symmetric int8 activations and weights (zero points 0); 7-bit weights "
        "so that its gate on ONNX Runtime's CPU kernels does not saturate on AVX2 without VNNI"),
}


def recipe_for_artifact(name: str) -> Int8Recipe | None:
    """The recipe that builds artifact ``name`` (None for a non-INT8 name)."""
    return next((r for r in RECIPES.values() if r.artifact == name), None)


def split_holdout(files: Sequence[str | Path], *, fraction: float = HOLDOUT_FRACTION, minimum: int = HOLDOUT_MIN) -> tuple[list[Path], list[Path]]:
    """Split calibration images into (calibrate, held back): an even spread of ``fraction`` (at least ``minimum``).

    The held-back images never calibrate; they score the candidates against FP32.  With fewer than
    ``2 * minimum`` images half are held back; with fewer than 2 none are.
    """
    files = [Path(f) for f in files]
    n = len(files)
    if n < 2:
        return files, []
    k = max(minimum, int(round(n * fraction))) if n >= 2 * minimum else n // 2
    held = set(np.linspace(0, n - 1, k).round().astype(int).tolist())
    return [f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held]


def int8_from_onnx(
    onnx_path: str | Path,
    out_path: str | Path,
    calibration_files: Sequence[str | Path],
    meta: ModelMeta,
    *,
    target: str = CPU_TARGET,
    method: str = "auto",
    min_agreement: float = 0.98,
    max_float_nodes: int = MAX_FLOAT_NODES,
    batch_size: int = 16,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Quantize ``onnx_path`` to one INT8 QDQ model for ``target`` at ``out_path`` (atomically).

    Args:
        onnx_path: the FP32 model from :func:`kimchi_edge.convert.onnx_export.onnx_from_learner`.
        out_path: where the INT8 model goes.
        calibration_files: images from the training split (see
            :func:`kimchi_edge.convert.runfolder.stratified_sample`); a slice is held back to choose the method.
        meta: labels and preprocessing (the calibration images go through the runtime's Preprocessor).
        target: ``"onnxruntime-cpu"`` (uint8 activations) or ``"tensorrt"`` (symmetric int8), see :data:`RECIPES`.
        method: ``auto`` (the best of minmax/entropy/percentile on the held-back images) or one of them.
        min_agreement: top-1 agreement with FP32 on the held-back images below which sensitive layers stay float.
        max_float_nodes: at most this many layers are kept in float.
        batch_size: calibration batch size.
        quiet: no progress bar.
        log: informational messages.

    Returns:
        Details for the manifest (recipe, calibration candidates and their scores, float nodes, seconds, ORT version).

    Raises:
        ConversionError: quantization fails or the result fails the checks.
    """
    out = int8_artifacts_from_onnx(onnx_path, {target: out_path}, calibration_files, meta, method=method,
                                   min_agreement=min_agreement, max_float_nodes=max_float_nodes, batch_size=batch_size,
                                   quiet=quiet, log=log)
    return out[target]


def int8_artifacts_from_onnx(
    onnx_path: str | Path,
    outputs: Mapping[str, str | Path],
    calibration_files: Sequence[str | Path],
    meta: ModelMeta,
    *,
    method: str = "auto",
    min_agreement: float = 0.98,
    max_float_nodes: int = MAX_FLOAT_NODES,
    batch_size: int = 16,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """One INT8 model per target (``outputs``: target -> path), sharing one calibration per method.

    Per target: every candidate method is calibrated on the calibration images minus a held-back slice
    (:func:`split_holdout`), scored by top-1 agreement (then mean |Δp|) with FP32 on that slice, and the best is kept.
    If it agrees on fewer than ``min_agreement`` of the held-back images, the layers whose quantization loses the most
    signal-to-noise (ONNX Runtime's ``qdq_loss_debug`` activations, float vs QDQ) are kept in float, 1, 2, 4 ... up to
    ``max_float_nodes``, until it reaches the floor.

    Returns:
        target -> details for that artifact's manifest entry.
    """
    if method not in CALIBRATION_CHOICES:
        raise ConversionError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_CHOICES)}")
    unknown = [t for t in outputs if t not in RECIPES]
    if unknown:
        raise ConversionError(f"unknown INT8 target {unknown[0]!r}; choose one of {', '.join(RECIPES)}")
    if not calibration_files:
        raise ConversionError("INT8 calibration needs at least one image")
    t0 = time.perf_counter()
    pre = Preprocessor(meta.preprocessing)
    # onnxruntime.quantization reports through the root logger (e.g. "Axis 1 is out-of-range" for
    # BatchNorm1d weights it leaves per-tensor); keep it out of the user's console.
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="kimchi-edge-int8-") as tmp:
            ws = _Workspace.prepare(Path(onnx_path), Path(tmp), calibration_files, pre, batch_size=batch_size, quiet=quiet, log=log)
            # too few images to hold any back: nothing to choose by, so auto is MinMax (the method stays recorded as auto)
            methods = (METHODS if ws.holdout is not None else ("minmax",)) if method == "auto" else (method,)
            results = {}
            for target, out_path in outputs.items():
                t1 = time.perf_counter()
                details = _build_target(ws, RECIPES[target], methods, Path(out_path), meta, min_agreement=min_agreement,
                                        max_float_nodes=max_float_nodes, log=log)
                details["calibration_mode"] = method
                details["seconds"] = round(time.perf_counter() - t1 + ws.shared_seconds / len(outputs), 2)
                results[target] = details
            for d in results.values():
                d["calibration_seconds"] = {m: round(s, 2) for m, s in ws.calibration_seconds.items()}
                d["int8_seconds_total"] = round(time.perf_counter() - t0, 2)
            return results
    finally:
        root_logger.setLevel(old_level)


class _Workspace:
    """What every target shares: the pre-processed float model, the held-back images and FP32's answers on them,
    one calibration cache per method."""

    def __init__(self, fp32: Path, prep: Path, tmp: Path, calib: list[Path], holdout: list[Path], pre: Preprocessor,
                 batch_size: int, quiet: bool):
        self.fp32, self.prep, self.tmp = fp32, prep, tmp
        self.calib, self.holdout_files, self.pre = calib, holdout, pre
        self.batch_size, self.quiet = batch_size, quiet
        self.prefix = _float_prefix_nodes(_load(prep))
        self.holdout = pre.batch(holdout) if holdout else None
        self.fp32_probs = _probs(fp32, self.holdout) if holdout else None
        self.calibration_seconds: dict[str, float] = {}
        self.shared_seconds = 0.0
        self._jitter: dict[str, Any] | None = None
        self._means: dict[str, np.ndarray] | None = None

    @classmethod
    def prepare(cls, fp32: Path, tmp: Path, files: Sequence[str | Path], pre: Preprocessor, *, batch_size: int, quiet: bool,
                log: Callable[[str], None]) -> "_Workspace":
        from onnxruntime.quantization import quant_pre_process

        t = time.perf_counter()
        prep = tmp / "prep.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # ONNX shape inference + graph optimisation; ORT's symbolic shape inference cannot follow
                # fastai's AdaptiveConcatPool head (a Concat of unknown-rank inputs), and it is not needed:
                # only the batch axis is dynamic.
                quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing is an optimisation; quantize the original if it fails
            log(f"INT8: quant_pre_process failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); quantizing the unprocessed model")
            prep = fp32
        calib, holdout = split_holdout(files)
        ws = cls(fp32, prep, tmp, calib, holdout, pre, batch_size, quiet)
        ws.shared_seconds = time.perf_counter() - t
        return ws

    def cache(self, method: str) -> Path:
        """The calibration ranges of ``method``, computed once.

        One ``collect_data`` call per batch: each call folds its batch into the ranges (MinMax) or histograms
        (Entropy, Percentile) and drops the activations, so memory holds one batch of them, not all.
        """
        path = self.tmp / f"ranges.{method}.json"
        if path.is_file():
            return path
        from onnxruntime.quantization import CalibrationDataReader
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

        class _Reader(ImageCalibrationReader, CalibrationDataReader):
            pass

        t = time.perf_counter()
        calibrator = create_calibrator(self.prep, None, augmented_model_path=str(self.tmp / f"augmented.{method}.onnx"),
                                       calibrate_method=_cal_method(method), providers=["CPUExecutionProvider"])
        bar = _progress(len(self.calib), f"INT8 calibration ({method})", self.quiet)
        # the histogram calibrators print their progress with print(): keep it off the console
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            for start in range(0, len(self.calib), self.batch_size):
                chunk = self.calib[start : start + self.batch_size]
                calibrator.collect_data(_Reader(chunk, self.pre, batch_size=self.batch_size, quiet=True))
                bar.update(len(chunk))
            save_tensors_data(calibrator.compute_data(), path)
        bar.close()
        del calibrator
        self.calibration_seconds[method] = time.perf_counter() - t
        return path

    def input_means(self) -> dict[str, np.ndarray]:
        """Per layer (Conv, Gemm), the FP32 model's mean input over the calibration images, computed once.

        ``(C, H, W)`` for a Conv (the mean per channel and position, so that :func:`bias_correct` sees which taps
        read padding), ``(C,)`` for a Gemm.  Every layer's input is added as a graph output and averaged over the
        batch, a batch at a time (memory holds one batch of activations).  The float prefix's nodes are left out.
        """
        if self._means is None:
            import onnx
            from onnx import helper

            model = _load(self.prep)
            layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.name and n.name not in self.prefix]
            outputs = {o.name for o in model.graph.output}
            for t in dict.fromkeys(n.input[0] for n in layers):
                if t not in outputs:
                    model.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
            session = _session(model)
            name = session.get_inputs()[0].name
            wanted = list(dict.fromkeys(n.input[0] for n in layers))
            sums: dict[str, np.ndarray] = {}
            count = 0
            step = max(1, min(self.batch_size, 8))  # every layer's input at once: keep the batch small
            for start in range(0, len(self.calib), step):
                x = self.pre.batch(self.calib[start : start + step])
                for t, v in zip(wanted, session.run(wanted, {name: x})):
                    m = v.astype(np.float64).sum(axis=0)  # (C, H, W) for a Conv: the padding's effect depends on where
                    sums[t] = sums[t] + m if t in sums else m
                count += len(x)
            del session
            self._means = {n.name: sums[n.input[0]] / max(count, 1) for n in layers}
        return self._means

    def quantize(self, recipe: Int8Recipe, method: str, out: Path, float_nodes: Sequence[str] = (), *,
                 bias_correction: bool = False) -> int:
        """Quantize to ``out``; with ``bias_correction`` apply :func:`bias_correct` too.  Returns the layers it corrected."""
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[recipe.activation_type]
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                quantize_static(
                    str(self.prep), str(out), None,
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=qtype,
                    weight_type=QuantType.QInt8,
                    calibrate_method=_cal_method(method),
                    nodes_to_exclude=list(self.prefix) + list(float_nodes),
                    calibration_providers=["CPUExecutionProvider"],
                    # 7-bit weights: x86 CPUs without VNNI (AVX2) run int8 convolutions through vpmaddubsw,
                    # whose 16-bit pair sums saturate with full-range weights.  On the digits sample
                    # (EfficientNet-Lite0) 8-bit weights gave 23 % agreement with FP32 there (99 % with ORT's
                    # QDQ fusions off, i.e. the model was right and the kernel saturated); 7-bit: 99.7 %.
                    reduce_range=recipe.reduce_range,
                    extra_options={"ActivationSymmetric": recipe.symmetric_activations, "WeightSymmetric": True},
                    calibration_cache_path=self.cache(method),
                )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConversionError(f"INT8 quantization failed: {type(exc).__name__}: {first[:300]}") from exc
        return self.bias_corrected(out, out) if bias_correction else 0

    def bias_corrected(self, model: Path, out: Path) -> int:
        """:func:`bias_correct` the QDQ model ``model`` into ``out`` (may be the same file); the layers corrected."""
        qdq = _load(model)
        corrected = bias_correct(qdq, _load(self.prep), self.input_means())
        atomic_write_bytes(out, qdq.SerializeToString())
        return len(corrected)

    def jitter(self, draws: int = 3) -> dict[str, Any]:
        """FP32 against its own answers when every input pixel moves by -1, 0 or +1 grey level (p = 1/4, 1/2, 1/4).

        The model's own sensitivity, measured on training images only (the calibration and held-back ones, never
        the validation split), over ``draws`` seeded jitters (a figure, not a dice roll; more images and draws
        than the held-back slice alone, whose 50 images would make it jump by 2 points per image).  INT8 rounds
        every activation far more coarsely than this, so a model that does not hold the INT8 agreement floor under
        this jitter is not one post-training quantization can be expected to keep (see the gate's notes).
        Empty without held-back images.
        """
        if self.holdout is None or self.fp32_probs is None:
            return {}
        if self._jitter is None:
            # A batch at a time (held-back images first, then the calibration files, decoded as they come): memory
            # holds one batch and its jitter, not the whole --calib sample; each draw's generator runs on across
            # batches, so the figure does not depend on the batch size.
            session = _session(self.fp32)
            rngs = [np.random.default_rng(seed) for seed in range(draws)]
            same, dprob, n, classes = np.zeros(draws), np.zeros(draws), 0, 1
            held = (self.holdout[i : i + self.batch_size] for i in range(0, len(self.holdout), self.batch_size))
            cal = (self.pre.batch(self.calib[i : i + self.batch_size]) for i in range(0, len(self.calib), self.batch_size))
            for x in itertools.chain(held, cal):
                ref = _probs(session, x)
                for d, rng in enumerate(rngs):
                    step = rng.choice(np.array([-1.0, 0.0, 0.0, 1.0], dtype=np.float32), size=x.shape)
                    p = _probs(session, np.clip(x.astype(np.float32) + step, 0, 255).astype(x.dtype))
                    same[d] += int((p.argmax(1) == ref.argmax(1)).sum())
                    dprob[d] += float(np.abs(p - ref).sum())
                n, classes = n + len(x), ref.shape[1]
            agree = same / n
            self._jitter = {"perturbation": "each input pixel -1/0/+1 grey level (p = 1/4, 1/2, 1/4)",
                            "agreement": round(float(agree.mean()), 6), "agreement_per_draw": [round(float(a), 6) for a in agree],
                            "mean_abs_dprob": round(float(dprob.mean() / (n * classes)), 6), "images": int(n), "draws": draws,
                            "split": "train (calibration + held-back images)"}
        return self._jitter

    def score(self, model: Path) -> dict[str, Any]:
        """Top-1 agreement and mean |Δp| with FP32 on the held-back images (empty without any)."""
        if self.holdout is None or self.fp32_probs is None:
            return {}
        p = _probs(model, self.holdout)
        return {"agreement": round(float((p.argmax(1) == self.fp32_probs.argmax(1)).mean()), 6),
                "mean_abs_dprob": round(float(np.abs(p - self.fp32_probs).mean()), 6), "images": int(len(p))}


def _build_target(ws: _Workspace, recipe: Int8Recipe, methods: Sequence[str], out_path: Path, meta: ModelMeta, *,
                  min_agreement: float, max_float_nodes: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Choose the calibration method for ``recipe``, keep sensitive layers float if needed, write ``out_path``."""
    import onnxruntime

    candidates: dict[str, dict[str, Any]] = {}
    paths: dict[tuple[str, bool], Path] = {}
    for m in methods:
        path = ws.tmp / f"{recipe.target}.{m}.onnx"
        ws.quantize(recipe, m, path)
        paths[m, False] = path
        candidates[m] = ws.score(path)
        if ws.holdout is not None:  # bias correction is a candidate too, judged on the same held-back images
            paths[m, True] = ws.tmp / f"{recipe.target}.{m}.bc.onnx"
            candidates[m]["bias_correction"] = {"layers": ws.bias_corrected(path, paths[m, True]), **ws.score(paths[m, True])}

    def rank(key: tuple[str, bool]) -> tuple[float, float]:
        c = candidates[key[0]].get("bias_correction", {}) if key[1] else candidates[key[0]]
        return c.get("agreement", 0.0), -c.get("mean_abs_dprob", 0.0)

    best, bc = max(paths, key=rank)  # ties: the first, i.e. without bias correction
    chosen = paths[best, bc]
    if len(paths) > 1:
        log(f"INT8 {recipe.artifact}: calibration {best}{' with bias correction' if bc else ''} (held-back agreement "
            + ", ".join(f"{m}{' +bc' if b else ''} {rank((m, b))[0] * 100:.1f}%" for m, b in paths) + ")")
    score = candidates[best].get("bias_correction", {}) if bc else candidates[best]
    fallback = _fallback(ws, recipe, best, chosen, {k: v for k, v in score.items() if k != "bias_correction"},
                         min_agreement=min_agreement, max_float_nodes=max_float_nodes, bias_correction=bc)
    if fallback["float_nodes"]:
        chosen = Path(fallback.pop("path"))
        log(f"INT8 {recipe.artifact}: kept {len(fallback['float_nodes'])} sensitive node(s) in float: held-back agreement "
            f"{fallback['agreement_without'] * 100:.1f}% -> {fallback['agreement'] * 100:.1f}%"
            + ("" if fallback["reached"] else f" (below the {min_agreement * 100:g}% floor)"))
    else:
        fallback.pop("path", None)
    model = _load(chosen)
    moved = prefix_channels_last(model, ws.prefix)
    set_metadata(model, meta, **{"kimchi_edge.precision": "int8", "kimchi_edge.int8_target": recipe.target})
    check_onnx_model(model, where="INT8 ONNX", dtype=meta.preprocessing.dtype)
    n_q = sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")
    if n_q == 0:
        raise ConversionError("INT8 quantization produced no QuantizeLinear nodes")
    atomic_write_bytes(out_path, model.SerializeToString())
    return {
        "quantization": "onnxruntime static, QDQ",
        **recipe.settings(),
        "calibration_method": best,
        "bias_correction": bc,
        "bias_corrected_layers": candidates[best]["bias_correction"]["layers"] if bc else 0,  # the chosen method's
        "calibration_images": len(ws.calib),
        "calibration_split": "train",
        "calibration_candidates": candidates,
        "holdout_images": len(ws.holdout_files),
        "holdout_min_agreement": min_agreement,
        "per_channel": True,
        "float_prefix_nodes": list(ws.prefix),
        "float_nodes": list(fallback.pop("float_nodes")),
        "fallback": fallback,
        "fp32_input_jitter": ws.jitter(),
        "quantize_linear_nodes": n_q,
        "prefix_channels_last_nodes": moved,
        "onnxruntime": onnxruntime.__version__,
    }


def prefix_channels_last(model: Any, nodes: Sequence[str]) -> int:
    """Run the float prefix's per-channel normalisation on the NHWC input, in place: same values, same results.

    The exported graph is ``image (NHWC) -> Transpose -> (x / 255 - mean) / std`` with ``(1, C, 1, 1)`` constants.
    In an INT8 graph ONNX Runtime runs the integer convolutions channels-last and its layout optimizer moves that
    Transpose back to the input, leaving the normalisation on NHWC data against ``(1, 1, 1, C)`` constants, which it
    broadcasts in spans of C = 3 values: 0.93 ms per op on a 224 px image against 0.04 ms with ``(1, 1, W, C)``
    constants (measured here) — about a quarter of EfficientNet-Lite0's INT8 inference at 1 thread.  So the element-wise
    chain right after that Transpose (Add/Sub/Mul/Div by a constant, each the only reader of its input) is moved in
    front of it, its constants tiled to ``(1, 1, W, C)``, and the Transpose follows the chain.

    Returns:
        How many nodes moved (0 when the prefix is not of that form or the input width is not fixed).
    """
    from onnx import helper, numpy_helper

    wanted = set(nodes)
    by_name = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    outputs = {o.name for o in model.graph.output}
    from onnx import shape_inference

    try:
        known = shape_inference.infer_shapes(model).graph
    except Exception:  # shapes only help to find the width; without them nothing moves
        known = model.graph
    dims = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            for vi in list(known.input) + list(known.value_info)}
    tr = next((n for n in model.graph.node if n.name in wanted and n.op_type == "Transpose"
               and [list(a.ints) for a in n.attribute if a.name == "perm"] == [[0, 3, 1, 2]]), None)
    shape = dims.get(tr.input[0]) if tr is not None else None
    if tr is None or not shape or len(shape) != 4 or shape[2] is None or shape[3] is None:
        return 0
    w, c = shape[2], shape[3]
    chain, tensor = [], tr.output[0]
    while True:
        rd = readers.get(tensor, [])
        if len(rd) != 1 or tensor in outputs:
            break
        n = rd[0]
        if n.name not in wanted or n.op_type not in ("Add", "Sub", "Mul", "Div") or len(n.input) != 2 or n.input[0] != tensor:
            break
        const = inits.get(n.input[1])
        if const is None or numpy_helper.to_array(const).size not in (1, c):
            break
        chain.append(n)
        tensor = n.output[0]
    if not chain:
        return 0
    src = tr.input[0]
    for n in chain:
        k = numpy_helper.to_array(inits[n.input[1]])
        if k.size == c:  # per channel: (1, C, 1, 1) on NCHW -> (1, 1, W, C) on NHWC
            wide = np.ascontiguousarray(np.broadcast_to(k.reshape(1, 1, 1, c), (1, 1, w, c)))
            name = f"{n.input[1]}_nhwc_{n.name}"
            model.graph.initializer.append(numpy_helper.from_array(wide, name))
            n.input[1] = name
        n.input[0] = src
        src = f"{n.output[0]}_nhwc"
        n.output[0] = src
    last_out = tensor
    model.graph.node.remove(tr)
    new_tr = helper.make_node("Transpose", [src], [last_out], name=tr.name, perm=[0, 3, 1, 2])
    idx = list(model.graph.node).index(by_name[chain[-1].name]) + 1
    model.graph.node.insert(idx, new_tr)
    used = {t for n in model.graph.node for t in n.input}
    for name in {i for i in inits if i not in used}:
        if any(name == n.input[1].split("_nhwc_")[0] for n in chain):
            model.graph.initializer.remove(inits[name])
    # the intermediate value_info of the moved tensors no longer holds (NCHW shapes): drop it
    for vi in [v for v in model.graph.value_info if v.name in {n.output[0].removesuffix("_nhwc") for n in chain} | {tr.output[0]}]:
        model.graph.value_info.remove(vi)
    return len(chain)


def bias_correct(qdq: Any, float_model: Any, input_means: Mapping[str, np.ndarray]) -> list[str]:
    """Fold the mean output shift that weight rounding causes into each quantized layer's bias, in place.

    A layer ``y = W x + b`` quantized to ``Wq`` computes ``y + (Wq - W) x``: on average its output moves by
    ``(Wq - W) E[x]`` per channel, a shift that no later layer undoes (EfficientNet-Lite's depthwise convolutions
    have few weights per channel, so their rounding errors do not average out).  Subtracting it from the bias --
    the bias correction of Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction"
    (ICCV 2019), with ``E[x]`` measured on calibration images instead of derived from BatchNorm -- leaves each
    layer's mean output as the float model's, at no cost at inference: only the int32 bias values change.

    Args:
        qdq: the QDQ ``onnx.ModelProto`` (changed in place): a Conv or Gemm (``transB=1``) whose weight and bias each
            come from a ``DequantizeLinear`` of initializers is corrected; others are left as they are.
        float_model: the float model that was quantized (the layers by name, with their float weights).
        input_means: layer name -> mean input (:meth:`_Workspace.input_means`): ``(C, H, W)`` for a Conv, whose taps
            that read zero padding are accounted for (explicit ``pads``; ``auto_pad`` layers are skipped), ``(C,)`` for
            a Gemm.

    Returns:
        The names of the layers whose bias changed.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    float_layers = {n.name: n for n in float_model.graph.node if n.name}
    float_inits = {i.name: i for i in float_model.graph.initializer}

    def dq_parts(tensor: str) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray] | None:
        node = producer.get(tensor)
        if node is None or node.op_type != "DequantizeLinear" or any(t not in inits for t in node.input):
            return None
        q = numpy_helper.to_array(inits[node.input[0]])
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 else np.zeros_like(scale)
        if scale.ndim == 1 and scale.size > 1:  # per-channel along `axis`
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return node, q, scale, zero

    corrected = []
    for node in qdq.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.name not in input_means:
            continue
        if node.op_type == "Gemm" and (attrs.get("transB") is None or attrs["transB"].i != 1 or "transA" in attrs and attrs["transA"].i
                                       or "alpha" in attrs and attrs["alpha"].f != 1.0 or "beta" in attrs and attrs["beta"].f != 1.0):
            continue
        w_parts, b_parts = dq_parts(node.input[1]), dq_parts(node.input[2])
        ref = float_layers.get(node.name)
        if w_parts is None or b_parts is None or ref is None or len(ref.input) < 2 or ref.input[1] not in float_inits:
            continue
        _, wq_int, w_scale, w_zero = w_parts
        b_node, b_int, b_scale, _ = b_parts
        w = numpy_helper.to_array(float_inits[ref.input[1]]).astype(np.float64)
        wq = (wq_int.astype(np.float64) - w_zero) * w_scale
        mu = np.asarray(input_means[node.name], dtype=np.float64)
        if wq.shape != w.shape or b_int.dtype != np.int32 or b_int.ndim != 1:
            continue
        groups = attrs["group"].i if "group" in attrs else 1
        taps = _tap_means(node, mu, w.shape) if node.op_type == "Conv" else mu.reshape(-1, 1)  # (C, taps)
        if taps is None or taps.shape[0] != groups * w.shape[1] or w.shape[0] % groups:
            continue
        d = (wq - w).reshape(groups, w.shape[0] // groups, w.shape[1], -1)  # (groups, out per group, in per group, taps)
        shift = np.einsum("goit,git->go", d, taps.reshape(groups, w.shape[1], -1)).reshape(-1)
        b_scale = np.broadcast_to(b_scale.reshape(-1), shift.shape)
        new = np.clip(np.round(b_int.astype(np.float64) - shift / b_scale), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        if not np.array_equal(new, b_int):
            inits[b_node.input[0]].CopyFrom(numpy_helper.from_array(new, b_node.input[0]))
            corrected.append(node.name)
    return corrected


def _tap_means(node: Any, mean: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray | None:
    """A Conv's mean input seen by each kernel tap: ``(C, kh * kw)``, averaged over the output positions.

    ``mean`` is the layer's mean input ``(C, H, W)``; a tap that reads the zero padding for some outputs sees
    those zeros.  None for what this does not model (``auto_pad``, not 2-D).
    """
    attrs = {a.name: a for a in node.attribute}
    if mean.ndim != 3 or len(w_shape) != 4 or ("auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET")):
        return None
    kh, kw = w_shape[2], w_shape[3]
    sh, sw = list(attrs["strides"].ints) if "strides" in attrs else [1, 1]
    dh, dw = list(attrs["dilations"].ints) if "dilations" in attrs else [1, 1]
    pt, pl, pb, pr = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
    c, h, w = mean.shape
    oh, ow = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        return None
    padded = np.zeros((c, h + pt + pb, w + pl + pr), dtype=np.float64)
    padded[:, pt : pt + h, pl : pl + w] = mean
    out = np.empty((c, kh, kw), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            out[:, i, j] = padded[:, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw].mean(axis=(1, 2))
    return out.reshape(c, kh * kw)


def _fallback(ws: _Workspace, recipe: Int8Recipe, method: str, model: Path, score: Mapping[str, Any], *, min_agreement: float,
              max_float_nodes: int, bias_correction: bool = False) -> dict[str, Any]:
    """Keep the fewest sensitive layers in float until held-back agreement reaches ``min_agreement``.

    Tries the 1, 2, 4 ... ``max_float_nodes`` most sensitive layers (:func:`layer_sensitivity`); keeps the first that
    reaches the floor, else the best that beats none at all (or none).  Returns ``float_nodes`` (empty when not needed), the tries, and held-back inference ms/image with and without.
    """
    if not score or score["agreement"] >= min_agreement - 1e-12:
        return {"float_nodes": [], "needed": False}
    if max_float_nodes < 1:
        return {"float_nodes": [], "needed": True, "reached": False, "agreement": score["agreement"],
                "agreement_without": score["agreement"], "tries": []}
    ranked = layer_sensitivity(ws.prep, model, ws.holdout[: SENSITIVITY_IMAGES], prefix=ws.prefix)
    if not ranked:
        return {"float_nodes": [], "needed": True, "reached": False, "agreement": score["agreement"],
                "agreement_without": score["agreement"], "tries": []}
    tries: list[dict[str, Any]] = []
    best: tuple[list[str], Mapping[str, Any], Path] = ([], score, model)  # float layers only where they help
    k = 1
    while True:
        nodes = list(dict.fromkeys(n for group, _ in ranked[:k] for n in group))
        path = ws.tmp / f"{recipe.target}.{method}.float{k}.onnx"
        ws.quantize(recipe, method, path, nodes, bias_correction=bias_correction)
        s = ws.score(path)
        tries.append({"float_nodes": len(nodes), "agreement": s["agreement"], "mean_abs_dprob": s["mean_abs_dprob"]})
        if s["agreement"] > best[1]["agreement"] + 1e-12:
            best = (nodes, s, path)
        if s["agreement"] >= min_agreement - 1e-12 or k >= min(max_float_nodes, len(ranked)):
            break
        k = min(k * 2, max_float_nodes, len(ranked))
    nodes, s, path = best
    ms = {"without": _ms_per_image(model, ws.holdout), "with": _ms_per_image(path, ws.holdout)} if nodes else {}
    return {"float_nodes": nodes, "needed": True, "reached": s["agreement"] >= min_agreement - 1e-12,
            "agreement": s["agreement"], "agreement_without": score["agreement"], "tries": tries,
            "sensitivity_db": [{"nodes": g, "sqnr_drop_db": round(d, 2)} for g, d in ranked[: max(k, 8)]],
            "holdout_ms_per_image": ms, "path": str(path)}


def layer_sensitivity(float_model: str | Path, qdq_model: str | Path, images: np.ndarray, *,
                      prefix: Sequence[str] = ()) -> list[tuple[list[str], float]]:
    """Nodes ranked by how much signal-to-quantization-noise (dB) the QDQ model loses across each of them.

    Both models' intermediate tensors are saved (``onnxruntime.quantization.qdq_loss_debug``), compared tensor by tensor
    (SQNR of the QDQ model's value vs the float one, accumulated over ``images`` one at a time so memory stays small),
    and a node's loss is the SQNR of its worst float input minus that of its output.

    Returns:
        ``[(node names, dB lost), ...]``, largest first: a node, with the producers of inputs the QDQ model fused away
        (a Conv whose Relu/Clip became its uint8 range); nodes in ``prefix`` and those with no saved output left out.
    """
    from onnxruntime.quantization import qdq_loss_debug
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors

    with tempfile.TemporaryDirectory(prefix="kimchi-edge-sens-") as tmp:
        aug_f, aug_q = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        modify_model_output_intermediate_tensors(str(float_model), str(aug_f))
        modify_model_output_intermediate_tensors(str(qdq_model), str(aug_q))
        sf, sq = _session(aug_f), _session(aug_q)
        name = sf.get_inputs()[0].name
        suffix = getattr(qdq_loss_debug, "_TENSOR_SAVE_POSTFIX", "_ReshapedSavedOutput")
        f_names = [o.name for o in sf.get_outputs()]
        q_names = [o.name for o in sq.get_outputs()]
        common = sorted({n[: -len(suffix)] for n in f_names if n.endswith(suffix)} & {n[: -len(suffix)] for n in q_names if n.endswith(suffix)})
        sig = dict.fromkeys(common, 0.0)
        err = dict.fromkeys(common, 0.0)
        for i in range(len(images)):
            x = {name: images[i : i + 1]}
            fo = dict(zip(f_names, sf.run(None, x)))
            qo = dict(zip(q_names, sq.run(None, x)))
            for t in common:
                a, b = fo[t + suffix].astype(np.float64), qo[t + suffix].astype(np.float64)
                if a.shape != b.shape:
                    continue
                sig[t] += float(np.square(a).sum())
                err[t] += float(np.square(a - b).sum())
        del sf, sq
    eps = np.finfo(np.float64).eps
    # capped: a tensor both models compute identically (float prefix) would otherwise count as ~300 dB
    sqnr = {t: min(SQNR_CAP_DB, 10 * math.log10(max(sig[t], eps) / max(err[t], eps))) for t in common}
    skip = set(prefix)
    nodes = [n for n in _load(float_model).graph.node if n.name]
    producer = {o: n for n in nodes for o in n.output}
    ranked = []
    for node in nodes:
        if node.name in skip or not node.output or node.output[0] not in sqnr:
            continue
        # A tensor the QDQ model no longer has (e.g. a Conv output whose Relu/Clip the quantizer folded into the
        # uint8 range) is traced back to its producer's inputs; that producer goes with this node as one unit.
        group, ins, todo, seen = [node.name], [], list(node.input), set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in sqnr:
                ins.append(sqnr[t])
            elif t in producer and producer[t].name not in skip and len(group) < 4:
                group.append(producer[t].name)
                todo.extend(producer[t].input)
        ranked.append((group, (min(ins) - sqnr[node.output[0]]) if ins else 0.0))
    ranked.sort(key=lambda gd: -gd[1])
    return ranked


def _cal_method(method: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]


def _load(path: str | Path) -> Any:
    import onnx

    return onnx.load(str(path))


def _session(path: str | Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    src = path.SerializeToString() if hasattr(path, "SerializeToString") else str(path)  # an onnx.ModelProto, or a file
    return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])


def _probs(model: Any, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """Softmax of ``model`` (a path, or an open ONNX Runtime session) on ``x``, ``batch`` images per run."""
    s = _session(model) if isinstance(model, (str, Path)) else model
    name = s.get_inputs()[0].name
    logits = np.concatenate([s.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _ms_per_image(path: str | Path, x: np.ndarray) -> float:
    """Median batch-1 inference ms over the held-back images (after one warm-up run)."""
    s = _session(path)
    name = s.get_inputs()[0].name
    s.run(None, {name: x[:1]})
    times = []
    for i in range(len(x)):
        t = time.perf_counter()
        s.run(None, {name: x[i : i + 1]})
        times.append((time.perf_counter() - t) * 1000)
    return round(float(np.median(times)), 3)
