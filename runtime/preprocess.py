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

#: Refuse images whose decoding would hold more memory than this (pixels x bytes per pixel of the file's
#: real mode, plus the RGB conversion; :func:`decode_bytes`): an RGB photo at the pixel limit just fits, an
#: RGBA or 16-bit image must be proportionally smaller.
DEFAULT_MAX_DECODE_BYTES = 4 * DEFAULT_MAX_PIXELS

# Pillow's own decompression-bomb check (Image.MAX_IMAGE_PIXELS) is left as it is for every other user of
# Pillow in the process: the runtime's limits are per call (decode_image's max_pixels / max_decode_bytes).
# An image over Pillow's hard limit (2 x MAX_IMAGE_PIXELS, ~179 MP) is refused by Pillow at open, whatever
# max_pixels says; an application that needs larger images raises Image.MAX_IMAGE_PIXELS itself.

#: Bytes per pixel Pillow stores for a mode (everything not listed is 4: RGB is stored as RGBX).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
#: Rows converted at a time from 16/32-bit greyscale (keeps the temporary arrays small).
_CHUNK_PIXELS = 1 << 18


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return f"file {os.fspath(src)!r}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"{len(src)} bytes"
    return type(src).__name__


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent images are composited on white (dropping alpha would expose arbitrary colours),
    16/32-bit greyscale is scaled (not clipped) to 8 bits with integer arithmetic, a block of rows at a
    time (no full-size float64 copy), palette/greyscale/CMYK are converted.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))  # = alpha_composite on opaque white, without the RGBA copies
        return out
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_grey_to_rgb(im)
    return im.convert("RGB")


def _wide_grey_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float greyscale -> RGB, scaled to 8 bits (not clipped), in blocks of rows.

    16-bit: ``(x * 255 + 32767) // 65535`` in ``uint32``, which equals ``rint(x / 65535 * 255)`` for every
    16-bit value (no ties exist), i.e. what the earlier float64 conversion gave.
    """
    mode, (w, h) = im.mode, im.size
    lo, hi = im.getextrema()
    if mode == "F" and not (math.isfinite(lo) and math.isfinite(hi)):
        raise InvalidInputError(f"image of mode {mode} holds NaN or infinite values")
    top = 65535.0 if mode.startswith("I;16") or hi > 255 else 255.0
    if mode == "F" and hi <= 1.0:
        top = 1.0
    out = np.empty((h, w), dtype=np.uint8)
    step = max(1, _CHUNK_PIXELS // max(1, w))
    for y in range(0, h, step):
        block = np.asarray(im.crop((0, y, w, min(h, y + step))))
        rows = out[y : y + block.shape[0]]
        if mode.startswith("I;16"):
            wide = block.astype(np.uint32)
            wide *= 255
            wide += 32767
            wide //= 65535
            rows[...] = wide
            continue
        wide = block.astype(np.float64)  # one block of rows, not the image
        if not np.isfinite(wide).all():
            raise InvalidInputError(f"image of mode {mode} holds NaN or infinite values")
        wide /= top
        wide *= 255.0
        np.rint(wide, out=wide)
        np.clip(wide, 0, 255, out=wide)
        rows[...] = wide
    return Image.fromarray(out, "L").convert("RGB")


def decode_bytes(size: tuple[int, int], mode: str, *, transparency: bool = False, rotated: bool = False) -> int:
    """Peak memory of decoding an image of ``mode`` and converting it to RGB, in bytes (an estimate from the header).

    The decoded image (Pillow's bytes per pixel for the mode), a rotated copy when EXIF orientation applies,
    then the conversion: RGB 0 more, greyscale/palette/CMYK 4 (the RGB image), alpha 5 (alpha channel + the
    white RGB background; 4 more first for modes other than RGBA), 16/32-bit greyscale 6 (8-bit result,
    its Pillow copy, the RGB image).
    """
    w, h = size
    stored = _STORED_BYTES.get(mode, 4)
    per_pixel = stored * (2 if rotated else 1)
    if mode == "RGB":
        pass
    elif mode in _ALPHA_MODES or (mode == "P" and transparency):
        per_pixel += 5 + (0 if mode == "RGBA" else 4)
    elif mode.startswith("I;16") or mode in ("I", "F"):
        per_pixel += 6
    else:
        per_pixel += 4
    return w * h * per_pixel


def decode_image(
    src: ImageInput,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int | None = DEFAULT_MAX_DECODE_BYTES,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode anything image-like into an upright 8-bit RGB Pillow image.

    Args:
        src: a path, encoded bytes, a PIL image, or an ``HxWx3`` array (``uint8``, or float in [0, 1]).
        max_pixels: refuse images larger than this *before* decoding them (``None``: no limit of ours;
            Pillow's own bomb check still applies).
        max_decode_bytes: refuse images whose decoding and RGB conversion would take more memory than
            this (:func:`decode_bytes`, from the header, after the JPEG draft scale), before decoding them.
        draft: for JPEG, let libjpeg decode at a reduced scale as long as the result is at least this
            ``(width, height)``; ``None`` decodes at full size.

    Returns:
        An RGB image with EXIF orientation applied (first frame of an animation).

    Raises:
        InvalidInputError: for anything that is not a decodable image, with what was received.
        ImageTooLargeError: when the image has more than ``max_pixels`` pixels or needs more than
            ``max_decode_bytes`` to decode.
    """
    if isinstance(src, np.ndarray):
        return Image.fromarray(array_to_uint8(src), "RGB")
    if isinstance(src, Image.Image):
        _check_size(src.size, max_pixels, "PIL image")
        _check_memory(src, max_decode_bytes, "PIL image")
        try:  # a lazily opened PIL image decodes here
            src.load()
            out = to_rgb(_upright(src))
            return src.copy() if out is src else out  # never the caller's own image object
        except _DECODE_ERRORS as exc:
            raise InvalidInputError(f"PIL image ({src.format or src.mode}) could not be decoded: {exc}") from exc
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise InvalidInputError("received 0 bytes; expected an encoded image (JPEG, PNG, WebP, ...)")
        fp: Any = io.BytesIO(src) if isinstance(src, bytes) else _BufferFile(src)  # neither copies the bytes
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
            late_exif = _exif_after_pixels(im)
            _check_memory(im, max_decode_bytes, what)
            im.load()
            if late_exif:  # its orientation is known only now, before the rotated copy
                _check_memory(im, max_decode_bytes, what)
            out = to_rgb(_upright(im))
            if out is im:  # detach from the file handle, sharing the pixels (no copy; a memory-mapped file is copied)
                out = im.copy() if im.readonly else im._new(im.im)
            return out
    except UnidentifiedImageError as exc:
        raise InvalidInputError(f"{what} is not an image Pillow can decode (JPEG, PNG, WebP, GIF, BMP, TIFF ...)") from exc
    except Image.DecompressionBombError as exc:  # over Pillow's own hard limit: refused at open, like ours
        raise ImageTooLargeError(_bomb_message(exc, fp, what, max_pixels)) from None
    except _DECODE_ERRORS as exc:
        raise InvalidInputError(f"{what} is a damaged or truncated image: {exc}") from exc


class _BufferFile(io.RawIOBase):
    """A read-only, seekable file over a ``bytearray``/``memoryview`` without copying it (``BytesIO`` would)."""

    def __init__(self, buf: bytearray | memoryview) -> None:
        super().__init__()
        self._view = memoryview(buf).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        b[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _check_size(size: tuple[int, int], max_pixels: int | None, what: str) -> None:
    w, h = size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise InvalidInputError(f"{what} is {w}x{h} pixels; expected a non-empty image")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(
            f"{what} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} pixels "
            "(refused before decoding; raise max_pixels if this is a genuine photo)"
        )


def _exif_after_pixels(im: Image.Image) -> bool:
    """A PNG whose EXIF block, if any, Pillow has not seen yet: before ``load()`` only decoding would find it."""
    return im.format == "PNG" and "exif" not in im.info


def _check_memory(im: Image.Image, max_decode_bytes: int | None, what: str) -> None:
    """Refuse (before ``load()``) an image whose decoding would need more than ``max_decode_bytes``."""
    if max_decode_bytes is None:
        return
    # Pillow's PNG reader finds an EXIF block placed after the pixel data only by decoding the whole image
    # (PngImageFile.getexif calls load()): asking here would decode before this check.  Such a PNG is checked
    # unrotated here and once more after load(), before any rotated copy is made (see decode_image).
    rotated = False if _exif_after_pixels(im) else _orientation(im) != 1
    need = decode_bytes(im.size, im.mode, transparency="transparency" in im.info, rotated=rotated)
    if need > max_decode_bytes:
        w, h = im.size
        raise ImageTooLargeError(
            f"{what} is {im.mode} {w}x{h}: decoding it would take about {need / 1e6:,.0f} MB "
            f"({need // (w * h)} bytes per pixel), over the limit of {max_decode_bytes / 1e6:,.0f} MB "
            "(refused before decoding; raise max_decode_bytes if this is a genuine image)"
        )


def _bomb_message(exc: Exception, fp: Any, what: str, max_pixels: int | None) -> str:
    """Our sentence for an image Pillow's own check refused at open (its size, from its header when we can read it)."""
    import re

    found = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = int(found.group(1)) if found else 0
    size = _declared_size(fp)
    shown = f"{size[0]}x{size[1]} = {pixels:,}" if size and size[0] * size[1] == pixels else f"{pixels:,}"
    limit = max_pixels if max_pixels is not None else 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return (f"{what} is {shown} pixels, over the limit of {limit:,} pixels "
            "(refused before decoding; Pillow's own limit is 2 x Image.MAX_IMAGE_PIXELS)")


def _declared_size(fp: Any) -> tuple[int, int] | None:
    """Width and height from the header of an image Pillow refused as a bomb (for the message only; nothing decoded)."""
    try:
        f = open(fp, "rb") if isinstance(fp, (str, os.PathLike)) else fp
        try:
            f.seek(0)
            prefix = f.read(16)
            for fmt in list(Image.ID):
                factory, accept = Image.OPEN[fmt]
                if accept is not None and (not accept(prefix) or isinstance(accept(prefix), str)):
                    continue
                f.seek(0)
                try:
                    return tuple(factory(f, "").size)  # type: ignore[return-value]
                except Exception:  # noqa: BLE001, S112 - not this format; try the next
                    continue
        finally:
            if f is not fp:
                f.close()
    except OSError:
        return None
    return None


#: EXIF orientations that move pixels (1 is upright; anything else is ignored, as Pillow does).
_TRANSPOSING_ORIENTATIONS = (2, 3, 4, 5, 6, 7, 8)


def _orientation(im: Image.Image) -> int:
    """The EXIF (or XMP) orientation of ``im`` that :func:`_upright` applies: 2..8, or 1 for nothing to do.

    Pillow parses the EXIF block once per image and caches it, so :func:`_check_memory` and
    :func:`_upright` asking both costs one parse.  A broken EXIF block counts as upright.
    """
    try:
        orientation = im.getexif().get(0x0112, 1)
        return orientation if orientation in _TRANSPOSING_ORIENTATIONS else 1
    except Exception:  # noqa: BLE001 - broken EXIF must not make a readable photo unreadable
        return 1


def _upright(im: Image.Image) -> Image.Image:
    """``im`` with its EXIF orientation applied; ``im`` itself (not a copy) when it is already upright."""
    if _orientation(im) == 1:  # ImageOps.exif_transpose would return a full copy of the pixels here
        return im
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001 - broken EXIF must not make a readable photo unreadable
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


def _tap_plan(idx: np.ndarray, w: np.ndarray, channels: int) -> tuple[int, list[tuple[np.ndarray | None, np.ndarray, np.ndarray]]]:
    """Taps ``(idx, w)`` of one axis as the work :func:`resample` does, tap by tap: ``(n_in_needed, steps)``.

    Each step is ``(None, index, weight)`` for a tap applied to every output position (tap 0 always, and
    any tap with mostly non-zero weights) or ``(positions, index, weight)`` for a tap whose non-zero
    weights are few (the 4th tap of the few rows whose band is one wider): the positions left out
    have weight 0, and adding ``0 * x`` (``x`` finite) to a float32 sum leaves it as it was, so
    skipping them changes no value.  Indices and weights are repeated ``channels`` times (the column
    pass works on the flattened ``(rows, width * channels)`` array).  The arrays are read-only.
    """
    if idx.size and int(idx.min()) < 0:
        raise ValueError("resample: tap indices must be >= 0")
    n = w.shape[0]
    steps: list[tuple[np.ndarray | None, np.ndarray, np.ndarray]] = []
    for k in range(w.shape[1]):
        nz = w[:, k] != 0
        count = int(np.count_nonzero(nz))
        if k == 0 or 2 * count > n:
            pos, i, wk = None, idx[:, k], w[:, k]
        elif count:
            pos = np.flatnonzero(nz)
            i, wk = idx[pos, k], w[pos, k]
        else:
            continue
        if channels > 1:
            i = (i[:, None] * channels + np.arange(channels)).ravel()
            wk = np.repeat(wk, channels)
            if pos is not None:
                pos = (pos[:, None] * channels + np.arange(channels)).ravel()
        step = (pos, np.array(i, dtype=np.intp), np.array(wk, dtype=np.float32))
        for a in step:
            if a is not None:
                a.setflags(write=False)
        steps.append(step)
    return int(idx.max()) + 1, steps


#: ``id(taps) -> (taps, channels, plans)`` for :func:`resample` (the taps object is kept, so its id stays its own).
_PLANS: dict[int, tuple[Any, int, Any]] = {}


def _plans(taps: Any, channels: int) -> Any:
    """``(row plan, column plan, out_h, out_w)`` of ``taps`` (:func:`_tap_plan`), computed once per taps object.

    :func:`batch_resample_taps` hands out the same (cached) object for a geometry, so this is a dict
    look-up per image; the taps' arrays must not be changed in place after their first use.
    """
    key = id(taps)
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is taps and hit[1] == channels:
        return hit[2]
    (ri, rw), (ci, cw) = taps
    plans = (_tap_plan(ri, rw, 1), _tap_plan(ci, cw, channels), rw.shape[0], cw.shape[0])
    if len(_PLANS) >= 64:
        _PLANS.clear()
    _PLANS[key] = (taps, channels, plans)
    return plans


def resample(arr: np.ndarray, taps: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
             dtype: str = "float32") -> np.ndarray:
    """``R @ arr @ C.T`` per channel for an ``(H, W, C)`` image, from :func:`batch_resample_taps`.

    ``dtype="float32"`` keeps fractional pixels (what fastai feeds its model); ``"uint8"`` rounds.

    Every output value is ``sum_k w[k] * x[k]`` in float32, the products rounded to float32 and added in
    tap order ``k = 0, 1, ...``, rows first and then columns -- the arithmetic of the ONNX in-graph
    version (:func:`kimchi_edge.convert.onnx_export.prepend_batch_resample`) and of the earlier
    implementation, bit for bit (``tests/runtime/test_preprocess_speedups.py``).  What makes it fast:
    ``uint8`` rows are gathered as ``uint8`` and converted inside the multiply (no float32 copy of the
    whole image, whose fresh pages alone cost more than the arithmetic), every step writes into a few
    buffers allocated once per call, both passes work on 2-D ``(rows, width * channels)`` views (the
    column pass gathers single floats), and a tap that is zero for nearly all outputs is applied only
    where it is not.

    Raises:
        ValueError: ``arr`` is not ``(H, W, C)`` or smaller than the taps read.
    """
    if arr.ndim != 3:
        raise ValueError(f"resample: got an array of shape {arr.shape}; expected (height, width, channels)")
    (r_need, r_steps), (c_need, c_steps), n_rows, n_cols = _plans(taps, arr.shape[2])
    if arr.shape[0] < r_need or arr.shape[1] < c_need:
        raise ValueError(f"resample: got an array of shape {arr.shape}; the taps read {r_need} rows x {c_need} columns x channels")
    x = arr if arr.dtype in (np.uint8, np.float32) else arr.astype(np.float32)  # uint8 -> float32 is exact, in the multiply
    _, w_in, ch = x.shape
    # 2-D (rows, width * channels) views: numpy broadcasts a (rows, 1) weight over them far faster than a
    # (rows, 1, 1) weight over the 3-D arrays.
    flat = np.empty((n_rows, w_in * ch), dtype=np.float32)
    part = np.empty_like(flat)
    rows = np.empty((n_rows, w_in, ch), dtype=x.dtype)
    rows_flat = rows.reshape(n_rows, w_in * ch)
    for k, (pos, i, wk) in enumerate(r_steps):
        if pos is None:
            np.take(x, i, axis=0, out=rows, mode="clip")  # indices checked above; "clip" lets take fill `out` directly
            if k == 0:
                np.multiply(rows_flat, wk[:, None], out=flat)
            else:
                np.multiply(rows_flat, wk[:, None], out=part)
                np.add(flat, part, out=flat)
        else:
            flat[pos] += wk[:, None] * x[i].reshape(i.size, w_in * ch)
    del part, rows, rows_flat
    z = np.empty((n_rows, n_cols * ch), dtype=np.float32)
    cols = np.empty_like(z)
    for k, (pos, i, wk) in enumerate(c_steps):
        if pos is None:
            np.take(flat, i, axis=1, out=cols, mode="clip")
            if k == 0:
                np.multiply(cols, wk, out=z)
            else:
                np.multiply(cols, wk, out=cols)
                np.add(z, cols, out=z)
        else:
            z[:, pos] += wk * flat[:, i]
    z = z.reshape(n_rows, n_cols, ch)
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
        max_decode_bytes: decoded-memory guard (see :func:`decode_image`).
    """

    spec: Preprocessing
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    fast_decode: bool = True
    max_decode_bytes: int | None = DEFAULT_MAX_DECODE_BYTES

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.spec.input_shape

    def decode(self, src: ImageInput) -> Image.Image:
        """Decode one image to upright RGB (reduced-scale JPEG decode when allowed)."""
        draft = (self.spec.resize_width, self.spec.resize_height) if self.fast_decode else None
        return decode_image(src, max_pixels=self.max_pixels, max_decode_bytes=self.max_decode_bytes, draft=draft)

    def transform(self, im: Image.Image) -> np.ndarray:
        """Geometry done on the host: an RGB image -> the model input of one image, ``spec.input_shape`` in ``spec.dtype``.

        With ``spec.resample_in_graph`` that is Pillow's item-size ``uint8`` image (the model resamples);
        otherwise the batch resample runs here too.
        """
        s = self.spec
        tw, th = s.resize_width, s.resize_height
        if s.resize_method == "crop":
            box = fastai_crop_box(im.width, im.height, tw, th)
            if box != (0, 0, im.width, im.height):
                im = im.crop(box)
        item = im.resize((tw, th), Image.BILINEAR) if im.size != (tw, th) else im
        arr = np.asarray(item, dtype=np.uint8)
        if s.batch_resize:
            if not s.resample_in_graph:  # in the graph: the model input is the item-size image
                arr = resample(arr, self._taps(), s.dtype)
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

    def _taps(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        s = self.spec
        return batch_resample_taps(s.resize_height, s.resize_width, s.height, s.width, s.batch_square, s.batch_crop)

    def network_pixels(self, batch: np.ndarray) -> np.ndarray:
        """Model input batch -> the 0-255 pixels the network sees (``height`` x ``width``, ``layout``).

        With ``spec.resample_in_graph`` this runs on the host the batch resample the ONNX graph does
        (float32, the same taps); otherwise the batch already is the network's input and is returned as is.

        Raises:
            InvalidInputError: the batch is not ``(N, *spec.input_shape)``.
        """
        s = self.spec
        if batch.ndim != 4 or tuple(batch.shape[1:]) != s.input_shape:
            raise InvalidInputError(f"got a batch of shape {tuple(batch.shape)}; expected (N, {', '.join(map(str, s.input_shape))})")
        if not s.resample_in_graph:
            return batch
        nchw = s.layout == "NCHW"
        taps = self._taps()
        out = [resample(img.transpose(1, 2, 0) if nchw else img, taps, "float32") for img in batch]
        y = np.stack(out)
        return np.ascontiguousarray(y.transpose(0, 3, 1, 2)) if nchw else y

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """Model input batch (0-255) -> float32 NCHW ``(x/255 - mean)/std`` at the network size (what the raw network sees).

        The batch resample is applied first when the bundle puts it in the graph (:meth:`network_pixels`).
        """
        x = self.network_pixels(batch).astype(np.float32) / 255.0
        if self.spec.layout == "NHWC":
            x = x.transpose(0, 3, 1, 2)
        mean = np.asarray(self.spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((x - mean) / std)
