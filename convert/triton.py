"""Bundle -> Triton Inference Server model repository: the gated classifier, its preprocessing, one pipeline.

``kimchi-edge export triton BUNDLE OUT`` (``convert/triton_cli.py``) calls :func:`export_triton`, which is two steps:

* :func:`plan_triton_repository` decides (pure policy, nothing written): which ONNX artifact and which TensorRT
  engine the accuracy gate lets out (:func:`kimchi_edge.runtime.backends.choose_onnx_artifact` and
  :func:`~kimchi_edge.runtime.backends.ungated_reason`, the runtime's own gate policy), on which device kind, and every
  model's ``config.pbtxt`` as a plain nested structure derived from the manifest;
* :func:`write_triton_repository` writes it: one folder per model, each built under a temporary name and renamed
  into place, the ensemble last.

The repository (``NAME`` is ``--name``, default ``classifier``)::

    OUT/NAME_preprocess/      Python backend: encoded image bytes -> model input; its model.py imports
                              kimchi_edge.runtime.preprocess (the runtime's code, not a copy) configured from
                              the bundle's manifest.json copied beside it
    OUT/NAME_onnx/            the gated ONNX, backend onnxruntime (platform onnxruntime_onnx)
    OUT/NAME_trt/             the gated TensorRT engine, platform tensorrt_plan (only when the bundle has one)
    OUT/NAME_onnx_python/     the gated ONNX run by ONNX Runtime inside the Python backend (--classify-with python:
                              for a tritonserver without the onnxruntime backend)
    OUT/NAME_postprocess/     Python backend: logits -> probabilities (softmax as the runtime does) + top-1 label
    OUT/NAME/                 the ensemble a client calls: IMAGE (BYTES) -> PROBABILITIES (FP32, label_filename
                              labels.txt) + LABEL (BYTES, UTF-8)

Every classifier and output folder carries ``labels.txt``: the labels' exact Unicode text, one a line, in vocab
order, referenced as ``label_filename`` (Triton's classification extension answers ``score:index:label``).
``OUT/NAME/export.json`` records what was exported from which bundle (SHA-256 of the manifest and of every file).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

# the runtime's gate policy, reused as is (_refuse: its one-line refusal naming gate.md and --allow-ungated)
from kimchi_edge.runtime.backends import _refuse, choose_onnx_artifact, ungated_reason
from kimchi_edge.runtime.errors import BundleError, UsageError
from kimchi_edge.runtime.manifest import (
    MANIFEST_NAME,
    Artifact,
    BundleManifest,
    artifact_path,
    read_manifest,
    verify_artifact,
)

#: what the client sends and receives (the ensemble's tensors)
IMAGE_INPUT = "IMAGE"
PROBABILITIES_OUTPUT = "PROBABILITIES"
LABEL_OUTPUT = "LABEL"
LABELS_FILE = "labels.txt"
EXPORT_RECORD = "export.json"

CLASSIFY_WITH = ("onnxruntime", "tensorrt", "python")
DEVICES = ("auto", "gpu", "cpu")
TRITON_DTYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32"}
_ORT_DTYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32"}
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")


class Enum(str):
    """A protobuf enum value in a config (written bare: ``TYPE_UINT8``, not ``"TYPE_UINT8"``)."""


@dataclass(frozen=True)
class TritonOptions:
    """How to lay the bundle out for Triton.

    Attributes:
        name: the ensemble's model name; the step models are ``NAME_preprocess``, ``NAME_onnx`` ...
        max_batch_size: Triton's ``max_batch_size`` (capped by a TensorRT engine's profile maximum).
        max_queue_delay_us: ``dynamic_batching.max_queue_delay_microseconds`` of every batching model.
        instances: ``instance_group.count`` of every model.
        device: ``auto`` (GPU when the gate passed the ONNX on CUDA, else CPU), ``gpu`` or ``cpu``: where the
            ``onnxruntime`` model runs.  A TensorRT engine always runs on the GPU, Python steps on the CPU.
        classify_with: the model the ensemble classifies with: ``onnxruntime``, ``tensorrt`` or ``python``.
        artifact: the ONNX artifact to export (default: the runtime's own choice among the gated ones).
        engine: the TensorRT artifact to export (default: the best gated engine, if any).
        allow_ungated: export artifacts the accuracy gate has not passed (the records say so).
        python_env: ``EXECUTION_ENV_PATH`` for the Python steps (a conda-pack archive or an unpacked environment
            with kimchi-edge installed); empty: the Python the server's Python backend runs with.
        ort_threads: ONNX Runtime threads of the Python-backend classifier (0: all cores).
    """

    name: str = "classifier"
    max_batch_size: int = 8
    max_queue_delay_us: int = 1000
    instances: int = 1
    device: str = "auto"
    classify_with: str = "onnxruntime"
    artifact: Optional[str] = None
    engine: Optional[str] = None
    allow_ungated: bool = False
    python_env: str = ""
    ort_threads: int = 0

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name or ""):
            raise UsageError(f"model name {self.name!r} is not usable by Triton; expected a letter then letters, digits, '_' or '-'")
        if self.max_batch_size < 1 or self.instances < 1 or self.max_queue_delay_us < 0 or self.ort_threads < 0:
            raise UsageError(f"max_batch_size and instances must be >= 1, max_queue_delay_us and ort_threads >= 0; got {self}")
        if self.device not in DEVICES:
            raise UsageError(f"device {self.device!r}; expected one of {', '.join(DEVICES)}")
        if self.classify_with not in CLASSIFY_WITH:
            raise UsageError(f"classify_with {self.classify_with!r}; expected one of {', '.join(CLASSIFY_WITH)}")


@dataclass(frozen=True)
class ModelPlan:
    """One model folder of the repository: its config and the files to put in it.

    ``files`` maps a path inside the model folder to a source file (copied byte for byte) or to text.
    ``expect_sha256`` maps copied paths to the SHA-256 the copy must have (checked after copying).
    """

    name: str
    role: str  # "preprocess" | "onnxruntime" | "tensorrt" | "python-classifier" | "postprocess" | "ensemble"
    config: Mapping[str, Any]
    files: Mapping[str, Any] = field(default_factory=dict)
    expect_sha256: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TritonPlan:
    """Everything :func:`write_triton_repository` writes, decided by :func:`plan_triton_repository`."""

    bundle: Path
    options: TritonOptions
    onnx: Artifact
    engine: Optional[Artifact]
    models: tuple[ModelPlan, ...]
    pipeline: str  # the ensemble's name
    classifier: str  # the model the ensemble classifies with
    ungated: tuple[str, ...] = ()  # what was exported although the gate has not passed it, in words
    notes: tuple[str, ...] = ()

    def model(self, role: str) -> Optional[ModelPlan]:
        return next((m for m in self.models if m.role == role), None)


# --------------------------------------------------------------------------- policy


def plan_triton_repository(bundle_dir: str | Path, options: TritonOptions | None = None) -> TritonPlan:
    """Decide the repository for a bundle: gated artifacts, device kinds and every model's config.

    Args:
        bundle_dir: the bundle folder (``manifest.json`` with the gate's verdicts).
        options: layout and batching; defaults: :class:`TritonOptions`.

    Returns:
        The plan; nothing is written.

    Raises:
        BundleError: the ONNX artifact (or the engine asked for) has not passed the accuracy gate (one line naming
            gate.md), the ONNX file does not match the manifest, or a label cannot go in a labels file.
        UsageError: an option names an artifact that does not exist or cannot be used.
    """
    opts = options or TritonOptions()
    bundle = Path(bundle_dir)
    manifest = read_manifest(bundle)
    _check_labels(manifest.labels)
    notes: list[str] = []
    ungated: list[str] = []

    # The server's CPU is not this one: unless named, the INT8 for VNNI CPUs is passed over for the portable one.
    vnni = None if opts.artifact else False
    onnx = choose_onnx_artifact(manifest, artifact=opts.artifact, allow_ungated=opts.allow_ungated, bundle=bundle, vnni=vnni)
    why = ungated_reason(manifest, onnx, vnni=vnni)
    if why:
        ungated.append(why)
    verify_artifact(bundle, onnx)  # the bytes the gate judged, before anything reads them
    onnx_batch = _check_onnx_interface(bundle, manifest, onnx, notes)

    kind, device_note = _onnx_instance_kind(manifest, onnx, opts, bundle)
    if device_note:
        notes.append(device_note)

    engine, engine_notes = _choose_engine(manifest, opts, bundle)
    notes += engine_notes
    if engine is not None:
        verify_artifact(bundle, engine)
        if why := ungated_reason(manifest, engine, provider="tensorrt"):
            ungated.append(why)
    if opts.classify_with == "tensorrt" and engine is None:
        raise UsageError("--classify-with tensorrt needs a gated TensorRT engine in the bundle: "
                         + ("; ".join(engine_notes) or "it has none (build one on the target: kimchi-edge build-engine BUNDLE --fp16)"))

    batch = min(opts.max_batch_size, onnx_batch) if onnx_batch else opts.max_batch_size
    names = _model_names(opts.name)
    models = [_preprocess_model(names["preprocess"], bundle, manifest, opts, batch)]
    models.append(_onnxruntime_model(names["onnxruntime"], bundle, manifest, onnx, opts, batch, kind))
    trt_batch = None
    if engine is not None:
        trt_batch = min(batch, _engine_max_batch(engine) or batch)
        models.append(_tensorrt_model(names["tensorrt"], bundle, manifest, engine, opts, trt_batch))
    if opts.classify_with == "python":
        models.append(_python_classifier_model(names["python-classifier"], bundle, manifest, onnx, opts, batch))
    models.append(_postprocess_model(names["postprocess"], bundle, manifest, opts, batch))
    role = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "python": "python-classifier"}[opts.classify_with]
    pipeline_batch = trt_batch if role == "tensorrt" else batch
    models.append(_ensemble_model(opts.name, manifest, names, role, pipeline_batch))
    plan = TritonPlan(bundle=bundle, options=opts, onnx=onnx, engine=engine, models=tuple(models), pipeline=opts.name,
                      classifier=names[role], ungated=tuple(ungated), notes=tuple(notes))
    ensemble = plan.models[-1]  # the entry point also carries the record of what was exported
    ensemble = replace(ensemble, files={**ensemble.files, EXPORT_RECORD: _json_text(export_record(plan, manifest))})
    return replace(plan, models=plan.models[:-1] + (ensemble,))


def _model_names(name: str) -> dict[str, str]:
    return {"preprocess": f"{name}_preprocess", "onnxruntime": f"{name}_onnx", "tensorrt": f"{name}_trt",
            "python-classifier": f"{name}_onnx_python", "postprocess": f"{name}_postprocess"}


def _check_labels(labels: Sequence[str]) -> None:
    bad = [lab for lab in labels if not lab.strip() or any(c in lab for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")]
    if bad:
        raise BundleError(f"label(s) {bad!r} cannot be written one a line to {LABELS_FILE} (empty or with a line break); "
                          "rename the class folders and retrain")


def _check_onnx_interface(bundle: Path, manifest: BundleManifest, art: Artifact, notes: list[str]) -> int:
    """The ONNX's input/output names, dtype and shape against the manifest; returns a fixed batch size (0: dynamic).

    Uses ONNX Runtime to read the graph when it is installed (the base install has it); otherwise trusts the manifest.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        notes.append(f"ONNX Runtime is not installed here: {art.file}'s input and output were taken from the manifest unchecked")
        return 0
    path = artifact_path(bundle, art)
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise BundleError(f"ONNX Runtime cannot read {art.file}: {str(exc).splitlines()[0]}") from exc
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    pre = manifest.preprocessing
    inp = next((i for i in inputs if i.name == manifest.input_name), None)
    out = next((o for o in outputs if o.name == manifest.output_name), None)
    if inp is None or out is None or len(inputs) != 1:
        raise BundleError(f"{art.file} has inputs {[i.name for i in inputs]} and outputs {[o.name for o in outputs]}; "
                          f"the manifest says one input {manifest.input_name!r} and an output {manifest.output_name!r}")
    dtype = _ORT_DTYPES.get(inp.type)
    if dtype != pre.dtype:
        raise BundleError(f"{art.file} takes {inp.type} but the manifest's preprocessing makes {pre.dtype}")
    if out.type != "tensor(float)":
        raise BundleError(f"{art.file} answers {out.type} for {out.name!r}; expected float32 (tensor(float))")
    dims = list(inp.shape)
    if len(dims) != 4 or [d for d in dims[1:]] != list(pre.input_shape):
        raise BundleError(f"{art.file} takes shape {dims}; the manifest says (N, {', '.join(map(str, pre.input_shape))})")
    out_dims = list(out.shape)
    if len(out_dims) != 2 or (isinstance(out_dims[1], int) and out_dims[1] != len(manifest.labels)):
        raise BundleError(f"{art.file} answers shape {out_dims}; expected (N, {len(manifest.labels)}) for {len(manifest.labels)} labels")
    if isinstance(dims[0], int) and dims[0] > 0:
        notes.append(f"{art.file} has a fixed batch of {dims[0]}: max_batch_size is capped at {dims[0]}")
        return dims[0]
    return 0


def _onnx_instance_kind(manifest: BundleManifest, art: Artifact, opts: TritonOptions, bundle: Path) -> tuple[str, str]:
    """``KIND_*`` of the onnxruntime model, and a note when ``auto`` kept it on the CPU because of the gate.

    Triton's onnxruntime backend runs ``KIND_GPU``/``KIND_AUTO`` instances with the CUDA execution provider: that is
    gated only where the gate passed the artifact on ``CUDAExecutionProvider``.
    """
    if opts.device == "cpu":
        return "KIND_CPU", ""
    cuda_why = ungated_reason(manifest, art, provider="CUDAExecutionProvider")
    if opts.device == "gpu":
        if cuda_why and not opts.allow_ungated:
            raise _refuse(cuda_why + "; --device gpu runs it with CUDAExecutionProvider", bundle)
        return "KIND_GPU", ""
    if cuda_why and not opts.allow_ungated:
        return "KIND_CPU", (f"the onnxruntime model runs on the CPU (KIND_CPU): {cuda_why}; score it on the GPU machine with "
                            f"kimchi-edge verify {bundle}, then re-export for KIND_AUTO")
    return "KIND_AUTO", ""


def _choose_engine(manifest: BundleManifest, opts: TritonOptions, bundle: Path) -> tuple[Optional[Artifact], list[str]]:
    """The TensorRT engine to export: the one asked for, else the recommended/best gated one (int8 > fp16 > fp32)."""
    from kimchi_edge.runtime.backends.tensorrt_backend import PRECISION_ORDER

    engines = [a for a in manifest.artifacts if a.format == "tensorrt"]
    if opts.engine:
        eng = manifest.artifact(opts.engine)
        if eng.format != "tensorrt":
            raise UsageError(f"artifact {opts.engine!r} is {eng.format}, not a TensorRT engine; engines: {[a.name for a in engines]}")
        why = ungated_reason(manifest, eng, provider="tensorrt")
        if why and not opts.allow_ungated:
            raise _refuse(why, bundle)
        return eng, []
    notes, gated = [], []
    for eng in engines:
        why = ungated_reason(manifest, eng, provider="tensorrt")
        if why and not opts.allow_ungated:
            notes.append(f"{eng.name} not exported: {why} (see {bundle / 'gate.md'}; --allow-ungated exports it anyway)")
        else:
            gated.append(eng)
    rec = manifest.recommended.get("tensorrt")
    gated.sort(key=lambda a: (a.name != rec, PRECISION_ORDER.index(a.precision) if a.precision in PRECISION_ORDER else 9))
    return (gated[0] if gated else None), notes


def _engine_max_batch(engine: Artifact) -> int:
    profile = (engine.details or {}).get("profile") or {}
    hi = profile.get("max") if isinstance(profile, Mapping) else None
    return int(hi[0]) if isinstance(hi, (list, tuple)) and hi and isinstance(hi[0], int) and hi[0] > 0 else 0


# --------------------------------------------------------------------------- configs (plain nested structures)


def _tensor(name: str, dtype: str, dims: Sequence[int], **extra: Any) -> dict[str, Any]:
    return {"name": name, "data_type": Enum(dtype), "dims": [int(d) for d in dims], **extra}


def _batching(batch: int, opts: TritonOptions) -> dict[str, Any]:
    return {"dynamic_batching": {"max_queue_delay_microseconds": opts.max_queue_delay_us}} if batch > 1 else {}


def _instances(kind: str, opts: TritonOptions) -> dict[str, Any]:
    return {"instance_group": [{"count": opts.instances, "kind": Enum(kind)}]}


def _parameters(values: Mapping[str, str]) -> dict[str, Any]:
    return {"parameters": [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]} if values else {}


def _python_env(opts: TritonOptions) -> dict[str, str]:
    return {"EXECUTION_ENV_PATH": opts.python_env} if opts.python_env else {}


def _model_input(manifest: BundleManifest, **extra: Any) -> dict[str, Any]:
    pre = manifest.preprocessing
    return _tensor(manifest.input_name, TRITON_DTYPES[pre.dtype], pre.input_shape, format=Enum(f"FORMAT_{pre.layout}"), **extra)


def _logits(manifest: BundleManifest, **extra: Any) -> dict[str, Any]:
    return _tensor(manifest.output_name, "TYPE_FP32", [len(manifest.labels)], **extra)


def _labels_text(manifest: BundleManifest) -> str:
    return "".join(f"{lab}\n" for lab in manifest.labels)


def _preprocess_model(name: str, bundle: Path, manifest: BundleManifest, opts: TritonOptions, batch: int) -> ModelPlan:
    config = {
        "name": name, "backend": "python", "max_batch_size": batch,
        "input": [_tensor(IMAGE_INPUT, "TYPE_STRING", [1])],
        "output": [_tensor(manifest.input_name, TRITON_DTYPES[manifest.preprocessing.dtype], manifest.preprocessing.input_shape)],
        **_batching(batch, opts), **_instances("KIND_CPU", opts), **_parameters(_python_env(opts)),
    }
    return ModelPlan(name, "preprocess", config, {"1/model.py": PREPROCESS_MODEL_PY, MANIFEST_NAME: bundle / MANIFEST_NAME})


def _onnxruntime_model(name: str, bundle: Path, manifest: BundleManifest, art: Artifact, opts: TritonOptions,
                       batch: int, kind: str) -> ModelPlan:
    config = {
        "name": name, "platform": "onnxruntime_onnx", "backend": "onnxruntime", "max_batch_size": batch,
        "default_model_filename": "model.onnx",
        "input": [_model_input(manifest)], "output": [_logits(manifest, label_filename=LABELS_FILE)],
        **_batching(batch, opts), **_instances(kind, opts),
    }
    files = {"1/model.onnx": artifact_path(bundle, art), LABELS_FILE: _labels_text(manifest)}
    return ModelPlan(name, "onnxruntime", config, files, {"1/model.onnx": art.sha256})


def _tensorrt_model(name: str, bundle: Path, manifest: BundleManifest, engine: Artifact, opts: TritonOptions,
                    batch: int) -> ModelPlan:
    config = {
        "name": name, "platform": "tensorrt_plan", "backend": "tensorrt", "max_batch_size": batch,
        "default_model_filename": "model.plan",
        "input": [_model_input(manifest)], "output": [_logits(manifest, label_filename=LABELS_FILE)],
        **_batching(batch, opts), **_instances("KIND_GPU", opts),
    }
    files = {"1/model.plan": artifact_path(bundle, engine), LABELS_FILE: _labels_text(manifest)}
    return ModelPlan(name, "tensorrt", config, files, {"1/model.plan": engine.sha256})


def _python_classifier_model(name: str, bundle: Path, manifest: BundleManifest, art: Artifact, opts: TritonOptions,
                             batch: int) -> ModelPlan:
    params = {"kimchi_edge_artifact": art.name, "allow_ungated": "true" if opts.allow_ungated else "false",
              "threads": str(opts.ort_threads), **_python_env(opts)}
    config = {
        "name": name, "backend": "python", "max_batch_size": batch,
        "input": [_model_input(manifest)], "output": [_logits(manifest, label_filename=LABELS_FILE)],
        **_batching(batch, opts), **_instances("KIND_CPU", opts), **_parameters(params),
    }
    # A one-artifact copy of the bundle: the manifest (with the gate's verdicts) and the ONNX under its bundle name, so
    # the step loads it with the runtime's own create_backend (gate policy and SHA-256 check at load time).
    files = {"1/model.py": PYTHON_CLASSIFIER_MODEL_PY, MANIFEST_NAME: bundle / MANIFEST_NAME, art.file: artifact_path(bundle, art),
             LABELS_FILE: _labels_text(manifest)}
    return ModelPlan(name, "python-classifier", config, files, {art.file: art.sha256})


def _postprocess_model(name: str, bundle: Path, manifest: BundleManifest, opts: TritonOptions, batch: int) -> ModelPlan:
    n = len(manifest.labels)
    config = {
        "name": name, "backend": "python", "max_batch_size": batch,
        "input": [_logits(manifest)],
        "output": [_tensor(PROBABILITIES_OUTPUT, "TYPE_FP32", [n], label_filename=LABELS_FILE), _tensor(LABEL_OUTPUT, "TYPE_STRING", [1])],
        **_batching(batch, opts), **_instances("KIND_CPU", opts), **_parameters(_python_env(opts)),
    }
    files = {"1/model.py": POSTPROCESS_MODEL_PY, MANIFEST_NAME: bundle / MANIFEST_NAME, LABELS_FILE: _labels_text(manifest)}
    return ModelPlan(name, "postprocess", config, files)


def _ensemble_model(name: str, manifest: BundleManifest, names: Mapping[str, str], classifier_role: str, batch: int) -> ModelPlan:
    x, z = manifest.input_name, manifest.output_name

    def step(model: str, inputs: Sequence[str], outputs: Sequence[str]) -> dict[str, Any]:
        return {"model_name": model, "model_version": -1,
                "input_map": [{"key": t, "value": t} for t in inputs], "output_map": [{"key": t, "value": t} for t in outputs]}

    config = {
        "name": name, "platform": "ensemble", "max_batch_size": batch,
        "input": [_tensor(IMAGE_INPUT, "TYPE_STRING", [1])],
        "output": [_tensor(PROBABILITIES_OUTPUT, "TYPE_FP32", [len(manifest.labels)], label_filename=LABELS_FILE),
                   _tensor(LABEL_OUTPUT, "TYPE_STRING", [1])],
        "ensemble_scheduling": {"step": [
            step(names["preprocess"], [IMAGE_INPUT], [x]),
            step(names[classifier_role], [x], [z]),
            step(names["postprocess"], [z], [PROBABILITIES_OUTPUT, LABEL_OUTPUT]),
        ]},
    }
    return ModelPlan(name, "ensemble", config, {"1/.keep": "", LABELS_FILE: _labels_text(manifest)})


def export_record(plan: TritonPlan, manifest: BundleManifest) -> dict[str, Any]:
    """``export.json``: which bundle, which artifacts (with their gate verdicts), which options, which models."""
    from dataclasses import asdict

    from kimchi_edge.runtime.fsutil import sha256_file

    from kimchi_edge import __version__

    def verdict(art: Artifact) -> Any:
        v = manifest.gate.verdict(art.name) if manifest.gate else None
        return {"status": v.status, "reason": v.reason, "providers": list(v.providers)} if v else None

    arts = [a for a in (plan.onnx, plan.engine) if a is not None]
    return {
        "kimchi_edge": __version__,
        "bundle": str(plan.bundle.resolve()),
        "manifest_sha256": sha256_file(plan.bundle / MANIFEST_NAME),
        "artifacts": [{"name": a.name, "file": a.file, "format": a.format, "precision": a.precision, "sha256": a.sha256,
                       "gate": verdict(a)} for a in arts],
        "ungated": list(plan.ungated),
        "models": {m.name: m.role for m in plan.models},
        "pipeline": plan.pipeline,
        "classifier": plan.classifier,
        "options": asdict(plan.options),
        "notes": list(plan.notes),
    }


def _json_text(obj: Any) -> str:
    from kimchi_edge.runtime.fsutil import dump_json

    return dump_json(obj)


# --------------------------------------------------------------------------- protobuf text format


def to_pbtxt(config: Mapping[str, Any], indent: int = 0) -> str:
    """A config structure as Triton's ``config.pbtxt`` (protobuf text format).

    Dicts are messages, lists of dicts repeated messages (``input [ {...}, {...} ]``), lists of scalars repeated
    scalars (``dims: [ 32, 32, 3 ]``), :class:`Enum` values bare words, strings quoted.
    """
    pad = "  " * indent
    lines = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            lines += [f"{pad}{key} {{", to_pbtxt(value, indent + 1).rstrip("\n"), f"{pad}}}"]
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            blocks = [f"{pad}  {{\n{to_pbtxt(v, indent + 2).rstrip(chr(10))}\n{pad}  }}" for v in value]
            lines += [f"{pad}{key} [", ",\n".join(blocks), f"{pad}]"]
        elif isinstance(value, (list, tuple)):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(lines) + "\n"


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
        return f'"{escaped}"'
    raise TypeError(f"cannot write {type(value).__name__} {value!r} in a config.pbtxt")


# --------------------------------------------------------------------------- writing


def write_triton_repository(plan: TritonPlan, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the plan's model folders into the model repository ``out`` (created when missing).

    Other models already in ``out`` are left alone; a folder of the same name as one of ours is refused unless
    ``overwrite``.  Each folder is built under a temporary name and renamed into place; the ensemble comes last, so
    the pipeline a client calls never exists without its steps.

    Raises:
        UsageError: a model folder exists and ``overwrite`` is false, or ``out`` is a file.
        BundleError: a copied artifact's SHA-256 differs from the manifest (the file changed).
    """
    from kimchi_edge.runtime.fsutil import atomic_directory

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; expected a folder for the Triton model repository")
    taken = [m.name for m in plan.models if (out / m.name).exists()]
    if taken and not overwrite:
        raise UsageError(f"{out} already has model folder(s) {taken}; choose another --name or OUT, or replace them with --force")
    out.mkdir(parents=True, exist_ok=True)
    for model in plan.models:
        with atomic_directory(out / model.name, overwrite=overwrite) as tmp:
            _write_model(model, tmp)
    return out


def _write_model(model: ModelPlan, folder: Path) -> None:
    from kimchi_edge.runtime.fsutil import atomic_write_text, sha256_file

    atomic_write_text(folder / "config.pbtxt", to_pbtxt(model.config))
    for rel, source in model.files.items():
        dest = folder / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path):
            shutil.copyfile(source, dest)
        else:
            atomic_write_text(dest, str(source))
    for rel, sha in model.expect_sha256.items():
        got = sha256_file(folder / rel)
        if got != sha:
            raise BundleError(f"{model.files[rel]} has SHA-256 {got[:12]}... but the manifest says {sha[:12]}...; it was modified: "
                              "re-run kimchi-edge convert (or build-engine) to regenerate it")


def export_triton(bundle_dir: str | Path, out: str | Path, options: TritonOptions | None = None, *,
                  overwrite: bool = False) -> TritonPlan:
    """Bundle -> Triton model repository: :func:`plan_triton_repository`, then :func:`write_triton_repository`.

    Args:
        bundle_dir: the bundle folder.
        out: the model repository folder (created when missing; other models in it are kept).
        options: see :class:`TritonOptions`.
        overwrite: replace model folders of the same names.

    Returns:
        The plan that was written (``models``, ``notes``, ``ungated``).

    Raises:
        BundleError: an ungated artifact without ``allow_ungated`` (one line naming gate.md), a tampered file.
        UsageError: bad options, or model folders already there without ``overwrite``.
    """
    plan = plan_triton_repository(bundle_dir, options)
    write_triton_repository(plan, out, overwrite=overwrite)
    return plan


def describe(plan: TritonPlan, out: str | Path) -> list[str]:
    """What was written, for people: one line per model, the gate's status, notes, how to call it."""
    head = (f"Triton model repository {out}: call model {plan.pipeline!r} with {IMAGE_INPUT} (encoded image bytes) -> "
            f"{PROBABILITIES_OUTPUT}, {LABEL_OUTPUT}")
    lines = [head]
    for m in plan.models:
        what = {"preprocess": "decode + preprocess (Python backend, kimchi_edge.runtime.preprocess)",
                "onnxruntime": f"{plan.onnx.name} ({plan.onnx.file}), onnxruntime backend",
                "tensorrt": f"{plan.engine.name if plan.engine else ''} engine, tensorrt_plan",
                "python-classifier": f"{plan.onnx.name} with ONNX Runtime in the Python backend",
                "postprocess": "softmax + top-1 label (Python backend)",
                "ensemble": f"the pipeline, classifying with {plan.classifier}"}[m.role]
        lines.append(f"  {m.name}: {what}")
    lines += [f"UNGATED: {why}; exported only because --allow-ungated was given" for why in plan.ungated]
    lines += [f"note: {n}" for n in plan.notes]
    return lines


# --------------------------------------------------------------------------- the Python-backend steps (model.py)

_MODEL_PY_HEAD = '''"""Generated by `kimchi-edge export triton`: {what}

The code that does the work is kimchi-edge's runtime (imported, not copied here), configured from the bundle's
manifest.json in this model's folder.  The Python backend must be able to import kimchi_edge (pip install kimchi-edge,
or --no-deps plus numpy and Pillow{extra}).
"""
{stdlib}
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from kimchi_edge.runtime.errors import KimchiEdgeError
from kimchi_edge.runtime.manifest import read_manifest
{runtime}


def _model_dir(args):
    """This model's folder (Triton passes it as model_repository; the file's own location says the same)."""
    given = Path(args.get("model_repository", ""))
    return given if (given / "manifest.json").is_file() else Path(__file__).resolve().parents[1]


def _failed(exc):
    """The error response of a request the runtime refused (INVALID_ARG: the client's HTTP 400)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)  # error codes: Triton >= 23.04
    error = pb_utils.TritonError(str(exc)) if code is None else pb_utils.TritonError(str(exc), code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)

'''

PREPROCESS_MODEL_PY = _MODEL_PY_HEAD.format(what="encoded image bytes -> the classifier's input.", extra="", stdlib="",
                                            runtime="from kimchi_edge.runtime.preprocess import Preprocessor") + '''

class TritonPythonModel:
    """IMAGE (BYTES, one encoded image per row) -> the model input, exactly as kimchi-edge's Classifier makes it."""

    def initialize(self, args):
        manifest = read_manifest(_model_dir(args))
        # the decode the accuracy gate judged: reduced-scale JPEG decoding only where the gate passed it (as Classifier)
        self.preprocessor = Preprocessor(manifest.preprocessing, fast_decode=bool(manifest.gate and manifest.gate.fast_decode))
        self.output = manifest.input_name

    def execute(self, requests):
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
            try:
                batch = self.preprocessor.batch([bytes(row) for row in rows])
            except KimchiEdgeError as exc:  # undecodable or too large: the client gets the runtime's message
                responses.append(_failed(exc))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, batch)]))
        return responses
'''

POSTPROCESS_MODEL_PY = _MODEL_PY_HEAD.format(what="the classifier's logits -> probabilities and the top-1 label.", extra="",
                                             stdlib="", runtime="from kimchi_edge.runtime.classifier import softmax") + '''

class TritonPythonModel:
    """logits (FP32) -> PROBABILITIES (FP32, label order) + LABEL (BYTES, UTF-8 top-1 label)."""

    def initialize(self, args):
        manifest = read_manifest(_model_dir(args))
        self.input = manifest.output_name
        self.apply_softmax = manifest.output == "logits"  # as Classifier.infer_array
        self.labels = np.array([label.encode("utf-8") for label in manifest.labels], dtype=np.object_)

    def execute(self, requests):
        responses = []
        for request in requests:
            z = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy().astype(np.float32)
            probs = softmax(z) if self.apply_softmax else z
            labels = self.labels[np.argmax(probs, axis=1)].reshape(-1, 1)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("PROBABILITIES", np.ascontiguousarray(probs, dtype=np.float32)),
                pb_utils.Tensor("LABEL", labels),
            ]))
        return responses
'''

PYTHON_CLASSIFIER_MODEL_PY = _MODEL_PY_HEAD.format(
    what="the gated ONNX run by ONNX Runtime inside the Python backend.", extra=", onnxruntime", stdlib="import json",
    runtime="from kimchi_edge.runtime.backends import create_backend") + '''

class TritonPythonModel:
    """The classifier for a server without the onnxruntime backend: the runtime's own ONNX Runtime backend.

    create_backend applies the runtime's gate policy and checks the ONNX's SHA-256 against the manifest at load time.
    Dynamic batching hands several requests to one execute(): they run as one ONNX Runtime batch.
    """

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        here = _model_dir(args)
        manifest = read_manifest(here)
        self.backend, notes = create_backend("onnxruntime", here, manifest, artifact=params["kimchi_edge_artifact"],
                                             threads=int(params.get("threads") or 0) or None,
                                             allow_ungated=params.get("allow_ungated") == "true")
        for note in notes:
            pb_utils.Logger.log_warn(f"{args.get('model_name', 'classifier')}: {note}")
        self.input, self.output = manifest.input_name, manifest.output_name

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        try:
            logits = self.backend.infer(np.ascontiguousarray(np.concatenate(arrays)))
        except KimchiEdgeError as exc:
            return [_failed(exc) for _ in requests]
        responses, start = [], 0
        for a in arrays:
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, logits[start:start + len(a)])]))
            start += len(a)
        return responses

    def finalize(self):
        self.backend.close()
'''
