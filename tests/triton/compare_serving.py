"""Bytes -> label through Triton vs ``kimchi-edge serve``, side by side in one run (a measurement, not a test).

    .venv/bin/python -m tests.triton.compare_serving [--bundle BUNDLE] [--images DIR] [-n 200] [--concurrency 1 8]

Exports the bundle (default: the tests' colour bundle, built in a temporary folder) with ``kimchi-edge export triton
--classify-with python`` (nvidia-pytriton's tritonserver has no onnxruntime backend), serves it with the real
tritonserver from the Triton venv, and serves the same bundle with ``kimchi-edge serve`` (FastAPI, defaults).  Every
client thread holds one keep-alive connection and sends one encoded image per request (JPEG files from
``--images``, default food10's validation split); both servers get the same images in the same order at the same
concurrency, and their labels are compared.  Prints a markdown table and the machine load (``uptime``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .harness import REPO, TritonServer, free_port, triton_unavailable


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def triton_caller(url: str, model: str):
    from tritonclient import http

    client = http.InferenceServerClient(url, network_timeout=60)

    def call(image: bytes) -> str:
        inp = http.InferInput("IMAGE", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        res = client.infer(model, [inp], outputs=[http.InferRequestedOutput("LABEL")])
        return res.as_numpy("LABEL").reshape(-1)[0].decode("utf-8")

    return call


def serve_caller(port: int):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(image: bytes) -> str:
        conn.request("POST", "/predict", body=image, headers={"Content-Type": "image/jpeg"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"kimchi-edge serve answered {resp.status}: {body[:200]!r}")
        return json.loads(body)["label"]

    return call


def measure(make_caller, images: list[bytes], concurrency: int) -> dict:
    """Send every image once from ``concurrency`` threads (each with its own connection); latency per request."""
    import threading

    local = threading.local()

    def one(i: int) -> tuple[int, str, float]:
        if not hasattr(local, "call"):
            local.call = make_caller()
        t0 = time.perf_counter()
        label = local.call(images[i])
        return i, label, (time.perf_counter() - t0) * 1e3

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(min(len(images), 4 * concurrency))))  # warm-up: connections, first batches
        t0 = time.perf_counter()
        results = list(pool.map(one, range(len(images))))
        wall = time.perf_counter() - t0
    lat = [r[2] for r in results]
    return {"labels": [r[1] for r in sorted(results)], "p50": percentile(lat, 50), "p95": percentile(lat, 95),
            "mean": float(np.mean(lat)), "throughput": len(images) / wall}


def start_serve(bundle: Path, port: int, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("kimchi-edge")
    proc = subprocess.Popen([str(exe), "serve", str(bundle), "--port", str(port), "--log-level", "warning"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kimchi-edge serve exited: {log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise RuntimeError("kimchi-edge serve did not answer /health in 60 s")


def main(argv: list[str] | None = None) -> int:
    from kimchi_edge.convert.triton import TritonOptions, export_triton

    from ..conftest import food10_root, make_color_bundle

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="bundle to serve (default: the tests' colour bundle)")
    ap.add_argument("--images", type=Path, default=None, help="folder of JPEG images (default: food10 valid)")
    ap.add_argument("-n", type=int, default=200, help="requests per measurement (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args(argv)
    why = triton_unavailable()
    if why:
        print(f"compare_serving: {why}", file=sys.stderr)
        return 2
    root = args.images or (food10_root() / "valid" if food10_root() else None)
    if root is None:
        print("compare_serving: no images (give --images DIR or place food10 at ../shared/data/food10)", file=sys.stderr)
        return 2
    files = sorted(root.rglob("*.jpg"))
    images = [files[i % len(files)].read_bytes() for i in range(args.n)]
    work = Path(tempfile.mkdtemp(prefix="compare-serving-"))
    bundle = args.bundle or make_color_bundle(work / "color" / "bundle")
    export_triton(bundle, work / "repo", TritonOptions(classify_with="python"))  # the defaults: one instance per step
    export_triton(bundle, work / "repo", TritonOptions(name="two", classify_with="python", instances=2))

    rows = []
    port = free_port()
    with TritonServer(work / "repo", ["classifier", "two"], work / "triton") as triton:
        serve = start_serve(bundle, port, work / "serve.log")
        try:
            for c in args.concurrency:  # interleaved: both servers see the same load at each level
                s = measure(lambda: serve_caller(port), images, c)
                for model, what in (("classifier", "1 instance per step (export default)"), ("two", "--instances 2")):
                    t = measure(lambda m=model: triton_caller(triton.url, m), images, c)
                    agree = sum(a == b for a, b in zip(t["labels"], s["labels"])) / len(images)
                    rows.append((c, f"Triton 2.51, {what}", t, agree))
                rows.append((c, "kimchi-edge serve (FastAPI/uvicorn, defaults)", s, 1.0))
        finally:
            serve.terminate()
            serve.wait(timeout=30)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"bundle: {bundle}; images: {len(images)} JPEG requests from {root} ({np.mean([len(i) for i in images]) / 1024:.0f} KiB mean); "
          f"cores: {os.cpu_count()}; load: {uptime}")
    print()
    print("Triton: ensemble of Python-backend preprocess -> ONNX Runtime in the Python backend -> postprocess, "
          "dynamic batching (1 ms queue delay); 'same labels': Triton's labels equal to kimchi-edge serve's.")
    print()
    print("| clients | server | p50 ms | p95 ms | mean ms | images/s | same labels |")
    print("|---|---|---|---|---|---|---|")
    for c, name, r, agree in rows:
        print(f"| {c} | {name} | {r['p50']:.1f} | {r['p95']:.1f} | {r['mean']:.1f} | {r['throughput']:.1f} | {agree * 100:.0f} % |")
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
