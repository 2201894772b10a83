"""Hostile and unusual inputs: each one gets a typed error saying what was received and what was expected,
or is handled correctly (first frame, EXIF orientation, colour modes).  Nothing crashes or hangs."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from kimchi_edge.runtime import Classifier, ImageTooLargeError, InvalidInputError, KimchiEdgeError, decode_image
from tests.conftest import COLOR_LABELS

RED, GREEN, BLUE = COLOR_LABELS


@pytest.fixture(scope="module")
def clf(color_bundle):
    with Classifier.from_bundle(color_bundle, backend="onnxruntime") as c:
        yield c


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(size=(96, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    arr[..., 0] = 230  # red dominant, so the colour model still says red
    arr[..., 1:] //= 4
    return Image.fromarray(arr, "RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` but carries (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- undecodable input


def test_garbage_bytes(clf):
    with pytest.raises(InvalidInputError, match=r"14 bytes is not an image Pillow can decode \(JPEG, PNG"):
        clf.predict(b"\x00\x01not an image")


def test_zero_bytes_and_zero_byte_file(clf, tmp_path):
    with pytest.raises(InvalidInputError, match="received 0 bytes; expected an encoded image"):
        clf.predict(b"")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(InvalidInputError, match=r"empty.jpg is an empty \(0-byte\) file; expected an image"):
        clf.predict(empty)


def test_truncated_jpeg(clf):
    data = encode(photo((400, 300)), "JPEG", quality=95)
    with pytest.raises(InvalidInputError, match=r"bytes is a damaged or truncated image"):
        clf.predict(data[: len(data) // 2])


def test_truncated_file_opened_lazily_by_the_caller(clf, tmp_path):
    path = tmp_path / "cut.png"
    data = encode(photo((400, 300)), "PNG")
    path.write_bytes(data[: len(data) // 3])
    with Image.open(path) as lazy:  # header parsed, pixels not yet decoded
        with pytest.raises(InvalidInputError, match="PIL image .* could not be decoded"):
            clf.predict(lazy)


def test_text_file_named_jpg(clf, tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("김치 is not a picture\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match=r"file '.*notes\.jpg' is not an image Pillow can decode"):
        clf.predict(path)


def test_missing_file_and_unsupported_types(clf, tmp_path):
    with pytest.raises(InvalidInputError, match="no such image file: .*nowhere.png"):
        clf.predict(tmp_path / "nowhere.png")
    for bad, name in ((None, "NoneType"), (42, "int"), ([b"x"], "list")):
        with pytest.raises(InvalidInputError, match=rf"cannot read an image from a {name}; expected a path, bytes, a PIL image or an HxWx3 uint8 array"):
            clf.predict(bad)


# --------------------------------------------------------------------------- size limits and geometry


def test_decompression_bomb_is_refused_before_decoding(clf):
    bomb = png_header_only(50_000, 50_000)  # 2.5 gigapixels declared, ~100 bytes sent
    with pytest.raises(ImageTooLargeError, match=r"is 50000x50000 = 2,500,000,000 pixels, over the limit of 80,000,000 pixels \(refused before decoding"):
        clf.predict(bomb)  # a decode attempt would have said "truncated" instead


def test_pixel_limit_is_configurable(color_bundle):
    im = Image.new("RGB", (100, 50), (250, 0, 0))
    with Classifier.from_bundle(color_bundle, max_pixels=4_999) as strict:
        with pytest.raises(ImageTooLargeError, match="100x50 = 5,000 pixels, over the limit of 4,999 pixels"):
            strict.predict(encode(im, "PNG"))
        with pytest.raises(ImageTooLargeError):
            strict.predict(im)
    with Classifier.from_bundle(color_bundle, max_pixels=5_000) as ok:
        assert ok.predict(encode(im, "PNG")).label == RED
    with Classifier.from_bundle(color_bundle, max_pixels=None) as unlimited:
        assert unlimited.predict(im).label == RED


@pytest.mark.parametrize("size", [(1, 1), (10000, 3), (3, 10000), (10000, 1), (1, 10000), (2, 2)])
def test_tiny_and_extremely_elongated_images(clf, size):
    im = Image.new("RGB", size, (10, 10, 240))  # blue: a black (empty) result would read as red
    assert clf.predict(encode(im, "PNG")).label == BLUE
    assert clf.predict(im).label == BLUE


def test_centre_crop_box_is_never_empty():
    from kimchi_edge.runtime.preprocess import fastai_crop_box

    for target in range(1, 400):
        for w, h in ((10000, 1), (1, 10000), (10000, 3), (1, 1)):
            left, top, right, bottom = fastai_crop_box(w, h, target, target)
            assert right - left >= 1 and bottom - top >= 1, (w, h, target)


def test_animated_gif_uses_the_first_frame(clf):
    frames = [Image.new("RGB", (32, 32), c) for c in ((240, 10, 10), (10, 10, 240), (10, 240, 10))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert clf.predict(data).label == RED
    webp = encode(frames[2], "WEBP", save_all=True, append_images=frames[:2], duration=50, lossless=True)
    assert clf.predict(webp).label == GREEN


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (60, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 30, 40))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge becomes the top
    data = encode(stored, "JPEG", quality=95, exif=exif)
    upright = decode_image(data)
    assert upright.size == (40, 60)
    top, bottom = np.asarray(upright)[5, 20], np.asarray(upright)[55, 20]
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    assert decode_image(encode(stored, "JPEG", quality=95)).size == (60, 40)  # no EXIF: unchanged


def test_broken_exif_does_not_make_a_readable_photo_unreadable(clf):
    exif = Image.Exif()
    exif[0x0112] = 99  # not a valid orientation
    data = encode(Image.new("RGB", (40, 30), (240, 10, 10)), "JPEG", exif=exif)
    assert clf.predict(data).label == RED


def test_large_jpeg_is_not_decoded_at_full_size():
    data = encode(photo((4000, 3000)), "JPEG", quality=80)
    small = decode_image(data, draft=(40, 40))
    assert min(small.size) >= 40 and small.size[0] <= 4000 // 4, small.size
    assert decode_image(data).size == (4000, 3000)


# --------------------------------------------------------------------------- colour modes


def test_colour_modes_become_rgb():
    cases = {
        "L": (Image.new("L", (8, 8), 200), (200, 200, 200)),
        "1": (Image.new("1", (8, 8), 1), (255, 255, 255)),
        "LA transparent": (Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)),
        "RGBA transparent": (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), (255, 255, 255)),
        "RGBA opaque": (Image.new("RGBA", (8, 8), (255, 0, 0, 255)), (255, 0, 0)),
        "RGBA half": (Image.new("RGBA", (8, 8), (255, 0, 0, 128)), (255, 127, 127)),
    }
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    cases["P"] = (pal, (250, 10, 10))
    ptrans = pal.copy()
    ptrans.info["transparency"] = 1
    cases["P transparent"] = (ptrans, (255, 255, 255))
    for name, (im, expected) in cases.items():
        for src in (im, encode(im, "PNG")):
            out = decode_image(src)
            assert out.mode == "RGB", name
            got = np.asarray(out)[4, 4]
            assert np.abs(got.astype(int) - expected).max() <= 2, (name, got, expected)


def test_cmyk_jpeg_becomes_rgb(clf):
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red ink
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert out.mode == "RGB"
    r, g, b = np.asarray(out)[16, 16]
    assert r > 200 and g < 60 and b < 60
    assert clf.predict(data).label == RED


def test_sixteen_bit_png_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    arr[:4] = 65535
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(decode_image(data))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[6, 0]) == (128, 128, 128)


def test_sixteen_bit_rgb_png_and_tiff_read(clf):
    im = Image.new("RGB", (16, 16), (10, 240, 10))
    for fmt in ("TIFF", "BMP", "PPM", "WEBP"):
        assert clf.predict(encode(im, fmt)).label == GREEN, fmt


# --------------------------------------------------------------------------- arrays


@pytest.mark.parametrize("shape, fragment", [
    ((4, 4), r"got an array of shape \(4, 4\); expected \(height, width, 3\) RGB"),
    ((8, 8, 4), r"got an array of shape \(8, 8, 4\); expected \(height, width, 3\) RGB"),
    ((3, 8, 8), r"got an array of shape \(3, 8, 8\); expected \(height, width, 3\) RGB"),
    ((1, 8, 8, 3), r"got an array of shape \(1, 8, 8, 3\); expected \(height, width, 3\) RGB"),
    ((0, 8, 3), r"got an empty array of shape \(0, 8, 3\)"),
])
def test_arrays_of_the_wrong_shape(clf, shape, fragment):
    with pytest.raises(InvalidInputError, match=fragment):
        clf.predict(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("dtype", [np.int64, np.int16, np.uint16, np.bool_, np.complex64, object])
def test_arrays_of_the_wrong_dtype(clf, dtype):
    with pytest.raises(InvalidInputError, match=r"got an array of dtype .*; expected uint8 \(0-255\) or float \(0-1\)"):
        clf.predict(np.zeros((8, 8, 3), dtype=dtype))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_arrays_with_nan_or_inf(clf, bad):
    arr = np.full((8, 8, 3), 0.5, dtype=np.float32)
    arr[3, 3, 1] = bad
    with pytest.raises(InvalidInputError, match="got a float array with NaN or infinite values; expected finite RGB in \\[0, 1\\]"):
        clf.predict(arr)


def test_float_arrays_in_and_out_of_range(clf):
    arr = np.zeros((8, 8, 3), dtype=np.float64)
    arr[..., 2] = 0.95
    assert clf.predict(arr).label == BLUE
    with pytest.raises(InvalidInputError, match=r"values in \[0, 255\]; expected \[0, 1\] \(or pass uint8\)"):
        clf.predict(np.where(arr > 0, 255.0, 0.0))  # 0-255 floats: a common mistake


def test_uint8_arrays_any_layout_in_memory(clf):
    arr = np.zeros((30, 20, 3), dtype=np.uint8)
    arr[..., 1] = 240
    assert clf.predict(arr).label == GREEN
    assert clf.predict(np.asfortranarray(arr)).label == GREEN
    assert clf.predict(arr[::2, ::-1]).label == GREEN  # non-contiguous view


def test_preprocessed_batch_of_the_wrong_shape(clf):
    with pytest.raises(InvalidInputError, match=r"got a batch of shape \(2, 31, 32, 3\); expected \(N, 32, 32, 3\)"):
        clf.infer_array(np.zeros((2, 31, 32, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- nothing else escapes


def test_mutated_files_raise_only_invalid_input():
    """Bounded fuzzing: random byte flips and truncations of seven formats never raise anything untyped."""
    rng = np.random.default_rng(1234)
    base = photo((48, 32))
    seeds = [encode(base, fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "ICO")]
    outcomes = {"decoded": 0, "refused": 0}
    for data in seeds:
        for _ in range(60):
            d = bytearray(data)
            for _ in range(int(rng.integers(1, 8))):
                d[int(rng.integers(0, len(d)))] = int(rng.integers(0, 256))
            if rng.random() < 0.3:
                d = d[: int(rng.integers(1, len(d)))]
            try:
                with warnings.catch_warnings():  # Pillow warns about odd TIFF tags; not our concern here
                    warnings.simplefilter("ignore")
                    decode_image(bytes(d), max_pixels=4_000_000)
                outcomes["decoded"] += 1
            except InvalidInputError:
                outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["decoded"] > 0, outcomes


def test_every_input_error_is_a_kimchi_edge_error():
    assert issubclass(InvalidInputError, KimchiEdgeError)
    assert issubclass(ImageTooLargeError, InvalidInputError)
