"""Through fine_tune the pretrained body's BatchNorm layers stay as pretrained (``KeepPretrainedBatchNorm``).

Real fastai on the bundled digits with EfficientNet-Lite0's shipped ImageNet weights: a frozen epoch and an unfrozen one
change the head (and the unfrozen body's convolutions) and leave every BatchNorm layer of the body (running statistics
and weights) exactly as loaded; with fastai's default (``--train-bn``) the same epochs change them, which is what cost
food10's learner 10 points of validation accuracy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastai", reason="the train extra (fastai) is not installed")

from tests.train.conftest import KIMCHI_CLASSES  # noqa: E402

pytestmark = pytest.mark.slow


def _learner(kimchi_tree: Path, tmp_path: Path, *, keep_bn: bool):
    import torch

    from kimchi_edge.train.api import keep_pretrained_batchnorm
    from kimchi_edge.train.archs import learner_for_arch
    from kimchi_edge.train.data import make_dataloaders, scan_dataset

    scan = scan_dataset(kimchi_tree, quiet=True)
    dls = make_dataloaders(scan, item_size=40, size=32, augment=1.0, flip=False, bs=16, device=torch.device("cpu"))
    learn, _ = learner_for_arch(dls, "efficientnet_lite0", pretrained=True, weights=None, metrics=[], path=tmp_path)
    if keep_bn:
        keep_pretrained_batchnorm(learn)
    return learn


def _body_bn_state(learn) -> dict:
    import torch.nn as nn

    out = {}
    for name, m in learn.model[0].named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for k in ("running_mean", "running_var", "weight", "bias"):
                out[f"{name}.{k}"] = getattr(m, k).detach().clone()
    return out


def _changed(before: dict, after: dict) -> list[str]:
    import torch

    return [k for k in before if not torch.equal(before[k], after[k])]


def _head_weights(learn):
    return [p.detach().clone() for p in learn.model[1].parameters()]


@pytest.mark.parametrize("keep_bn", [True, False], ids=["default: kept as pretrained", "--train-bn: fastai's default"])
def test_a_frozen_epoch_leaves_the_body_batchnorm_as_pretrained(kimchi_tree, tmp_path, keep_bn):
    import torch

    learn = _learner(kimchi_tree, tmp_path, keep_bn=keep_bn)
    bn0, head0 = _body_bn_state(learn), _head_weights(learn)
    assert bn0, "EfficientNet-Lite0's body has BatchNorm layers"
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-2)
    changed = _changed(bn0, _body_bn_state(learn))
    assert any(not torch.equal(a, b) for a, b in zip(head0, _head_weights(learn))), "the head must have trained"
    if keep_bn:
        assert changed == [], f"{len(changed)} body BatchNorm tensors changed while the body was frozen, e.g. {changed[:3]}"
    else:  # fastai's train_bn=True: statistics of the training batches, weights trained
        assert any(k.endswith("running_mean") for k in changed) and any(k.endswith(".weight") for k in changed)


@pytest.mark.parametrize("keep_bn", [True, False], ids=["default: kept as pretrained", "--train-bn: fastai's default"])
def test_once_unfrozen_the_body_batchnorm_still_stays_as_pretrained(kimchi_tree, tmp_path, keep_bn):
    import torch

    learn = _learner(kimchi_tree, tmp_path, keep_bn=keep_bn)
    learn.unfreeze()
    bn0 = _body_bn_state(learn)
    convs0 = [p.detach().clone() for n, p in learn.model[0].named_parameters() if p.ndim == 4]
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-3)
    changed = _changed(bn0, _body_bn_state(learn))
    convs = [p for n, p in learn.model[0].named_parameters() if p.ndim == 4]
    assert any(not torch.equal(a, b) for a, b in zip(convs0, convs)), "the unfrozen body's convolutions must have trained"
    if keep_bn:
        assert changed == [], f"{len(changed)} body BatchNorm tensors changed after unfreeze(), e.g. {changed[:3]}"
    else:
        assert any(k.endswith("running_mean") for k in changed) and any(k.endswith(".weight") for k in changed)


def test_the_run_says_so_and_the_exported_learner_carries_no_training_callback(tiny_run):
    from fastai.vision.all import load_learner

    assert "BatchNorm layers kept as pretrained throughout" in (tiny_run / "summary.md").read_text(encoding="utf-8")
    learn = load_learner(tiny_run / "learner.pkl")
    assert not [type(c).__name__ for c in learn.cbs if type(c).__name__ in ("KeepPretrainedBatchNorm", "BestModelSaver", "EarlyStoppingCallback")]
    assert list(learn.dls.vocab) == sorted(KIMCHI_CLASSES.values())


def test_who_keeps_the_batchnorm_by_default_and_how_to_change_it():
    """Kept by default for the arch it was measured on; the torchvision archs keep fastai's default; both flags win."""
    import argparse

    from kimchi_edge.train.api import TrainConfig, keeps_pretrained_batchnorm
    from kimchi_edge.train.cli import add_args

    parser = argparse.ArgumentParser()
    add_args(parser)
    flags = {(): None, ("--train-bn",): True, ("--keep-bn",): False}
    assert {k: parser.parse_args(["data", *k]).train_bn for k in flags} == flags
    from kimchi_edge.train.cli import train_argv

    for k in flags:  # what --gpus N hands to torchrun's workers is the same choice (the two flags share one dest)
        args = parser.parse_args(["data", *k])
        assert vars(parser.parse_args(train_argv(args))) == vars(args), k

    def keeps(**kw):
        return keeps_pretrained_batchnorm(TrainConfig(data=Path("d"), out=Path("o"), **kw))

    assert keeps(arch="efficientnet_lite0") and not keeps(arch="efficientnet_lite0", train_bn=True)
    assert not keeps(arch="resnet18") and keeps(arch="resnet18", train_bn=False)
    # nothing to keep: every layer trains from the start, or there are no pretrained statistics
    assert not keeps(arch="efficientnet_lite0", freeze_epochs=0)
    assert not keeps(arch="efficientnet_lite0", pretrained=False, train_bn=False)
