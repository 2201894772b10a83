"""The Python API: ``Classifier.from_bundle(path).predict(image)``."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backends import create_backend
from .errors import BackendError, InvalidInputError, UsageError
from .manifest import BundleManifest, read_manifest
from .preprocess import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, ImageInput, Preprocessor


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
        self.load_ms = 0.0
        self._calls = 0  # inferences running now; close() waits for them
        self._closed = False
        self._calls_cv = threading.Condition()

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
        max_decode_bytes: int | None = DEFAULT_MAX_DECODE_BYTES,
        fast_decode: bool | None = None,
        allow_ungated: bool = False,
    ) -> "Classifier":
        """Load a bundle.

        Args:
            path: the bundle folder (with ``manifest.json``).
            backend: ``"auto"`` (TensorRT when a compatible engine exists; else OpenVINO on x86-64 where it is
                installed and the gate passed the artifact on it; else ONNX Runtime), ``"onnxruntime"``, ``"tensorrt"``
                or ``"openvino"``.
            artifact: force an artifact by name (``"onnx-fp32"``, ``"onnx-int8"``, ...).
            precision: prefer ``"fp32"``, ``"fp16"`` or ``"int8"``.
            threads: CPU threads for ONNX Runtime / OpenVINO.
            providers: force ONNX Runtime execution providers.
            verify: check the artifact's SHA-256 before loading it.
            max_pixels: refuse larger images before decoding them.
            max_decode_bytes: refuse images whose decoding would take more memory than this (pixels x bytes per
                pixel of the file's mode, plus the RGB conversion), before decoding them.
            fast_decode: reduced-scale JPEG decoding of large photos.  ``None`` (default): only where the
                accuracy gate found it meets the FP32 thresholds on this bundle (``manifest.gate.fast_decode``);
                otherwise full-size decoding, which is what the gate judged.
            allow_ungated: run an artifact or execution provider the accuracy gate has not passed (failed, skipped,
                never gated); ``info["gated"]`` is then False and ``notes`` say so.  By default only gated artifacts
                run and a bundle whose FP32 artifact failed is refused.

        Returns:
            A loaded classifier; ``info`` and ``notes`` say which backend/artifact is used and why
            (e.g. why a TensorRT engine was passed over under ``"auto"``).

        Raises:
            BundleError: missing/malformed/tampered bundle, or an unknown artifact name.
            UsageError: unknown backend, or no artifact in the requested precision.
            TensorRTUnavailable: ``backend="tensorrt"`` and no engine of the bundle can run here.
            BackendError: TensorRT failed to load the engine (``backend="tensorrt"``).
        """
        t0 = time.perf_counter()
        bundle_dir = Path(path)
        manifest = read_manifest(bundle_dir)
        be, notes = create_backend(
            backend, bundle_dir, manifest, artifact=artifact, precision=precision, threads=threads,
            providers=providers, verify=verify, allow_ungated=allow_ungated,
        )
        if fast_decode is None:
            fast_decode = bool(manifest.gate and manifest.gate.fast_decode)
        pre = Preprocessor(manifest.preprocessing, max_pixels=max_pixels, fast_decode=fast_decode, max_decode_bytes=max_decode_bytes)
        clf = cls(bundle_dir, manifest, be, pre, notes)
        clf.load_ms = (time.perf_counter() - t0) * 1e3
        return clf

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
            "load_ms": round(self.load_ms, 1),
            "gated": not any(n.startswith("UNGATED:") for n in self.notes),
            "fast_decode": self.preprocessor.fast_decode,
            "notes": list(self.notes),
        }

    # ------------------------------------------------------------------ inference

    def prediction(self, probs: np.ndarray, top_k: int = 3, timings: dict[str, float] | None = None) -> Prediction:
        """Turn one probability vector into a :class:`Prediction` (top ``top_k`` labels, best first)."""
        k = max(1, min(int(top_k), len(self.labels)))
        order = np.argsort(-probs, kind="stable")[:k]
        top = [(self.labels[i], float(probs[i])) for i in order]
        return Prediction(top[0][0], top[0][1], top, probs, dict(timings or {}))

    def infer_array(self, batch: np.ndarray) -> np.ndarray:
        """Run an already-preprocessed ``uint8`` batch.

        Args:
            batch: ``(N, H, W, 3)`` ``uint8`` (``(N, 3, H, W)`` for NCHW bundles), as
                :meth:`prepare` or :class:`~kimchi_edge.runtime.preprocess.Preprocessor` make it.

        Returns:
            Probabilities ``(N, classes)`` in label order.

        Raises:
            InvalidInputError: the batch has the wrong shape or dtype.
            BackendError: the classifier has been closed, or the backend failed.
        """
        expected = self.preprocessor.input_shape
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise InvalidInputError(f"got a batch of shape {tuple(batch.shape)}; expected (N, {', '.join(map(str, expected))})")
        with self._calls_cv:
            if self._closed:
                raise BackendError("this Classifier is closed; load the bundle again (Classifier.from_bundle)")
            self._calls += 1
        try:
            logits = self.backend.infer(np.ascontiguousarray(batch))
        finally:
            with self._calls_cv:
                self._calls -= 1
                self._calls_cv.notify_all()
        return softmax(logits) if self.manifest.output == "logits" else logits

    def prepare(self, image: ImageInput) -> tuple[np.ndarray, dict[str, float]]:
        """Decode and preprocess one image.

        Returns:
            ``(array, timings)``: the model input for one image (no batch axis) and the ``decode`` and
            ``preprocess`` times in milliseconds.

        Raises:
            InvalidInputError: the image cannot be decoded (the message says what was received).
            ImageTooLargeError: the image has more pixels than ``max_pixels``.
        """
        t0 = time.perf_counter()
        im = self.preprocessor.decode(image)
        t1 = time.perf_counter()
        x = self.preprocessor.transform(im)
        t2 = time.perf_counter()
        return x, {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3}

    def predict(self, image: ImageInput, top_k: int = 3) -> Prediction:
        """Classify one image.

        Safe to call from several threads at once (ONNX Runtime sessions run concurrently, OpenVINO gives each
        concurrent call its own infer request; the TensorRT backend serialises its execution context itself).

        Args:
            image: a path, encoded bytes, a PIL image or an ``HxWx3`` ``uint8`` array (float in [0, 1]
                is accepted too).
            top_k: how many labels to return in ``Prediction.top``.

        Returns:
            The :class:`Prediction` with per-stage ``timings_ms``.

        Raises:
            InvalidInputError: the image cannot be used (the message says what was received and expected).
        """
        t0 = time.perf_counter()
        x, timings = self.prepare(image)
        t2 = time.perf_counter()
        probs = self.infer_array(x[None])[0]
        t3 = time.perf_counter()
        timings.update(infer=(t3 - t2) * 1e3, total=(t3 - t0) * 1e3)
        return self.prediction(probs, top_k, timings)

    def predict_batch(self, images: Sequence[ImageInput], top_k: int = 3, batch_size: int = 32) -> list[Prediction]:
        """Classify several images, running inference ``batch_size`` images at a time.

        Args:
            images: a list of anything :meth:`predict` accepts.
            top_k: how many labels each prediction lists.
            batch_size: images per inference call.

        Returns:
            One :class:`Prediction` per image, in order; ``timings_ms`` are the batch's per-stage times
            divided by the number of images in it.

        Raises:
            InvalidInputError: any image is unusable (one bad image fails the whole call).
            UsageError: ``images`` is a single image rather than a list.
        """
        if isinstance(images, (str, bytes, Path, np.ndarray)):
            raise UsageError("predict_batch takes a list of images; use predict for one")
        results: list[Prediction] = []
        step = max(1, int(batch_size))
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            t0 = time.perf_counter()
            decoded = [self.preprocessor.decode(im) for im in chunk]
            t1 = time.perf_counter()
            x = np.stack([self.preprocessor.transform(im) for im in decoded])
            t2 = time.perf_counter()
            probs = self.infer_array(x)
            t3 = time.perf_counter()
            n = len(chunk)
            timings = {"decode": (t1 - t0) * 1e3 / n, "preprocess": (t2 - t1) * 1e3 / n, "infer": (t3 - t2) * 1e3 / n, "total": (t3 - t0) * 1e3 / n}
            results.extend(self.prediction(p, top_k, timings) for p in probs)
        return results

    def close(self) -> None:
        """Release the backend once the inferences already running have finished; later calls raise ``BackendError``."""
        with self._calls_cv:
            if self._closed:
                return
            self._closed = True
            self._calls_cv.wait_for(lambda: self._calls == 0)
        self.backend.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
