"""The image type training decodes with: fastai's ``PILImage`` read by the runtime's decoder.

Kept in its own module *without* ``from __future__ import annotations``: fastai's type dispatch reads
the annotation of ``create`` at run time (``learn.predict``/``test_dl`` choose the decoder by it), and a
string annotation would make it ``Any`` and break them.
"""

from pathlib import Path

from kimchi_edge.runtime.preprocess import decode_image

from .third_party import importing_fastai

try:  # fastai present: the image type training decodes with (same decoder as the runtime)
    with importing_fastai():
        from fastai.vision.core import PILImage
    from numpy import ndarray
    from PIL import Image
    from torch import Tensor

    class PILImageUpright(PILImage):
        """fastai ``PILImage`` decoded by the runtime's decoder: EXIF orientation applied, any mode -> RGB.

        Training and serving therefore see the same pixels for phone photos with an orientation tag.
        """

        @classmethod
        def create(cls, fn: Path | str | Tensor | ndarray | bytes | Image.Image, **kwargs):
            if isinstance(fn, (str, Path, bytes)):
                return cls(decode_image(fn))
            return super().create(fn, **kwargs)

except ImportError:  # runtime-only install: training is unavailable anyway
    PILImageUpright = None  # type: ignore[assignment,misc]
