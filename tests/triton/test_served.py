"""The exported repository served by a real tritonserver: bytes in, the runtime's labels out.

The server is nvidia-pytriton's tritonserver 2.51 on loopback (fixture ``triton``), serving the colour bundle's
pipeline: the Python-backend preprocessing (kimchi_edge.runtime.preprocess), the gated ONNX in ONNX Runtime inside
the Python backend (this build has no onnxruntime backend) and the postprocessing.  Every answer is compared with
kimchi-edge's own ``Classifier`` on the same bytes.  Extra pipelines are exported into the served repository and
loaded on demand (explicit model control) to show that wrong labels, a config without a dtype and a tampered ONNX are
each caught.
"""

from __future__ import annotations

import io
import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from kimchi_edge.runtime.classifier import Classifier

from ..conftest import COLOR_LABELS, food10_root
from .conftest import QUEUE_DELAY_US, export

pytestmark = pytest.mark.triton


def encoded_images() -> list[bytes]:
    """Solid colours (PNG, JPEG) and, when present, real photos from food10's validation split."""
    from PIL import Image

    images = []
    for i, rgb in enumerate([(230, 30, 40), (30, 220, 50), (40, 30, 230), (200, 180, 20), (20, 190, 200), (128, 128, 128)]):
        buf = io.BytesIO()
        Image.new("RGB", (48 + i, 40), rgb).save(buf, "PNG" if i % 2 else "JPEG", quality=95)
        images.append(buf.getvalue())
    root = food10_root()
    if root is not None:
        for folder in sorted((root / "valid").iterdir())[:10]:
            images += [p.read_bytes() for p in sorted(folder.glob("*.jpg"))[:2]]
    return images


def infer(server, model: str, images: list[bytes], *, class_count: int = 0):
    """One request with ``len(images)`` rows; returns (probabilities, labels) or the classification strings."""
    from tritonclient import http

    client = http.InferenceServerClient(server.url, network_timeout=60)
    inp = http.InferInput("IMAGE", [len(images), 1], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1))
    if class_count:
        res = client.infer(model, [inp], outputs=[http.InferRequestedOutput("PROBABILITIES", class_count=class_count)])
        return [[s.decode("utf-8") for s in row] for row in res.as_numpy("PROBABILITIES")]
    res = client.infer(model, [inp], outputs=[http.InferRequestedOutput("PROBABILITIES"), http.InferRequestedOutput("LABEL")])
    return res.as_numpy("PROBABILITIES"), [b.decode("utf-8") for b in res.as_numpy("LABEL").reshape(-1)]


def mismatches(triton_answers: list[tuple[np.ndarray, str]], predictions) -> list[str]:
    """Where Triton's answer differs from the runtime's: the label, or probabilities by more than 0.001.

    Labels must be equal.  Probabilities only close: ONNX Runtime sums in another order for a batch of 5 than for 1
    (3e-5 seen here), and a batch is what Triton's dynamic batching makes.
    """
    out = []
    for i, ((probs, label), pred) in enumerate(zip(triton_answers, predictions)):
        if label != pred.label:
            out.append(f"image {i}: Triton says {label!r}, the runtime {pred.label!r}")
        elif not np.allclose(probs, pred.probabilities, atol=1e-3):
            out.append(f"image {i}: probabilities {np.round(probs, 5)} vs {np.round(pred.probabilities, 5)}")
    return out


@pytest.fixture(scope="module")
def runtime(color_bundle):
    with Classifier.from_bundle(color_bundle, backend="onnxruntime") as clf:
        yield clf


def test_ready_and_metrics_answer(triton):
    assert triton.http_status("/v2/health/ready") == 200
    assert triton.http_status("/v2/health/live") == 200
    assert triton.http_status("/v2/models/classifier/ready") == 200
    infer(triton, "classifier", encoded_images()[:1])
    with urllib.request.urlopen(triton.metrics_url, timeout=10) as r:
        text = r.read().decode()
    assert re.search(r'nv_inference_count\{model="classifier",version="1"\} [1-9]', text), text[:2000]


def test_labels_through_triton_equal_the_runtimes(triton, runtime):
    images = encoded_images()
    answers = [(p[0], lab[0]) for p, lab in (infer(triton, "classifier", [im]) for im in images)]
    predictions = [runtime.predict(im) for im in images]
    assert mismatches(answers, predictions) == []
    assert {a[1] for a in answers} <= set(COLOR_LABELS) and len({a[1] for a in answers}) == 3
    # several images in one request: the rows keep their order
    probs, labels = infer(triton, "classifier", images[:5])
    assert mismatches(list(zip(probs, labels)), predictions[:5]) == []


def test_classification_extension_gives_the_exact_korean_labels(triton, runtime):
    image = encoded_images()[1]  # green
    (row,) = infer(triton, "classifier", [image], class_count=3)
    pred = runtime.predict(image, top_k=3)
    assert [s.split(":", 2)[2] for s in row] == [lab for lab, _ in pred.top]
    assert row[0].split(":")[1:] == ["1", "초록 green"]


def test_concurrent_clients_are_batched_and_all_answered_right(triton, runtime):
    from tritonclient import http

    images = encoded_images()
    expected = [runtime.predict(im).label for im in images]
    client = http.InferenceServerClient(triton.url)
    before = _batch_sizes(client, "classifier_onnx_python")
    jobs = [i % len(images) for i in range(96)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: infer(triton, "classifier", [images[i]])[1][0], jobs))
    wrong = [(i, g, expected[i]) for i, g in zip(jobs, got) if g != expected[i]]
    assert wrong == []
    after = _batch_sizes(client, "classifier_onnx_python")
    new = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert sum(size * n for size, n in new.items()) == len(jobs)  # every request was classified exactly once
    assert any(size > 1 and n > 0 for size, n in new.items()), f"no batch of more than 1 under 8 clients: {new}"


def _batch_sizes(client, model: str) -> dict[int, int]:
    (stats,) = client.get_inference_statistics(model)["model_stats"]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def test_undecodable_bytes_get_the_runtimes_message(triton):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="12 bytes is not an image Pillow can decode") as exc:
        infer(triton, "classifier", [b"not an image"])
    assert "400" in str(exc.value)
    infer(triton, "classifier", encoded_images()[:1])  # and the server goes on


def test_wrong_labels_are_caught(triton, color_bundle, runtime):
    """A pipeline whose postprocessing reads a manifest with the labels reversed: the comparison must fail."""
    export(color_bundle, triton.repository, name="reversed", classify_with="python", max_queue_delay_us=QUEUE_DELAY_US)
    manifest_path = triton.repository / "reversed_postprocess" / "manifest.json"
    doc = json.loads(manifest_path.read_text(encoding="utf-8"))
    doc["model"]["labels"] = doc["model"]["labels"][::-1]
    manifest_path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    _client(triton).load_model("reversed")
    images = encoded_images()[:3]
    answers = [(p[0], lab[0]) for p, lab in (infer(triton, "reversed", [im]) for im in images)]
    found = mismatches(answers, [runtime.predict(im) for im in images])
    assert len(found) == 2 and all("Triton says" in m for m in found)  # blue<->red swapped; green stays in the middle


def test_config_without_dtype_is_refused_by_the_server(triton, color_bundle):
    from tritonclient.utils import InferenceServerException

    export(color_bundle, triton.repository, name="nodtype", classify_with="python")
    config = triton.repository / "nodtype_preprocess" / "config.pbtxt"
    config.write_text(config.read_text().replace("    data_type: TYPE_UINT8\n", "", 1))
    with pytest.raises(InferenceServerException, match="data_type"):
        _client(triton).load_model("nodtype")


def test_tampered_onnx_in_the_repository_is_refused_at_load(triton, color_bundle):
    from tritonclient.utils import InferenceServerException

    export(color_bundle, triton.repository, name="tampered", classify_with="python")
    onnx = triton.repository / "tampered_onnx_python" / "model.onnx"
    with open(onnx, "ab") as f:
        f.write(b"\0")
    with pytest.raises(InferenceServerException, match="has been modified"):
        _client(triton).load_model("tampered")


def _client(server):
    from tritonclient import http

    return http.InferenceServerClient(server.url, network_timeout=120)


def test_the_documented_client_example_runs(triton, runtime, tmp_path, capsys, monkeypatch):
    """docs/TRITON.md's client block, run as written against the served pipeline (only host and file replaced)."""
    from ..conftest import REPO

    doc = (REPO / "docs" / "TRITON.md").read_text(encoding="utf-8")
    block = doc.split("<!-- client-example -->", 1)[1].split("<!-- /client-example -->", 1)[0]
    code = block.split("```python", 1)[1].split("```", 1)[0]
    image = encoded_images()[2]  # blue
    (tmp_path / "kimchi.jpg").write_bytes(image)
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("localhost:8000", triton.url), "TRITON.md", "exec"), {})
    label, top = capsys.readouterr().out.strip().split(" [", 1)
    pred = runtime.predict(image, top_k=3)
    assert label == pred.label == "파랑 blue"
    assert top.startswith(f"'{pred.top[0][1]:.6f}:2:파랑 blue'")
