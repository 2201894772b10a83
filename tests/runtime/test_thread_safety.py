"""One Classifier shared by several threads answers exactly as it does sequentially."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from kimchi_edge.runtime import Classifier
from tests.conftest import COLOR_LABELS


def varied_inputs(n: int = 24) -> list:
    """Encoded JPEG/PNG bytes, PIL images and arrays of random sizes and colours."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        w, h = int(rng.integers(8, 300)), int(rng.integers(8, 300))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr[..., i % 3] = np.maximum(arr[..., i % 3], 200)  # a dominant channel, varying strength elsewhere
        im = Image.fromarray(arr, "RGB")
        if i % 3 == 0:
            buf = io.BytesIO()
            im.save(buf, "JPEG" if i % 2 else "PNG")
            out.append(buf.getvalue())
        elif i % 3 == 1:
            out.append(im)
        else:
            out.append(arr)
    return out


def test_concurrent_predict_matches_sequential(color_bundle):
    images = varied_inputs()
    with Classifier.from_bundle(color_bundle, backend="onnxruntime") as clf:
        expected = [clf.predict(im) for im in images]
        assert {p.label for p in expected} == set(COLOR_LABELS)  # the inputs really differ
        start = threading.Barrier(6)

        def worker(offset: int):
            start.wait(timeout=30)  # all threads hit the session at once
            got = []
            for round_ in range(3):
                for i in range(len(images)):
                    j = (i + offset + round_) % len(images)
                    got.append((j, clf.predict(images[j])))
            return got

        with ThreadPoolExecutor(max_workers=6) as pool:
            results = [f.result(timeout=120) for f in [pool.submit(worker, k * 5) for k in range(6)]]
        checked = 0
        for got in results:
            for j, pred in got:
                assert pred.label == expected[j].label
                np.testing.assert_allclose(pred.probabilities, expected[j].probabilities, rtol=0, atol=1e-6)
                checked += 1
        assert checked == 6 * 3 * len(images)


def test_concurrent_predict_batch_matches_sequential(color_bundle):
    images = varied_inputs(16)
    with Classifier.from_bundle(color_bundle, backend="onnxruntime") as clf:
        expected = [p.label for p in clf.predict_batch(images, batch_size=5)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(clf.predict_batch, images, 3, bs) for bs in (1, 4, 5, 16) for _ in range(2)]
            for f in futures:
                assert [p.label for p in f.result(timeout=120)] == expected
