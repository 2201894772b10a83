"""fastai's batch resample inside the ONNX graph (``Preprocessing.resample_in_graph``) equals the host's.

The host resample (``runtime.preprocess.resample``) is what ``test_preprocess_vs_fastai.py`` proves equal to
fastai; here the graph's ``preprocess/*`` nodes (``convert.onnx_export.prepend_batch_resample``) are run by
ONNX Runtime on the uint8 item-size image of real photos (food10 when present, else generated photo-like
JPEGs) and compared with it.  Bundles written before the field existed must load and run as before.
No torch: the "networks" are small ONNX graphs built with ``onnx.helper``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from kimchi_edge.runtime.errors import BundleError, InvalidInputError
from kimchi_edge.runtime.manifest import MANIFEST_NAME, Artifact, BundleManifest, ModelMeta, Preprocessing, write_manifest
from kimchi_edge.runtime.preprocess import Preprocessor

from ..conftest import food10_root

onnx = pytest.importorskip("onnx", reason="builds ONNX graphs: needs onnx (pip install 'kimchi-edge[dev]')")

HOST = Preprocessing(height=224, width=224, resize_height=460, resize_width=460, batch_resize=True, batch_crop=1.0,
                     mean=(0.5,) * 3, std=(0.5,) * 3, dtype="float32")
SPECS = {
    "460->224 square": HOST,
    "non-square (300x400 -> 160x224, crop 0.75)": dataclasses.replace(HOST, resize_height=300, resize_width=400, height=160,
                                                                        width=224, batch_crop=0.75),
    "squish 240->128, >2x: area pre-filter": dataclasses.replace(HOST, resize_method="squish", resize_height=240, resize_width=240,
                                                                 height=128, width=128, batch_square=False),
    "NCHW": dataclasses.replace(HOST, layout="NCHW"),
}


def in_graph(pre: Preprocessing) -> Preprocessing:
    return dataclasses.replace(pre, resample_in_graph=True, dtype="uint8")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    root = food10_root()
    if root is not None:
        files = sorted((root / "valid").rglob("*.jpg"))
        return files[:: max(1, len(files) // 12)][:12]
    from kimchi_edge.runtime.bench_cli import photo_like_jpeg

    folder = tmp_path_factory.mktemp("photos")
    out = []
    for i, (w, h) in enumerate([(640, 480), (480, 640), (512, 512), (3000, 2250)]):
        out.append(folder / f"{i}.jpg")
        out[-1].write_bytes(photo_like_jpeg(w, h, seed=i))
    return out


def network(pre: Preprocessing, head: str = "pixels"):
    """A float32 "network" at the network size, as the exporter makes before the resample is prepended.

    ``head="pixels"`` returns its input (so the graph's output is what the network sees); ``"linear"``
    is a fixed random linear classifier over every pixel (3 classes).
    """
    from onnx import TensorProto, helper, numpy_helper

    shape = ["N", *dataclasses.replace(pre, resample_in_graph=False, dtype="float32").input_shape]
    inits = []
    if head == "pixels":
        nodes = [helper.make_node("Identity", ["image"], ["logits"])]
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)
    else:
        n = int(np.prod(shape[1:]))
        w = np.random.default_rng(0).normal(0, 1 / np.sqrt(n), (n, 3)).astype(np.float32)
        nodes = [helper.make_node("Div", ["image", "scale"], ["x"]), helper.make_node("Flatten", ["x"], ["flat"], axis=1),
                 helper.make_node("MatMul", ["flat", "W"], ["logits"])]
        inits = [numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"), numpy_helper.from_array(w, "W")]
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def resampling_model(pre: Preprocessing):
    """The in-graph resample of ``pre`` in front of the pixel-returning network, checked by onnx."""
    from kimchi_edge.convert.onnx_export import prepend_batch_resample

    model = prepend_batch_resample(network(pre), in_graph(pre))
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": batch})[0]


@pytest.mark.parametrize("name", list(SPECS))
def test_graph_resample_equals_the_host_resample_on_real_photos(photos, name):
    host_pre = SPECS[name]
    host = Preprocessor(host_pre, fast_decode=False).batch(photos)  # today's model input: float32, network size
    graph = Preprocessor(in_graph(host_pre), fast_decode=False)
    items = graph.batch(photos)
    assert items.dtype == np.uint8 and items.shape == (len(photos), *in_graph(host_pre).input_shape)
    got = run(resampling_model(host_pre), items)
    assert got.shape == host.shape
    diff = float(np.abs(got - host).max())
    assert diff <= 1e-3, f"{name}: max |graph - host| = {diff:.2g}/255 on {len(photos)} photos"
    # the host copy of the in-graph step (what the gate feeds TorchScript) is the old path, bit for bit
    assert np.array_equal(graph.network_pixels(items), host)
    assert np.array_equal(graph.normalize(items), Preprocessor(host_pre).normalize(host))


def test_a_wrong_resample_in_the_graph_is_caught(photos):
    """The comparison above can fail: taps of another crop are far off."""
    wrong = resampling_model(dataclasses.replace(HOST, batch_crop=0.8))
    items = Preprocessor(in_graph(HOST), fast_decode=False).batch(photos[:4])
    host = Preprocessor(HOST, fast_decode=False).batch(photos[:4])
    assert float(np.abs(run(wrong, items) - host).max()) > 20


def test_the_resample_nodes_come_first_and_are_named_preprocess(photos):
    model = resampling_model(HOST)
    (inp,) = model.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [460, 460, 3]
    ops = [n.op_type for n in model.graph.node]
    first_network_node = ops.index("Identity", 1)
    assert all(n.name.startswith("preprocess/") for n in model.graph.node[:first_network_node])
    assert not {"MatMul", "Gemm", "Conv"} & set(ops[:first_network_node])  # INT8 keeps this prefix in float


def test_spec_reports_the_real_model_input():
    new = in_graph(HOST)
    assert new.input_shape == (460, 460, 3) and new.batch_shape(2) == (2, 460, 460, 3)
    assert new.example_batch(2).dtype == np.uint8 and new.example_batch(2).shape == (2, 460, 460, 3)
    assert (new.height, new.width) == (224, 224)  # what the network sees
    assert dataclasses.replace(new, layout="NCHW").input_shape == (3, 460, 460)
    assert HOST.input_shape == (224, 224, 3) and HOST.example_batch().dtype == np.float32
    with pytest.raises(BundleError, match="no batch resample"):
        dataclasses.replace(HOST, batch_resize=False, resample_in_graph=True, dtype="uint8")
    with pytest.raises(BundleError, match="got dtype 'float32'"):
        dataclasses.replace(HOST, resample_in_graph=True)


def _bundle(folder: Path, pre: Preprocessing, model) -> Path:
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"))
    from kimchi_edge.runtime.fsutil import sha256_file

    art = Artifact(name="onnx-fp32", file="model.onnx", format="onnx", precision="fp32", sha256=sha256_file(folder / "model.onnx"),
                   size_bytes=(folder / "model.onnx").stat().st_size, input=f"{pre.dtype}-{pre.layout.lower()}")
    meta = ModelMeta(labels=("가", "나", "다"), architecture="linear", preprocessing=pre)
    write_manifest(folder, BundleManifest(model=meta, artifacts=(art,), recommended={"onnxruntime": "onnx-fp32"}))
    return folder


def test_old_bundle_without_the_field_runs_as_before_and_the_new_one_agrees(photos, tmp_path):
    from kimchi_edge.convert.onnx_export import prepend_batch_resample
    from kimchi_edge.runtime.classifier import Classifier

    old = _bundle(tmp_path / "old", HOST, network(HOST, "linear"))
    manifest = json.loads((old / MANIFEST_NAME).read_text(encoding="utf-8"))
    del manifest["model"]["preprocessing"]["resample_in_graph"]  # written before the field existed
    (old / MANIFEST_NAME).write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    new = _bundle(tmp_path / "new", in_graph(HOST), prepend_batch_resample(network(HOST, "linear"), in_graph(HOST)))

    with Classifier.from_bundle(old, allow_ungated=True, threads=1) as a, Classifier.from_bundle(new, allow_ungated=True, threads=1) as b:
        assert a.preprocessor.spec.resample_in_graph is False
        x, _ = a.prepare(photos[0])
        assert x.dtype == np.float32 and x.shape == (224, 224, 3)  # the old interface, unchanged
        y, _ = b.prepare(photos[0])
        assert y.dtype == np.uint8 and y.shape == (460, 460, 3)
        pa = np.stack([p.probabilities for p in a.predict_batch(photos)])
        pb = np.stack([p.probabilities for p in b.predict_batch(photos)])
        assert [p.label for p in a.predict_batch(photos)] == [p.label for p in b.predict_batch(photos)]
        assert float(np.abs(pa - pb).max()) <= 1e-5
        # each backend refuses the other interface, saying what it expects
        with pytest.raises(InvalidInputError, match=r"dtype float32; this model expects uint8"):
            b.backend.infer(x[None])
        with pytest.raises(InvalidInputError, match=r"shape \(1, 224, 224, 3\); expected \(N, 460, 460, 3\)"):
            b.backend.infer(x[None].astype(np.uint8))
        with pytest.raises(InvalidInputError, match=r"expected \(N, 460, 460, 3\)"):
            b.infer_array(x[None].astype(np.uint8))


def test_phone_photo_through_the_in_graph_bundle(tmp_path):
    """A 3000x2250 JPEG (reduced-scale decode) gives the host path's label and probabilities."""
    from kimchi_edge.convert.onnx_export import prepend_batch_resample
    from kimchi_edge.runtime.bench_cli import photo_like_jpeg
    from kimchi_edge.runtime.classifier import Classifier

    jpeg = photo_like_jpeg(3000, 2250, seed=3)
    old = _bundle(tmp_path / "old", HOST, network(HOST, "linear"))
    new = _bundle(tmp_path / "new", in_graph(HOST), prepend_batch_resample(network(HOST, "linear"), in_graph(HOST)))
    with Classifier.from_bundle(old, allow_ungated=True) as a, Classifier.from_bundle(new, allow_ungated=True) as b:
        pa, pb = a.predict(jpeg), b.predict(jpeg)
    assert pa.label == pb.label
    assert float(np.abs(pa.probabilities - pb.probabilities).max()) <= 1e-5
