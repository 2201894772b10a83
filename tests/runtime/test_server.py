"""The real server: ``kimchi-edge serve`` in a subprocess on 127.0.0.1 (ephemeral port), spoken to over HTTP.

Loopback only; every loop and wait is bounded.
"""

from __future__ import annotations

import io
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import COLOR_LABELS, REPO

httpx = pytest.importorskip("httpx", reason="the server tests need httpx (pip install 'kimchi-edge[dev]')")
pytest.importorskip("fastapi", reason="the server needs the serve extra (pip install 'kimchi-edge[serve]')")
pytest.importorskip("uvicorn", reason="the server needs the serve extra (pip install 'kimchi-edge[serve]')")

RED, GREEN, BLUE = COLOR_LABELS
COLOURS = {RED: (230, 20, 20), GREEN: (20, 230, 20), BLUE: (20, 20, 230)}


class Server:
    """``kimchi-edge serve BUNDLE --port 0`` in a subprocess; the port is read from its first line."""

    def __init__(self, bundle: Path, log: Path, *extra: str, env_extra: dict | None = None, verify=True) -> None:
        cmd = [sys.executable, "-m", "kimchi_edge", "serve", str(bundle), "--host", "127.0.0.1", "--port", "0",
               "--log-level", "warning", *extra]
        env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
        self.log = log
        self._err = open(log, "w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self._err, text=True, encoding="utf-8")
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        try:
            first = lines.get(timeout=60)
        except queue.Empty:
            self.stop()
            raise RuntimeError(f"server did not start within 60 s: {log.read_text()}") from None
        self.url = first.split(" on ", 1)[1].split()[0]
        self.client = httpx.Client(base_url=self.url, timeout=30, trust_env=False, verify=verify)  # no proxies for loopback
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not healthy within 30 s: {log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self._err.close()


@pytest.fixture(scope="module")
def server(color_bundle, tmp_path_factory):
    s = Server(color_bundle, tmp_path_factory.mktemp("server") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strict_server(color_bundle, tmp_path_factory):
    s = Server(color_bundle, tmp_path_factory.mktemp("strict") / "server.log", "--max-body-mb", "1", "--timeout", "0.001",
               "--body-timeout", "0.5")
    yield s
    s.stop()


def png(rgb, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "PNG")
    return buf.getvalue()


def jpeg(rgb, size=(640, 480)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def assert_json_error(r, status: int, kind: str, fragment: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"] == kind, body
    assert fragment in body["message"], body
    assert "Traceback" not in r.text and 'File "' not in r.text


# --------------------------------------------------------------------------- happy paths


def test_health_metadata_and_openapi(server):
    assert server.client.get("/health").json()["status"] == "ok"
    meta = server.client.get("/metadata")
    assert meta.status_code == 200
    assert "빨강 red".encode() in meta.content  # UTF-8, not \\u escapes
    m = meta.json()
    assert m["labels"] == list(COLOR_LABELS)
    assert m["input_size"] == [32, 32]
    assert m["backend"]["backend"] == "onnxruntime" and m["backend"]["artifact"] == "onnx-fp32"
    assert m["gate"]["passed"] is True and m["gated"] is True and m["limits"]["max_body_bytes"] == 20 * 1024 * 1024
    assert m["gate_in_words"][0].startswith("Accuracy gate passed on 9 validation images")
    spec = server.client.get("/openapi.json").json()
    content = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"image/*", "application/octet-stream", "multipart/form-data"} <= set(content)
    assert {"/health", "/metadata"} <= set(spec["paths"])
    assert server.client.get("/docs").status_code == 200


@pytest.mark.parametrize("label", list(COLOURS))
def test_predict_raw_body(server, label):
    r = server.client.post("/predict", content=png(COLOURS[label]), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == label
    assert [t["label"] for t in body["top"]][0] == label and len(body["top"]) == 3
    assert abs(sum(t["probability"] for t in body["top"]) - 1) < 1e-4
    assert body["backend"] == "onnxruntime" and body["artifact"] == "onnx-fp32"
    assert {"decode", "preprocess", "infer", "server_total"} <= set(body["latency_ms"])
    assert label.encode() in r.content


def test_predict_octet_stream_jpeg_multipart_and_top_k(server):
    r = server.client.post("/predict?top_k=1", content=jpeg(COLOURS[BLUE]), headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["label"] == BLUE and len(r.json()["top"]) == 1
    r = server.client.post("/predict", files={"file": ("사진.png", png(COLOURS[GREEN]), "image/png")})
    assert r.status_code == 200 and r.json()["label"] == GREEN
    r = server.client.post("/predict", files={"image": ("x.jpg", jpeg(COLOURS[RED]), "image/jpeg")}, data={"note": "any field name works"})
    assert r.status_code == 200 and r.json()["label"] == RED
    r = server.client.post("/predict", content=png(COLOURS[RED]))  # no Content-Type at all: the bytes are sniffed
    assert r.status_code == 200 and r.json()["label"] == RED


# --------------------------------------------------------------------------- hostile input


def truncated_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[:5000]


def bomb_png() -> bytes:
    from tests.runtime.test_input_validation import png_header_only

    return png_header_only(40_000, 40_000)


HOSTILE = [
    ("garbage", b"\x00\xffnot an image at all", "image/jpeg", 422, "invalid_image", "is not an image Pillow can decode"),
    ("zero bytes", b"", "image/png", 422, "invalid_image", "no image (0 bytes)"),
    ("truncated jpeg", truncated_jpeg(), "image/jpeg", 422, "invalid_image", "damaged or truncated image"),
    ("text as jpeg", "김치찌개 recipe".encode(), "image/jpeg", 422, "invalid_image", "is not an image Pillow can decode"),
    ("bomb", bomb_png(), "image/png", 422, "image_too_large", "40000x40000 = 1,600,000,000 pixels, over the limit"),
    ("text/plain", b"hello", "text/plain", 415, "unsupported_media_type", "Content-Type text/plain is not supported"),
    ("json", b'{"image": "x"}', "application/json", 415, "unsupported_media_type", "curl -F file=@photo.jpg"),
    ("form-urlencoded", b"a=b", "application/x-www-form-urlencoded", 415, "unsupported_media_type", "image/*"),
    ("multipart without boundary", b"--x\r\n", "multipart/form-data", 400, "bad_request", "malformed multipart body"),
]


@pytest.mark.parametrize("name, data, ctype, status, kind, fragment", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies(server, name, data, ctype, status, kind, fragment):
    r = server.client.post("/predict", content=data, headers={"Content-Type": ctype})
    assert_json_error(r, status, kind, fragment)


def test_multipart_without_a_file(server):
    r = server.client.post("/predict", files={"file": (None, b"a text field, not a file")})
    assert r.request.headers["content-type"].startswith("multipart/form-data")
    assert_json_error(r, 422, "invalid_image", "no file part")


def test_multipart_with_a_broken_image(server):
    r = server.client.post("/predict", files={"file": ("a.jpg", truncated_jpeg(), "image/jpeg")})
    assert_json_error(r, 422, "invalid_image", "damaged or truncated")


@pytest.mark.parametrize("query, fragment", [("top_k=0", "top_k: Input should be greater than or equal to 1"),
                                             ("top_k=4", "top_k: Input should be less than or equal to 3"),
                                             ("top_k=abc", "top_k: Input should be a valid integer")])
def test_bad_parameters(server, query, fragment):
    r = server.client.post(f"/predict?{query}", content=png(COLOURS[RED]), headers={"Content-Type": "image/png"})
    assert_json_error(r, 422, "invalid_request", fragment)


def test_wrong_method_and_unknown_path(server):
    for method in ("GET", "PUT", "DELETE"):
        r = server.client.request(method, "/predict")
        assert_json_error(r, 405, "method_not_allowed", f"{method} is not allowed on /predict")
        assert "POST" in r.headers.get("allow", "")
    assert_json_error(server.client.post("/health"), 405, "method_not_allowed", "POST is not allowed on /health")
    assert_json_error(server.client.get("/predictions"), 404, "not_found", "no such endpoint /predictions")


def test_server_still_healthy_after_hostile_input(server):
    assert server.client.get("/health").json()["pending"] == 0
    r = server.client.post("/predict", content=png(COLOURS[BLUE]), headers={"Content-Type": "image/png"})
    assert r.json()["label"] == BLUE


# --------------------------------------------------------------------------- limits


def test_oversize_body_is_refused(strict_server):
    big = os.urandom(2 * 1024 * 1024)
    r = strict_server.client.post("/predict", content=big, headers={"Content-Type": "image/jpeg"})
    assert_json_error(r, 413, "payload_too_large", f"request body is {len(big)} bytes, over the limit of 1048576 bytes")

    def chunks():  # no Content-Length: refused while streaming
        for _ in range(32):
            yield b"\xff" * 65536

    r = strict_server.client.post("/predict", content=chunks(), headers={"Content-Type": "image/jpeg"})
    assert_json_error(r, 413, "payload_too_large", "over the limit of 1048576 bytes")
    r = strict_server.client.post("/predict", files={"file": ("big.jpg", big, "image/jpeg")})
    assert_json_error(r, 413, "payload_too_large", "over the limit")


def test_slow_request_times_out_with_504(strict_server):
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)).save(buf, "PNG")
    assert len(buf.getvalue()) < 1024 * 1024
    r = strict_server.client.post("/predict", content=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert_json_error(r, 504, "timeout", "not classified within 0.001 s")
    assert strict_server.client.get("/health").status_code == 200


def test_slow_upload_gets_408(strict_server):
    def trickle():
        yield b"\xff\xd8\xff"
        time.sleep(1.5)  # past the 0.5 s body timeout
        yield b"\x00" * 16

    try:
        r = strict_server.client.post("/predict", content=trickle(), headers={"Content-Type": "image/jpeg"})
    except httpx.TransportError:  # the server may close before the client finishes writing; either is fine
        pass
    else:
        assert_json_error(r, 408, "request_timeout", "did not arrive within 0.5 s")
    assert strict_server.client.get("/health").status_code == 200


# --------------------------------------------------------------------------- concurrency


def hammer(url: str, clients: int = 16, per_client: int = 50) -> dict:
    """``clients`` threads, each with its own connection, ``per_client`` requests each; every answer checked."""
    labels = list(COLOURS)
    bodies = {lab: png(COLOURS[lab], (80 + 7 * i, 60 + 5 * i)) for i, lab in enumerate(labels)}
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
            start.wait(timeout=60)
            for i in range(per_client):
                lab = labels[(k + i) % 3]
                t0 = time.perf_counter()
                r = c.post("/predict?top_k=1", content=bodies[lab], headers={"Content-Type": "image/png"})
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if r.status_code != 200 or r.json()["label"] != lab:
                        failures.append(f"{r.status_code} {r.text[:200]} (expected {lab})")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - t0
    assert not any(t.is_alive() for t in threads), "clients still running after 300 s"
    lat = np.asarray(latencies) * 1e3
    return {"failures": failures, "requests": len(latencies), "rps": len(latencies) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


@pytest.mark.parametrize("batching", [False, True], ids=["no-batching", "micro-batching"])
def test_sixteen_clients_fifty_requests_each(color_bundle, tmp_path, batching):
    extra = ("--batching",) if batching else ()
    server = Server(color_bundle, tmp_path / "server.log", *extra)
    try:
        stats = hammer(server.url)
        meta = server.client.get("/metadata").json()
    finally:
        server.stop()
    print(f"\nbatching={batching}: {stats['requests']} requests, {stats['rps']:.0f} req/s, "
          f"p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms, mean batch {meta['batching']['mean_batch_size']}")
    assert stats["failures"] == []
    assert stats["requests"] == 16 * 50
    assert "Traceback" not in (tmp_path / "server.log").read_text()
    if batching:
        assert meta["batching"]["enabled"] and meta["batching"]["mean_batch_size"] >= 1


def test_no_tracebacks_in_the_server_logs(server, strict_server):
    for s in (server, strict_server):
        log = s.log.read_text(encoding="utf-8")
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log


def test_serve_https_in_one_flag(color_bundle, tmp_path):
    """--https makes a certificate for this machine (kept outside the repo, reused), serves TLS, prints the phone URL."""
    import ssl

    home = tmp_path / "https-home"
    env = {"KIMCHI_EDGE_HTTPS_DIR": str(home)}
    # trust exactly the certificate the server will make: made first through the same function
    from kimchi_edge.runtime.https import lan_certificate

    os.environ["KIMCHI_EDGE_HTTPS_DIR"] = str(home)
    try:
        cert, _, made = lan_certificate()
    finally:
        del os.environ["KIMCHI_EDGE_HTTPS_DIR"]
    assert made and cert.parent == home
    ctx = ssl.create_default_context(cafile=str(cert))
    srv = Server(color_bundle, tmp_path / "https.log", "--https", env_extra=env, verify=ctx)
    try:
        assert srv.url.startswith("https://127.0.0.1:")
        r = srv.client.post("/predict", content=png(COLOURS[BLUE]), headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["label"] == BLUE
        with pytest.raises(httpx.ConnectError):  # a client that does not trust it is refused: it is really TLS
            httpx.get(srv.url + "/health", trust_env=False)
    finally:
        srv.stop()
    log = (tmp_path / "https.log").read_text(encoding="utf-8")
    assert "Traceback" not in log
