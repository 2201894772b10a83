"""What the demo page does, without Streamlit: configuration, classifying one upload, live throttling.

The Streamlit page (:mod:`kimchi_edge.mobile_demo.page`) only lays these results out, so everything here is tested
with plain pytest.  Imports: the standard library, numpy, Pillow and :mod:`runtime` — never torch or
fastai (``tests/mobile_demo`` checks the running app's ``sys.modules``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kimchi_edge.runtime.errors import KimchiEdgeError, UsageError
from kimchi_edge.runtime.manifest import MANIFEST_NAME, BundleManifest, GateSummary, artifact_gate
from kimchi_edge.runtime.preprocess import decode_image

log = logging.getLogger(__name__)

#: Environment variables the page reads (``kimchi-edge demo`` sets them for the Streamlit process).
ENV_BUNDLE = "KIMCHI_EDGE_BUNDLE"
ENV_BACKEND = "KIMCHI_EDGE_BACKEND"
ENV_ICE_SERVERS = "KIMCHI_EDGE_DEMO_ICE_SERVERS"
ENV_ALLOW_UNGATED = "KIMCHI_EDGE_ALLOW_UNGATED"  # "1": also run what the accuracy gate did not pass

#: Where ``kimchi-edge quickstart`` / ``make quickstart`` writes its bundle, relative to the working folder.
DEFAULT_BUNDLE = Path("runs") / "quickstart" / "bundle"

#: How to make a bundle, shown when there is none (two lines, as the page shows them).
MAKE_BUNDLE_HELP = (
    "Train and convert the built-in sample with `make quickstart` (writes `runs/quickstart/bundle`),",
    "or convert your own training run with `kimchi-edge convert RUN_DIR`, then start `kimchi-edge demo BUNDLE`.",
)

#: Largest upload the page accepts, in MB (phone photos are 2-15 MB).
MAX_UPLOAD_MB = 50
#: Longest side of the preview image shown next to a result.
PREVIEW_SIDE = 480


# --------------------------------------------------------------------------- configuration


def parse_ice_servers(value: str | None) -> list[dict[str, Any]] | None:
    """Turn the ``--ice-servers`` / ``$KIMCHI_EDGE_DEMO_ICE_SERVERS`` text into WebRTC ``iceServers``.

    Args:
        value: ``None``/``""``/``"none"``: no STUN/TURN at all (host candidates only — right for a
            phone on the same LAN, and never waits on an unreachable public STUN server);
            ``"auto"``: let streamlit-webrtc choose (Google's public STUN, or TURN from Twilio /
            Hugging Face / Cloudflare credentials in the environment);
            a JSON list of ``{"urls": ..., "username": ..., "credential": ...}`` or a JSON object with
            an ``iceServers`` list; a path to a file holding that JSON; or comma-separated
            ``stun:``/``turn:`` URLs without credentials.

    Returns:
        The ``iceServers`` list, or ``None`` for ``"auto"``.

    Raises:
        UsageError: malformed JSON or an entry without ``urls``.
    """
    text = (value or "").strip()
    if text.lower() in ("", "none", "lan"):
        return []
    if text.lower() == "auto":
        return None
    source = "--ice-servers"
    if not text.startswith(("[", "{")) and Path(text).is_file():
        source = text
        text = Path(text).read_text(encoding="utf-8").strip()
    if text.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{source}: not valid JSON ({exc}); expected a list of {{\"urls\": ...}} objects") from exc
        if isinstance(data, dict):
            data = data.get("iceServers")
        if not isinstance(data, list) or not all(isinstance(s, dict) and s.get("urls") for s in data):
            raise UsageError(
                f"{source}: expected a list like [{{\"urls\": \"turn:10.0.0.2:3478\", \"username\": \"u\", "
                f"\"credential\": \"p\"}}], got {json.dumps(data, ensure_ascii=False)[:200]}"
            )
        return data
    urls = [u.strip() for u in text.split(",") if u.strip()]
    bad = [u for u in urls if not u.startswith(("stun:", "stuns:", "turn:", "turns:"))]
    if bad:
        raise UsageError(f"--ice-servers: {bad[0]!r} is not a stun:/turn: URL, 'none', 'auto', JSON or a JSON file")
    return [{"urls": urls}]


@dataclass(frozen=True)
class DemoConfig:
    """What the page needs to start: which bundle, which backend, which ICE servers, gated artifacts only or not.

    Attributes:
        bundle: the bundle folder (absolute).
        bundle_given: whether the user named it (else it is the quickstart default).
        backend: ``auto``, ``onnxruntime`` or ``tensorrt``.
        ice_servers: WebRTC ``iceServers`` (``[]``: host candidates only; ``None``: streamlit-webrtc's default).
        ice_error: why the ICE setting was refused (the page shows it and uses ``[]``).
        allow_ungated: also run an artifact the accuracy gate did not pass (``--allow-ungated``); the page then
            says so above everything else.
    """

    bundle: Path
    bundle_given: bool = False
    backend: str = "auto"
    ice_servers: list[dict[str, Any]] | None = field(default_factory=list)
    ice_error: str | None = None
    allow_ungated: bool = False

    @property
    def rtc_configuration(self) -> dict[str, Any] | None:
        """``rtc_configuration`` for ``webrtc_streamer`` (``None`` lets streamlit-webrtc pick)."""
        return None if self.ice_servers is None else {"iceServers": self.ice_servers}

    @classmethod
    def load(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> "DemoConfig":
        """Read the configuration: script arguments first (``streamlit run app.py -- --bundle B``), then env.

        Args:
            argv: script arguments after ``--`` (``None``: none).
            environ: environment (``None``: ``os.environ``).
            cwd: folder the default bundle is relative to (``None``: the working folder).
        """
        env = os.environ if environ is None else environ
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--bundle")
        parser.add_argument("--backend")
        parser.add_argument("--ice-servers")
        parser.add_argument("--allow-ungated", action="store_true", default=None)
        ns, _ = parser.parse_known_args(list(argv or []))
        bundle_text = ns.bundle or env.get(ENV_BUNDLE) or ""
        base = cwd or Path.cwd()
        bundle = Path(bundle_text).expanduser() if bundle_text else DEFAULT_BUNDLE
        if not bundle.is_absolute():
            bundle = base / bundle
        ice_text = ns.ice_servers if ns.ice_servers is not None else env.get(ENV_ICE_SERVERS)
        try:
            ice, ice_error = parse_ice_servers(ice_text), None
        except UsageError as exc:
            ice, ice_error = [], str(exc)
        return cls(
            bundle=bundle,
            bundle_given=bool(bundle_text),
            backend=ns.backend or env.get(ENV_BACKEND) or "auto",
            ice_servers=ice,
            ice_error=ice_error,
            allow_ungated=bool(ns.allow_ungated) or env.get(ENV_ALLOW_UNGATED, "").strip().lower() in ("1", "true", "yes"),
        )


def bundle_present(path: Path) -> bool:
    """Whether ``path`` looks like a bundle at all (a folder with ``manifest.json``)."""
    return (path / MANIFEST_NAME).is_file()


def bundle_stamp(path: Path) -> float:
    """Modification time of the manifest: part of the classifier cache key, so a re-converted bundle reloads."""
    try:
        return (path / MANIFEST_NAME).stat().st_mtime
    except OSError:
        return 0.0


# --------------------------------------------------------------------------- one image


@dataclass
class ImageResult:
    """The outcome of classifying one image from the page.

    Exactly one of ``prediction`` and ``error`` is set.  ``preview`` is a small RGB copy for display
    (``None`` when the image could not be read).
    """

    name: str
    prediction: Any = None  # runtime.Prediction
    error: str | None = None
    preview: Any = None  # PIL.Image.Image
    source_mode: str = ""
    source_size: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def describe_mode(mode: str) -> str:
    """A human name for a Pillow mode (shown as "converted from ...")."""
    names = {
        "RGBA": "RGBA (transparency composited on white)",
        "LA": "greyscale with alpha",
        "P": "palette",
        "PA": "palette with alpha",
        "L": "greyscale",
        "1": "1-bit",
        "CMYK": "CMYK",
        "YCbCr": "YCbCr",
        "I;16": "16-bit greyscale",
        "I;16B": "16-bit greyscale",
        "I;16L": "16-bit greyscale",
        "I": "32-bit integer",
        "F": "32-bit float",
    }
    return names.get(mode, mode)


def _source_mode(data: bytes) -> tuple[str, tuple[int, int] | None]:
    """Mode and size from the file header only (no pixel decode)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.mode, im.size
    except Exception:  # noqa: BLE001 - header sniffing only; decode_image reports the real error
        return "", None


def classify_image(classifier: Any, data: bytes, name: str, top_k: int = 3) -> ImageResult:
    """Classify one uploaded or photographed image; never raises for bad input.

    The image is decoded once, at reduced scale, for the preview (which also surfaces any decoding
    error first), then classified from the original bytes so the stage timings are those of a real
    request.

    Args:
        classifier: a :class:`runtime.Classifier`.
        data: the encoded file as uploaded.
        name: file name for messages.
        top_k: how many labels to return.

    Returns:
        An :class:`ImageResult` with either ``prediction`` or a one-line ``error`` saying what was
        received and what was expected.
    """
    result = ImageResult(name=name)
    if not data:
        result.error = f"{name}: the file is empty (0 bytes); expected an image (JPEG, PNG, WebP, ...)"
        return result
    result.source_mode, result.source_size = _source_mode(data)
    try:
        preview = decode_image(data, max_pixels=classifier.preprocessor.max_pixels, draft=(PREVIEW_SIDE, PREVIEW_SIDE))
        preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        result.preview = preview
        result.prediction = classifier.predict(data, top_k=top_k)
    except KimchiEdgeError as exc:
        result.error = _message(name, str(exc))
    except Exception as exc:  # noqa: BLE001 - the page's boundary: say what happened, keep running
        # Pillow plug-ins can fail on hostile files in ways decode_image does not translate
        # (struct.error, EOFError, IndexError, MemoryError ...); the page must survive and say so.
        log.warning("unexpected error classifying %s", name, exc_info=True)
        result.error = f"{name}: could not be read as an image ({type(exc).__name__}: {exc})"
    return result


def warm_up(classifier: Any, size: tuple[int, int] = (640, 480)) -> ImageResult:
    """Send one throw-away photo through the page's whole path: decode, preview, preprocess, inference.

    The first image a process handles pays one-off costs (Pillow's JPEG decoder, numpy's first resize and
    normalisation, ONNX Runtime's first run); done once when the classifier is loaded, the first photo a user
    takes shows the latency of every later one.

    Args:
        classifier: a :class:`runtime.Classifier`.
        size: width and height of the generated photo-like JPEG (a phone camera frame).

    Returns:
        The warm-up's :class:`ImageResult` (its timings are the cold ones); a failure is logged, not raised.
    """
    from kimchi_edge.runtime.bench_cli import photo_like_jpeg  # the runtime's generated test photo

    result = classify_image(classifier, photo_like_jpeg(*size), "warm-up photo", top_k=1)
    if not result.ok:
        log.warning("warm-up prediction failed: %s", result.error)
    return result


def _message(name: str, message: str) -> str:
    """``"12345 bytes is not an image ..."`` -> ``"cat.jpg (12,345 bytes) is not an image ..."``."""
    head, sep, tail = message.partition(" bytes ")
    if sep and head.isdigit():
        return f"{name} ({int(head):,} bytes) {tail}"
    return f"{name}: {message}"


def stage_timings(timings_ms: Mapping[str, float]) -> list[tuple[str, float]]:
    """Stage timings in display order: decode, preprocess, inference, total."""
    order = [("decode", "decode"), ("preprocess", "preprocess"), ("infer", "inference"), ("total", "total")]
    return [(label, float(timings_ms[key])) for key, label in order if key in timings_ms]


def format_timings(timings_ms: Mapping[str, float]) -> str:
    """``"decode 1.2 ms · preprocess 0.8 ms · inference 0.5 ms · total 2.5 ms"``."""
    return " · ".join(f"{label} {ms:.1f} ms" for label, ms in stage_timings(timings_ms))


# --------------------------------------------------------------------------- bundle facts


def backend_line(info: Mapping[str, Any]) -> str:
    """``"onnxruntime (CPUExecutionProvider) · onnx-fp32 (fp32)"`` from ``Classifier.info``."""
    backend = str(info.get("backend", "?"))
    providers = info.get("providers") or []
    prov = f" ({', '.join(map(str, providers))})" if providers else ""
    art = info.get("artifact")
    prec = info.get("precision")
    tail = f" · {art}" + (f" ({prec})" if prec else "") if art else ""
    return f"{backend}{prov}{tail}"


def gate_summary(gate: GateSummary | None) -> tuple[str, list[str]]:
    """A headline and plain sentences for the bundle's accuracy gate (:class:`GateSummary`, the typed ``manifest.gate``).

    Returns:
        ``("no accuracy gate report in this bundle ...", [])`` when the gate never ran; otherwise
        ``("gate passed" | "gate FAILED", sentences)``: what was measured, then one line per artifact in words.
    """
    if gate is None:
        return "no accuracy gate report in this bundle (run `kimchi-edge verify BUNDLE`)", []
    return ("gate passed" if gate.passed else "gate FAILED"), gate.in_words()


def artifact_gate_line(manifest: BundleManifest, artifact_name: str | None) -> str | None:
    """The gate's figures for the artifact in use, in words.

    e.g. ``"onnx-int8 passed: 91.2 % right, 0.25 points below the fastai learner, same answer on 98.7 % of images"``.
    """
    for art in manifest.artifacts:
        if art.name != artifact_name:
            continue
        g = artifact_gate(art)
        if g is None:
            return None
        word = {"pass": "passed", "fail": "failed"}.get(g.status, g.status)
        d = g.delta_points
        change = "as accurate as the fastai learner" if abs(d) < 0.005 else (
            f"{abs(d):.2f} points {'below' if d < 0 else 'above'} the fastai learner")
        return f"{art.name} {word}: {g.top1:.1%} right, {change}, same answer on {g.agreement:.1%} of images"
    return None


def bundle_facts(classifier: Any) -> dict[str, Any]:
    """What the page shows about the model: labels, input size, architecture, backend, gate."""
    info = classifier.info
    manifest = classifier.manifest
    h, w = info.get("input_size", ["?", "?"])
    headline, rows = gate_summary(getattr(manifest, "gate", None))
    return {
        "labels": list(info.get("labels", [])),
        "input_size": f"{h}×{w}",
        "architecture": info.get("architecture", ""),
        "backend": backend_line(info),
        "notes": list(info.get("notes", [])),
        "gate_headline": headline,
        "gate_short": headline if headline.startswith("gate") else "no gate report",
        "gate_rows": rows,
        "gate_in_use": artifact_gate_line(manifest, info.get("artifact")),
        "bundle": str(info.get("bundle", "")),
    }


# --------------------------------------------------------------------------- live video


@dataclass(frozen=True)
class LiveStatus:
    """What the live panel shows; a consistent snapshot of :class:`LivePredictor`."""

    prediction: Any  # runtime.Prediction | None
    error: str | None
    video_fps: float
    predictions_per_s: float
    frames: int
    predictions: int
    age_s: float | None  # seconds since the shown prediction was made


class LivePredictor:
    """Throttled, non-blocking classification of a video stream.

    ``on_frame`` is streamlit-webrtc's ``video_frame_callback``: it runs on the video worker thread,
    counts the frame, and at most ``max_rate`` times a second hands a copy of the frame to one
    background inference thread — it never waits for the model, so the video stays smooth however slow
    the backend is.  Between predictions the last result is reused.  The page reads :meth:`status`.

    Args:
        classify: ``rgb_array -> Prediction`` (e.g. ``lambda a: classifier.predict(a, top_k=3)``).
        max_rate: most predictions per second.
        clock: monotonic clock (tests inject a fake one).
        idle_exit_s: the inference thread exits after this long without work (restarted on demand).
    """

    def __init__(self, classify: Callable[[np.ndarray], Any], max_rate: float = 5.0, *,
                 clock: Callable[[], float] = time.monotonic, idle_exit_s: float = 5.0):
        self.classify = classify
        self.max_rate = max_rate
        self._clock = clock
        self._idle_exit_s = idle_exit_s
        self._cond = threading.Condition()
        self._pending: np.ndarray | None = None
        self._busy = False
        self._thread: threading.Thread | None = None
        self._last_submit: float | None = None
        self._frame_times: deque[float] = deque(maxlen=60)
        self._pred_times: deque[float] = deque(maxlen=20)
        self._frames = 0
        self._predictions = 0
        self._latest: Any = None
        self._latest_at: float | None = None
        self._error: str | None = None
        self._closed = False

    # -- video thread

    def on_frame(self, frame: Any) -> Any:
        """``video_frame_callback``: count the frame, maybe submit it, return it unchanged."""
        now = self._clock()
        with self._cond:
            self._frames += 1
            self._frame_times.append(now)
            due = self._due(now)
            if due:
                self._last_submit = now  # reserve the slot before the (slow) conversion below
        if due:
            try:
                rgb = frame.to_ndarray(format="rgb24")
            except Exception as exc:  # noqa: BLE001 - a bad frame must not kill the stream
                with self._cond:
                    self._error = f"could not read a video frame: {exc}"
                return frame
            self.submit(rgb, now=now, _reserved=True)
        return frame

    def _due(self, now: float) -> bool:
        if self._closed or self._busy or self._pending is not None:
            return False
        if self.max_rate <= 0:
            return False
        return self._last_submit is None or now - self._last_submit >= 1.0 / self.max_rate

    def submit(self, rgb: np.ndarray, *, now: float | None = None, _reserved: bool = False) -> bool:
        """Queue one ``HxWx3`` uint8 frame for classification if a slot is free; returns whether it was."""
        now = self._clock() if now is None else now
        with self._cond:
            if not _reserved:
                if not self._due(now):
                    return False
                self._last_submit = now
            elif self._closed:
                return False
            self._pending = rgb
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="kimchi-edge-live", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return True

    # -- inference thread

    def _work(self) -> None:
        while True:
            with self._cond:
                if self._pending is None and not self._closed:
                    self._cond.wait(timeout=self._idle_exit_s)
                if self._pending is None or self._closed:
                    self._thread = None if self._thread is threading.current_thread() else self._thread
                    self._cond.notify_all()
                    return
                rgb, self._pending = self._pending, None
                self._busy = True
            try:
                pred, err = self.classify(rgb), None
            except KimchiEdgeError as exc:
                pred, err = None, str(exc)
            except Exception as exc:  # noqa: BLE001 - keep the stream alive, show the reason
                log.warning("live prediction failed", exc_info=True)
                pred, err = None, f"{type(exc).__name__}: {exc}"
            with self._cond:
                self._busy = False
                if pred is not None:
                    self._latest, self._latest_at, self._error = pred, self._clock(), None
                    self._predictions += 1
                    self._pred_times.append(self._latest_at)
                else:
                    self._error = err
                self._cond.notify_all()

    # -- page thread

    def status(self) -> LiveStatus:
        """A consistent snapshot for the page (rates are 0 once frames stop arriving)."""
        now = self._clock()
        with self._cond:
            return LiveStatus(
                prediction=self._latest,
                error=self._error,
                video_fps=_rate(self._frame_times, now),
                predictions_per_s=_rate(self._pred_times, now, stale_s=max(2.0, 3.0 / max(self.max_rate, 1e-3))),
                frames=self._frames,
                predictions=self._predictions,
                age_s=None if self._latest_at is None else max(0.0, now - self._latest_at),
            )

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until nothing is pending or running (tests, shutdown); returns whether it got there."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=left)
        return True

    def close(self) -> None:
        """Stop accepting frames and let the inference thread exit."""
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify_all()


def _rate(times: Sequence[float], now: float, stale_s: float = 2.0) -> float:
    """Events per second over the recorded window; 0 when the last event is older than ``stale_s``."""
    if len(times) < 2 or now - times[-1] > stale_s:
        return 0.0
    span = times[-1] - times[0]
    return (len(times) - 1) / span if span > 0 else 0.0


__all__ = [
    "DEFAULT_BUNDLE",
    "ENV_BACKEND",
    "ENV_BUNDLE",
    "ENV_ALLOW_UNGATED",
    "ENV_ICE_SERVERS",
    "MAKE_BUNDLE_HELP",
    "DemoConfig",
    "ImageResult",
    "LivePredictor",
    "LiveStatus",
    "backend_line",
    "bundle_facts",
    "bundle_present",
    "bundle_stamp",
    "classify_image",
    "format_timings",
    "gate_summary",
    "parse_ice_servers",
    "stage_timings",
    "warm_up",
]
