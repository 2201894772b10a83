"""Fixtures of the Triton export tests.

``color_repo``: the shared colour bundle exported as a Triton model repository (the pipeline classifies with the
Python-backend ONNX Runtime step: nvidia-pytriton's tritonserver has no onnxruntime backend).  ``triton`` (marker
``triton``): a real tritonserver serving it on loopback, started once per session, skipped with the reason when the
Triton venv (``bash tests/triton/setup_triton_venv.sh``) or tritonclient is missing.  ``trt_bundle``: the colour
bundle plus two TensorRT engine entries (bytes that are not a real engine: nothing here deserialises them), one
passed by the gate on TensorRT, one failed.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from kimchi_edge.runtime.fsutil import atomic_write_bytes, sha256_file
from kimchi_edge.runtime.manifest import (
    Artifact,
    GateVerdict,
    read_manifest,
    write_manifest,
)

from .harness import TritonServer, triton_unavailable


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: starts a real tritonserver (nvidia-pytriton, from the Triton venv; skipped with the reason)")


#: the pipeline's tests batch for real: requests wait up to 20 ms for others
QUEUE_DELAY_US = 20_000


def export(bundle: Path, out: Path, **options):
    from kimchi_edge.convert.triton import TritonOptions, export_triton

    return export_triton(bundle, out, TritonOptions(**options))


@pytest.fixture(scope="session")
def color_repo(color_bundle, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("triton") / "repo"
    export(color_bundle, repo, classify_with="python", max_queue_delay_us=QUEUE_DELAY_US)
    return repo


@pytest.fixture(scope="session")
def triton(color_repo, tmp_path_factory):
    why = triton_unavailable()
    if why:
        pytest.skip(why)
    with TritonServer(color_repo, ["classifier"], tmp_path_factory.mktemp("tritonserver")) as server:
        yield server


def _engine(bundle: Path, precision: str, max_batch: int) -> Artifact:
    onnx = read_manifest(bundle).artifact("onnx-fp32")
    path = bundle / f"model.{precision}.engine"
    atomic_write_bytes(path, f"not a real {precision} engine".encode())
    return Artifact(name=f"trt-{precision}", file=path.name, format="tensorrt", precision=precision, sha256=sha256_file(path),
                    size_bytes=path.stat().st_size,
                    built_with={"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"},
                    details={"onnx_file": onnx.file, "onnx_sha256": onnx.sha256,
                             "profile": {"input": "image", "min": [1, 32, 32, 3], "opt": [1, 32, 32, 3], "max": [max_batch, 32, 32, 3]}})


@pytest.fixture
def trt_bundle(color_bundle, tmp_path) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(color_bundle, bundle)
    m = read_manifest(bundle)
    fp16, int8 = _engine(bundle, "fp16", 4), _engine(bundle, "int8", 8)
    verdicts = {**m.gate.artifacts, "trt-fp16": GateVerdict("pass", providers=("tensorrt",)),
                "trt-int8": GateVerdict("fail", reason="loses 12.0 points > 1", providers=("tensorrt",))}
    write_manifest(bundle, m.replace(artifacts=(*m.artifacts, fp16, int8), gate=dataclasses.replace(m.gate, artifacts=verdicts)))
    return bundle
