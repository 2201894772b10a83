"""The one preprocessing implementation: image file -> model input, derived from the bundle alone.

Training decodes its images with :func:`decode_image` (so EXIF orientation and colour-mode handling are
identical in training and serving), and the geometry below reproduces fastai's *validation*
transform (``Resize`` on the PIL image, then the ``RandomResizedCropGPU``/affine resample on the batch)
as fixed separable linear maps.  ``tests/runtime/test_preprocess_vs_fastai.py`` proves the match on
real photos.
"""

from __future__ import annotations

import io
import math
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageTooLargeError, InvalidInputError
from .manifest import Preprocessing

#: Refuse images with more pixels than this before decoding them (a 50 MP phone photo passes).
DEFAULT_MAX_PIXELS = 80_000_000
#: Smallest side we accept; anything smaller is almost certainly not a photo.
MIN_SIDE = 1

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

#: What Pillow's decoders raise on damaged or hostile bytes.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, OverflowError, NotImplementedError,
                  struct.error, Image.DecompressionBombError)

# Pillow's own bomb check would raise its own error type at 2x its limit; we check first ourselves.
Image.MAX_IMAGE_PIXELS = None


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return f"file {os.fspath(src)!r}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"{len(src)} bytes"
    return type(src).__name__


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent images are composited on white (dropping alpha would expose arbitrary colours),
    16/32-bit greyscale is scaled (not clipped) to 8 bits, palette/greyscale/CMYK are converted.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise InvalidInputError(f"image of mode {mode} holds NaN or infinite values")
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F" and arr.max() <= 1.0:
            top = 1.0
        arr8 = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    return im.convert("RGB")


def decode_image(
    src: ImageInput,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode anything image-like into an upright 8-bit RGB Pillow image.

    Args:
        src: a path, encoded bytes, a PIL image, or an ``HxWx3`` array (``uint8``, or float in [0, 1]).
        max_pixels: refuse images larger than this *before* decoding them (``None``: no limit).
        draft: for JPEG, let libjpeg decode at a reduced scale as long as the result is at least this
            ``(width, height)``; ``None`` decodes at full size.

    Returns:
        An RGB image with EXIF orientation applied (first frame of an animation).

    Raises:
        InvalidInputError: for anything that is not a decodable image, with what was received.
        ImageTooLargeError: when the image has more than ``max_pixels`` pixels.
    """
    if isinstance(src, np.ndarray):
        return Image.fromarray(array_to_uint8(src), "RGB")
    if isinstance(src, Image.Image):
        _check_size(src.size, max_pixels, "PIL image")
        try:  # a lazily opened PIL image decodes here
            src.load()
            return to_rgb(_upright(src))
        except _DECODE_ERRORS as exc:
            raise InvalidInputError(f"PIL image ({src.format or src.mode}) could not be decoded: {exc}") from exc
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise InvalidInputError("received 0 bytes; expected an encoded image (JPEG, PNG, WebP, ...)")
        fp: Any = io.BytesIO(bytes(src))
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise InvalidInputError(f"no such image file: {os.fspath(src)}")
        if path.stat().st_size == 0:
            raise InvalidInputError(f"{os.fspath(src)} is an empty (0-byte) file; expected an image")
        fp = path
    else:
        raise InvalidInputError(
            f"cannot read an image from a {type(src).__name__}; expected a path, bytes, a PIL image or an HxWx3 uint8 array"
        )
    what = _describe(src)
    try:
        with Image.open(fp) as im:
            _check_size(im.size, max_pixels, what)
            # An animation opens on its first frame; counting frames (n_frames) would walk the whole file.
            if draft is not None and im.format == "JPEG":
                side = max(draft)
                im.draft("RGB", (side, side))  # keeps both sides >= side (orientation-proof)
            im.load()
            out = to_rgb(_upright(im))
            if out is im:  # detach from the file handle
                out = im.copy()
            return out
    except UnidentifiedImageError as exc:
        raise InvalidInputError(f"{what} is not an image Pillow can decode (JPEG, PNG, WebP, GIF, BMP, TIFF ...)") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidInputError(f"{what} is a damaged or truncated image: {exc}") from exc


def _check_size(size: tuple[int, int], max_pixels: int | None, what: str) -> None:
    w, h = size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise InvalidInputError(f"{what} is {w}x{h} pixels; expected a non-empty image")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(
            f"{what} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} pixels "
            "(refused before decoding; raise max_pixels if this is a genuine photo)"
        )


def _upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception:  # broken EXIF must not make a readable photo unreadable
        return im


def array_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Validate an ``HxWx3`` array and return it as contiguous ``uint8``.

    ``uint8`` arrays pass through; float arrays must be finite and within [0, 1].
    """
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InvalidInputError(f"got an array of shape {arr.shape}; expected (height, width, 3) RGB")
    if arr.shape[0] < MIN_SIDE or arr.shape[1] < MIN_SIDE:
        raise InvalidInputError(f"got an empty array of shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InvalidInputError("got a float array with NaN or infinite values; expected finite RGB in [0, 1]")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidInputError(f"got a float array with values in [{lo:.3g}, {hi:.3g}]; expected [0, 1] (or pass uint8)")
        return np.rint(arr * 255.0).astype(np.uint8)
    raise InvalidInputError(f"got an array of dtype {arr.dtype}; expected uint8 (0-255) or float (0-1)")


# --------------------------------------------------------------------------- geometry


def fastai_crop_box(w: int, h: int, tw: int, th: int) -> tuple[int, int, int, int]:
    """fastai ``Resize(method='crop')`` on the validation set: centred box with the target aspect."""
    m = w / tw if (w / tw) < (h / th) else h / th
    cw, ch = max(1, int(m * tw)), max(1, int(m * th))  # never empty, even for a 10000x1 strip
    left, top = int(0.5 * (w - cw)), int(0.5 * (h - ch))
    return left, top, left + cw, top + ch


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``F.interpolate(mode='area')`` (adaptive average pooling) along one axis."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _bilinear_align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``grid_sample(mode='bilinear', align_corners=True)`` over an identity grid along one axis."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    if n_out == 1:
        pos = np.array([(n_in - 1) / 2.0])
    else:
        pos = np.linspace(-1.0, 1.0, n_out, dtype=np.float32).astype(np.float64)
        pos = (pos + 1.0) / 2.0 * (n_in - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
    hi = np.clip(lo + 1, 0, n_in - 1)
    frac = pos - lo
    for i in range(n_out):
        m[i, lo[i]] += 1.0 - frac[i]
        m[i, hi[i]] += frac[i]
    return m


@lru_cache(maxsize=32)
def batch_resample_matrices(in_h: int, in_w: int, out_h: int, out_w: int, square: bool, crop: float) -> tuple[np.ndarray, np.ndarray]:
    """Row and column matrices reproducing fastai's batch-level resize on the validation set.

    ``RandomResizedCropGPU`` (valid): centre crop (square when ``ratio=(1, 1)``) scaled by
    ``valid_scale``; then ``affine_coord(sz)`` whose ``_grid_sample`` first area-downsamples when the
    reduction exceeds 2x (fastai's own heuristic, reproduced with its exact arithmetic), then samples
    bilinearly with ``align_corners=True``.

    Returns:
        ``(R, C)`` float32 matrices so that ``out = R @ channel @ C.T``.
    """
    ch, cw = in_h, in_w
    if square:
        if cw / ch < 1:
            ch = int(cw / 1)
        elif cw / ch > 1:
            cw = int(ch * 1)
    ch, cw = int(ch * crop), int(cw * crop)
    top, left = (in_h - ch) // 2, (in_w - cw) // 2
    crop_r = np.zeros((ch, in_h))
    crop_r[np.arange(ch), top + np.arange(ch)] = 1
    crop_c = np.zeros((cw, in_w))
    crop_c[np.arange(cw), left + np.arange(cw)] = 1
    # fastai: d = min(H_in / coords.shape[-2], W_in / coords.shape[-1]) / 2 with coords (N, H, W, 2),
    # i.e. min(H_in / W_out, W_in / 2) / 2; z = 1 for an identity grid.
    d, z = min(ch / out_w, cw / 2) / 2, 1.0
    rows, cols = crop_r, crop_c
    if d > 1 and d > z:
        ah, aw = math.floor(ch * (1 / d)), math.floor(cw * (1 / d))
        rows = _area_matrix(ch, ah) @ rows
        cols = _area_matrix(cw, aw) @ cols
    rows = _bilinear_align_corners_matrix(rows.shape[0], out_h) @ rows
    cols = _bilinear_align_corners_matrix(cols.shape[0], out_w) @ cols
    return rows.astype(np.float32), np.ascontiguousarray(cols.T.astype(np.float32))


def _taps(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A banded ``(n_out, n_in)`` matrix as ``(indices, weights)``, both ``(n_out, k)``: its non-zeros per row.

    Rows with fewer than ``k`` non-zeros are padded with index 0 and weight 0.
    """
    nz = m != 0
    k = max(1, int(nz.sum(axis=1).max()))
    idx = np.zeros((m.shape[0], k), dtype=np.intp)
    w = np.zeros((m.shape[0], k), dtype=np.float32)
    for i in range(m.shape[0]):
        j = np.flatnonzero(nz[i])
        idx[i, : j.size] = j
        w[i, : j.size] = m[i, j]
    return idx, w


@lru_cache(maxsize=32)
def batch_resample_taps(in_h: int, in_w: int, out_h: int, out_w: int, square: bool, crop: float) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """:func:`batch_resample_matrices` as per-output taps: ``((row_idx, row_w), (col_idx, col_w))``.

    Each output pixel depends on a handful of input rows/columns (crop + area pre-filter + bilinear),
    so applying only the non-zero taps does the same arithmetic as the dense matrix products with a
    few hundred times fewer multiplications and without BLAS (whose worker threads would compete
    with the inference threads).
    """
    rows, cols_t = batch_resample_matrices(in_h, in_w, out_h, out_w, square, crop)
    return _taps(rows), _taps(cols_t.T)


def resample(arr: np.ndarray, taps: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
             dtype: str = "float32") -> np.ndarray:
    """``R @ arr @ C.T`` per channel for an ``(H, W, 3)`` ``uint8`` image, from :func:`batch_resample_taps`.

    ``dtype="float32"`` keeps fractional pixels (what fastai feeds its model); ``"uint8"`` rounds.
    """
    (ri, rw), (ci, cw) = taps
    x = arr.astype(np.float32)
    y = x[ri[:, 0]]
    y *= rw[:, 0, None, None]
    for k in range(1, ri.shape[1]):
        y += rw[:, k, None, None] * x[ri[:, k]]
    z = np.take(y, ci[:, 0], axis=1)
    z *= cw[None, :, 0, None]
    for k in range(1, ci.shape[1]):
        z += cw[None, :, k, None] * np.take(y, ci[:, k], axis=1)
    if dtype == "uint8":
        return np.clip(np.rint(z), 0, 255).astype(np.uint8)
    return np.clip(z, 0, 255, out=z)


@dataclass
class Preprocessor:
    """Turns images into model input exactly as the bundle says.

    Args:
        spec: the bundle's :class:`~kimchi_edge.runtime.manifest.Preprocessing`.
        max_pixels: decompression-bomb guard (see :func:`decode_image`).
        fast_decode: let libjpeg decode large JPEGs at a reduced scale that still covers the
            resize target (big phone photos decode several times faster).
    """

    spec: Preprocessing
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    fast_decode: bool = True

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.spec.input_shape

    def decode(self, src: ImageInput) -> Image.Image:
        """Decode one image to upright RGB (reduced-scale JPEG decode when allowed)."""
        draft = (self.spec.resize_width, self.spec.resize_height) if self.fast_decode else None
        return decode_image(src, max_pixels=self.max_pixels, draft=draft)

    def transform(self, im: Image.Image) -> np.ndarray:
        """Geometry only: an RGB image -> pixel array ``(H, W, 3)`` (``(3, H, W)`` for NCHW) in ``spec.dtype``."""
        s = self.spec
        tw, th = s.resize_width, s.resize_height
        if s.resize_method == "crop":
            box = fastai_crop_box(im.width, im.height, tw, th)
            if box != (0, 0, im.width, im.height):
                im = im.crop(box)
        item = im.resize((tw, th), Image.BILINEAR) if im.size != (tw, th) else im
        arr = np.asarray(item, dtype=np.uint8)
        if s.batch_resize:
            arr = resample(arr, batch_resample_taps(th, tw, s.height, s.width, s.batch_square, s.batch_crop), s.dtype)
        elif arr.shape[:2] != (s.height, s.width):  # item size is the model size
            arr = np.asarray(item.resize((s.width, s.height), Image.BILINEAR), dtype=np.uint8)
        if arr.dtype != s.dtype:
            arr = arr.astype(s.dtype)
        if s.layout == "NCHW":
            arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
        return arr

    def __call__(self, src: ImageInput) -> np.ndarray:
        """Decode and transform one image."""
        return self.transform(self.decode(src))

    def batch(self, srcs: list[ImageInput]) -> np.ndarray:
        """Decode and transform several images into one batch (``spec.dtype``)."""
        return np.stack([self(s) for s in srcs])

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """Pixel batch (0-255) -> float32 NCHW ``(x/255 - mean)/std`` (what the raw network sees)."""
        x = batch.astype(np.float32) / 255.0
        if self.spec.layout == "NHWC":
            x = x.transpose(0, 3, 1, 2)
        mean = np.asarray(self.spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((x - mean) / std)
