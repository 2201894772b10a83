"""The bundle contract: one set of frozen dataclasses every stage reads and writes.

``train/`` writes a :class:`ModelMeta` (``model_meta.json``) into its run folder; ``convert/`` wraps it
into a :class:`BundleManifest` (``manifest.json``) with one :class:`Artifact` entry per file; the
runtime, the server, the demo and the gate read only that.  Everything is JSON, UTF-8, with labels in
the learner's vocab order and their exact Unicode text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import BundleError

MANIFEST_NAME = "manifest.json"
MODEL_META_NAME = "model_meta.json"
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
    runtime feeds RGB pixel values 0-255 in ``layout`` at ``height`` x ``width``, as ``dtype``:
    ``uint8`` when the geometry is Pillow's alone (exact), ``float32`` when the batch resample makes
    fractional pixels — rounding those to uint8 flipped 1 of 90 validation predictions of a food10 model,
    enough to fail the FP32 gate, so they are passed on unrounded, as fastai does.
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
    gate: Mapping[str, Any] = field(default_factory=dict)
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


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise BundleError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            continue  # forward compatible: newer writers may add fields
        if cls is Preprocessing and key in ("mean", "std"):
            value = tuple(float(v) for v in value)
        elif cls is ModelMeta and key == "labels":
            value = tuple(str(v) for v in value)
        elif cls is ModelMeta and key == "preprocessing":
            value = _build(Preprocessing, value, f"{where}.preprocessing")
        elif cls is BundleManifest and key == "model":
            value = _build(ModelMeta, value, f"{where}.model")
        elif cls is BundleManifest and key == "artifacts":
            value = tuple(_build(Artifact, a, f"{where}.artifacts[{i}]") for i, a in enumerate(value))
        kwargs[key] = value
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


def verify_artifact(bundle_dir: str | Path, art: Artifact) -> None:
    """Refuse an artifact whose bytes differ from what the manifest recorded (checked before loading).

    Raises:
        BundleError: the file is missing or its SHA-256 differs.
    """
    from .fsutil import sha256_file

    path = Path(bundle_dir) / art.file
    if not path.is_file():
        raise BundleError(f"bundle artifact {art.name!r} is missing its file {art.file}")
    actual = sha256_file(path)
    if actual != art.sha256:
        raise BundleError(
            f"{art.file} has been modified: SHA-256 {actual[:12]}... but the manifest says {art.sha256[:12]}...; "
            "re-run kimchi-edge convert (or build-engine) to regenerate it"
        )
