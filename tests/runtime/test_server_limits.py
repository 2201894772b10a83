"""The server's limits against someone who means harm: admission before the body, streaming cut-offs,
readiness, metrics, access control, graceful shutdown.  A real ``kimchi-edge serve`` on 127.0.0.1, real
sockets; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from kimchi_edge.runtime.fsutil import sha256_file
from kimchi_edge.runtime.manifest import Artifact, BundleManifest, ModelMeta, Preprocessing, write_manifest
from tests.conftest import COLOR_LABELS
from tests.runtime.test_server import COLOURS, Server, assert_json_error, png

RED, GREEN, BLUE = COLOR_LABELS


def address(server: Server) -> tuple[str, int]:
    u = urlsplit(server.url)
    return u.hostname, u.port


def stalled_upload(server: Server, declared: int, sent: bytes = b"\x89PNG\r\n") -> socket.socket:
    """A connection that declares ``declared`` body bytes, sends a few, then stalls."""
    s = socket.create_connection(address(server), timeout=10)
    s.sendall(f"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\nContent-Length: {declared}\r\n\r\n".encode() + sent)
    return s


def read_response(s: socket.socket, timeout: float = 5.0) -> bytes:
    """What the server answered on ``s`` within ``timeout`` (until it closes or the headers and some body arrived)."""
    s.settimeout(timeout)
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            part = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not part:
            break
        got += part
        if b"\r\n\r\n" in got and got.rstrip().endswith(b"}"):
            break
    return got


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of ``/metrics`` (0 when absent)."""
    text = server.client.get("/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == name or (labels and key.startswith(name + "{") and all(f'{k}="{v}"' in key for k, v in labels.items())):
            return float(value)
    assert want or name in text, f"{name} not in /metrics"
    return 0.0


# --------------------------------------------------------------------------- admission before the body


def test_seventeenth_request_over_a_limit_of_sixteen_gets_503_at_once(color_bundle, tmp_path):
    server = Server(color_bundle, tmp_path / "server.log", "--max-pending", "16", "--body-timeout", "20")
    stalls: list[socket.socket] = []
    try:
        stalls = [stalled_upload(server, 1000) for _ in range(16)]
        try:  # all 16 have sent their headers (not their bodies)
            wait_for(lambda: server.client.get("/health").json()["pending"] == 16, timeout=5, what="16 requests in flight")
        except AssertionError:
            pass  # a server that counts only received bodies never says 16: the 17th request below tells
        t0 = time.perf_counter()
        r = server.client.post("/predict", content=png(COLOURS[RED]), headers={"Content-Type": "image/png"})
        waited = time.perf_counter() - t0
        assert_json_error(r, 503, "busy", "16 requests in flight (limit 16); retry shortly")
        assert r.headers["retry-after"] == "1"
        assert waited < 5, f"the 503 took {waited:.1f} s"  # at once, not after a body timeout (20 s)
        assert server.client.get("/health/ready").status_code == 200  # readiness is not admission
        assert metric(server, "kimchi_edge_rejected_requests_total", reason="busy") >= 1
        assert metric(server, "kimchi_edge_in_flight_requests") == 16
    finally:
        for s in stalls:
            s.close()
    try:
        wait_for(lambda: server.client.get("/health").json()["pending"] == 0, what="the stalled requests released")
        r = server.client.post("/predict", content=png(COLOURS[BLUE]), headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["label"] == BLUE
    finally:
        server.stop()


def test_in_flight_body_bytes_are_bounded_before_reading(color_bundle, tmp_path):
    mb = 1024 * 1024
    server = Server(color_bundle, tmp_path / "server.log", "--max-body-mb", "1", "--max-inflight-body-mb", "2", "--body-timeout", "20")
    stalls: list[socket.socket] = []
    try:
        stalls = [stalled_upload(server, mb - 10) for _ in range(2)]  # 2 x ~1 MB declared: the budget is spent
        wait_for(lambda: metric(server, "kimchi_edge_in_flight_body_bytes") == 2 * (mb - 10), what="2 MB reserved")
        s = stalled_upload(server, 100_000)  # would fit the body limit, not the budget: refused with nothing read
        head = read_response(s)
        s.close()
        assert head.startswith(b"HTTP/1.1 503"), head[:200]
        assert b"retry-after: 1" in head.lower() and b"body bytes would be in flight" in head
        body = png(COLOURS[RED])  # chunked, sent in one write with the headers (so the close cannot reset the answer)
        s = socket.create_connection(address(server), timeout=10)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        head = read_response(s)
        s.close()
        assert head.startswith(b"HTTP/1.1 503"), head[:200]  # a chunked body reserves the largest allowed, 1 MB
        assert b"a body without Content-Length counts as the largest allowed" in head
    finally:
        for s in stalls:
            s.close()
    try:
        wait_for(lambda: metric(server, "kimchi_edge_in_flight_body_bytes") == 0, what="the budget released")
        r = server.client.post("/predict", content=png(COLOURS[GREEN]), headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["label"] == GREEN
    finally:
        server.stop()


def test_oversized_upload_is_cut_at_the_limit_not_read_whole(color_bundle, tmp_path):
    """A 30 MB chunked upload against a 1 MB limit: 413, and the connection is closed instead of swallowing 30 MB."""
    server = Server(color_bundle, tmp_path / "server.log", "--max-body-mb", "1")
    try:
        s = socket.create_connection(address(server), timeout=10)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % 65536 + b"\xff" * 65536 + b"\r\n"
        total, sent, cut = 30 * 1024 * 1024, 0, False
        s.settimeout(10)
        try:
            while sent < total:
                s.sendall(chunk)
                sent += 65536
            s.sendall(b"0\r\n\r\n")
        except OSError:  # EPIPE / ECONNRESET: the server closed the connection
            cut = True
        answer = read_response(s)
        s.close()
        assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
        assert b"over the limit of 1048576 bytes" in answer
        assert cut, f"the server read all {sent / 2**20:.0f} MB of a body over its 1 MB limit"
        assert sent < 16 * 1024 * 1024, f"{sent / 2**20:.0f} MB were accepted before the cut"

        s = stalled_upload(server, 30 * 1024 * 1024)  # declared over the limit: 413 before a body byte is read
        head = read_response(s)
        s.close()
        assert head.startswith(b"HTTP/1.1 413") and b"request body is 31457280 bytes, over the limit" in head
        assert b"connection: close" in head.lower()
        assert server.client.get("/health/ready").status_code == 200
    finally:
        server.stop()


def test_slow_sender_is_cut_by_the_body_timeout_and_releases_its_budget(color_bundle, tmp_path):
    server = Server(color_bundle, tmp_path / "server.log", "--body-timeout", "1")
    try:
        s = stalled_upload(server, 15 * 1024 * 1024)
        answer = read_response(s, timeout=8)
        s.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer
        wait_for(lambda: server.client.get("/health").json()["pending"] == 0, what="the slow request released")
        assert metric(server, "kimchi_edge_rejected_requests_total", reason="request_timeout") == 1
    finally:
        server.stop()


def test_multipart_with_extra_fields_streams_only_the_file_part(server_default):
    body = png(COLOURS[GREEN])
    r = server_default.client.post("/predict", files={"photo": ("g.png", body, "image/png")},
                                   data={"a": "x" * 1000, "b": "김치"})
    assert r.status_code == 200, r.text
    assert r.json()["label"] == GREEN


@pytest.fixture(scope="module")
def server_default(color_bundle, tmp_path_factory):
    s = Server(color_bundle, tmp_path_factory.mktemp("limits") / "server.log")
    yield s
    s.stop()


# --------------------------------------------------------------------------- health, readiness, metrics


def make_broken_bundle(folder: Path) -> Path:
    """A bundle whose ONNX graph loads but cannot infer (a Reshape that cannot hold at run time)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["f", "shape"], ["r"]),  # 32*32*3 = 3072 values per image: not a multiple of 7
        helper.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=1),
        helper.make_node("Mul", ["m", "ones"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(np.array([-1, 7], dtype=np.int64), "shape"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
             numpy_helper.from_array(np.ones((1, 3), dtype=np.float32), "ones")]
    graph = helper.make_graph(nodes, "broken", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 32, 32, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(folder / "model.onnx"))
    pre = Preprocessing(height=32, width=32, resize_height=32, resize_width=32, batch_resize=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    art = Artifact(name="onnx-fp32", file="model.onnx", format="onnx", precision="fp32",
                   sha256=sha256_file(folder / "model.onnx"), size_bytes=(folder / "model.onnx").stat().st_size)
    write_manifest(folder, BundleManifest(model=ModelMeta(labels=COLOR_LABELS, architecture="broken", preprocessing=pre),
                                          artifacts=(art,), recommended={"onnxruntime": "onnx-fp32"}))
    return folder


def test_readiness_is_false_when_the_backend_cannot_infer(tmp_path):
    bundle = make_broken_bundle(tmp_path / "broken")
    server = Server(bundle, tmp_path / "server.log", "--allow-ungated")
    try:
        assert server.client.get("/health/live").status_code == 200
        r = server.client.get("/health/ready")
        assert r.status_code == 503, r.text
        assert r.json()["ready"] is False and "warm-up inference failed" in r.json()["reason"]
        assert server.client.get("/v2/health/ready").status_code == 503
        h = server.client.get("/health")
        assert h.status_code == 200 and h.json()["ready"] is False and h.json()["status"] == "not_ready"
        r = server.client.post("/predict", content=png(COLOURS[RED]), headers={"Content-Type": "image/png"})
        assert_json_error(r, 500, "inference_failed", "the backend could not classify the image")
        assert metric(server, "kimchi_edge_ready") == 0
    finally:
        server.stop()


def test_health_ready_and_metrics_on_a_good_server(server_default):
    c = server_default.client
    assert c.get("/health/live").json() == {"status": "live"}
    assert c.get("/health/ready").status_code == 200 and c.get("/health/ready").json()["ready"] is True
    assert c.get("/v2/health/live").status_code == 200 and c.get("/v2/health/ready").status_code == 200
    h = c.get("/health").json()
    assert h["status"] == "ok" and h["live"] is True and h["ready"] is True
    for lab in (RED, GREEN):
        assert c.post("/predict", content=png(COLOURS[lab]), headers={"Content-Type": "image/png"}).json()["label"] == lab
    assert c.post("/predict", content=b"not an image", headers={"Content-Type": "image/png"}).status_code == 422
    m = c.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert metric(server_default, "kimchi_edge_requests_total", endpoint="/predict", status="200") >= 2
    assert metric(server_default, "kimchi_edge_requests_total", endpoint="/predict", status="422") >= 1
    for stage in ("decode", "preprocess", "infer"):
        assert metric(server_default, "kimchi_edge_stage_duration_seconds_count", stage=stage) >= 2, stage
    assert 'kimchi_edge_model_info{architecture="mean-colour",artifact="onnx-fp32",backend="onnxruntime"' in text
    assert "kimchi_edge_queue_depth 0.0" in text and "kimchi_edge_ready 1.0" in text
    assert 'kimchi_edge_request_duration_seconds_bucket{endpoint="/predict"' in text
    limits = c.get("/metadata").json()["limits"]
    assert limits["max_pending"] == 32 and limits["api_key_required"] is False and "api_key" not in limits


# --------------------------------------------------------------------------- access control


def test_api_key_from_the_environment_and_cors(color_bundle, tmp_path):
    key = "s3cret-키"
    server = Server(color_bundle, tmp_path / "server.log", "--cors-origin", "http://phone.test:8080",
                    env_extra={"KIMCHI_EDGE_API_KEY": key})
    try:
        c, body, ctype = server.client, png(COLOURS[RED]), {"Content-Type": "image/png"}
        assert_json_error(c.post("/predict", content=body, headers=ctype), 401, "unauthorized", "needs an API key")
        assert c.post("/predict", content=body, headers=ctype).headers["www-authenticate"] == "Bearer"
        assert_json_error(c.post("/predict", content=body, headers={**ctype, "X-API-Key": "wrong"}), 401, "unauthorized", "API key")
        assert c.post("/predict", content=body, headers={**ctype, "Authorization": f"Bearer {key}".encode()}).json()["label"] == RED
        assert c.post("/predict", content=body, headers={**ctype, "X-API-Key": key.encode()}).json()["label"] == RED
        assert c.get("/health/ready").status_code == 200  # probes need no key
        assert c.get("/metadata").json()["limits"]["api_key_required"] is True
        assert key not in c.get("/metadata").text and key not in c.get("/metrics").text
        pre = c.options("/predict", headers={"Origin": "http://phone.test:8080", "Access-Control-Request-Method": "POST",
                                             "Access-Control-Request-Headers": "x-api-key"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://phone.test:8080"
        r = c.post("/predict", content=body, headers={**ctype, "Origin": "http://phone.test:8080"})  # 401, readable by the page
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://phone.test:8080"
        other = c.options("/predict", headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        server.stop()


def test_refusals_before_the_body_is_read_still_reach_the_client(color_bundle, tmp_path):
    """401 and 400 answered with a 4 MB body unread: the client gets the answer, not a TCP reset (lingering close)."""
    key = "k3y"
    server = Server(color_bundle, tmp_path / "server.log", env_extra={"KIMCHI_EDGE_API_KEY": key})
    try:
        body = os.urandom(4 << 20)
        for _ in range(3):  # a reset is a race; three tries make a regression show almost surely
            assert_json_error(server.client.post("/predict", content=body, headers={"Content-Type": "image/png"}),
                              401, "unauthorized", "needs an API key")
            assert_json_error(server.client.post("/predict", content=body,
                                                 headers={"Content-Type": "multipart/form-data", "X-API-Key": key}),
                              400, "bad_request", "no boundary")
    finally:
        server.stop()


def test_loopback_detection_for_the_lan_warning():
    from kimchi_edge.runtime.serve_cli import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("::") and not _is_loopback("192.168.1.20")


# --------------------------------------------------------------------------- shutdown and close


@pytest.mark.skipif(os.name != "posix", reason="sends SIGTERM")
def test_graceful_shutdown_finishes_the_request_in_flight(color_bundle, tmp_path):
    server = Server(color_bundle, tmp_path / "server.log")
    body = png(COLOURS[GREEN])
    s = stalled_upload(server, len(body), body[:10])
    wait_for(lambda: server.client.get("/health").json()["pending"] == 1, what="the request in flight")
    server.client.close()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # uvicorn is draining now: the listening socket is closed
    s.sendall(body[10:])
    answer = read_response(s, timeout=10)
    s.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert COLOR_LABELS[1].encode() in answer
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn >= 0.29 re-raises the signal it handled
    server._err.close()
    assert "Traceback" not in (tmp_path / "server.log").read_text(encoding="utf-8")


def test_close_during_predict_raises_a_backend_error_not_attribute_error(color_bundle):
    from kimchi_edge.runtime import BackendError, Classifier

    clf = Classifier.from_bundle(color_bundle, backend="onnxruntime")
    image = np.full((48, 64, 3), COLOURS[RED], dtype=np.uint8)
    outcomes: list[str] = []
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                assert clf.predict(image).label == RED
                outcomes.append("ok")
            except BackendError as exc:
                assert "closed" in str(exc)
                outcomes.append("closed")
                return
            except Exception as exc:  # noqa: BLE001 - the test reports what leaked
                outcomes.append(f"{type(exc).__name__}: {exc}")
                return

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    clf.close()
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not any(o not in ("ok", "closed") for o in outcomes), [o for o in outcomes if o not in ("ok", "closed")]
    assert "ok" in outcomes
    with pytest.raises(BackendError, match="this Classifier is closed"):
        clf.predict(image)
    clf.close()  # twice is fine
