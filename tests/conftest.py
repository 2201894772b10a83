"""Shared fixtures.

``color_bundle`` is a small but real bundle: an ONNX graph (built with ``onnx.helper``, no torch) that
classifies an image by its mean colour into three Korean-named classes.  It lets runtime, server and
demo tests run in seconds with real ONNX Runtime sessions and predictable answers.  The end-to-end
fixtures that train a fastai learner live in ``tests/train`` and ``tests/convert``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kimchi_edge.runtime.fsutil import sha256_file
from kimchi_edge.runtime.manifest import Artifact, BundleManifest, ModelMeta, Preprocessing, write_manifest

COLOR_LABELS = ("빨강 red", "초록 green", "파랑 blue")
REPO = Path(__file__).resolve().parents[1]


def food10_root() -> Path | None:
    """``$KIMCHI_EDGE_FOOD10`` or ``../shared/data/food10`` when present (never copied into the repo)."""
    env = os.environ.get("KIMCHI_EDGE_FOOD10")
    root = Path(env) if env else REPO.parent / "shared" / "data" / "food10"
    return root if (root / "valid").is_dir() else None


def make_color_onnx(path: Path, size: int = 32) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.eye(3, dtype=np.float32) * 10.0
    b = np.zeros(3, dtype=np.float32)
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["f", "scale"], ["x"]),
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
        helper.make_node("Sub", ["m", "center"], ["c"]),
        helper.make_node("MatMul", ["c", "W"], ["z"]),
        helper.make_node("Add", ["z", "B"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "center"),
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(b, "B"),
    ]
    graph = helper.make_graph(
        nodes,
        "color",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


#: the verification images of the colour bundle: (file, label, RGB)
COLOR_IMAGES = [(f"{lab}/{i}.png", lab, rgb) for lab, base in zip(COLOR_LABELS, ((230, 30, 40), (30, 220, 50), (40, 30, 230)))
                for i, rgb in enumerate([base, tuple(min(255, c + 15) for c in base), tuple(max(0, c - 20) for c in base)])]


def color_reference_probabilities(rgb) -> np.ndarray:
    """What the mean-colour "learner" says about a solid image: softmax(10 * (rgb / 255 - 0.5))."""
    z = 10.0 * (np.asarray(rgb, dtype=np.float64) / 255.0 - 0.5)
    e = np.exp(z - z.max())
    return e / e.sum()


def make_color_bundle(folder: Path, *, gated: bool = True) -> Path:
    """The colour bundle, gated for real: verification images, ``reference.json``, then ``run_gate`` on them.

    uint8 input without a batch resample: a combination training writes (Pillow's geometry alone is exact).
    """
    from PIL import Image

    from kimchi_edge.runtime.fsutil import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    make_color_onnx(folder / "model.onnx")
    pre = Preprocessing(height=32, width=32, resize_height=32, resize_width=32, batch_resize=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    meta = ModelMeta(labels=COLOR_LABELS, architecture="mean-colour", preprocessing=pre)
    art = Artifact(
        name="onnx-fp32", file="model.onnx", format="onnx", precision="fp32",
        sha256=sha256_file(folder / "model.onnx"), size_bytes=(folder / "model.onnx").stat().st_size,
    )
    write_manifest(folder, BundleManifest(model=meta, artifacts=(art,), recommended={"onnxruntime": "onnx-fp32"}))
    if not gated:
        return folder
    images = folder.parent / "verification-images"
    items = []
    for file, label, rgb in COLOR_IMAGES:
        (images / file).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), rgb).save(images / file)
        p = color_reference_probabilities(rgb)
        items.append({"file": file, "label": label, "prediction": COLOR_LABELS[int(p.argmax())], "probabilities": p.tolist()})
    atomic_write_json(folder / "reference.json", {"data_root": str(images), "labels": list(COLOR_LABELS), "items": items,
                                                  "source": {"what": "mean-colour formula (the test's 'learner')"}})
    from kimchi_edge.convert.bundle import write_verification_set
    from kimchi_edge.convert.gate import run_gate
    from kimchi_edge.convert.runfolder import Item
    from kimchi_edge.runtime.manifest import read_manifest

    vs = write_verification_set(folder, [Item(f, lab) for f, lab, _ in COLOR_IMAGES], [images / f for f, _, _ in COLOR_IMAGES],
                                COLOR_LABELS)
    m = read_manifest(folder)
    write_manifest(folder, m.replace(source={"verification": "verification.json", "verification_images": len(vs.images),
                                             "verification_sha256": sha256_file(folder / "verification.json")}))
    run_gate(folder, data_root=images, quiet=True, openvino=False)  # the shared bundle is ONNX Runtime-only; test_openvino re-gates a copy
    return folder


@pytest.fixture(scope="session")
def color_bundle(tmp_path_factory) -> Path:
    """A real ONNX bundle classifying by mean colour into ``COLOR_LABELS``, passed by a real accuracy-gate run."""
    return make_color_bundle(tmp_path_factory.mktemp("color_bundle") / "bundle")


@pytest.fixture(scope="session")
def ungated_color_bundle(tmp_path_factory) -> Path:
    """The same bundle before any gate ran (what ``convert --no-gate`` leaves)."""
    return make_color_bundle(tmp_path_factory.mktemp("ungated_bundle") / "bundle", gated=False)


@pytest.fixture(scope="session")
def food10() -> Path:
    root = food10_root()
    if root is None:
        pytest.skip("food10 not found: set KIMCHI_EDGE_FOOD10 or place it at ../shared/data/food10")
    return root


def solid_image(rgb: tuple[int, int, int], size: tuple[int, int] = (64, 48)):
    from PIL import Image

    return Image.new("RGB", size, rgb)
