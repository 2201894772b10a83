"""HTTP server for a bundle: ``POST /predict``, ``GET /health`` (+ ``/health/live``, ``/health/ready``),
``GET /metadata``, ``GET /metrics`` (FastAPI + uvicorn + prometheus-client).

Build the app with :func:`create_app` (``kimchi-edge serve`` does it for you).  FastAPI and
prometheus-client are imported inside :func:`create_app`, so this module imports with the base install;
the ``serve`` extra provides them.

What the server promises:

* ``POST /predict`` takes the image as the raw body (``Content-Type: image/*`` or
  ``application/octet-stream``) or as a ``multipart/form-data`` file field, and answers JSON: labels,
  probabilities, backend, artifact and per-stage latency.
* Admission before the body (:class:`Admission`, a pure ASGI middleware): the API key when one is set
  (401); a declared body over ``max_body_bytes`` 413; more than ``max_pending`` requests in flight, or
  more than ``max_inflight_body_bytes`` of bodies in flight, 503 with ``Retry-After`` at once, nothing read.
* Then, while the body streams in: cut at ``max_body_bytes`` (413), ``body_timeout_s`` (408); other media
  types 415; the body is held once (a multipart body is parsed as it arrives, only its file part kept).
  Images that cannot be decoded, or exceed the pixel or decoded-memory limit, 422 with the reason;
  classification over ``timeout_s`` 504.
* Every error is JSON ``{"error": kind, "message": text}``; a stack trace never leaves the server (it
  goes to the server log).
* ``/health/ready`` is 200 only once a warm-up inference has passed, while the last inference did not
  fail in the backend, and not while draining on shutdown; ``/health/live`` is 200 while the process serves.
* Inference runs in a small thread pool, off the event loop.  Optional micro-batching gathers the
  requests that arrive while an inference is running into one batch (``batching``).  Measured on a
  2-core CPU it cost ~40 % throughput with a trivial model and gained 0-60 % (within noise) with a
  CNN, so it is off by default (docs/RUNTIME.md has the numbers).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at runtime, and
# Request/Query are imported inside create_app (lazily), where string annotations could not be resolved.
import asyncio
import hmac
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
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
        max_pending: ``/predict`` requests in flight (from their headers on: receiving, queued, classifying)
            before new ones get 503 at once, before their body is read.
        max_inflight_body_bytes: body bytes the requests in flight may hold together (declared
            ``Content-Length``; ``max_body_bytes`` for a chunked body); 503 at once above.
        batching: gather concurrent requests into one inference call.
        max_batch: largest micro-batch.
        batch_wait_ms: how long the batcher waits for more requests once one has arrived (0: take what
            is already queued, never wait).
        default_top_k: ``top_k`` when the request does not say.
        api_key: when set, ``/predict`` needs it (``Authorization: Bearer KEY`` or ``X-API-Key``), 401 otherwise.
        cors_origins: browser origins allowed to call the server from another origin (CORS); none by default.
        retry_after_s: the ``Retry-After`` of a 503.
    """

    max_body_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    workers: int = 2
    max_pending: int = 32
    max_inflight_body_bytes: int = 64 * 1024 * 1024
    batching: bool = False
    max_batch: int = 16
    batch_wait_ms: float = 0.0
    default_top_k: int = 3
    api_key: str | None = field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()
    retry_after_s: int = 1


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


async def read_body(request: Any, limit: int, media: str = "") -> bytearray:
    """Read the request body (for multipart: only its first file part), refusing (413) more than ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before anything is read; a chunked body is cut
    as soon as it passes the limit.  The bytes are kept once, in one ``bytearray`` (a multipart body is
    parsed as it streams in: only the file part's bytes are kept).

    Raises:
        ApiError: 413 over the limit, 400 for a bad ``Content-Length`` or a malformed multipart body, 422 for a
            multipart body without a file part.
    """
    declared = request.headers.get("content-length")
    expected = None
    if declared is not None:
        expected = declared_length(declared)
        if expected > limit:
            raise too_large(limit, expected)
    parser = _FilePart(request.headers.get("content-type", "")) if media == MULTIPART else None
    # A declared length is allocated once (growing a buffer reallocates and fragments the heap under load).
    data = bytearray(expected) if parser is None and expected is not None else bytearray()
    size = 0
    async for chunk in request.stream():
        if size + len(chunk) > limit:
            # The buffers go first: the exception's traceback keeps this frame alive while the 413 is sent
            # (and Admission drains what is left of the body, within bounds).
            data = parser = None
            raise too_large(limit)
        if parser is not None:
            parser.feed(chunk)
        elif expected is not None and size + len(chunk) <= expected:
            data[size : size + len(chunk)] = chunk
        else:
            data[size:] = chunk
        size += len(chunk)
    if parser is not None:
        return parser.finish()
    del data[size:]
    return data


def declared_length(value: str) -> int:
    """``Content-Length`` as a number (400 when it is not one)."""
    try:
        size = int(value)
    except ValueError:
        size = -1
    if size < 0:
        raise ApiError(400, "bad_request", f"Content-Length {value!r} is not a number", {"Connection": "close"})
    return size


def too_large(limit: int, size: int | None = None) -> ApiError:
    """413 for a body over ``limit`` (``size``: its declared length when known); the connection is closed."""
    what = f"request body is {size} bytes, over" if size is not None else "request body is over"
    return ApiError(413, "payload_too_large", f"{what} the limit of {limit} bytes; send a smaller image", {"Connection": "close"})


#: Before a refusal closes the connection, up to this long is spent reading (and dropping) what the client still sends...
LINGER_S = 2.0
#: ...and reading stops as soon as the client sends nothing for this long (a stalled upload gets its answer at once).
LINGER_GAP_S = 0.25
#: what the linger may read beyond twice the body limit: multipart framing around a file of twice the limit, and the
#: read chunk that crosses it (a declared length just over 2x was cut at once, and the client got a reset instead of its 413)
LINGER_SLACK_BYTES = 64 * 1024


class _Body:
    """Wraps an ASGI ``receive`` to know how much of the request body has been read and whether all of it has.

    A socket closed with unread data in its receive buffer answers the client with a TCP reset, and most
    clients (httpx, browsers, curl) then report "connection reset" instead of the 401/400/413/503 they were
    sent.  So before any answer that closes the connection, :meth:`linger` reads and drops what the client
    is still sending, as nginx's lingering close does, within three bounds: at most ``budget`` bytes in all
    (twice the body limit plus :data:`LINGER_SLACK_BYTES`: a phone photo a little too big for a small ``--max-body-mb``
    still gets its 413, multipart framing included),
    at most ``seconds`` in all, and at most ``gap`` seconds without a byte (nginx's ``lingering_timeout``).
    Nothing is kept, so memory stays bounded; a larger or slower body is cut.
    """

    def __init__(self, receive: Any, budget: int, seconds: float = LINGER_S, gap: float = LINGER_GAP_S) -> None:
        self._receive, self.budget, self.seconds, self.gap = receive, budget, seconds, gap
        self.read, self.complete = 0, False

    async def receive(self) -> dict:
        message = await self._receive()
        if message["type"] == "http.request":
            self.read += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:  # http.disconnect: nothing more will come
            self.complete = True
        return message

    async def linger(self, declared: int | None) -> None:
        """Drain the rest of the body (see the class), unless it is already read or declared too large to wait for."""
        if self.complete or (declared is not None and declared > self.budget):
            return

        async def drain() -> None:
            while not self.complete and self.read <= self.budget:
                await asyncio.wait_for(self.receive(), self.gap)

        try:
            await asyncio.wait_for(drain(), self.seconds)
        except asyncio.TimeoutError:
            pass


class _FilePart:
    """Streams a ``multipart/form-data`` body through python-multipart, keeping only the first file part's bytes."""

    MAX_PARTS = 20

    def __init__(self, content_type: str) -> None:
        try:
            from python_multipart.multipart import MultipartParser, parse_options_header
        except ImportError:  # python-multipart < 0.0.13 is imported as `multipart`
            from multipart.multipart import MultipartParser, parse_options_header

        _, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if not boundary:
            raise ApiError(400, "bad_request", "malformed multipart body: the Content-Type has no boundary", {"Connection": "close"})
        self.data: bytearray | None = None  # the file part, once found
        self.done = False  # the file part has ended
        self.parts = 0
        self._field, self._value, self._headers = bytearray(), bytearray(), {}
        self._current_is_file = False
        callbacks = {
            "on_part_begin": self._begin, "on_part_data": self._part_data, "on_part_end": self._part_end,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
        }
        self._parser = MultipartParser(boundary, callbacks)

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > self.MAX_PARTS:
            raise ApiError(400, "bad_request", f"malformed multipart body: more than {self.MAX_PARTS} parts", {"Connection": "close"})
        self._headers, self._current_is_file = {}, False

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field, self._value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition", b"")
        if self.data is None and b"filename" in disposition:
            self.data, self._current_is_file = bytearray(), True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_is_file and not self.done:
            self.data += memoryview(data)[start:end]

    def _part_end(self) -> None:
        if self._current_is_file:
            self.done = True
        self._current_is_file = False

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - python-multipart's MultipartParseError and friends
            raise ApiError(400, "bad_request", f"malformed multipart body: {exc}", {"Connection": "close"}) from None

    def finish(self) -> bytearray:
        try:
            self._parser.finalize()
        except Exception as exc:  # noqa: BLE001 - same family as in feed
            raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from None
        if self.data is None:
            raise ApiError(422, "invalid_image", "multipart body has no file part; send the image as a file field (curl -F file=@photo.jpg)")
        return self.data


# --------------------------------------------------------------------------- admission, metrics


#: Endpoints named in the metrics' ``endpoint`` label (anything else is "other": bounded label values).
_ENDPOINTS = ("/predict", "/health", "/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready",
              "/metadata", "/metrics")


class ServerState:
    """What the server knows about itself: admitted requests, reserved body bytes, readiness, draining."""

    def __init__(self) -> None:
        self.pending = 0  # /predict requests admitted and not yet answered
        self.body_bytes = 0  # body bytes reserved by them (declared Content-Length, or max_body_bytes when chunked)
        self.queued = 0  # received, waiting for an inference worker
        self.queue_lock = threading.Lock()
        self.warmup_error: str | None = "warm-up inference has not run yet"
        self.backend_error: str | None = None  # the last inference failure of the backend (cleared by a success)
        self.draining = False
        self.batcher: MicroBatcher | None = None

    def not_ready_reason(self) -> str | None:
        """Why the server is not ready, or ``None`` when it is."""
        if self.draining:
            return "shutting down: finishing the requests in flight"
        return self.warmup_error or self.backend_error


class Metrics:
    """The Prometheus metrics of one app, in their own registry (``prometheus_client``, imported here)."""

    def __init__(self, state: ServerState, info: dict[str, Any]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("kimchi_edge_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("kimchi_edge_request_duration_seconds", "Time from request start to the answer, by endpoint",
                                 ["endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.stage = Histogram("kimchi_edge_stage_duration_seconds", "Time per stage of /predict (decode, preprocess, infer)",
                               ["stage"], registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.rejected = Counter("kimchi_edge_rejected_requests", "Requests refused by a limit, by reason", ["reason"], registry=r)
        Gauge("kimchi_edge_in_flight_requests", "/predict requests admitted and not yet answered",
              registry=r).set_function(lambda: state.pending)
        Gauge("kimchi_edge_in_flight_body_bytes", "Body bytes reserved by the admitted requests",
              registry=r).set_function(lambda: state.body_bytes)
        Gauge("kimchi_edge_queue_depth", "Requests received and waiting for an inference worker",
              registry=r).set_function(lambda: state.queued)
        Gauge("kimchi_edge_ready", "1 when /health/ready answers 200", registry=r).set_function(
            lambda: 0 if state.not_ready_reason() else 1)
        model = Gauge("kimchi_edge_model_info", "The model and artifact in use (value 1)",
                      ["architecture", "backend", "artifact", "precision", "gated"], registry=r)
        model.labels(str(info.get("architecture")), str(info.get("backend")), str(info.get("artifact")),
                     str(info.get("precision")), str(bool(info.get("gated"))).lower()).set(1)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def api_key_matches(headers: Any, key: str) -> bool:
    """``Authorization: Bearer KEY`` or ``X-API-Key: KEY``, compared in constant time."""
    given = headers.get("x-api-key")
    if given is None:
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    # ASGI header values are bytes, decoded as latin-1 by Starlette: back to the bytes, compared with the key's UTF-8
    return hmac.compare_digest(given.encode("latin-1", "replace"), key.encode("utf-8"))


class Admission:
    """Pure ASGI middleware: access control and admission of ``POST /predict`` *before* its body is read; metrics.

    ``/predict`` needs the API key when one is set (401), a declared body over ``max_body_bytes`` is refused
    (413), and the request is admitted only while fewer than ``max_pending`` are in flight and its body fits
    the ``max_inflight_body_bytes`` budget (the declared ``Content-Length``; ``max_body_bytes`` for a chunked
    body); otherwise it is answered 503 with ``Retry-After`` at once, and the connection closed.  Every
    answer is counted in the metrics.
    """

    def __init__(self, app: Any, cfg: ServerConfig, state: ServerState, metrics: Metrics) -> None:
        self.app, self.cfg, self.state, self.metrics = app, cfg, state, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        status = {"code": 500}
        started = time.perf_counter()
        body = _Body(receive, 2 * self.cfg.max_body_bytes + LINGER_SLACK_BYTES)

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                closes = any(k.lower() == b"connection" and v.lower() == b"close" for k, v in message.get("headers", ()))
                if closes and message["status"] != 408:  # a sender too slow for the body timeout is not waited for again
                    await body.linger(_declared_or_none(scope))
            await send(message)

        try:
            if path == "/predict" and scope.get("method") == "POST":
                await self._predict(scope, body.receive, counting_send)
            else:
                await self.app(scope, body.receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _predict(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.datastructures import Headers

        cfg, state = self.cfg, self.state
        headers = Headers(scope=scope)
        if cfg.api_key and not api_key_matches(headers, cfg.api_key):
            self.metrics.rejected.labels("unauthorized").inc()
            await _refuse(scope, receive, send, 401, "unauthorized",
                          "this server needs an API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                          {"WWW-Authenticate": "Bearer"})
            return
        declared = headers.get("content-length")
        try:
            reserve = declared_length(declared) if declared is not None else cfg.max_body_bytes
            if declared is not None and reserve > cfg.max_body_bytes:
                raise too_large(cfg.max_body_bytes, reserve)
        except ApiError as exc:
            self.metrics.rejected.labels(exc.kind).inc()
            await _refuse(scope, receive, send, exc.status, exc.kind, exc.message, exc.headers)
            return
        retry = {"Retry-After": str(cfg.retry_after_s)}
        if state.draining:
            self.metrics.rejected.labels("draining").inc()
            await _refuse(scope, receive, send, 503, "unavailable", "the server is shutting down; retry on another instance", retry)
            return
        if state.pending >= cfg.max_pending:
            self.metrics.rejected.labels("busy").inc()
            await _refuse(scope, receive, send, 503, "busy",
                          f"{state.pending} requests in flight (limit {cfg.max_pending}); retry shortly", retry)
            return
        if state.body_bytes + reserve > cfg.max_inflight_body_bytes:
            self.metrics.rejected.labels("body_budget").inc()
            await _refuse(scope, receive, send, 503, "busy",
                          f"{state.body_bytes + reserve} body bytes would be in flight (limit {cfg.max_inflight_body_bytes}; "
                          "a body without Content-Length counts as the largest allowed); retry shortly", retry)
            return
        state.pending += 1
        state.body_bytes += reserve
        try:
            await self.app(scope, receive, send)
        finally:
            state.pending -= 1
            state.body_bytes -= reserve


def _declared_or_none(scope: dict) -> int | None:
    """The request's ``Content-Length`` as a number, ``None`` when absent or not a number."""
    for k, v in scope.get("headers", ()):
        if k.lower() == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


async def _refuse(scope: dict, receive: Any, send: Any, status: int, kind: str, message: str,
                  headers: dict[str, str] | None = None) -> None:
    """Answer JSON ``{"error", "message"}`` without using the body, and close the connection (after a bounded linger)."""
    from starlette.responses import JSONResponse

    await JSONResponse({"error": kind, "message": message}, status_code=status,
                       headers={**(headers or {}), "Connection": "close"})(scope, receive, send)


# --------------------------------------------------------------------------- the app


def create_app(classifier: Any, config: ServerConfig | None = None):
    """Build the FastAPI application serving ``classifier``.

    Args:
        classifier: a loaded :class:`~kimchi_edge.runtime.classifier.Classifier`.
        config: limits and scheduling (:class:`ServerConfig` defaults when ``None``).

    Returns:
        A ``fastapi.FastAPI`` app; run it with uvicorn (``kimchi-edge serve`` does).  ``app.state.server``
        is its :class:`ServerState` (``draining = True`` makes it not ready and refuse new work).

    Raises:
        MissingDependencyError: FastAPI, python-multipart or prometheus-client is not installed
            (``pip install 'kimchi-edge[serve]'``).
        UsageError: ``max_inflight_body_bytes`` is smaller than ``max_body_bytes`` (no upload could ever be admitted).
    """
    from .errors import UsageError, require

    require("fastapi", extra="serve", purpose="kimchi-edge serve")
    require("multipart", extra="serve", purpose="kimchi-edge serve (multipart uploads)")
    require("prometheus_client", extra="serve", purpose="kimchi-edge serve (/metrics)")
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    from kimchi_edge import __version__

    cfg = config or ServerConfig()
    if cfg.max_inflight_body_bytes < cfg.max_body_bytes:
        raise UsageError(f"the in-flight body budget ({cfg.max_inflight_body_bytes} bytes) is smaller than the largest body "
                         f"({cfg.max_body_bytes} bytes): no upload of that size could ever be admitted")
    n_labels = len(classifier.labels)
    info = classifier.info
    executor = ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="kimchi-infer")
    state = ServerState()
    metrics = Metrics(state, info)

    @asynccontextmanager
    async def lifespan(app):
        await _warm_up(classifier, executor, state)
        if cfg.batching:
            state.batcher = MicroBatcher(classifier, executor, cfg.max_batch, cfg.batch_wait_ms / 1e3)
            state.batcher.start()
        try:
            yield
        finally:
            state.draining = True
            if state.batcher is not None:
                await state.batcher.stop()
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="kimchi-edge",
        version=__version__,
        description=f"Image classifier ({info['architecture']}, {n_labels} labels) served from a kimchi-edge bundle.",
        lifespan=lifespan,
    )
    app.state.classifier = classifier
    app.state.config = cfg
    app.state.server = state
    app.state.metrics = metrics

    _add_error_handlers(app, metrics)
    _add_predict_route(app, classifier, cfg, executor, state, metrics)
    _add_info_routes(app, classifier, cfg, state, metrics)
    app.add_middleware(Admission, cfg=cfg, state=state, metrics=metrics)
    if cfg.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"], expose_headers=["Retry-After"])
    return app


async def _warm_up(classifier: Any, executor: ThreadPoolExecutor, state: ServerState) -> None:
    """One tiny inference (a blank image of the model's input shape) before the server says it is ready."""
    x = np.zeros((1, *classifier.preprocessor.input_shape), dtype=classifier.manifest.preprocessing.dtype)
    try:
        probs = await asyncio.get_running_loop().run_in_executor(executor, classifier.infer_array, x)
        if probs.shape != (1, len(classifier.labels)) or not np.isfinite(probs).all():
            raise KimchiEdgeError(f"it gave {probs.shape} {'non-finite ' if not np.isfinite(probs).all() else ''}values; "
                                  f"expected (1, {len(classifier.labels)}) probabilities")
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; the server stays up to say why
        state.warmup_error = f"warm-up inference failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.error("%s; /health/ready answers 503", state.warmup_error)
    else:
        state.warmup_error = None


def _add_error_handlers(app: Any, metrics: Metrics) -> None:
    """Every error is ``{"error": kind, "message": one line}`` with its status code; nothing leaks a traceback."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": kind, "message": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.kind in ("payload_too_large", "request_timeout", "timeout", "busy"):
            metrics.rejected.labels(exc.kind).inc()
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
            (401, "unauthorized", "the server has an API key and the request did not send it"),
            (408, "request_timeout", "the body did not arrive within the body timeout"),
            (413, "payload_too_large", "body over the size limit"),
            (415, "unsupported_media_type", "not an image media type"),
            (422, "invalid_image", "the image cannot be decoded, is too large in pixels or decoded memory, or a parameter is invalid"),
            (500, "inference_failed", "the backend failed (the server log has the details; /health/ready turns 503)"),
            (503, "busy", "too many requests or body bytes in flight, or shutting down (Retry-After)"),
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


def _add_predict_route(app: Any, classifier: Any, cfg: ServerConfig, executor: ThreadPoolExecutor, state: ServerState,
                       metrics: Metrics) -> None:
    """``POST /predict``: media type, body (size, time), then classify in the executor (admission is :class:`Admission`'s)."""
    from fastapi import Query, Request

    info = classifier.info
    n_labels = len(classifier.labels)
    _, PredictResponse = _response_models()
    predict_body, error_responses = _openapi_predict_docs()

    def in_worker(fn: Any, *args: Any) -> Any:
        with state.queue_lock:
            state.queued -= 1
        return fn(*args)

    async def run(fn: Any, *args: Any) -> Any:
        with state.queue_lock:
            state.queued += 1
        return await asyncio.get_running_loop().run_in_executor(executor, in_worker, fn, *args)

    async def classify(data: bytearray, top_k: int, started: float) -> dict[str, Any]:
        batcher = state.batcher
        try:
            if batcher is None:
                pred = await run(classifier.predict, data, top_k)
                timings, batch_size = dict(pred.timings_ms), 1
            else:
                x, timings = await run(classifier.prepare, data)
                probs, batch_size, timings["infer"] = await batcher.infer(x)
                pred = classifier.prediction(probs, top_k)
        except InvalidInputError:
            raise
        except Exception as exc:  # the backend failed: not ready until an inference succeeds again
            state.backend_error = f"the last inference failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.error("inference failed on /predict", exc_info=exc)
            raise ApiError(500, "inference_failed", f"the backend could not classify the image ({type(exc).__name__}); "
                                                    "the details are in the server log; /health/ready says not ready") from None
        state.backend_error = None
        for stage in ("decode", "preprocess", "infer"):
            if stage in timings:
                metrics.stage.labels(stage).observe(timings[stage] / 1e3)
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
            data = await asyncio.wait_for(read_body(request, cfg.max_body_bytes, media), cfg.body_timeout_s)
        except asyncio.TimeoutError:
            data = None  # raised below, outside this block: no __context__ chain keeps the cancelled read's buffer alive
        if data is None:
            raise ApiError(408, "request_timeout", f"the request body did not arrive within {cfg.body_timeout_s:g} s",
                           {"Connection": "close"})
        if not data:
            raise ApiError(422, "invalid_image", "the request has no image (0 bytes); expected an encoded image (JPEG, PNG, WebP ...)")
        try:
            return await asyncio.wait_for(classify(data, top_k, started), cfg.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"the image was not classified within {cfg.timeout_s:g} s; retry, or send a smaller image") from None
        except ImageTooLargeError as exc:
            raise ApiError(422, "image_too_large", str(exc)) from None
        except InvalidInputError as exc:
            raise ApiError(422, "invalid_image", str(exc)) from None


def _add_info_routes(app: Any, classifier: Any, cfg: ServerConfig, state: ServerState, metrics: Metrics) -> None:
    """``GET /health`` (summary), ``/health/live``, ``/health/ready`` (and Triton's ``/v2/health/*``), ``/metadata``, ``/metrics``."""
    from fastapi.responses import JSONResponse, Response

    from kimchi_edge import __version__

    info = classifier.info

    def ready_answer() -> JSONResponse:
        reason = state.not_ready_reason()
        if reason:
            return JSONResponse({"status": "not_ready", "ready": False, "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready", "ready": True})

    @app.get("/health", summary="Summary: live, ready, model in use, requests in flight (always 200 while the process serves)")
    async def health():
        reason = state.not_ready_reason()
        out = {"status": "ok" if reason is None else "not_ready", "live": True, "ready": reason is None,
               "backend": info["backend"], "artifact": info["artifact"], "gated": info["gated"],
               "pending": state.pending, "queued": state.queued}
        if reason:
            out["reason"] = reason
        if not info["gated"]:
            out["warning"] = next(n for n in info["notes"] if n.startswith("UNGATED:"))
        return out

    @app.get("/health/live", summary="Liveness: the process answers (200)")
    async def live():
        return {"status": "live"}

    @app.get("/health/ready", summary="Readiness: the model loaded, the warm-up inference passed, not draining (200, else 503)")
    async def ready():
        return ready_answer()

    @app.get("/v2/health/live", include_in_schema=False)
    async def triton_live():
        return {"status": "live"}

    @app.get("/v2/health/ready", include_in_schema=False)
    async def triton_ready():
        return ready_answer()

    @app.get("/metrics", summary="Prometheus metrics: requests by status, latency per stage, queue depth, rejections, model")
    async def prometheus_metrics():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/metadata", summary="Labels, input size, backend, limits and the accuracy gate's summary")
    async def metadata():
        from .manifest import to_dict

        m = classifier.manifest
        batcher = state.batcher
        sizes = list(batcher.batch_sizes) if batcher else []
        limits = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
        limits["api_key_required"] = bool(cfg.api_key)
        return {
            "labels": list(classifier.labels),
            "input_size": info["input_size"],
            "architecture": info["architecture"],
            "backend": {k: v for k, v in info.items() if k not in ("labels", "input_size", "architecture", "notes", "bundle")},
            "notes": info["notes"],
            "gated": info["gated"],
            "gate": to_dict(m.gate) if m.gate else {},
            "gate_in_words": m.gate.in_words() if m.gate else ["the accuracy gate has never run on this bundle"],
            "limits": limits,
            "batching": {"enabled": cfg.batching, "mean_batch_size": round(float(np.mean(sizes)), 2) if sizes else None},
            "kimchi_edge": __version__,
        }
