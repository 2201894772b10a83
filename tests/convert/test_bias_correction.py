"""INT8 bias correction: each layer's bias absorbs the mean output shift its rounded weights cause.

A small real model built with ``onnx.helper`` whose weights all sit 0.45 of a quantization step above a level, so
rounding moves every output channel the same way; quantized by ONNX Runtime (``quantize_static``, the recipe the
bundle uses), run by ONNX Runtime.  Without correction the mean output is off by a fixed amount; with it, the shift
is gone -- and the bias values are all that changed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="building the test models needs onnx (pip install 'kimchi-edge[dev]')")
pytest.importorskip("onnxruntime", reason="quantizing and running the models needs onnxruntime")

from kimchi_edge.convert.int8 import CPU_TARGET, METHODS, RECIPES, _Workspace, bias_correct, int8_from_onnx  # noqa: E402
from kimchi_edge.runtime.manifest import ModelMeta, Preprocessing  # noqa: E402
from kimchi_edge.runtime.preprocess import Preprocessor  # noqa: E402

SIZE = 16
CHANNELS = 6


def make_model(path: Path, *, groups: int = 1) -> np.ndarray:
    """uint8 NHWC -> /255 -> NCHW -> conv (3x3, 3 -> 6 channels, or depthwise-style groups=3) -> mean -> 6 outputs.

    Each output channel's weights are ``(k + 0.45) * step`` for integers ``k``, where ``step`` is the scale ONNX Runtime's
    symmetric 7-bit per-channel quantization gives them (``2 * max|w| / 127``, the largest weight set to 63.5 steps), so
    rounding moves every weight by 0.45 of a step the same way.  Returns the weights.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    cin = 3 // groups
    step = 0.01
    k = rng.integers(5, 40, size=(CHANNELS, cin, 3, 3)).astype(np.float32)
    w = ((k + 0.45) * step).astype(np.float32)
    w[:, 0, 0, 0] = 63.5 * step  # the largest weight of each channel sets the scale: 2 * 0.635 / 127 = step
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Div", ["f", "scale"], ["x"], name="div"),
        helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2], name="layout"),
        helper.make_node("Conv", ["xc", "W", "B"], ["h"], name="conv", pads=[1, 1, 1, 1], group=groups),
        helper.make_node("GlobalAveragePool", ["h"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["logits"], name="flatten"),
    ]
    inits = [numpy_helper.from_array(np.array(255.0, np.float32), "scale"), numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(np.full(CHANNELS, 0.1, np.float32), "B")]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", SIZE, SIZE, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CHANNELS])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w


def photos(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = np.clip(150 + rng.normal(0, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)  # bright: a large mean input
        out.append(folder / f"{i:02d}.png")
        Image.fromarray(img).save(out[-1])
    return out


def meta() -> ModelMeta:
    pre = Preprocessing(height=SIZE, width=SIZE, resize_height=SIZE, resize_width=SIZE, batch_resize=False, dtype="uint8",
                        mean=(0.5,) * 3, std=(0.5,) * 3)
    return ModelMeta(labels=tuple(f"클래스 {i}" for i in range(CHANNELS)), architecture="one-conv", preprocessing=pre)


def run(model_path: Path, x: np.ndarray) -> np.ndarray:
    from kimchi_edge.convert.int8 import _session

    s = _session(model_path)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("groups", [1, 3], ids=["dense", "depthwise"])
def test_bias_correction_removes_the_mean_shift_of_rounded_weights(tmp_path, groups):
    import onnx
    from onnx import numpy_helper

    fp32 = tmp_path / "fp32.onnx"
    make_model(fp32, groups=groups)
    files = photos(tmp_path / "img", 24)
    pre = Preprocessor(meta().preprocessing)
    x = pre.batch(files)
    ws = _Workspace.prepare(fp32, tmp_path, files, pre, batch_size=8, quiet=True, log=lambda m: None)
    plain, corrected = tmp_path / "q.onnx", tmp_path / "q.bc.onnx"
    ws.quantize(RECIPES[CPU_TARGET], "minmax", plain)
    assert ws.bias_corrected(plain, corrected) == 1

    ref, before, after = run(fp32, x), run(plain, x), run(corrected, x)
    shift_before = (before - ref).mean(axis=0)
    shift_after = (after - ref).mean(axis=0)
    # rounding moved every weight the same way: every channel's mean output moved, all in one direction ...
    assert (np.sign(shift_before) == np.sign(shift_before[0])).all() and np.abs(shift_before).min() > 0.003, shift_before
    # ... and the correction takes at least 90 % of that away (what is left: activation rounding), 75 % in every channel
    assert np.abs(shift_after).mean() < 0.1 * np.abs(shift_before).mean(), (shift_before, shift_after)
    assert (np.abs(shift_after) < 0.25 * np.abs(shift_before)).all(), (shift_before, shift_after)

    # only the bias values changed: same graph, same weights, same scales
    a, b = onnx.load(str(plain)), onnx.load(str(corrected))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    ia = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    ib = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    changed = [k for k in ia if not np.array_equal(ia[k], ib[k])]
    assert len(changed) == 1 and ia[changed[0]].dtype == np.int32  # the int32 bias of the conv


def test_bias_correct_leaves_layers_it_cannot_model_alone(tmp_path):
    """No input mean for a layer (the float prefix, an unknown name): nothing changes."""
    import onnx

    fp32 = tmp_path / "fp32.onnx"
    make_model(fp32)
    files = photos(tmp_path / "img", 20)
    pre = Preprocessor(meta().preprocessing)
    ws = _Workspace.prepare(fp32, tmp_path, files, pre, batch_size=8, quiet=True, log=lambda m: None)
    q = tmp_path / "q.onnx"
    ws.quantize(RECIPES[CPU_TARGET], "minmax", q)
    model = onnx.load(str(q))
    before = model.SerializeToString()
    assert bias_correct(model, onnx.load(str(ws.prep)), {}) == []
    assert bias_correct(model, onnx.load(str(ws.prep)), {"another layer": np.ones(3)}) == []
    assert model.SerializeToString() == before


def test_auto_keeps_bias_correction_only_where_the_held_back_images_say_so(tmp_path):
    fp32 = tmp_path / "fp32.onnx"
    make_model(fp32)
    files = photos(tmp_path / "img", 40)
    d = int8_from_onnx(fp32, tmp_path / "int8.onnx", files, meta(), method="auto", quiet=True, log=lambda m: None)
    cands = d["calibration_candidates"]
    assert list(cands) == list(METHODS) and all(c["bias_correction"]["layers"] == 1 for c in cands.values())

    def key(c):
        return c["agreement"], -c["mean_abs_dprob"]

    pairs = {(m, bc): key(c["bias_correction"] if bc else c) for m, c in cands.items() for bc in (False, True)}
    best = max(pairs.values())
    assert pairs[d["calibration_method"], d["bias_correction"]] == best
    # this model's outputs are shifted, not noisy: corrected, every method's outputs are closer to FP32's
    assert all(c["bias_correction"]["mean_abs_dprob"] < c["mean_abs_dprob"] for c in cands.values())
    assert d["bias_correction"] is True and d["bias_corrected_layers"] == 1
