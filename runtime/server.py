"""HTTP server for a bundle: ``POST /predict``, ``GET /health``, ``GET /metadata`` (FastAPI + uvicorn).

Build the app with :func:`create_app` (``kimchi-edge serve`` does it for you).  FastAPI is imported
inside :func:`create_app`, so this module imports with the base install; the ``serve`` extra provides
FastAPI, uvicorn and python-multipart.

What the server promises:

* ``POST /predict`` takes the image as the raw body (``Content-Type: image/*`` or
  ``application/octet-stream``) or as a ``multipart/form-data`` file field, and answers JSON: labels,
  probabilities, backend, artifact and per-stage latency.
* Limits: bodies over ``max_body_bytes`` get 413 (checked on ``Content-Length`` before reading, and
  while streaming for chunked uploads); a body still arriving after ``body_timeout_s`` 408; other media
  types 415; images that cannot be decoded (or that exceed the pixel limit) 422 with the reason;
  classification over ``timeout_s`` 504; more than ``max_pending`` requests in flight 503.
* Every error is JSON ``{"error": kind, "message": text}``; a stack trace never leaves the server (it
  goes to the server log).
* Inference runs in a small thread pool, off the event loop.  Optional micro-batching gathers the
  requests that arrive while an inference is running into one batch (``batching``).  Measured on a
  2-core CPU it cost ~40 % throughput with a trivial model and gained 0-60 % (within noise) with a
  CNN, so it is off by default (docs/RUNTIME.md has the numbers).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at runtime, and
# Request/Query are imported inside create_app (lazily), where string annotations could not be resolved.
import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import ImageTooLargeError, InvalidInputError, KimchiEdgeError

log = logging.getLogger(__name__)

#: Media types accepted by ``POST /predict`` (besides any ``image/*``).
RAW_TYPES = ("application/octet-stream",)
MULTIPART = "multipart/form-data"


@dataclass(frozen=True)
class ServerConfig:
    """Limits and scheduling of the HTTP server.

    Attributes:
        max_body_bytes: largest request body accepted (413 above).
        timeout_s: seconds allowed for classifying an image once received (504 above).
        body_timeout_s: seconds allowed for receiving the request body (408 above; phones upload slowly).
        workers: threads running decode/preprocess/inference.
        max_pending: requests in flight before new ones get 503.
        batching: gather concurrent requests into one inference call.
        max_batch: largest micro-batch.
        batch_wait_ms: how long the batcher waits for more requests once one has arrived (0: take what
            is already queued, never wait).
        default_top_k: ``top_k`` when the request does not say.
    """

    max_body_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    workers: int = 2
    max_pending: int = 64
    batching: bool = False
    max_batch: int = 16
    batch_wait_ms: float = 0.0
    default_top_k: int = 3


class ApiError(KimchiEdgeError):
    """An error answered as JSON ``{"error": kind, "message": message}`` with ``status``."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


# --------------------------------------------------------------------------- inference scheduling


class _Pending:
    __slots__ = ("x", "future")

    def __init__(self, x: np.ndarray, future: asyncio.Future) -> None:
        self.x, self.future = x, future


class MicroBatcher:
    """Runs the inference of concurrent requests as one batch.

    Requests decode and preprocess in the thread pool as usual, then queue their ``uint8`` array here.
    One task takes everything queued (up to ``max_batch``; waiting ``wait_s`` at most for more), runs a
    single ``Classifier.infer_array`` call in the pool and hands each request its row.
    """

    def __init__(self, classifier: Any, executor: ThreadPoolExecutor, max_batch: int, wait_s: float) -> None:
        self.classifier, self.executor = classifier, executor
        self.max_batch, self.wait_s = max(1, max_batch), max(0.0, wait_s)
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent batch sizes, for /metadata
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def infer(self, x: np.ndarray) -> tuple[np.ndarray, int, float]:
        """Queue one preprocessed image; return ``(probabilities, batch size, inference ms)``."""
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(x, fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [p for p in batch if not p.future.done()]  # timed-out requests are dropped
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            t0 = time.perf_counter()
            try:
                probs = await loop.run_in_executor(self.executor, self.classifier.infer_array, np.stack([p.x for p in batch]))
            except Exception as exc:  # handed to every waiting request, which reports it
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            ms = (time.perf_counter() - t0) * 1e3
            for p, row in zip(batch, probs):
                if not p.future.done():
                    p.future.set_result((row, len(batch), ms))


# --------------------------------------------------------------------------- request body


def media_type(content_type: str | None) -> str:
    """``"image/jpeg; q=1"`` -> ``"image/jpeg"`` (lower case, empty when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_media_type(media: str) -> None:
    """Raise 415 for anything but ``image/*``, ``application/octet-stream``, multipart or no type at all."""
    if media and not (media.startswith("image/") or media in RAW_TYPES or media == MULTIPART):
        raise ApiError(
            415, "unsupported_media_type",
            f"Content-Type {media} is not supported; send the image bytes as image/* or application/octet-stream "
            "(curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg') or as a multipart/form-data file field "
            "(curl -F file=@photo.jpg)",
        )


async def read_body(request: Any, limit: int) -> bytes:
    """Read the request body, refusing (413) more than ``limit`` bytes without buffering them."""
    declared = request.headers.get("content-length")
    too_big = ApiError(413, "payload_too_large", f"request body is over the limit of {limit} bytes; send a smaller image")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, "payload_too_large", f"request body is {int(declared)} bytes, over the limit of {limit} bytes; send a smaller image")
        except ValueError:
            raise ApiError(400, "bad_request", f"Content-Length {declared!r} is not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def file_from_multipart(headers: Any, body: bytes) -> bytes:
    """The first file part of a ``multipart/form-data`` body (422 when there is none)."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=4, max_fields=16).parse()
    except MultiPartException as exc:
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc.message}") from None
    try:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                return await value.read()
    finally:
        await form.close()
    raise ApiError(422, "invalid_image", "multipart body has no file part; send the image as a file field (curl -F file=@photo.jpg)")


# --------------------------------------------------------------------------- the app


def create_app(classifier: Any, config: ServerConfig | None = None):
    """Build the FastAPI application serving ``classifier``.

    Args:
        classifier: a loaded :class:`~kimchi_edge.runtime.classifier.Classifier`.
        config: limits and scheduling (:class:`ServerConfig` defaults when ``None``).

    Returns:
        A ``fastapi.FastAPI`` app; run it with uvicorn (``kimchi-edge serve`` does).

    Raises:
        MissingDependencyError: FastAPI is not installed (``pip install 'kimchi-edge[serve]'``).
    """
    from .errors import require

    require("fastapi", extra="serve", purpose="kimchi-edge serve")
    require("multipart", extra="serve", purpose="kimchi-edge serve (multipart uploads)")
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    from kimchi_edge import __version__

    cfg = config or ServerConfig()
    n_labels = len(classifier.labels)
    info = classifier.info
    executor = ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="kimchi-infer")
    state: dict[str, Any] = {"pending": 0, "batcher": None}

    @asynccontextmanager
    async def lifespan(app):
        if cfg.batching:
            state["batcher"] = MicroBatcher(classifier, executor, cfg.max_batch, cfg.batch_wait_ms / 1e3)
            state["batcher"].start()
        try:
            yield
        finally:
            if state["batcher"] is not None:
                await state["batcher"].stop()
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="kimchi-edge",
        version=__version__,
        description=f"Image classifier ({info['architecture']}, {n_labels} labels) served from a kimchi-edge bundle.",
        lifespan=lifespan,
    )
    app.state.classifier = classifier
    app.state.config = cfg
    app.state.stats = state

    _add_error_handlers(app)
    _add_predict_route(app, classifier, cfg, executor, state)
    _add_info_routes(app, classifier, cfg, state)
    return app


def _add_error_handlers(app: Any) -> None:
    """Every error is ``{"error": kind, "message": one line}`` with its status code; nothing leaks a traceback."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": kind, "message": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.kind, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed"}
        message = {404: f"no such endpoint {request.url.path}; see /docs",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error(exc.status_code, kinds.get(exc.status_code, "http_error"), message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return error(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.error("unhandled %s on %s %s (traceback follows from the ASGI server)", type(exc).__name__, request.method, request.url.path)
        return error(500, "internal_error", "internal server error; the details are in the server log")


def _openapi_predict_docs() -> tuple[dict[str, Any], dict[int, Any]]:
    """The ``/predict`` request body (raw image or multipart) and error responses, for the OpenAPI page."""
    predict_body = {
        "requestBody": {
            "required": True,
            "description": "The image: raw bytes (image/*, application/octet-stream) or a multipart file field.",
            "content": {
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                MULTIPART: {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
            },
        }
    }
    error_responses = {
        code: {"description": text, "content": {"application/json": {"example": {"error": kind, "message": "..."}}}}
        for code, kind, text in [
            (413, "payload_too_large", "body over the size limit"),
            (415, "unsupported_media_type", "not an image media type"),
            (422, "invalid_image", "the image cannot be decoded, is too large in pixels, or a parameter is invalid"),
            (503, "busy", "too many requests in flight"),
            (504, "timeout", "the request took longer than the server's time limit"),
        ]
    }
    return predict_body, error_responses


def _response_models() -> tuple[Any, Any]:
    """Pydantic models of ``/predict``'s answer (for the OpenAPI schema and response validation)."""
    from pydantic import BaseModel

    class LabelProbability(BaseModel):
        label: str
        probability: float

    class PredictResponse(BaseModel):
        label: str
        probability: float
        top: list[LabelProbability]
        backend: str
        artifact: str
        batch_size: int
        latency_ms: dict[str, float]

    return LabelProbability, PredictResponse


def _add_predict_route(app: Any, classifier: Any, cfg: ServerConfig, executor: ThreadPoolExecutor, state: dict[str, Any]) -> None:
    """``POST /predict``: limits (media type, size, body time, in-flight count), then classify in the executor."""
    from fastapi import Query, Request

    info = classifier.info
    n_labels = len(classifier.labels)
    _, PredictResponse = _response_models()
    predict_body, error_responses = _openapi_predict_docs()

    async def classify(data: bytes, top_k: int, started: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        batcher: MicroBatcher | None = state["batcher"]
        if batcher is None:
            pred = await loop.run_in_executor(executor, classifier.predict, data, top_k)
            timings, batch_size = dict(pred.timings_ms), 1
        else:
            x, timings = await loop.run_in_executor(executor, classifier.prepare, data)
            probs, batch_size, timings["infer"] = await batcher.infer(x)
            pred = classifier.prediction(probs, top_k)
        timings["server_total"] = (time.perf_counter() - started) * 1e3
        return {
            "label": pred.label,
            "probability": pred.probability,
            "top": [{"label": lab, "probability": p} for lab, p in pred.top],
            "backend": info["backend"],
            "artifact": info["artifact"],
            "batch_size": batch_size,
            "latency_ms": {k: round(v, 3) for k, v in timings.items()},
        }

    @app.post("/predict", summary="Classify one image", response_model=PredictResponse, openapi_extra=predict_body,
              responses=error_responses)
    async def predict(request: Request, top_k: int = Query(cfg.default_top_k, ge=1, le=n_labels, description="how many labels to return")):
        started = time.perf_counter()
        media = media_type(request.headers.get("content-type"))
        check_media_type(media)
        try:
            body = await asyncio.wait_for(read_body(request, cfg.max_body_bytes), cfg.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, "request_timeout", f"the request body did not arrive within {cfg.body_timeout_s:g} s") from None
        data = await file_from_multipart(request.headers, body) if media == MULTIPART else body
        if not data:
            raise ApiError(422, "invalid_image", "the request has no image (0 bytes); expected an encoded image (JPEG, PNG, WebP ...)")
        if state["pending"] >= cfg.max_pending:
            raise ApiError(503, "busy", f"{state['pending']} requests in flight (limit {cfg.max_pending}); retry shortly", {"Retry-After": "1"})
        state["pending"] += 1
        try:
            return await asyncio.wait_for(classify(data, top_k, started), cfg.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"the image was not classified within {cfg.timeout_s:g} s; retry, or send a smaller image") from None
        except ImageTooLargeError as exc:
            raise ApiError(422, "image_too_large", str(exc)) from None
        except InvalidInputError as exc:
            raise ApiError(422, "invalid_image", str(exc)) from None
        finally:
            state["pending"] -= 1


def _add_info_routes(app: Any, classifier: Any, cfg: ServerConfig, state: dict[str, Any]) -> None:
    """``GET /health`` and ``GET /metadata``."""
    from kimchi_edge import __version__

    info = classifier.info

    @app.get("/health", summary="Liveness: the model is loaded")
    async def health():
        out = {"status": "ok", "backend": info["backend"], "artifact": info["artifact"], "gated": info["gated"],
               "pending": state["pending"]}
        if not info["gated"]:
            out["warning"] = next(n for n in info["notes"] if n.startswith("UNGATED:"))
        return out

    @app.get("/metadata", summary="Labels, input size, backend, limits and the accuracy gate's summary")
    async def metadata():
        from .manifest import to_dict

        m = classifier.manifest
        batcher: MicroBatcher | None = state["batcher"]
        sizes = list(batcher.batch_sizes) if batcher else []
        return {
            "labels": list(classifier.labels),
            "input_size": info["input_size"],
            "architecture": info["architecture"],
            "backend": {k: v for k, v in info.items() if k not in ("labels", "input_size", "architecture", "notes", "bundle")},
            "notes": info["notes"],
            "gated": info["gated"],
            "gate": to_dict(m.gate) if m.gate else {},
            "gate_in_words": m.gate.in_words() if m.gate else ["the accuracy gate has never run on this bundle"],
            "limits": {k: v for k, v in asdict(cfg).items()},
            "batching": {"enabled": cfg.batching, "mean_batch_size": round(float(np.mean(sizes)), 2) if sizes else None},
            "kimchi_edge": __version__,
        }
