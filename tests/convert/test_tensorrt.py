"""TensorRT engines through Polygraphy (needs TensorRT and a CUDA GPU; skipped here with the reason)."""

from __future__ import annotations

import shutil

import pytest

from kimchi_edge.convert.tensorrt import source_onnx, tensorrt_unavailable_reason

REASON = tensorrt_unavailable_reason()
pytestmark = [pytest.mark.tensorrt, pytest.mark.slow,
              pytest.mark.skipif(REASON is not None, reason=f"needs TensorRT and a CUDA GPU: {REASON}")]


def test_fp16_and_int8_engines_are_built_and_recorded(bundle, tmp_path):
    from kimchi_edge.convert.tensorrt import add_engines, default_timing_cache
    from kimchi_edge.runtime.manifest import verify_artifact

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = add_engines(copy, ("fp16", "int8"), log=lambda m: None)
    for precision in ("fp16", "int8"):
        art = manifest.artifact(f"trt-{precision}")
        verify_artifact(copy, art)
        assert {"tensorrt", "gpu", "compute_capability"} <= set(art.built_with)
        assert art.details["onnx_sha256"] == source_onnx(manifest, precision).sha256
    assert default_timing_cache(copy).is_file()  # beside the bundle, not inside
    assert not (copy / default_timing_cache(copy).name).exists()
