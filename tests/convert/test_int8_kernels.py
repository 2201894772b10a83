"""The CPU probe that picks the INT8 file agrees with what ONNX Runtime's integer kernels really do on this CPU.

``onnx-int8-vnni`` (full 8-bit weights) is run only where ``sysinfo.cpu_has_vnni()``; ``onnx-int8`` keeps 7-bit weights
because x86 CPUs without VNNI multiply u8 x s8 with ``vpmaddubsw``, whose 16-bit pair sums saturate.  Here one QDQ
1x1 convolution with the worst case for that instruction (every activation 255, every weight at the top of its range)
runs twice: with ONNX Runtime's QDQ fusion (the integer kernel) and with graph optimisations off (dequantize, float
Conv, quantize: exact).  On a VNNI CPU both agree for 8-bit weights; without VNNI 8-bit weights saturate while 7-bit
ones do not.  So the test fails if the probe says VNNI where the kernels saturate, or the other way round.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="building the test model needs onnx (pip install 'kimchi-edge[dev]')")
ort = pytest.importorskip("onnxruntime", reason="needs ONNX Runtime (pip install 'kimchi-edge[onnxruntime]')")

from kimchi_edge.runtime import sysinfo  # noqa: E402

C = K = 64


def _y_scale(w_max: int) -> float:
    return C * 1.27 * w_max * 0.01 / 40  # the exact output is +-40 levels from the zero point: never clipped


def _conv(w_max: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((K, C, 1, 1), w_max, np.int8)
    w[1::2] = -w_max  # half the output channels negative: both signs saturate
    y_scale = _y_scale(w_max)
    inits = [numpy_helper.from_array(np.array(0.01, np.float32), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.full(K, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(K, np.int8), "wz"), numpy_helper.from_array(np.array(y_scale, np.float32), "ys"),
             numpy_helper.from_array(np.array(128, np.uint8), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0), helper.make_node("Conv", ["xd", "wd"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]), helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    graph = helper.make_graph(nodes, "worst_case_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def _levels_off(w_max: int) -> float:
    """Largest difference, in output quantization levels, between the integer kernel and the exact float path."""
    x = np.full((1, C, 8, 8), 1.27, np.float32)  # quantizes to 255 (scale 0.01, zero point 128)
    out = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level, so.intra_op_num_threads = level, 1
        out.append(ort.InferenceSession(_conv(w_max), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0])
    exact = np.abs(out[0]) / _y_scale(w_max)
    assert 39 <= exact.min() and exact.max() <= 41  # the worst case really is what was run, unclipped
    return float(np.abs(out[0] - out[1]).max() / _y_scale(w_max))


@pytest.mark.skipif(not {"avx2", *sysinfo.VNNI_FLAGS} & sysinfo.cpu_flags(),
                    reason="not an x86-64 CPU with AVX2 or VNNI (e.g. ARM): the saturation this checks is x86's vpmaddubsw")
def test_the_vnni_probe_matches_whether_full_8bit_weights_saturate_here():
    assert _levels_off(63) <= 1  # 7-bit weights: exact on every x86 kernel (the portable onnx-int8)
    off = _levels_off(127)
    if sysinfo.cpu_has_vnni():
        assert off <= 1, f"this CPU reports {sysinfo.VNNI_FLAGS} but ONNX Runtime's kernel is {off:.0f} levels off with 8-bit weights"
    else:
        assert off > 1, "no VNNI here, yet 8-bit weights did not saturate: the probe would withhold onnx-int8-vnni for nothing"


def test_the_probe_reads_flags_and_says_vnni_for_any_of_its_instructions():
    assert sysinfo.cpu_has_vnni(frozenset({"avx2", "avx512_vnni"})) and sysinfo.cpu_has_vnni(frozenset({"amx_int8"}))
    assert sysinfo.cpu_has_vnni(frozenset({"avx_vnni"}))
    assert not sysinfo.cpu_has_vnni(frozenset({"avx2", "fma", "avx512bw"})) and not sysinfo.cpu_has_vnni(frozenset())
    assert isinstance(sysinfo.cpu_flags(), frozenset)
