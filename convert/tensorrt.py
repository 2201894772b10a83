"""TensorRT engines from the bundle's ONNX, through Polygraphy — torch/fastai free.

Used by ``kimchi-edge convert --fp16/--int8`` and by ``kimchi-edge build-engine`` on the target
(a Jetson with only the runtime, TensorRT and Polygraphy installed).  ``tensorrt`` and ``polygraphy``
are imported inside the functions; :func:`tensorrt_unavailable_reason` says in one line why engines
cannot be built here.

Engines are not portable across TensorRT versions or GPUs, so every engine's manifest entry records
the TensorRT and CUDA versions, the GPU and its compute capability and the SHA-256 of the ONNX file it
was built from (checked by the runtime *before* deserialising).  The timing cache lives beside the
bundle (not inside it), so rebuilding after an upgrade is fast and the bundle stays clean.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from kimchi_edge.runtime.errors import BundleError, MissingDependencyError
from kimchi_edge.runtime.fsutil import atomic_write_bytes, sha256_file
from kimchi_edge.runtime.manifest import TARGET_TENSORRT, Artifact, BundleManifest, read_manifest, write_manifest
from kimchi_edge.runtime.sysinfo import cuda_device_facts

PRECISIONS = ("fp16", "int8")
#: engine precision -> the ONNX artifact it is built from (INT8: see :func:`source_onnx`)
SOURCE_ONNX = {"fp16": "onnx-fp32", "int8": "onnx-int8-qdq-s8"}


def source_onnx(manifest: BundleManifest, precision: str) -> Artifact:
    """The ONNX artifact an engine of ``precision`` is built from.

    FP16: ``onnx-fp32``.  INT8: the INT8 ONNX quantized for TensorRT (``target == "tensorrt"``, symmetric int8 QDQ:
    explicit quantization needs zero points of 0); in a bundle written before targets existed, its only INT8 file
    ``onnx-int8``, which was that recipe.  ONNX Runtime's CPU INT8 (uint8 activations) is never used.

    Raises:
        BundleError: the bundle has no suitable ONNX artifact.
    """
    if precision != "int8":
        return manifest.artifact(SOURCE_ONNX[precision])
    onnx_int8 = [a for a in manifest.artifacts if a.format == "onnx" and a.precision == "int8"]
    for a in onnx_int8:
        if a.target == TARGET_TENSORRT:
            return a
    legacy = [a for a in onnx_int8 if a.target == ""]
    if legacy:
        return legacy[0]
    raise BundleError("the bundle has no INT8 ONNX model quantized for TensorRT (symmetric int8 QDQ; it has "
                      f"{[(a.name, a.target) for a in onnx_int8] or 'no INT8 ONNX'}); re-convert it with a current kimchi-edge")


class TensorRTUnavailableError(MissingDependencyError):
    """TensorRT (or a GPU, or Polygraphy) is not available here; the message says which."""


def engine_name(precision: str) -> str:
    return f"trt-{precision}"


def engine_file(precision: str) -> str:
    return f"model.{precision}.engine"


def default_timing_cache(bundle_dir: str | Path) -> Path:
    """``<bundle>/../<bundle name>.trt-timing.cache``: beside the bundle, never inside it."""
    b = Path(bundle_dir).resolve()
    return b.parent / f"{b.name}.trt-timing.cache"


def tensorrt_unavailable_reason() -> str | None:
    """``None`` when engines can be built here, else one line saying why not."""
    from kimchi_edge.runtime.sysinfo import cuda_hidden

    if cuda_hidden():
        return "no GPU visible (CUDA_VISIBLE_DEVICES hides them)"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (JetPack ships it; on x86: pip install 'kimchi-edge[tensorrt]')"
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return "polygraphy is not installed (pip install polygraphy)"
    if not cuda_device_facts()["gpu"]:
        return "no CUDA GPU found (libcuda could not be loaded or reports no device)"
    return None


def engine_from_onnx(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    fp16: bool = False,
    int8: bool = False,
    timing_cache: str | Path | None = None,
    input_name: str = "image",
    input_shape: tuple[int, ...] | None = None,
    batch: tuple[int, int, int] = (1, 1, 8),
    workspace_mib: int | None = None,
) -> dict[str, Any]:
    """Build a TensorRT engine from an ONNX file with Polygraphy and save it atomically.

    Args:
        onnx_path: the ONNX model (FP32 for ``fp16``; the QDQ INT8 model for ``int8``).
        engine_path: where to write the serialized engine.
        fp16: allow FP16 kernels.
        int8: allow INT8 kernels (explicit quantization from the QDQ nodes; no calibrator).
        timing_cache: a timing-cache file to read and update (speeds up rebuilds).
        input_name: the network input.
        input_shape: the per-image input shape (``(H, W, 3)``); read from the ONNX file when omitted.
        batch: ``(min, opt, max)`` batch sizes of the optimisation profile.
        workspace_mib: workspace memory-pool limit.

    Returns:
        Facts for the manifest: TensorRT/CUDA versions, GPU, compute capability, precision, profile,
        ONNX SHA-256, build seconds.

    Raises:
        TensorRTUnavailableError: TensorRT, Polygraphy or a GPU is missing (one line, with the fix).
    """
    reason = tensorrt_unavailable_reason()
    if reason:
        raise TensorRTUnavailableError(f"TensorRT engines cannot be built here: {reason}")
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path

    onnx_path = Path(onnx_path)
    if input_shape is None:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        inp = next(i for i in model.graph.input if i.name == input_name)
        input_shape = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim[1:])
    lo, opt, hi = batch
    profile = Profile().add(input_name, min=(lo, *input_shape), opt=(opt, *input_shape), max=(hi, *input_shape))
    kwargs: dict[str, Any] = {"fp16": fp16 or int8, "int8": int8, "profiles": [profile]}
    if timing_cache is not None and Path(timing_cache).is_file():
        kwargs["load_timing_cache"] = str(timing_cache)
    if workspace_mib:
        kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: workspace_mib << 20}
    t0 = time.perf_counter()
    network = network_from_onnx_path(str(onnx_path))
    data = engine_bytes_from_network(network, config=CreateConfig(**kwargs), save_timing_cache=str(timing_cache) if timing_cache else None)
    atomic_write_bytes(Path(engine_path), bytes(data))
    facts = {
        "tensorrt": trt.__version__,
        **cuda_device_facts(),
        "precision": "int8" if int8 else "fp16" if fp16 else "fp32",
        "profile": {"input": input_name, "min": [lo, *input_shape], "opt": [opt, *input_shape], "max": [hi, *input_shape]},
        "onnx_file": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "timing_cache": str(timing_cache) if timing_cache else "",
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    try:
        import polygraphy

        facts["polygraphy"] = polygraphy.__version__
    except ImportError:  # pragma: no cover - imported above
        pass
    return facts


def engine_artifact(bundle_dir: str | Path, precision: str, facts: Mapping[str, Any], input_kind: str = "uint8-nhwc") -> Artifact:
    """The manifest entry of an engine already written to ``bundle_dir``."""
    path = Path(bundle_dir) / engine_file(precision)
    built_with = {k: str(facts[k]) for k in ("tensorrt", "cuda_driver", "gpu", "compute_capability", "polygraphy") if k in facts}
    details = {k: v for k, v in facts.items() if k not in built_with}
    return Artifact(
        name=engine_name(precision), file=path.name, format="tensorrt", precision=precision,
        sha256=sha256_file(path), size_bytes=path.stat().st_size, input=input_kind, built_with=built_with, details=details,
    )


def build_engines(
    bundle_dir: str | Path,
    manifest: BundleManifest,
    precisions: tuple[str, ...],
    *,
    timing_cache: str | Path | None = None,
    batch: tuple[int, int, int] = (1, 1, 8),
    log: Any = print,
) -> list[Artifact]:
    """Build one engine per precision into ``bundle_dir`` (the manifest is not written; see :func:`add_engines`).

    Raises:
        TensorRTUnavailableError: TensorRT/GPU missing.
        BundleError: the source ONNX artifact is missing from the manifest.
    """
    from kimchi_edge.runtime.manifest import verify_artifact

    out = []
    cache = Path(timing_cache) if timing_cache else default_timing_cache(bundle_dir)
    pre = manifest.preprocessing
    shape = pre.input_shape
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown engine precision {precision!r}; choose from {PRECISIONS}")
        src = source_onnx(manifest, precision)
        verify_artifact(bundle_dir, src)
        log(f"TensorRT: building {engine_name(precision)} from {src.file} (timing cache {cache})")
        facts = engine_from_onnx(
            Path(bundle_dir) / src.file, Path(bundle_dir) / engine_file(precision), fp16=True, int8=precision == "int8",
            timing_cache=cache, input_name=manifest.input_name, input_shape=shape, batch=batch,
        )
        out.append(engine_artifact(bundle_dir, precision, facts, input_kind=src.input))
    return out


def add_engines(
    bundle_dir: str | Path,
    precisions: tuple[str, ...],
    *,
    timing_cache: str | Path | None = None,
    batch: tuple[int, int, int] = (1, 1, 8),
    log: Any = print,
) -> BundleManifest:
    """Build engines into an existing bundle and update its manifest atomically (``kimchi-edge build-engine``).

    A new engine replaces an older one of the same precision, and loses that one's gate verdict: an engine is
    recommended and run by default only after the gate scored it (``kimchi-edge build-engine`` does right away,
    on the bundle's verification set; ``kimchi-edge verify BUNDLE`` does too).

    Returns:
        The updated manifest.
    """
    manifest = read_manifest(bundle_dir)
    new = build_engines(bundle_dir, manifest, precisions, timing_cache=timing_cache, batch=batch, log=log)
    names = {a.name for a in new}
    arts = tuple(a for a in manifest.artifacts if a.name not in names) + tuple(new)
    rec = {b: n for b, n in manifest.recommended.items() if n not in names}  # never an engine the gate has not seen
    gate = manifest.gate
    if gate is not None:
        import dataclasses

        gate = dataclasses.replace(gate, artifacts={n: v for n, v in gate.artifacts.items() if n not in names})
    manifest = manifest.replace(artifacts=arts, recommended=rec, gate=gate)
    write_manifest(bundle_dir, manifest)
    return manifest
