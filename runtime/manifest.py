"""The bundle contract: one set of frozen dataclasses every stage reads and writes.

``train/`` writes a :class:`ModelMeta` (``model_meta.json``) and a :class:`Split` (``split.json``) into its
run folder; ``convert/`` wraps the meta into a :class:`BundleManifest` (``manifest.json``) with one
:class:`Artifact` entry per file, the learner's own predictions as a :class:`ReferenceFile`
(``reference.json``) and the gate's verdicts as a :class:`GateSummary` (``manifest.gate``) with one
:class:`GateVerdict` per artifact; the runtime, the server, the demo and the gate read only these.
Everything is JSON, UTF-8, with labels in the learner's vocab order and their exact Unicode text.
Readers ignore fields they do not know (newer writers may add some) and refuse missing required ones.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .errors import BundleError

MANIFEST_NAME = "manifest.json"
MODEL_META_NAME = "model_meta.json"
SPLIT_NAME = "split.json"
REFERENCE_NAME = "reference.json"
GATE_JSON = "gate.json"
GATE_MD = "gate.md"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes model input: fastai's *validation* transform, written down.

    The geometry is two steps, exactly as fastai runs them:

    1. ``item``: fastai ``Resize`` on the PIL image (``method`` ``"crop"``: centre crop to the target
       aspect then resize; ``"squish"``: resize ignoring aspect), Pillow bilinear, to
       ``resize_height`` x ``resize_width``.
    2. ``batch`` (optional, present when ``aug_transforms``/``RandomResizedCropGPU`` ran on the
       batch): centre crop of ``batch_crop`` of the side (a square when ``batch_square``), then a
       ``grid_sample``-style bilinear resample (``align_corners=True``) to ``height`` x ``width``,
       preceded by fastai's area pre-filter when it downsamples by more than 2x.

    Normalisation ``(x / 255 - mean) / std`` is recorded here and folded into the ONNX graph, so a
    runtime feeds RGB pixel values 0-255 in ``layout`` at ``input_height`` x ``input_width``, as ``dtype``.
    ``height`` x ``width`` is always the size the network itself sees.

    * Without a batch step, or with ``resample_in_graph`` (new bundles), the model input is the
      ``uint8`` item-size image (Pillow's output, exact); with ``resample_in_graph`` step 2 is a fixed
      float32 linear map inside the ONNX graph (``preprocess/*`` nodes, in front of the normalisation).
    * Bundles written before ``resample_in_graph`` existed (it defaults to ``False``) resample on the
      host and feed ``float32`` at ``height`` x ``width``: rounding the fractional pixels of the
      resample to uint8 flipped 1 of 90 validation predictions of a food10 model, enough to fail the
      FP32 gate, so they are passed on unrounded, as fastai does.
    """

    height: int
    width: int
    resize_height: int
    resize_width: int
    resize_method: str = "crop"  # "crop" | "squish"
    resample: str = "bilinear"
    batch_resize: bool = False
    batch_square: bool = True
    batch_crop: float = 1.0
    resample_in_graph: bool = False  # the batch resample runs inside the model (input at the item size)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: str = "NHWC"
    dtype: str = "uint8"
    channels: str = "RGB"

    def __post_init__(self) -> None:
        if self.resize_method not in ("crop", "squish"):
            raise BundleError(f"preprocessing.resize_method is {self.resize_method!r}; expected 'crop' or 'squish'")
        if min(self.height, self.width, self.resize_height, self.resize_width) < 1:
            raise BundleError(f"preprocessing sizes must be positive, got {self}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise BundleError(f"preprocessing mean/std must be 3 values with std > 0, got {self.mean}/{self.std}")
        if self.dtype not in ("uint8", "float32"):
            raise BundleError(f"preprocessing.dtype is {self.dtype!r}; expected 'uint8' or 'float32'")
        if self.layout not in ("NHWC", "NCHW"):
            raise BundleError(f"preprocessing.layout is {self.layout!r}; expected 'NHWC' or 'NCHW'")
        if self.resample_in_graph and not self.batch_resize:
            raise BundleError("preprocessing.resample_in_graph is set but there is no batch resample (batch_resize is false)")
        if self.resample_in_graph and self.dtype != "uint8":
            raise BundleError(f"preprocessing.resample_in_graph feeds the item-size uint8 image; got dtype {self.dtype!r}")

    @property
    def input_height(self) -> int:
        """Height of the model input: the item size when the batch resample is in the graph."""
        return self.resize_height if self.resample_in_graph else self.height

    @property
    def input_width(self) -> int:
        """Width of the model input: the item size when the batch resample is in the graph."""
        return self.resize_width if self.resample_in_graph else self.width

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image's model input shape in ``layout`` (no batch axis)."""
        h, w = self.input_height, self.input_width
        return (h, w, 3) if self.layout == "NHWC" else (3, h, w)

    def batch_shape(self, n: int) -> tuple[int, int, int, int]:
        """The model input shape of ``n`` images."""
        return (n, *self.input_shape)

    def example_batch(self, n: int = 1):
        """Zeros of the model's exact input shape and dtype: the smoke input of engines and exporters."""
        import numpy as np

        return np.zeros(self.batch_shape(n), dtype=np.dtype(self.dtype))


@dataclass(frozen=True)
class ModelMeta:
    """What training knows about the model and every later stage must agree on."""

    labels: tuple[str, ...]
    architecture: str
    preprocessing: Preprocessing
    pretrained: str = ""  # where the starting weights came from ("" = random init)
    framework: Mapping[str, str] = field(default_factory=dict)  # versions (fastai, torch, ...)

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise BundleError(f"a classifier needs at least 2 labels, got {list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise BundleError(f"labels must be unique, got {list(self.labels)}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)


#: ``Artifact.target`` values ("" = not target-specific)
TARGET_ORT_CPU = "onnxruntime-cpu"
#: ONNX Runtime on x86-64 CPUs with VNNI-class integer dot products (``sysinfo.cpu_has_vnni``): full 8-bit weights
TARGET_ORT_CPU_VNNI = "onnxruntime-cpu-vnni"
TARGET_TENSORRT = "tensorrt"
ARTIFACT_TARGETS = ("", TARGET_ORT_CPU, TARGET_ORT_CPU_VNNI, TARGET_TENSORRT)


@dataclass(frozen=True)
class Artifact:
    """One file of the bundle and the facts needed to trust it.

    ``input`` describes what the file expects: ``"uint8-nhwc"`` (normalisation inside the graph) or
    ``"float-nchw-normalized"`` (TorchScript of the raw model).
    """

    name: str  # e.g. "onnx-fp32", "onnx-int8", "torchscript", "trt-fp16"
    file: str
    format: str  # "onnx" | "torchscript" | "tensorrt" | "ort"
    precision: str  # "fp32" | "fp16" | "int8"
    sha256: str
    size_bytes: int
    input: str = "uint8-nhwc"
    built_with: Mapping[str, str] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)
    #: the engine an INT8 ONNX file was quantized for: "onnxruntime-cpu" (uint8 activations), "onnxruntime-cpu-vnni"
    #: (the same with 8-bit weights, x86-64 CPUs with VNNI only) or "tensorrt" (symmetric int8 QDQ); "" for everything
    #: else and for INT8 files of bundles written before targets existed.
    #: A value this runtime does not know is kept and never chosen automatically.
    target: str = ""

    def __post_init__(self) -> None:
        problem = unsafe_relative_path(self.file)
        if problem:
            raise BundleError(f"artifact {self.name!r}: file {self.file!r} {problem}; a bundle names files inside its own folder")


@dataclass(frozen=True)
class BundleManifest:
    """The manifest of a model bundle (``manifest.json``)."""

    model: ModelMeta
    artifacts: tuple[Artifact, ...] = ()
    input_name: str = "image"
    output_name: str = "logits"
    output: str = "logits"  # "logits" (apply softmax) | "probabilities"
    recommended: Mapping[str, str] = field(default_factory=dict)  # backend -> artifact name
    created: str = ""
    source: Mapping[str, Any] = field(default_factory=dict)
    gate: Optional["GateSummary"] = None  # None until the accuracy gate has run
    format_version: int = FORMAT_VERSION

    @property
    def labels(self) -> tuple[str, ...]:
        return self.model.labels

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.preprocessing

    def artifact(self, name: str) -> Artifact:
        """Return the artifact called ``name`` or raise :class:`BundleError` listing what exists."""
        for a in self.artifacts:
            if a.name == name:
                return a
        raise BundleError(f"bundle has no artifact {name!r}; it has {[a.name for a in self.artifacts]}")

    def replace(self, **changes: Any) -> "BundleManifest":
        return dataclasses.replace(self, **changes)


def unsafe_relative_path(name: str) -> str:
    """Why ``name`` is not a plain relative path inside a folder ('' when it is): absolute, ``..``, drive, backslash."""
    from pathlib import PurePosixPath, PureWindowsPath

    if not isinstance(name, str) or not name or name.strip() != name:
        return "is empty or not a plain file name"
    if "\\" in name or "\x00" in name:
        return "contains a backslash or NUL"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "climbs out with '..'"
    return ""


def artifact_path(bundle_dir: str | Path, art: Artifact) -> Path:
    """The artifact's file inside the bundle; refused *before* anything is opened when it resolves outside (symlinks).

    Raises:
        BundleError: the name is unsafe or its real path is not inside the bundle folder.
    """
    problem = unsafe_relative_path(art.file)
    if problem:
        raise BundleError(f"artifact {art.name!r}: file {art.file!r} {problem}; a bundle names files inside its own folder")
    root = Path(bundle_dir).resolve()
    path = Path(bundle_dir) / art.file
    real = path.resolve()
    if real != root and root not in real.parents:
        raise BundleError(f"artifact {art.name!r}: {art.file} resolves to {real}, outside the bundle {root} (a symlink?); refused")
    return path


# --------------------------------------------------------------------------- typed exchange files


@dataclass(frozen=True)
class Item:
    """One image of a split: ``file`` relative to the data root (POSIX), and its label."""

    file: str
    label: str


@dataclass(frozen=True)
class Split:
    """``split.json`` of a run folder: the exact files of each split, written by ``kimchi-edge train``.

    ``valid`` chose the best epoch and is what the accuracy gate scores; ``test`` (optional) was never
    used to choose anything, so its accuracy is the number to quote.
    """

    data_root: str
    train: tuple[Item, ...]
    valid: tuple[Item, ...]
    test: tuple[Item, ...] = ()
    vocab: tuple[str, ...] = ()
    layout: str = ""  # "random" | "given"
    seed: Optional[int] = None
    valid_pct: Optional[float] = None
    test_pct: Optional[float] = None
    excluded: tuple[Mapping[str, Any], ...] = ()  # files left out by screening: {file, reason}


@dataclass(frozen=True)
class ReferenceItem:
    """The fastai learner's own prediction on one validation file."""

    file: str
    label: str
    prediction: str
    probabilities: tuple[float, ...]


@dataclass(frozen=True)
class ReferenceFile:
    """``reference.json`` of a bundle: what the gate compares every artifact with."""

    data_root: str
    labels: tuple[str, ...]
    items: tuple[ReferenceItem, ...]
    source: Mapping[str, Any] = field(default_factory=dict)


VERIFICATION_DIR = "verification"
VERIFICATION_NAME = "verification.json"


@dataclass(frozen=True)
class VerificationImage:
    """One image of the bundle's own verification set: its original encoded bytes, inside the bundle."""

    file: str  # relative to the bundle, e.g. "verification/0007.jpg"
    source: str  # the validation file it is a copy of (``reference.json`` item ``file``)
    label: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class VerificationSet:
    """``verification.json``: a stratified sample of the validation split that travels with the bundle.

    ``kimchi-edge verify BUNDLE`` (no ``--images``) and ``build-engine`` gate on it, so a bundle copied to a Jetson
    re-checks itself there; the reference predictions are those of ``reference.json`` for ``source``.
    """

    images: tuple[VerificationImage, ...]
    of_valid: int = 0  # how many validation images the sample was drawn from
    seed: int = 0


GATE_STATUSES = ("pass", "fail", "skipped")


@dataclass(frozen=True)
class GateVerdict:
    """The gate's verdict on one artifact (``manifest.gate.artifacts[name]``)."""

    status: str  # "pass" | "fail" | "skipped"
    reason: str = ""
    #: where it passed: ONNX Runtime execution providers ("CPUExecutionProvider") or "tensorrt" for engines.
    #: The runtime uses only these by default; ``kimchi-edge verify`` on another machine adds that machine's.
    providers: tuple[str, ...] = ()
    #: of those, the one with the lowest measured inference time in the gate run ("" = not compared); ``auto``
    #: switches to another engine than ONNX Runtime only where it won here, at equal fidelity
    fastest: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def in_words(self) -> str:
        """``"passed"``, ``"failed: loses 18.4 points > 1"``, ``"not scored: torch is not installed here"``."""
        word = {"pass": "passed", "fail": "failed", "skipped": "not scored"}.get(self.status, self.status)
        return f"{word}: {self.reason}" if self.reason else word


@dataclass(frozen=True)
class ArtifactGate:
    """The gate's figures for one artifact, kept in ``Artifact.details["gate"]``."""

    status: str
    top1: float
    delta_points: float
    agreement: float
    images_per_s: float = 0.0


@dataclass(frozen=True)
class GateSummary:
    """``manifest.gate``: the last accuracy-gate run, in short (``gate.json``/``gate.md`` have everything)."""

    passed: bool
    created: str = ""
    report: str = GATE_MD
    images: int = 0
    reference_top1: Optional[float] = None
    thresholds: Mapping[str, float] = field(default_factory=dict)
    artifacts: Mapping[str, GateVerdict] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    #: the runtime's reduced-scale JPEG decoding met the FP32 thresholds, so it is the runtime's default decode
    fast_decode: bool = False

    def verdict(self, artifact: str) -> Optional[GateVerdict]:
        return self.artifacts.get(artifact)

    def in_words(self) -> list[str]:
        """Plain sentences for people (the demo's sidebar, ``kimchi-edge info``): headline, then one per artifact."""
        head = "Accuracy gate " + ("passed" if self.passed else "FAILED")
        facts = []
        if self.images:
            facts.append(f"{self.images} validation images")
        if self.reference_top1 is not None:
            facts.append(f"the fastai learner got {self.reference_top1:.1%} of them right")
        lines = [head + (" on " + ", ".join(facts) if facts else "") + "."]
        lines += [f"{name}: {v.in_words()}" for name, v in self.artifacts.items()]
        return lines


def artifact_gate(art: Artifact) -> Optional[ArtifactGate]:
    """The gate's figures recorded on an artifact, or None when it was never scored."""
    raw = art.details.get("gate") if isinstance(art.details, Mapping) else None
    return _build(ArtifactGate, raw, f"artifacts[{art.name}].details.gate") if isinstance(raw, Mapping) else None


# --------------------------------------------------------------------------- (de)serialisation


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _convert(hint: Any, value: Any, where: str) -> Any:
    """JSON value -> the annotated type: nested dataclasses, tuples (of any length), mappings, optionals."""
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, Mapping) and not value and dataclasses.is_dataclass(inner[0]):
            return None  # bundles of 0.1 wrote "gate": {} before the gate ran
        return _convert(inner[0], value, where) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise BundleError(f"{where}: expected a list, got {type(value).__name__}")
        elem = args[0] if args else Any
        return tuple(_convert(args[i] if (args and args[-1] is not Ellipsis) and i < len(args) else elem, v, f"{where}[{i}]")
                     for i, v in enumerate(value))
    if origin in (Mapping, dict) or origin is typing.get_origin(Mapping[str, Any]):
        if not isinstance(value, Mapping):
            raise BundleError(f"{where}: expected an object, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    return _primitive(hint, value, where)


_KINDS = {str: "text", int: "a whole number", float: "a number", bool: "true or false"}


def _primitive(hint: Any, value: Any, where: str) -> Any:
    """Check a JSON scalar against ``str``/``int``/``float``/``bool``; other hints (``Any``) pass through."""
    ok = {
        str: isinstance(value, str),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
    }.get(hint)
    if ok is None:
        return value
    if not ok:
        raise BundleError(f"{where}: expected {_KINDS[hint]}, got {type(value).__name__} {value!r:.40}")
    return float(value) if hint is float else value


def _build(cls: type, data: Any, where: str) -> Any:
    """A dataclass from a JSON object, every field converted by its annotation (unknown keys ignored)."""
    if not isinstance(data, Mapping):
        raise BundleError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            continue  # forward compatible: newer writers may add fields
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}")
    missing = [n for n, f in known.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    if missing:
        raise BundleError(f"{where}: missing required field(s) {missing}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise BundleError(f"{where}: {exc}") from exc


def model_meta_from_dict(data: Any) -> ModelMeta:
    return _build(ModelMeta, data, "model_meta")


def manifest_from_dict(data: Any) -> BundleManifest:
    if isinstance(data, Mapping) and data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise BundleError(
            f"bundle format_version {data['format_version']} is newer than this runtime understands "
            f"({FORMAT_VERSION}); upgrade kimchi-edge"
        )
    return _build(BundleManifest, data, "manifest")


def read_manifest(bundle_dir: str | Path) -> BundleManifest:
    """Read ``manifest.json`` of a bundle folder.

    Raises:
        BundleError: when the folder or manifest is missing or malformed.
    """
    from .fsutil import read_json

    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist; make one with: kimchi-edge convert RUN_DIR")
    if not path.is_file():
        raise BundleError(f"{bundle_dir} has no {MANIFEST_NAME}: not a kimchi-edge bundle (or an interrupted one)")
    try:
        data = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid UTF-8 JSON: {exc}") from exc
    return manifest_from_dict(data)


def write_manifest(bundle_dir: str | Path, manifest: BundleManifest) -> Path:
    """Write ``manifest.json`` atomically and return its path."""
    from .fsutil import atomic_write_json

    path = Path(bundle_dir) / MANIFEST_NAME
    atomic_write_json(path, to_dict(manifest))
    return path


def read_model_meta(path: str | Path) -> ModelMeta:
    from .fsutil import read_json

    return model_meta_from_dict(read_json(path))


def read_typed(cls: type, path: str | Path) -> Any:
    """Read one typed exchange file (``split.json`` -> :class:`Split`, ``reference.json`` -> :class:`ReferenceFile`).

    Raises:
        BundleError: not UTF-8 JSON, or not the expected shape (the message names the field).
    """
    from .fsutil import read_json

    path = Path(path)
    try:
        data = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid UTF-8 JSON: {exc}") from exc
    return _build(cls, data, path.name)


def write_typed(path: str | Path, obj: Any) -> Path:
    """Write one typed exchange file atomically (UTF-8, labels unescaped)."""
    from .fsutil import atomic_write_json

    atomic_write_json(Path(path), to_dict(obj))
    return Path(path)


def verify_artifact(bundle_dir: str | Path, art: Artifact) -> None:
    """Refuse an artifact whose bytes differ from what the manifest recorded (checked before loading).

    Raises:
        BundleError: the file is missing or its SHA-256 differs.
    """
    from .fsutil import sha256_file

    path = artifact_path(bundle_dir, art)
    if not path.is_file():
        raise BundleError(f"bundle artifact {art.name!r} is missing its file {art.file}")
    actual = sha256_file(path)
    if actual != art.sha256:
        raise BundleError(
            f"{art.file} has been modified: SHA-256 {actual[:12]}... but the manifest says {art.sha256[:12]}...; "
            "re-run kimchi-edge convert (or build-engine) to regenerate it"
        )
