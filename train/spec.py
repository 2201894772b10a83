"""Read the preprocessing out of a fastai pipeline (never re-type it) and prove the runtime matches it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kimchi_edge.runtime.errors import DataError
from kimchi_edge.runtime.manifest import Preprocessing
from kimchi_edge.runtime.preprocess import Preprocessor

# Batch transforms that are identity on the validation set unless they resize.
_TRAIN_ONLY_OK = {"Brightness", "Contrast", "Saturation", "Hue", "LightingTfm", "RandomErasing"}


def _hw(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def preprocessing_from_dls(dls, *, resample_in_graph: bool = False) -> Preprocessing:
    """Describe ``dls.valid``'s transform as a :class:`~kimchi_edge.runtime.manifest.Preprocessing`.

    Args:
        dls: the learner's ``DataLoaders``.
        resample_in_graph: when the pipeline has a batch resample, let the exported model do it (its
            input is then the item-size uint8 image) instead of the host.  Off by default: on a CPU it
            was not faster (docs/CONVERT.md); it takes the resample off a host whose model runs on a GPU.

    Raises:
        DataError: the pipeline contains a transform the bundle cannot express (named).
    """
    from fastai.vision.all import AffineCoordTfm, IntToFloatTensor, Normalize, RandomResizedCropGPU, Resize, ResizeMethod, ToTensor

    resize = None
    for t in dls.valid.after_item.fs:
        if isinstance(t, Resize):
            resize = t
        elif isinstance(t, ToTensor):
            continue
        elif getattr(t, "split_idx", None) == 0:
            continue  # training-only item transform
        else:
            raise DataError(f"validation item transform {type(t).__name__} cannot be carried into the bundle")
    if resize is None:
        raise DataError("the pipeline has no Resize item transform; kimchi-edge needs one (item_tfms=Resize(...))")
    if resize.method not in (ResizeMethod.Crop, ResizeMethod.Squish):
        raise DataError(f"Resize(method={resize.method!r}) is not supported; use 'crop' or 'squish'")
    rw, rh = int(resize.size[0]), int(resize.size[1])  # fastai stores (width, height)

    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    batch: dict[str, Any] = {}
    for t in dls.valid.after_batch.fs:
        name = type(t).__name__
        if isinstance(t, IntToFloatTensor):
            if float(t.div) != 255.0:
                raise DataError(f"IntToFloatTensor(div={t.div}) is not supported (expected 255)")
        elif isinstance(t, Normalize):
            mean = tuple(float(v) for v in t.mean.flatten().cpu().tolist())
            std = tuple(float(v) for v in t.std.flatten().cpu().tolist())
        elif isinstance(t, RandomResizedCropGPU):
            if tuple(t.ratio) != (1, 1):
                raise DataError(f"RandomResizedCropGPU(ratio={t.ratio}) is not supported; aug_transforms uses ratio=(1, 1)")
            h, w = _hw(t.size)
            batch = {"height": h, "width": w, "square": True, "crop": float(t.valid_scale)}
        elif isinstance(t, AffineCoordTfm):
            if getattr(t, "size", None) is not None:  # resizes on the validation set too
                h, w = _hw(t.size)
                batch = {"height": h, "width": w, "square": False, "crop": 1.0}
        elif name in _TRAIN_ONLY_OK or getattr(t, "split_idx", None) == 0:
            continue
        else:
            raise DataError(f"validation batch transform {name} cannot be carried into the bundle")
    if batch:
        return Preprocessing(
            height=batch["height"], width=batch["width"], resize_height=rh, resize_width=rw,
            resize_method="crop" if resize.method == ResizeMethod.Crop else "squish",
            batch_resize=True, batch_square=batch["square"], batch_crop=batch["crop"], mean=mean, std=std,
            resample_in_graph=resample_in_graph,
            # on the host the batch resample makes fractional pixels: do not round them
            dtype="uint8" if resample_in_graph else "float32",
        )
    return Preprocessing(
        height=rh, width=rw, resize_height=rh, resize_width=rw,
        resize_method="crop" if resize.method == ResizeMethod.Crop else "squish", mean=mean, std=std,
    )


def compare_with_fastai(dls, spec: Preprocessing, files: Sequence[Path]) -> float:
    """Largest |difference| in 0-255 pixel units between fastai's validation pipeline and the runtime.

    Float noise (~1e-3) with a batch resample (on the host or, reproduced on the host, in the graph);
    rounding (<= 0.5) for a Pillow-only ``uint8`` spec.
    """
    dl = dls.test_dl(list(files), bs=len(files), num_workers=0)
    (x,) = dl.one_batch()[:1]
    # undo Normalize: fastai's decode of the batch gives back 0-1 floats before IntToFloat's decode
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    ref = (x.detach().float().cpu().numpy() * std + mean) * 255.0
    pre = Preprocessor(spec, fast_decode=False)
    ours = pre.network_pixels(pre.batch(list(files))).astype(np.float32)
    ours = ours.transpose(0, 3, 1, 2) if spec.layout == "NHWC" else ours
    return float(np.abs(ref - ours).max())
