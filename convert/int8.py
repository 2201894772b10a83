"""FP32 ONNX -> INT8 QDQ ONNX with ONNX Runtime static quantization.

Calibration images come from the *training* split (never the validation images the gate scores on),
stratified by class, and go through :class:`kimchi_edge.runtime.preprocess.Preprocessor` — the same code that
feeds the model at inference time — so the calibrated ranges are those the deployed model sees.

Defaults are chosen so the same file also feeds TensorRT's explicit quantization: QDQ format,
per-channel symmetric INT8 weights, symmetric INT8 activations (TensorRT requires zero points of 0).
The normalisation nodes in front of the first convolution stay in float.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kimchi_edge.runtime.fsutil import atomic_write_bytes
from kimchi_edge.runtime.manifest import ModelMeta
from kimchi_edge.runtime.preprocess import Preprocessor

from .errors import ConversionError
from .onnx_export import INPUT_NAME, check_onnx_model, set_metadata

METHODS = ("minmax", "entropy", "percentile")


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
    """Names of the nodes before the first Conv/MatMul/Gemm (cast, normalisation, layout): kept in float."""
    out = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm", "ConvTranspose"):
            break
        out.append(node.name)
    return [n for n in out if n]


def int8_from_onnx(
    onnx_path: str | Path,
    out_path: str | Path,
    calibration_files: Sequence[str | Path],
    meta: ModelMeta,
    *,
    method: str = "minmax",
    per_channel: bool = True,
    symmetric_activations: bool = True,
    batch_size: int = 16,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Quantize ``onnx_path`` to INT8 QDQ at ``out_path`` (atomically).

    Args:
        onnx_path: the FP32 model from :func:`kimchi_edge.convert.onnx_export.onnx_from_learner`.
        out_path: where the INT8 model goes.
        calibration_files: images from the training split (see
            :func:`kimchi_edge.convert.runfolder.stratified_sample`).
        meta: labels and preprocessing (the calibration images go through the runtime's Preprocessor).
        method: calibration method: ``minmax``, ``entropy`` or ``percentile``.
        per_channel: per-channel weight scales.
        symmetric_activations: zero-point-free activations (needed by TensorRT).
        batch_size: calibration batch size.
        quiet: no progress bar.
        log: informational messages.

    Returns:
        Details for the manifest (method, count, settings, seconds, ORT version).

    Raises:
        ConversionError: quantization fails or the result fails the checks.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod

    if method not in METHODS:
        raise ConversionError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if not calibration_files:
        raise ConversionError("INT8 calibration needs at least one image")
    t0 = time.perf_counter()

    class _Reader(ImageCalibrationReader, CalibrationDataReader):
        pass

    reader = _Reader(calibration_files, Preprocessor(meta.preprocessing, max_pixels=None), batch_size=batch_size, quiet=quiet)
    cal_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]
    # onnxruntime.quantization reports through the root logger (e.g. "Axis 1 is out-of-range" for
    # BatchNorm1d weights it leaves per-tensor); keep it out of the user's console.
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.setLevel(logging.ERROR)
    try:
        return _quantize(onnx_path, out_path, reader, meta, cal_method, method, per_channel, symmetric_activations, calibration_files, t0, log)
    finally:
        root_logger.setLevel(old_level)


def _quantize(onnx_path, out_path, reader, meta, cal_method, method, per_channel, symmetric_activations, calibration_files, t0, log) -> dict[str, Any]:
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    with tempfile.TemporaryDirectory(prefix="kimchi-edge-int8-") as tmp:
        prep = Path(tmp) / "prep.onnx"
        qpath = Path(tmp) / "int8.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # ONNX shape inference + graph optimisation; ORT's symbolic shape inference cannot follow
                # fastai's AdaptiveConcatPool head (a Concat of unknown-rank inputs), and it is not needed:
                # only the batch axis is dynamic.
                quant_pre_process(str(onnx_path), str(prep), skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing is an optimisation; quantize the original if it fails
            log(f"INT8: quant_pre_process failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); quantizing the unprocessed model")
            prep = Path(onnx_path)
        fp32 = onnx.load(str(prep))
        exclude = _float_prefix_nodes(fp32)
        try:
            # the histogram calibrators print their progress with print(): keep it off the console
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                quantize_static(
                    str(prep),
                    str(qpath),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=cal_method,
                    nodes_to_exclude=exclude,
                    calibration_providers=["CPUExecutionProvider"],
                    # 7-bit weights: x86 CPUs without VNNI (AVX2) run int8 convolutions through vpmaddubsw,
                    # whose 16-bit pair sums saturate with full-range weights.  On the digits sample
                    # (EfficientNet-Lite0) 8-bit weights gave 23 % agreement with FP32 there (99 % with ORT's
                    # QDQ fusions off, i.e. the model was right and the kernel saturated); 7-bit: 99.7 %.
                    reduce_range=True,
                    extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True},
                )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConversionError(f"INT8 quantization failed: {type(exc).__name__}: {first[:300]}") from exc
        model = onnx.load(str(qpath))
    set_metadata(model, meta, **{"kimchi_edge.precision": "int8"})
    check_onnx_model(model, where="INT8 ONNX", dtype=meta.preprocessing.dtype)
    n_q = sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")
    if n_q == 0:
        raise ConversionError("INT8 quantization produced no QuantizeLinear nodes")
    atomic_write_bytes(Path(out_path), model.SerializeToString())
    return {
        "quantization": "onnxruntime static, QDQ",
        "calibration_method": method,
        "calibration_images": len(calibration_files),
        "calibration_split": "train",
        "per_channel": per_channel,
        "activations": "int8 symmetric" if symmetric_activations else "int8 asymmetric",
        "weights": "int8 symmetric, 7-bit range (reduce_range)",
        "float_nodes": exclude,
        "quantize_linear_nodes": n_q,
        "onnxruntime": onnxruntime.__version__,
        "seconds": round(time.perf_counter() - t0, 2),
    }
