"""The runtime's preprocessing equals fastai's validation transform on real photos.

The spec is read from the fastai pipeline (train.spec) and the runtime (numpy + Pillow only) is
compared pixel by pixel with what fastai feeds the model.  With fastai's batch resample the runtime
passes float pixels on (bound: float noise, 0.01/255); without it, Pillow's uint8 output is exact.  Uses food10 when present (real 512 px photos, one
greyscale), else the built-in digits sample.
"""

import pytest

from tests.conftest import food10_root

# Before the fixture: without food10 it writes the digits sample, which needs scikit-learn (the train extra too).
pytest.importorskip("fastai", reason="compares with fastai's own pipeline: needs the train extra (pip install 'kimchi-edge[train]')")

CONFIGS = [
    dict(item_size=460, size=224, min_scale=0.75, resize_method="crop"),  # the seeds' presizing
    dict(item_size=256, size=224, min_scale=1.0, resize_method="crop"),  # affine-resize path
    dict(item_size=(300, 400), size=(160, 224), min_scale=0.75, resize_method="crop"),  # non-square
    dict(item_size=240, size=128, min_scale=0.75, resize_method="squish"),  # >2x: fastai's area pre-filter
    dict(item_size=224, size=224, min_scale=0.75, resize_method="crop", augment=0),  # item size == model size
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = food10_root()
    if root is not None:
        return root, "food10"
    from kimchi_edge.train.sample import write_digits_sample

    return write_digits_sample(tmp_path_factory.mktemp("digits"), per_class=6), "digits sample"


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['item_size']}->{c['size']}-{c['resize_method']}")
def test_runtime_preprocessing_matches_fastai_validation_transform(photos, cfg):
    pytest.importorskip("fastai")
    from kimchi_edge.train.data import make_dataloaders, scan_dataset
    from kimchi_edge.train.spec import compare_with_fastai, preprocessing_from_dls

    root, _ = photos
    scan = scan_dataset(root, screen=False)
    dls = make_dataloaders(scan, bs=4, **cfg)
    spec = preprocessing_from_dls(dls)
    files = list(dls.valid_ds.items)[::max(1, len(dls.valid_ds.items) // 24)][:24]
    diff = compare_with_fastai(dls, spec, files)
    assert spec.dtype == ("float32" if spec.batch_resize else "uint8")
    assert diff <= 0.01, f"max |runtime - fastai| = {diff:.4f}/255 on {len(files)} images"


@pytest.mark.parametrize("cfg", CONFIGS[:4:3], ids=lambda c: f"{c['item_size']}->{c['size']}-{c['resize_method']}")
def test_resample_in_graph_spec_matches_fastai(photos, cfg):
    """With the batch resample in the graph the host hands over Pillow's uint8 item-size image; its resample
    (``network_pixels``, the host copy of the graph's, proved equal in test_graph_resample.py) matches fastai."""
    pytest.importorskip("fastai")
    from kimchi_edge.train.data import make_dataloaders, scan_dataset
    from kimchi_edge.train.spec import compare_with_fastai, preprocessing_from_dls

    root, _ = photos
    dls = make_dataloaders(scan_dataset(root, screen=False), bs=4, **cfg)
    spec = preprocessing_from_dls(dls, resample_in_graph=True)
    item = cfg["item_size"] if isinstance(cfg["item_size"], tuple) else (cfg["item_size"],) * 2
    assert (spec.dtype, spec.input_shape) == ("uint8", (*item, 3))
    files = list(dls.valid_ds.items)[::max(1, len(dls.valid_ds.items) // 24)][:24]
    diff = compare_with_fastai(dls, spec, files)
    assert diff <= 0.01, f"max |runtime - fastai| = {diff:.4f}/255 on {len(files)} images"


def test_wrong_spec_is_caught(photos):
    """The comparison can fail: a spec with the wrong batch crop is far off (any image shape)."""
    pytest.importorskip("fastai")
    import dataclasses

    from kimchi_edge.train.data import make_dataloaders, scan_dataset
    from kimchi_edge.train.spec import compare_with_fastai, preprocessing_from_dls

    root, _ = photos
    dls = make_dataloaders(scan_dataset(root, screen=False), item_size=300, size=224, bs=4)
    spec = dataclasses.replace(preprocessing_from_dls(dls), batch_crop=0.8)
    files = list(dls.valid_ds.items)[:8]
    assert compare_with_fastai(dls, spec, files) > 20
