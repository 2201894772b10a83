"""What each exported ``config.pbtxt`` must say, derived from the manifest here (not from the exporter's code).

:func:`config_problems` and :func:`ensemble_problems` return sentences (empty: fine), so a test can both assert a
good export passes and that a broken one (a dropped ``data_type``, swapped dims) is caught.
:func:`protobuf_problems` parses every config with Triton's own ``ModelConfig`` protobuf (in the Triton venv, where
tritonclient[grpc] ships ``model_config_pb2``): unknown fields and misspelt enums fail there.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from kimchi_edge.runtime.manifest import BundleManifest

from .pbtxt import one, parse

TRITON_TYPE = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32"}


def read_config(model_dir: Path) -> dict[str, list[Any]]:
    return parse((Path(model_dir) / "config.pbtxt").read_text(encoding="utf-8"))


def _tensor_problems(where: str, tensors: list[dict], expected: list[tuple[str, str, list[int], dict[str, Any]]]) -> list[str]:
    problems = []
    if len(tensors) != len(expected):
        problems.append(f"{where}: {len(tensors)} tensor(s), expected {len(expected)}")
    for t, (name, dtype, dims, extra) in zip(tensors, expected):
        got = {"name": one(t, "name"), "data_type": one(t, "data_type"), "dims": t.get("dims", [])}
        if got["name"] != name:
            problems.append(f"{where}: name {got['name']!r}, expected {name!r}")
        if got["data_type"] != dtype:
            problems.append(f"{where} {name}: data_type {got['data_type']!r}, expected {dtype}")
        if got["dims"] != list(dims):
            problems.append(f"{where} {name}: dims {got['dims']}, expected {list(dims)}")
        for key, value in extra.items():
            if one(t, key) != value:
                problems.append(f"{where} {name}: {key} {one(t, key)!r}, expected {value!r}")
    return problems


def config_problems(config: dict[str, list[Any]], manifest: BundleManifest, role: str) -> list[str]:
    """How ``config`` differs from what a model of ``role`` must declare for this manifest."""
    pre = manifest.preprocessing
    n = len(manifest.labels)
    image = (manifest.input_name, TRITON_TYPE[pre.dtype], list(pre.input_shape), {})
    image_fmt = (manifest.input_name, TRITON_TYPE[pre.dtype], list(pre.input_shape), {"format": f"FORMAT_{pre.layout}"})
    logits_labelled = (manifest.output_name, "TYPE_FP32", [n], {"label_filename": "labels.txt"})
    encoded = ("IMAGE", "TYPE_STRING", [1], {})
    outputs = [("PROBABILITIES", "TYPE_FP32", [n], {"label_filename": "labels.txt"}), ("LABEL", "TYPE_STRING", [1], {})]
    expected = {
        "onnxruntime": ({"platform": "onnxruntime_onnx", "backend": "onnxruntime"}, [image_fmt], [logits_labelled]),
        "tensorrt": ({"platform": "tensorrt_plan", "backend": "tensorrt"}, [image_fmt], [logits_labelled]),
        "python-classifier": ({"backend": "python"}, [image_fmt], [logits_labelled]),
        "preprocess": ({"backend": "python"}, [encoded], [image]),
        "postprocess": ({"backend": "python"}, [(manifest.output_name, "TYPE_FP32", [n], {})], outputs),
        "ensemble": ({"platform": "ensemble"}, [encoded], outputs),
    }[role]
    fields, inputs, outs = expected
    problems = [f"{k} is {one(config, k)!r}, expected {v!r}" for k, v in fields.items() if one(config, k) != v]
    problems += _tensor_problems("input", config.get("input", []), inputs)
    problems += _tensor_problems("output", config.get("output", []), outs)
    batch = one(config, "max_batch_size", 0)
    if not isinstance(batch, int) or batch < 1:
        problems.append(f"max_batch_size is {batch!r}; expected >= 1 (the first dimension is the batch)")
    if role != "ensemble":
        if batch > 1 and not config.get("dynamic_batching"):
            problems.append("no dynamic_batching although max_batch_size > 1")
        groups = config.get("instance_group", [])
        kinds = [one(g, "kind") for g in groups]
        if not groups or any(k not in ("KIND_CPU", "KIND_GPU", "KIND_AUTO") for k in kinds):
            problems.append(f"instance_group kinds {kinds}; expected KIND_CPU/KIND_GPU/KIND_AUTO")
        if role == "tensorrt" and kinds != ["KIND_GPU"]:
            problems.append(f"a TensorRT plan runs on the GPU; instance_group kinds {kinds}")
        if role.startswith("p") and kinds != ["KIND_CPU"]:
            problems.append(f"the Python steps run on the CPU; instance_group kinds {kinds}")
    return problems


def ensemble_problems(repo: Path, name: str) -> list[str]:
    """Whether the ensemble's steps chain: each step's inputs exist by then, names match the step models' configs."""
    config = read_config(repo / name)
    available = {one(t, "name") for t in config.get("input", [])}
    problems = []
    for step in one(config, "ensemble_scheduling", {}).get("step", []):
        model = one(step, "model_name")
        if not (repo / model / "config.pbtxt").is_file():
            problems.append(f"step {model}: no such model in {repo}")
            continue
        sub = read_config(repo / model)
        sub_in = {one(t, "name") for t in sub.get("input", [])}
        sub_out = {one(t, "name") for t in sub.get("output", [])}
        for m in step.get("input_map", []):
            if one(m, "key") not in sub_in:
                problems.append(f"step {model}: input_map key {one(m, 'key')!r} is not an input of {model} ({sorted(sub_in)})")
            if one(m, "value") not in available:
                problems.append(f"step {model}: reads {one(m, 'value')!r} before any step produces it")
        for m in step.get("output_map", []):
            if one(m, "key") not in sub_out:
                problems.append(f"step {model}: output_map key {one(m, 'key')!r} is not an output of {model} ({sorted(sub_out)})")
            available.add(one(m, "value"))
        if one(sub, "max_batch_size", 0) < one(config, "max_batch_size", 0):
            problems.append(f"step {model}: max_batch_size {one(sub, 'max_batch_size')} < the ensemble's {one(config, 'max_batch_size')}")
    missing = {one(t, "name") for t in config.get("output", [])} - available
    if missing:
        problems.append(f"ensemble outputs {sorted(missing)} are produced by no step")
    return problems


_PROTOBUF_CHECK = """
import json, sys
from pathlib import Path
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
problems = {}
for path in sys.argv[1:]:
    try:
        cfg = text_format.Parse(Path(path).read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
        if not cfg.name:
            problems[path] = "no name"
    except text_format.ParseError as exc:
        problems[path] = str(exc)
print(json.dumps(problems))
"""


def protobuf_problems(python: Path, configs: list[Path]) -> dict[str, str]:
    """Parse ``configs`` with Triton's ``ModelConfig`` message using the Triton venv's ``python``: path -> error."""
    out = subprocess.run([str(python), "-c", _PROTOBUF_CHECK, *map(str, configs)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"the protobuf check did not run: {out.stderr[-2000:]}")
    return json.loads(out.stdout)
