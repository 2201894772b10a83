"""The Python API: ``Classifier.from_bundle(path).predict(image)``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backends import create_backend
from .errors import InvalidInputError, UsageError
from .manifest import BundleManifest, read_manifest
from .preprocess import DEFAULT_MAX_PIXELS, ImageInput, Preprocessor


@dataclass(frozen=True)
class Prediction:
    """The result for one image.

    Attributes:
        label: the top-1 label (exact Unicode text from the bundle).
        probability: its probability.
        top: ``[(label, probability), ...]`` best first, ``top_k`` long.
        probabilities: the full probability vector in label order.
        timings_ms: ``decode``, ``preprocess``, ``infer`` and ``total`` in milliseconds (batch calls
            report the batch's inference time divided by the batch size).
    """

    label: str
    probability: float
    top: list[tuple[str, float]]
    probabilities: np.ndarray = field(repr=False)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "probability": self.probability,
            "top": [{"label": lab, "probability": p} for lab, p in self.top],
            "timings_ms": self.timings_ms,
        }


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Classifier:
    """Loads a bundle once and classifies images; safe to call from several threads.

    Use :meth:`from_bundle`.  ``info`` says which backend, provider and artifact are really in use.
    """

    def __init__(self, bundle_dir: Path, manifest: BundleManifest, backend: Any, preprocessor: Preprocessor, notes: list[str]):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.preprocessor = preprocessor
        self.notes = notes
        self.labels = list(manifest.labels)

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        backend: str = "auto",
        *,
        artifact: str | None = None,
        precision: str | None = None,
        threads: int | None = None,
        providers: list[str] | None = None,
        verify: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        fast_decode: bool = True,
    ) -> "Classifier":
        """Load a bundle.

        Args:
            path: the bundle folder (with ``manifest.json``).
            backend: ``"auto"`` (TensorRT when a compatible engine exists, else ONNX Runtime),
                ``"onnxruntime"`` or ``"tensorrt"``.
            artifact: force an artifact by name (``"onnx-fp32"``, ``"onnx-int8"``, ...).
            precision: prefer ``"fp32"``, ``"fp16"`` or ``"int8"``.
            threads: CPU threads for ONNX Runtime.
            providers: force ONNX Runtime execution providers.
            verify: check the artifact's SHA-256 before loading it.
            max_pixels: refuse larger images before decoding them.
            fast_decode: allow reduced-scale JPEG decoding of large photos.

        Raises:
            BundleError: missing/malformed/tampered bundle.
            UsageError: unknown backend or artifact.
        """
        bundle_dir = Path(path)
        manifest = read_manifest(bundle_dir)
        be, notes = create_backend(
            backend, bundle_dir, manifest, artifact=artifact, precision=precision, threads=threads,
            providers=providers, verify=verify,
        )
        pre = Preprocessor(manifest.preprocessing, max_pixels=max_pixels, fast_decode=fast_decode)
        return cls(bundle_dir, manifest, be, pre, notes)

    # ------------------------------------------------------------------ info

    @property
    def info(self) -> dict[str, Any]:
        """Backend, providers, artifact, precision, labels and input size actually in use."""
        p = self.manifest.preprocessing
        return {
            **self.backend.info(),
            "bundle": str(self.bundle_dir),
            "architecture": self.manifest.model.architecture,
            "labels": self.labels,
            "input_size": [p.height, p.width],
            "notes": list(self.notes),
        }

    # ------------------------------------------------------------------ inference

    def _result(self, probs: np.ndarray, top_k: int, timings: dict[str, float]) -> Prediction:
        k = max(1, min(int(top_k), len(self.labels)))
        order = np.argsort(-probs, kind="stable")[:k]
        top = [(self.labels[i], float(probs[i])) for i in order]
        return Prediction(top[0][0], top[0][1], top, probs, timings)

    def infer_array(self, batch: np.ndarray) -> np.ndarray:
        """Run an already-preprocessed ``uint8`` batch; returns probabilities ``(N, classes)``."""
        expected = self.preprocessor.input_shape
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise InvalidInputError(f"got a batch of shape {tuple(batch.shape)}; expected (N, {', '.join(map(str, expected))})")
        logits = self.backend.infer(np.ascontiguousarray(batch))
        return softmax(logits) if self.manifest.output == "logits" else logits

    def predict(self, image: ImageInput, top_k: int = 3) -> Prediction:
        """Classify one image (path, bytes, PIL image or ``HxWx3`` uint8 array)."""
        t0 = time.perf_counter()
        im = self.preprocessor.decode(image)
        t1 = time.perf_counter()
        x = self.preprocessor.transform(im)[None]
        t2 = time.perf_counter()
        probs = self.infer_array(x)[0]
        t3 = time.perf_counter()
        timings = {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3, "infer": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}
        return self._result(probs, top_k, timings)

    def predict_batch(self, images: Sequence[ImageInput], top_k: int = 3, batch_size: int = 32) -> list[Prediction]:
        """Classify several images, ``batch_size`` at a time; one bad image raises for the whole call."""
        if isinstance(images, (str, bytes, Path, np.ndarray)):
            raise UsageError("predict_batch takes a list of images; use predict for one")
        results: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            t0 = time.perf_counter()
            decoded = [self.preprocessor.decode(im) for im in chunk]
            t1 = time.perf_counter()
            x = np.stack([self.preprocessor.transform(im) for im in decoded])
            t2 = time.perf_counter()
            probs = self.infer_array(x)
            t3 = time.perf_counter()
            n = len(chunk)
            timings = {"decode": (t1 - t0) * 1e3 / n, "preprocess": (t2 - t1) * 1e3 / n, "infer": (t3 - t2) * 1e3 / n, "total": (t3 - t0) * 1e3 / n}
            results.extend(self._result(p, top_k, dict(timings)) for p in probs)
        return results

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
