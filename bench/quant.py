"""Re-quantize the bundle's FP32 model with other INT8 settings, to measure what they change.

The bundle's INT8 file is QDQ with *symmetric int8* activations (zero point 0), chosen so the same
file feeds TensorRT's explicit quantization.  ONNX Runtime's CPU kernels fuse QDQ groups into
integer kernels best with *uint8* activations; these helpers build such variants (same calibration
reader and the same float prefix as :mod:`kimchi_edge.convert.int8`) and a temporary bundle that holds one, so
``runtime.Classifier`` can run it from image bytes like any other artifact.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from kimchi_edge.runtime.fsutil import sha256_file
from kimchi_edge.runtime.manifest import Artifact, read_manifest, write_manifest

U8_ARTIFACT = "onnx-int8-u8"


def requantize(fp32: str | Path, out: str | Path, calibration: Sequence[str], spec: Any, *, fmt: str = "QDQ",
               activations: str = "uint8", dedicated_qdq: bool = False) -> dict[str, Any]:
    """Static INT8 quantization of ``fp32`` (per-channel symmetric int8 weights, MinMax calibration).

    Args:
        fp32: the bundle's FP32 ONNX model.
        out: where the INT8 model goes.
        calibration: image files (training split) fed through the runtime's preprocessing.
        spec: the bundle's :class:`~kimchi_edge.runtime.manifest.Preprocessing`.
        fmt: ``"QDQ"`` or ``"QOperator"``.
        activations: ``"uint8"`` (asymmetric) or ``"int8"`` (symmetric, as the bundle's file).
        dedicated_qdq: one DQ per consumer (``DedicatedQDQPair``).

    Returns:
        The settings and the seconds it took.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from kimchi_edge.convert.int8 import ImageCalibrationReader, _float_prefix_nodes
    from kimchi_edge.runtime.preprocess import Preprocessor

    class Reader(ImageCalibrationReader, CalibrationDataReader):
        pass

    t0 = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(
                str(fp32), str(out), Reader(list(calibration), Preprocessor(spec, max_pixels=None), quiet=True),
                quant_format=QuantFormat.QOperator if fmt == "QOperator" else QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=_float_prefix_nodes(onnx.load(str(fp32))),
                extra_options={"ActivationSymmetric": activations != "uint8", "WeightSymmetric": True,
                               "DedicatedQDQPair": dedicated_qdq},
            )
    finally:
        root.setLevel(level)
    return {"format": fmt, "activations": "uint8 asymmetric" if activations == "uint8" else "int8 symmetric",
            "weights": "int8 symmetric per-channel", "dedicated_qdq": dedicated_qdq, "calibration": "minmax",
            "calibration_images": len(calibration), "seconds": round(time.perf_counter() - t0, 1)}


def _link_or_copy(src: Path, dst: Path) -> None:
    import shutil

    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links there
        shutil.copyfile(src, dst)


def bundle_with_artifact(bundle: str | Path, model: str | Path, out: str | Path, *, name: str = U8_ARTIFACT,
                         details: dict[str, Any] | None = None) -> Path:
    """A temporary copy of ``bundle`` (files hard-linked where possible, else copied) whose manifest also lists ``model``.

    Not symlinks: the runtime refuses an artifact whose real path is outside its bundle.
    """
    bundle, model, out = Path(bundle), Path(model), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(bundle)
    for art in manifest.artifacts:
        src = (bundle / art.file).resolve()
        if src.is_file() and not (out / art.file).exists():
            _link_or_copy(src, out / art.file)
    target = out / f"model.{name}.onnx"
    if not target.exists():
        _link_or_copy(model.resolve(), target)
    import onnxruntime

    art = Artifact(name=name, file=target.name, format="onnx", precision="int8", sha256=sha256_file(target),
                   size_bytes=target.stat().st_size,
                   input=f"{manifest.preprocessing.dtype}-{manifest.preprocessing.layout.lower()}", built_with={"onnxruntime": onnxruntime.__version__},
                   details=details or {})
    write_manifest(out, dataclasses.replace(manifest, artifacts=tuple(manifest.artifacts) + (art,)))
    return out
