"""The built-in sample: scikit-learn's bundled handwritten digits, written as a folder-per-class tree.

Real scanned handwriting (1,797 images of 8x8 pixels from UCI's optdigits, shipped inside scikit-learn,
no download), upscaled to 32x32 greyscale PNGs.  The class folders carry Korean names
(``0 영`` ... ``9 구``), so the whole toolchain is exercised with Korean labels, as in the kimchi case.
"""

from __future__ import annotations

import io
from pathlib import Path

from kimchi_edge.runtime.errors import MissingDependencyError

KOREAN_DIGITS = ("영", "일", "이", "삼", "사", "오", "육", "칠", "팔", "구")
SAMPLE_LABELS = tuple(f"{d} {k}" for d, k in enumerate(KOREAN_DIGITS))


def write_digits_sample(out: str | Path, *, per_class: int | None = None, size: int = 32) -> Path:
    """Write the digits as ``out/<label>/<index>.png``; return ``out``.

    Args:
        out: target folder (created; existing sample files are overwritten).
        per_class: keep at most this many images per class (``None``: all, about 180 each).
        size: side of the written PNGs in pixels.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingDependencyError("the built-in sample needs scikit-learn: pip install 'kimchi-edge[train]'") from None
    import numpy as np
    from PIL import Image

    from kimchi_edge.runtime.fsutil import atomic_write_bytes

    digits = load_digits()
    out = Path(out)
    counts = {d: 0 for d in range(10)}
    for i, (img, target) in enumerate(zip(digits.images, digits.target)):
        d = int(target)
        if per_class is not None and counts[d] >= per_class:
            continue
        counts[d] += 1
        # ink is 16 in the data: dark ink on white paper, as it was scanned
        arr = (255 - np.clip(img / 16.0, 0, 1) * 255).astype(np.uint8)
        im = Image.fromarray(arr, "L").resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        atomic_write_bytes(out / SAMPLE_LABELS[d] / f"{i:04d}.png", buf.getvalue())
    return out
