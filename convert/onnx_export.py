"""``learn.model`` -> one self-contained ONNX file that takes RGB pixels 0-255 (uint8, or float32 when the
bundle's preprocessing resamples on the batch on the host, see ``kimchi_edge.runtime.manifest.Preprocessing``).

The exported graph is ``image (N, H, W, 3) uint8 -> Cast -> /255 -> (x - mean) / std -> NCHW -> model
-> logits (N, classes)``, with mean/std read from ``model_meta.json`` (which training read from the
fastai pipeline), so a runtime feeds the bytes of its resized image and nothing else.  With
``Preprocessing.resample_in_graph`` the input is the item-size uint8 image and ``preprocess/*`` nodes do
fastai's batch resample first (:func:`prepend_batch_resample`).

The exporter is the maintained one for the installed torch (``torch.onnx.export(..., dynamo=True)``,
based on ``torch.export``).  Only when it fails do we try the legacy TorchScript-based exporter, and
the reason is printed and recorded in the artifact details.  When both fail, the error names the op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kimchi_edge.runtime.fsutil import atomic_write_bytes
from kimchi_edge.runtime.manifest import ModelMeta, Preprocessing, to_dict
from kimchi_edge.runtime.preprocess import Preprocessor

from .errors import ConversionError

DEFAULT_OPSET = 18
MIN_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: ``metadata_props`` keys written into every ONNX artifact.
META_LABELS = "kimchi_edge.labels"
META_PREPROCESSING = "kimchi_edge.preprocessing"
META_ARCHITECTURE = "kimchi_edge.architecture"
META_INTERFACE = "kimchi_edge.interface"


@dataclass
class OnnxExport:
    """What :func:`onnx_from_learner` produced."""

    path: Path
    exporter: str  # "dynamo" | "legacy-torchscript"
    opset: int
    fallback_reason: str = ""
    max_abs_diff: float = 0.0  # ONNX Runtime vs torch on a random uint8 batch
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def _example(shape: tuple, dtype: str, gen: Any) -> Any:
    """A random image batch in the bundle's input dtype: uint8, or float32 pixel values in [0, 255]."""
    import torch

    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    return x if dtype == "uint8" else x.to(torch.float32)


def normalizing_module(model: Any, pre: Preprocessing) -> Any:
    """Wrap ``model`` so it takes RGB pixel values 0-255 (``pre.dtype``: uint8, or float32 when fastai's
    batch resample makes fractional pixels) in ``pre.layout`` and does the normalisation itself."""
    import torch

    class UInt8Normalize(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, mean: tuple, std: tuple, nhwc: bool):
            super().__init__()
            self.model = inner
            self.nhwc = nhwc
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1))

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = image.to(torch.float32)
            if self.nhwc:
                x = x.permute(0, 3, 1, 2)
            x = (x / 255.0 - self.mean) / self.std
            return self.model(x)

    return UInt8Normalize(model, pre.mean, pre.std, pre.layout == "NHWC").eval()


#: Name prefix of the nodes and initializers :func:`prepend_batch_resample` adds.
RESAMPLE_PREFIX = "preprocess/"


def prepend_batch_resample(model: Any, pre: Preprocessing) -> Any:
    """Put fastai's batch resample in front of a graph that takes float32 pixels at the network size.

    The new input ``image`` is the item-size ``uint8`` image (``pre.input_shape``); ``preprocess/*``
    nodes cast it to float32 and apply the taps of
    :func:`kimchi_edge.runtime.preprocess.batch_resample_taps` -- the host's own resample, the same
    float32 weights summed in the same order -- as one ``Gather`` + ``Mul`` per tap and a ``Sum``, rows
    first, then columns (after swapping the two axes, so that both passes gather whole rows), clip to
    [0, 255] and feed the old input.  There is no MatMul: everything stays in front of the first
    convolution, where INT8 quantization keeps nodes in float.

    Args:
        model: an ``onnx.ModelProto`` whose one input ``image`` is float32 ``(N, height, width, 3)`` in
            ``pre.layout``; changed in place and returned.
        pre: the bundle's preprocessing, with ``resample_in_graph`` set.

    Raises:
        ConversionError: ``pre`` has no in-graph resample, or the graph's input is not the expected one.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kimchi_edge.runtime.preprocess import batch_resample_taps

    if not pre.resample_in_graph:
        raise ConversionError("prepend_batch_resample: the preprocessing does not put the batch resample in the graph")
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ConversionError(f"prepend_batch_resample: expected one float input {INPUT_NAME!r}, found {[i.name for i in inputs]}")
    old = inputs[0]
    batch_dim = onnx.TensorShapeProto.Dimension()
    batch_dim.CopyFrom(old.type.tensor_type.shape.dim[0])
    P = RESAMPLE_PREFIX
    pixels = P + "pixels"  # what the old graph read as its input
    for node in g.node:
        node.input[:] = [pixels if n == INPUT_NAME else n for n in node.input]

    (ri, rw), (ci, cw) = batch_resample_taps(pre.resize_height, pre.resize_width, pre.height, pre.width, pre.batch_square, pre.batch_crop)
    axis = 1 if pre.layout == "NHWC" else 2  # the height axis; width is the next one
    swap = list(range(4))
    swap[axis], swap[axis + 1] = swap[axis + 1], swap[axis]
    nodes = [helper.make_node("Cast", [INPUT_NAME], [P + "float"], name=P + "cast", to=TensorProto.FLOAT)]
    new_inits = []

    def one_axis(src: str, idx: np.ndarray, w: np.ndarray, tag: str) -> str:
        """out[i] = sum_k w[i, k] * src[idx[i, k]] along ``axis``, k in order (as the host does)."""
        terms = []
        for k in range(idx.shape[1]):
            name = f"{P}{tag}_tap{k}"
            new_inits.append(numpy_helper.from_array(idx[:, k].astype(np.int64), name + "_index"))
            new_inits.append(numpy_helper.from_array(w[:, k].astype(np.float32).reshape((-1,) + (1,) * (3 - axis)), name + "_weight"))
            nodes.append(helper.make_node("Gather", [src, name + "_index"], [name + "_rows"], name=name + "_gather", axis=axis))
            nodes.append(helper.make_node("Mul", [name + "_rows", name + "_weight"], [name], name=name + "_mul"))
            terms.append(name)
        out = f"{P}{tag}"
        nodes.append(helper.make_node("Sum", terms, [out], name=out + "_sum") if len(terms) > 1
                     else helper.make_node("Identity", terms, [out], name=out + "_sum"))
        return out

    rows = one_axis(P + "float", ri, rw, "rows")
    nodes.append(helper.make_node("Transpose", [rows], [P + "rows_t"], name=P + "swap", perm=swap))
    cols = one_axis(P + "rows_t", ci, cw, "cols")
    nodes.append(helper.make_node("Transpose", [cols], [P + "resampled"], name=P + "swap_back", perm=swap))
    new_inits += [numpy_helper.from_array(np.array(0.0, dtype=np.float32), P + "min"),
                  numpy_helper.from_array(np.array(255.0, dtype=np.float32), P + "max")]
    nodes.append(helper.make_node("Clip", [P + "resampled", P + "min", P + "max"], [pixels], name=P + "clip"))

    new_input = helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [None, *pre.input_shape])
    new_input.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)
    position = list(g.input).index(old)
    g.input.remove(old)
    g.input.insert(position, new_input)
    existing = list(g.node)
    del g.node[:]
    g.node.extend(nodes + existing)
    g.initializer.extend(new_inits)
    return model


def ops_named_in(exc: BaseException) -> list[str]:
    """Operator names (``aten::foo``, ``mylib::bar``) mentioned anywhere in an exception chain."""
    texts, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(f"{e}")
        e = e.__cause__ or e.__context__
    text = "\n".join(texts)
    found: list[str] = []
    for ns, op in re.findall(r"torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)", text):
        found.append(f"{ns}::{op}")
    for ns, op in re.findall(r"\b([A-Za-z_]\w*)::([A-Za-z_]\w*)", text):
        if ns not in ("torch", "c10", "at", "std", "onnx", "prim", "jit"):
            found.append(f"{ns}::{op}")
    for ns, op in re.findall(r"\b(aten|prims)\.([A-Za-z_]\w*)", text):
        found.append(f"{ns}::{op}")
    return list(dict.fromkeys(found))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def _silence_fds():
    """Silence C++-level prints (the legacy exporter dumps whole graphs to stderr when it fails)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # pragma: no cover
        yield
        return
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
            except OSError:
                pass
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = [_ANSI.sub("", ln).strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)[:limit]


def _export_dynamo(wrapper: Any, example: Any, opset: int) -> Any:
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes={"image": {0: batch}},
            external_data=False,
            optimize=True,
            verbose=False,
        )
    return program.model_proto


def _export_legacy(wrapper: Any, example: Any, opset: int) -> Any:
    import onnx
    import torch

    with tempfile.TemporaryDirectory(prefix="kimchi-edge-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings(), _silence_fds():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        return onnx.load(str(path), load_external_data=True)


def set_metadata(model: Any, meta: ModelMeta, **extra: str) -> None:
    """Write labels, preprocessing and the interface into ``metadata_props`` (replacing old values)."""
    pre = meta.preprocessing
    props = {
        META_LABELS: json.dumps(list(meta.labels), ensure_ascii=False),
        META_PREPROCESSING: json.dumps(to_dict(pre), ensure_ascii=False),
        META_ARCHITECTURE: meta.architecture,
        META_INTERFACE: json.dumps(
            {"input": INPUT_NAME, "dtype": pre.dtype, "layout": pre.layout, "channels": pre.channels,
             "height": pre.input_height, "width": pre.input_width, "resample_in_graph": pre.resample_in_graph,
             "output": OUTPUT_NAME, "output_kind": "logits"},
            ensure_ascii=False,
        ),
        **extra,
    }
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(path: str | Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as a dict (reads the graph only, via onnxruntime)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return dict(sess.get_modelmeta().custom_metadata_map)


def check_onnx_model(model: Any, *, where: str, dtype: str = "uint8", shape: tuple[int, ...] | None = None) -> None:
    """``onnx.checker`` (full check, with shape inference) and the interface kimchi-edge promises
    (one input ``image`` of the bundle's ``dtype`` with a dynamic batch axis and, when given, the per-image
    ``shape`` (``Preprocessing.input_shape``), one self-contained file).

    Raises:
        ConversionError: the checker fails, the file would need external data, or the interface is wrong.
    """
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ConversionError(f"{where}: onnx.checker rejects the graph: {_first_line(exc)}") from exc
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ConversionError(f"{where}: initializer {init.name} is stored as external data; expected one self-contained file")
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise ConversionError(f"{where}: expected one input {INPUT_NAME!r}, found {[i.name for i in inputs]}")
    t = inputs[0].type.tensor_type
    expected = {"uint8": onnx.TensorProto.UINT8, "float32": onnx.TensorProto.FLOAT}[dtype]
    if t.elem_type != expected:
        raise ConversionError(
            f"{where}: input {INPUT_NAME!r} is {onnx.TensorProto.DataType.Name(t.elem_type)}; "
            f"expected {onnx.TensorProto.DataType.Name(expected)}"
        )
    if not t.shape.dim or t.shape.dim[0].dim_value:
        raise ConversionError(f"{where}: the batch axis of {INPUT_NAME!r} is fixed; expected a dynamic batch")
    dims = tuple(d.dim_value for d in t.shape.dim[1:])
    if shape is not None and dims != tuple(shape):
        raise ConversionError(f"{where}: input {INPUT_NAME!r} is (N, {', '.join(map(str, dims))}); expected (N, {', '.join(map(str, shape))})")
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if opsets.get("ai.onnx", 0) < MIN_OPSET:
        raise ConversionError(f"{where}: opset {opsets.get('ai.onnx')} < {MIN_OPSET}")


def _ort_logits(model_bytes: bytes, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def onnx_from_learner(
    learn: Any,
    meta: ModelMeta,
    out_path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    log: Callable[[str], None] = print,
) -> OnnxExport:
    """Export ``learn.model`` to ``out_path`` (FP32, NHWC 0-255 input in the bundle's dtype, normalisation folded in).

    Args:
        learn: a fastai learner (only ``learn.model`` is used), or a bare ``torch.nn.Module``.
        meta: labels and preprocessing (from ``model_meta.json``).
        out_path: the ONNX file to write (atomically).
        opset: ONNX opset, >= 17.
        exporter: ``"auto"`` (dynamo, then legacy with a stated reason), ``"dynamo"`` or ``"legacy"``.
        log: where to say that the legacy exporter was used and why.

    Returns:
        An :class:`OnnxExport` with the exporter used and the ORT-vs-torch check.

    Raises:
        ConversionError: the model cannot be exported (the op is named), or the result fails
            ``onnx.checker`` or the interface checks.
    """
    import time

    import onnx
    import torch

    if opset < MIN_OPSET:
        raise ConversionError(f"opset {opset} is too old; kimchi-edge exports opset >= {MIN_OPSET}")
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ConversionError(f"unknown exporter {exporter!r}; choose auto, dynamo or legacy")
    t0 = time.perf_counter()
    model = getattr(learn, "model", learn)
    model = model.eval().cpu().float()
    pre = meta.preprocessing
    # The network part is exported as it always was: float32 pixels at the network size.  With the batch
    # resample in the graph, its nodes are prepended afterwards (prepend_batch_resample).
    net_pre = dataclasses.replace(pre, resample_in_graph=False, dtype="float32") if pre.resample_in_graph else pre
    wrapper = normalizing_module(model, net_pre)
    shape = pre.batch_shape(2)
    gen = torch.Generator().manual_seed(0)
    example = _example(net_pre.batch_shape(2), net_pre.dtype, gen)

    used, fallback_reason, proto = "", "", None
    errors: list[BaseException] = []
    if exporter in ("auto", "dynamo"):
        try:
            proto, used = _export_dynamo(wrapper, example, opset), "dynamo"
        except Exception as exc:  # the exporter raises many types (ConversionError, TorchExportError, ...)
            errors.append(exc)
            ops = ops_named_in(exc)
            fallback_reason = (f"the dynamo exporter cannot translate {', '.join(ops)} ({type(exc).__name__})" if ops
                               else f"the dynamo exporter failed: {_first_line(exc)}")
            if exporter == "auto":
                log(f"ONNX: {fallback_reason}; falling back to the legacy TorchScript-based exporter")
    if proto is None and exporter in ("auto", "legacy"):
        try:
            proto, used = _export_legacy(wrapper, example, opset), "legacy-torchscript"
        except Exception as exc:
            errors.append(exc)
    if proto is None:
        ops = list(dict.fromkeys(op for e in errors for op in ops_named_in(e)))
        what = f"op {', '.join(ops)}" if ops else "an operation"
        raise ConversionError(
            f"cannot export {meta.architecture} to ONNX: {what} is not supported by the ONNX exporter(s) "
            f"({_first_line(errors[-1], 200)})"
        ) from errors[-1]

    if pre.resample_in_graph:
        prepend_batch_resample(proto, pre)
    set_metadata(proto, meta)
    proto.doc_string = (
        f"kimchi-edge: {meta.architecture} image classifier, {len(meta.labels)} classes; input {INPUT_NAME} {pre.dtype} "
        f"(N, {', '.join(map(str, pre.input_shape))}) RGB, output {OUTPUT_NAME} (N, {len(meta.labels)})"
    )
    check_onnx_model(proto, where="exported ONNX", dtype=pre.dtype, shape=pre.input_shape)
    data = proto.SerializeToString()

    # Sanity check against torch on batches of 3 and 1 (proves the batch axis is really dynamic); with the
    # resample in the graph, torch gets the host's resample of the same uint8 batch.
    max_diff = 0.0
    host = Preprocessor(pre)
    for n in (3, 1):
        x = _example((n, *shape[1:]), pre.dtype, gen)
        with torch.no_grad():
            ref = wrapper(torch.from_numpy(host.network_pixels(x.numpy())) if pre.resample_in_graph else x).float().numpy()
        try:
            got = _ort_logits(data, x.numpy())
        except Exception as exc:
            raise ConversionError(f"ONNX Runtime cannot run the exported model on a batch of {n}: {_first_line(exc)}") from exc
        if got.shape != (n, len(meta.labels)):
            raise ConversionError(f"exported model returns shape {got.shape} for a batch of {n}; expected {(n, len(meta.labels))}")
        max_diff = max(max_diff, float(np.abs(got - ref).max()))
    scale = max(1.0, float(np.abs(ref).max()))
    if max_diff > 1e-2 * scale:
        raise ConversionError(f"exported ONNX disagrees with torch: max |Δlogit| {max_diff:.3g} on a random batch (logit scale {scale:.3g})")

    out_path = Path(out_path)
    atomic_write_bytes(out_path, data)
    return OnnxExport(
        path=out_path, exporter=used, opset=opset, fallback_reason=fallback_reason, max_abs_diff=max_diff,
        seconds=time.perf_counter() - t0,
        details={"ir_version": int(proto.ir_version), "onnx": onnx.__version__, "nodes": len(proto.graph.node)},
    )
