"""Count a model's multiply-accumulates from its ONNX graph (shape inference, no guessing).

Only the ops that carry the arithmetic are counted (Conv, ConvTranspose, Gemm, MatMul and their
quantized forms); element-wise ops, pooling and activations are left out and said to be.
FLOPs = 2 x MACs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")


def _shape(value_info: Any) -> list[int] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return dims


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _inferred_shapes(path: str | Path, batch: int) -> tuple[Any, dict[str, list[int] | None]]:
    """The model with its batch axis fixed to ``batch`` and ONNX shape inference run, and every tensor's shape by name
    (initializers included; ``None`` where inference left a dimension unknown)."""
    import onnx

    model = onnx.load(str(path))
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dim0 = inp.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_param")
        dim0.dim_value = batch
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int] | None] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[vi.name] = _shape(vi)
    shapes.update(inits)
    return model, shapes


def macs_from_onnx(path: str | Path, batch: int = 1) -> dict[str, Any]:
    """MACs per forward pass of ``batch`` images, by op type, from ONNX shape inference.

    Args:
        path: an ONNX model whose first input has a dynamic batch axis.
        batch: the batch size to fix before shape inference.

    Returns:
        ``{"macs": int, "flops": int, "by_op": {op: macs}, "nodes_counted": int, "nodes_unresolved": [names]}``.
    """
    model, shapes = _inferred_shapes(path, batch)

    by_op: dict[str, int] = {}
    unresolved: list[str] = []
    counted = 0
    for node in model.graph.node:
        op = node.op_type
        if op not in COUNTED:
            continue
        macs = None
        if op in ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose"):
            w_name = node.input[3] if op == "QLinearConv" else node.input[1]
            w, y = shapes.get(w_name), shapes.get(node.output[0])
            if w and y:
                if op == "ConvTranspose":
                    x = shapes.get(node.input[0])
                    if x:  # every input pixel is scattered through the kernel
                        macs = x[0] * x[1] * _prod(x[2:]) * w[1] * _prod(w[2:])
                else:  # y: (N, Cout, *spatial); w: (Cout, Cin/group, *kernel)
                    macs = y[0] * y[1] * _prod(y[2:]) * w[1] * _prod(w[2:])
        elif op == "Gemm":
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            if a and b:
                m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
                n = b[0] if _attr(node, "transB", 0) else b[1]
                macs = m * k * n
        else:  # MatMul-like: (..., M, K) x (..., K, N)
            ia, ib = (node.input[0], node.input[3]) if op == "QLinearMatMul" else (node.input[0], node.input[1])
            a, b, y = shapes.get(ia), shapes.get(ib), shapes.get(node.output[0])
            if a and b and y:
                macs = _prod(y) * a[-1]
        if macs is None:
            unresolved.append(node.name or op)
            continue
        counted += 1
        by_op[op] = by_op.get(op, 0) + int(macs)
    total = sum(by_op.values())
    return {"batch": batch, "macs": total, "flops": 2 * total, "by_op": by_op, "nodes_counted": counted,
            "nodes_unresolved": unresolved, "counted_ops": list(COUNTED)}


def _prod(xs: list[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def conv_kind(weight: list[int], in_channels: int) -> str:
    """What a Conv is, from its weight ``(Cout, Cin/group, *kernel)`` and input channels: the kinds whose speed differs.

    ``"depthwise"`` (one filter per channel), ``"grouped"``, ``"1x1"`` (a matmul over channels) or ``"kxk"`` (dense, e.g. a stem).
    """
    group = in_channels // max(1, weight[1])
    if group > 1:
        return "depthwise" if weight[1] == 1 and weight[0] == in_channels else "grouped"
    return "1x1" if all(k == 1 for k in weight[2:]) else "kxk"


def conv_layers(path: str | Path, batch: int = 1) -> list[dict[str, Any]]:
    """The Conv nodes of an FP32 ONNX model in graph order: name, kind (:func:`conv_kind`), MACs, output shape and the
    fewest bytes it must move in float32 (input read once, output written once, weights read once).

    Raises:
        ValueError: a Conv whose shapes shape inference could not resolve (nothing is guessed).
    """
    model, shapes = _inferred_shapes(path, batch)
    out = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        x, w, y = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if not (x and w and y):
            raise ValueError(f"Conv {node.name or node.output[0]}: shapes not resolved by ONNX shape inference")
        macs = y[0] * y[1] * _prod(y[2:]) * w[1] * _prod(w[2:])
        out.append({"name": node.name or node.output[0], "kind": conv_kind(w, x[1]), "macs": int(macs), "output": y,
                    "min_bytes": 4 * (_prod(x) + _prod(y) + _prod(w))})
    return out
