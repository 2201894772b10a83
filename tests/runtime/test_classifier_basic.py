import numpy as np
import pytest

from kimchi_edge.runtime import BundleError, Classifier, InvalidInputError
from tests.conftest import COLOR_LABELS, solid_image


def test_predicts_by_colour_with_korean_labels(color_bundle):
    with Classifier.from_bundle(color_bundle) as clf:
        assert clf.labels == list(COLOR_LABELS)
        for i, rgb in enumerate([(250, 10, 10), (10, 250, 10), (10, 10, 250)]):
            pred = clf.predict(solid_image(rgb))
            assert pred.label == COLOR_LABELS[i]
            assert pred.probability > 0.9
            assert set(pred.timings_ms) == {"decode", "preprocess", "infer", "total"}
        assert clf.info["backend"] == "onnxruntime"
        assert clf.info["providers"] == ["CPUExecutionProvider"] or "CPUExecutionProvider" in clf.info["providers"]


def test_tampered_artifact_is_refused(color_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(color_bundle, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="modified"):
        Classifier.from_bundle(copy)


def test_wrong_array_shape_is_explained(color_bundle):
    with Classifier.from_bundle(color_bundle) as clf:
        with pytest.raises(InvalidInputError, match=r"shape \(4, 4\)"):
            clf.predict(np.zeros((4, 4), dtype=np.uint8))


def test_no_tensorrt_note_where_tensorrt_cannot_matter(color_bundle, monkeypatch):
    """No engine in the bundle and no CUDA GPU: nothing to say about TensorRT (issue: a note on every CPU predict)."""
    import kimchi_edge.runtime.backends as backends

    monkeypatch.setattr(backends, "_cuda_gpu_present", lambda: False)
    with Classifier.from_bundle(color_bundle) as clf:
        assert not any("TensorRT" in n for n in clf.info["notes"]), clf.info["notes"]


def test_tensorrt_note_once_when_a_gpu_is_here_but_no_engine(color_bundle, monkeypatch):
    import kimchi_edge.runtime.backends as backends

    monkeypatch.setattr(backends, "_cuda_gpu_present", lambda: True)  # the check a GPU machine's driver answers
    with Classifier.from_bundle(color_bundle) as clf:
        trt = [n for n in clf.info["notes"] if "TensorRT" in n]
        assert len(trt) == 1 and "kimchi-edge build-engine" in trt[0], clf.info["notes"]
        assert clf.info["backend"] == "onnxruntime"
