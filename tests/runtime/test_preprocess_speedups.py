"""The fast paths of ``runtime.preprocess`` give exactly what the straightforward code gives.

* ``resample`` (gathers into preallocated buffers, skips the zero taps) equals the dense matrix product
  ``R @ channel @ C`` of :func:`batch_resample_matrices` (within 1e-3) and, bit for bit, the plain
  tap-by-tap formulation the ONNX in-graph resample mirrors (float32 products added in tap order), on
  random images and on every kind of geometry: square and non-square, crop < 1, upsampling, big
  reductions with fastai's area pre-filter.
* ``decode_image`` no longer copies an upright image (no ``ImageOps.exif_transpose`` when there is no
  orientation to apply) but still turns EXIF-rotated photos upright and never hands back a caller's
  image object or an image tied to the file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from kimchi_edge.runtime import preprocess
from kimchi_edge.runtime.manifest import Preprocessing
from kimchi_edge.runtime.preprocess import (
    Preprocessor,
    batch_resample_matrices,
    batch_resample_taps,
    decode_image,
    fastai_crop_box,
    resample,
)

from ..conftest import food10_root

#: (in_h, in_w, out_h, out_w, square, crop)
GEOMETRIES = {
    "460->224 square (the bundles' default; light area pre-filter)": (460, 460, 224, 224, True, 1.0),
    "non-square in, square crop": (384, 512, 224, 224, True, 1.0),
    "non-square out, crop 0.75": (300, 400, 160, 224, False, 0.75),
    "crop 0.5, no square": (333, 517, 96, 200, False, 0.5),
    "upsampling 100x80 -> 224": (100, 80, 224, 224, True, 1.0),
    "upsampling, non-square out": (37, 53, 61, 90, False, 1.0),
    "big reduction 1000x700 -> 128x160 (area pre-filter)": (1000, 700, 128, 160, False, 1.0),
    "big reduction 2000x1500 -> 224, square": (2000, 1500, 224, 224, True, 1.0),
    "identity size": (224, 224, 224, 224, True, 1.0),
    "one output pixel": (5, 3, 1, 1, False, 1.0),
}


def dense_reference(arr: np.ndarray, geometry: tuple) -> np.ndarray:
    """``R @ channel @ C`` per channel in float64 with the float32 matrices, clipped to [0, 255]."""
    rows, cols_t = batch_resample_matrices(*geometry)
    x = arr.astype(np.float64)
    out = np.stack([rows.astype(np.float64) @ x[..., c] @ cols_t.astype(np.float64) for c in range(x.shape[2])], axis=-1)
    return np.clip(out, 0, 255)


def tap_order_reference(arr: np.ndarray, taps) -> np.ndarray:
    """The plain formulation: float32 ``sum_k w[:, k] * x[idx[:, k]]``, k = 0, 1, ..., rows then columns."""
    (ri, rw), (ci, cw) = taps
    x = arr.astype(np.float32)
    y = x[ri[:, 0]] * rw[:, 0, None, None]
    for k in range(1, ri.shape[1]):
        y = y + rw[:, k, None, None] * x[ri[:, k]]
    z = y[:, ci[:, 0]] * cw[None, :, 0, None]
    for k in range(1, ci.shape[1]):
        z = z + cw[None, :, k, None] * y[:, ci[:, k]]
    return np.clip(z, 0, 255)


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)  # photo-like blobs ...
    big = np.asarray(Image.fromarray(smooth).resize((w, h), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-40, 41, (h, w, 3))  # ... plus noise, and the extremes 0 and 255
    return np.clip(big + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_resample_equals_the_dense_matrix_product(name):
    geometry = GEOMETRIES[name]
    in_h, in_w, out_h, out_w = geometry[:4]
    taps = batch_resample_taps(*geometry)
    for seed in range(3):
        arr = random_image(in_h, in_w, seed)
        before = arr.copy()
        out = resample(arr, taps)
        assert out.dtype == np.float32 and out.shape == (out_h, out_w, 3)
        ref = dense_reference(arr, geometry)
        assert np.abs(out - ref).max() <= 1e-3, name
        assert np.array_equal(arr, before)  # the input is not touched
        rounded = resample(arr, taps, "uint8")
        assert rounded.dtype == np.uint8 and rounded.shape == (out_h, out_w, 3)
        assert np.abs(rounded.astype(np.int16) - np.rint(ref)).max() <= 1  # .5 ties may round either way
        assert np.mean(rounded == np.rint(ref)) > 0.99


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_resample_is_bit_identical_to_the_tap_order_formulation(name):
    geometry = GEOMETRIES[name]
    taps = batch_resample_taps(*geometry)
    arr = random_image(geometry[0], geometry[1], seed=7)
    want = tap_order_reference(arr, taps)
    for x in (arr, arr.astype(np.float32), arr.astype(np.int32),  # network_pixels passes float32 batches
              np.ascontiguousarray(arr.transpose(2, 0, 1)).transpose(1, 2, 0)):  # a non-contiguous (NCHW) view
        got = resample(x, taps)
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name


def test_the_big_reductions_really_use_the_area_pre_filter():
    # bilinear alone has 2 taps per output; the area pre-filter makes them wider (and uneven)
    for name in ("big reduction 1000x700 -> 128x160 (area pre-filter)", "big reduction 2000x1500 -> 224, square"):
        (ri, rw), (ci, _) = batch_resample_taps(*GEOMETRIES[name])
        assert ri.shape[1] > 2 and ci.shape[1] > 2
        assert len(set((rw != 0).sum(axis=1).tolist())) > 1  # some rows have a zero-padded last tap


def test_resample_single_channel_and_fresh_outputs():
    geometry = GEOMETRIES["non-square out, crop 0.75"]
    taps = batch_resample_taps(*geometry)
    arr = random_image(geometry[0], geometry[1], seed=3)
    grey = np.ascontiguousarray(arr[..., :1])
    assert np.array_equal(resample(grey, taps)[..., 0], resample(arr, taps)[..., 0])
    a, b = resample(arr, taps), resample(arr, taps)
    assert a is not b and not np.shares_memory(a, b)
    a[...] = -1  # the caller owns its output: the next call is not affected
    assert np.array_equal(resample(arr, taps), b)


def test_resample_refuses_an_image_smaller_than_its_taps():
    taps = batch_resample_taps(*GEOMETRIES["460->224 square (the bundles' default; light area pre-filter)"])
    with pytest.raises(ValueError):
        resample(np.zeros((300, 460, 3), np.uint8), taps)
    with pytest.raises(ValueError):
        resample(np.zeros((460, 460), np.uint8), taps)


# --------------------------------------------------------------------------- decode


def upright_pattern(w: int = 48, h: int = 32) -> Image.Image:
    """Four flat quadrants (red, green / blue, white): each rotation or flip puts a different colour top-left."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (230, 20, 20)
    a[: h // 2, w // 2 :] = (20, 200, 20)
    a[h // 2 :, : w // 2] = (20, 20, 230)
    a[h // 2 :, w // 2 :] = (250, 250, 250)
    return Image.fromarray(a)


def jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def quadrant_means(im: Image.Image) -> np.ndarray:
    a = np.asarray(im, dtype=np.float64)
    h, w = a.shape[0] // 2, a.shape[1] // 2
    quads = (a[:h, :w], a[:h, w:], a[h:, :w], a[h:, w:])
    return np.stack([q[2:-2, 2:-2].reshape(-1, 3).mean(axis=0) for q in quads])  # away from the JPEG edges


@pytest.mark.parametrize("orientation, stored_from_upright", [
    (6, Image.Transpose.ROTATE_90),  # the camera was turned: stored 90 degrees off, displayed after ROTATE_270
    (3, Image.Transpose.ROTATE_180),
    (8, Image.Transpose.ROTATE_270),
    (2, Image.Transpose.FLIP_LEFT_RIGHT),
])
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, orientation, stored_from_upright):
    upright = upright_pattern()
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(upright.transpose(stored_from_upright), exif=exif)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    want = quadrant_means(upright)
    for src in (data, path, bytearray(data), Image.open(io.BytesIO(data))):
        out = decode_image(src)
        assert out.mode == "RGB" and out.size == upright.size
        assert np.abs(quadrant_means(out) - want).max() < 12
    with Image.open(path) as im:  # exactly what Pillow's own transpose gives
        assert np.array_equal(np.asarray(decode_image(path)), np.asarray(ImageOps.exif_transpose(im)))


def spy(monkeypatch):
    calls = {"exif_transpose": 0, "copy": 0}
    real_transpose, real_copy = ImageOps.exif_transpose, Image.Image.copy

    def exif_transpose(im, **kw):
        calls["exif_transpose"] += 1
        return real_transpose(im, **kw)

    def copy(self):
        calls["copy"] += 1
        return real_copy(self)

    monkeypatch.setattr(preprocess.ImageOps, "exif_transpose", exif_transpose)
    monkeypatch.setattr(Image.Image, "copy", copy)
    return calls


@pytest.mark.parametrize("exif_orientation", [None, 1, 0])
def test_upright_jpeg_is_not_copied(tmp_path, monkeypatch, exif_orientation):
    upright = upright_pattern(64, 40)
    kw = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif
    path = tmp_path / "upright.jpg"
    path.write_bytes(jpeg(upright, **kw))
    with Image.open(path) as im:
        want = np.asarray(im.convert("RGB"))
    calls = spy(monkeypatch)
    for src in (path, path.read_bytes()):
        out = decode_image(src)
        assert out.size == (64, 40) and out.mode == "RGB"
        assert np.array_equal(np.asarray(out), want)
        assert getattr(out, "fp", None) is None  # detached from the file, still readable after it was closed
    assert calls == {"exif_transpose": 0, "copy": 0}  # the fast path: no transpose, no pixel copy


def test_rotated_jpeg_still_goes_through_exif_transpose(monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg(upright_pattern().transpose(Image.Transpose.ROTATE_90), exif=exif)
    calls = spy(monkeypatch)
    assert decode_image(data).size == upright_pattern().size
    assert calls["exif_transpose"] == 1


def test_a_pil_image_input_is_never_handed_back_itself():
    src = upright_pattern()
    out = decode_image(src)
    assert out is not src and np.array_equal(np.asarray(out), np.asarray(src))
    out.paste((0, 0, 0), (0, 0, 10, 10))
    assert np.asarray(src)[0, 0].tolist() == [230, 20, 20]  # the caller's image is untouched


@pytest.mark.parametrize("exif_bytes", [b"Exif\x00\x00garbage-not-a-tiff-header", b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff"])
def test_broken_exif_is_ignored(exif_bytes):
    data = jpeg(upright_pattern(), exif=exif_bytes)
    out = decode_image(data)
    assert out.size == upright_pattern().size
    assert np.abs(quadrant_means(out) - quadrant_means(upright_pattern())).max() < 12


def test_animated_gif_first_frame_and_palette_images():
    frames = [Image.new("RGB", (20, 10), c) for c in ((250, 0, 0), (0, 0, 250))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = decode_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (20, 10)
    r, _, b = np.asarray(out, dtype=np.int16).reshape(-1, 3).mean(axis=0)
    assert r > 200 and b < 50


# --------------------------------------------------------------------------- whole


def _photos(tmp_path: Path) -> list[Path]:
    root = food10_root()
    if root is not None:
        files = sorted((root / "valid").rglob("*.jpg"))
        return files[:: max(1, len(files) // 6)][:6]
    from kimchi_edge.runtime.bench_cli import photo_like_jpeg

    out = []
    for i, (w, h) in enumerate([(512, 384), (512, 512), (384, 512)]):
        out.append(tmp_path / f"{i}.jpg")
        out[-1].write_bytes(photo_like_jpeg(w, h, seed=i))
    return out


def test_preprocessor_equals_the_straightforward_pipeline(tmp_path):
    spec = Preprocessing(height=224, width=224, resize_height=460, resize_width=460, batch_resize=True, batch_crop=1.0,
                         mean=(0.5,) * 3, std=(0.5,) * 3, dtype="float32")
    pre = Preprocessor(spec, fast_decode=False)
    taps = batch_resample_taps(460, 460, 224, 224, True, 1.0)
    for path in _photos(tmp_path):
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
        box = fastai_crop_box(im.width, im.height, 460, 460)
        item = np.asarray(im.crop(box).resize((460, 460), Image.BILINEAR), dtype=np.uint8)
        got = pre(path)
        assert got.dtype == np.float32 and got.shape == (224, 224, 3)
        assert np.array_equal(got.view(np.uint32), tap_order_reference(item, taps).view(np.uint32))
        assert np.abs(got - dense_reference(item, (460, 460, 224, 224, True, 1.0))).max() <= 1e-3
