"""Re-quantize the bundle's FP32 model with other INT8 settings, for the benchmark's *experiments* only.

The paths of ``kimchi-edge bench --compare`` run the bundle's own INT8 files (``onnx-int8`` for ONNX Runtime on
CPU, ``onnx-int8-qdq-s8`` for TensorRT; :mod:`kimchi_edge.convert.int8` makes them).  What is here builds variants the
product does not ship (QOperator, dedicated QDQ pairs) with the same calibration reader and float prefix, to time
them side by side; their accuracy is not scored.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence



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
                str(fp32), str(out), Reader(list(calibration), Preprocessor(spec), quiet=True),
                quant_format=QuantFormat.QOperator if fmt == "QOperator" else QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=_float_prefix_nodes(onnx.load(str(fp32))),
                # 7-bit weights, as the bundle's own files (convert/int8.py): with full-range weights, onnxruntime 1.31.1
                # on an AVX2-only CPU crashed the process when the session was destroyed (heap damage, reproduced in
                # `bench --compare`'s experiments); and those kernels saturate there anyway.
                reduce_range=True,
                extra_options={"ActivationSymmetric": activations != "uint8", "WeightSymmetric": True,
                               "DedicatedQDQPair": dedicated_qdq},
            )
    finally:
        root.setLevel(level)
    return {"format": fmt, "activations": "uint8 asymmetric" if activations == "uint8" else "int8 symmetric",
            "weights": "int8 symmetric per-channel, 7-bit range (reduce_range)", "dedicated_qdq": dedicated_qdq, "calibration": "minmax",
            "calibration_images": len(calibration), "seconds": round(time.perf_counter() - t0, 1)}
