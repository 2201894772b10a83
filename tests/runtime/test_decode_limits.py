"""Decode limits per call, not per process: Pillow's own bomb check stays on, the runtime's pixel limit and
decoded-memory bound (pixels x bytes per pixel of the real mode) refuse from the header, 16-bit images are
converted without float64 copies."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from kimchi_edge.runtime import ImageTooLargeError, InvalidInputError, Preprocessor, decode_image
from kimchi_edge.runtime.manifest import Preprocessing
from kimchi_edge.runtime.preprocess import DEFAULT_MAX_DECODE_BYTES, decode_bytes, to_rgb
from tests.conftest import REPO


def png_header(width: int, height: int, *, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` in the given colour type, with (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_importing_the_runtime_leaves_pillows_bomb_limit_alone():
    code = ("import PIL.Image as I; before = I.MAX_IMAGE_PIXELS\n"
            "import kimchi_edge.runtime, kimchi_edge.runtime.preprocess, kimchi_edge.runtime.server\n"
            "from kimchi_edge import Classifier\n"
            "assert before is not None and I.MAX_IMAGE_PIXELS == before, (before, I.MAX_IMAGE_PIXELS)\n"
            "print(I.MAX_IMAGE_PIXELS)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == Image.MAX_IMAGE_PIXELS


def test_an_image_over_pillows_own_limit_is_refused_with_our_error_even_without_our_pixel_limit():
    bomb = png_header(30_000, 30_000)
    with pytest.raises(ImageTooLargeError, match=r"is 30000x30000 = 900,000,000 pixels, over the limit of 80,000,000 pixels"):
        decode_image(bomb)
    with pytest.raises(ImageTooLargeError, match="900,000,000 pixels, over the limit"):
        decode_image(bomb, max_pixels=None)  # Pillow's protection is still on for us too


@pytest.mark.parametrize("colour_type, bit_depth, mode, per_pixel", [
    (6, 8, "RGBA", 9),     # decoded RGBA 4 + alpha 1 + white RGB background 4
    (0, 16, "I;16", 8),    # decoded 2 + 8-bit result 1 + its Pillow copy 1 + RGB 4
    (4, 8, "LA", 13),      # decoded 4 + RGBA 4 + alpha 1 + background 4
])
def test_decoded_memory_is_bounded_by_the_real_mode_before_decoding(colour_type, bit_depth, mode, per_pixel):
    data = png_header(8000, 8000, bit_depth=bit_depth, colour_type=colour_type)  # 64 MP: under the 80 MP pixel limit
    assert Image.open(io.BytesIO(data)).mode == mode
    need = 64_000_000 * per_pixel
    assert need > DEFAULT_MAX_DECODE_BYTES
    with pytest.raises(ImageTooLargeError, match=rf"is {mode} 8000x8000: decoding it would take about {need / 1e6:,.0f} MB "
                                                 rf"\({per_pixel} bytes per pixel\), over the limit of 320 MB \(refused before decoding"):
        decode_image(data)  # without the bound this would start a decode (and fail as "truncated")
    spec = Preprocessing(height=32, width=32, resize_height=32, resize_width=32, batch_resize=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ImageTooLargeError):  # the gate, calibration and spec checks decode through Preprocessor
        Preprocessor(spec).decode(data)


def test_rgb_at_the_same_size_fits_the_bound_and_is_decoded():
    data = png_header(8000, 8000)  # RGB, 4 bytes per pixel in Pillow: 256 MB <= 320 MB, so decoding starts (and fails)
    with pytest.raises(InvalidInputError, match="damaged or truncated") as info:
        decode_image(data)
    assert not isinstance(info.value, ImageTooLargeError)


def test_a_png_is_not_decoded_to_look_for_its_exif_before_the_bound(monkeypatch):
    """Pillow finds a PNG's EXIF block after the pixel data only by decoding it all: the bound must not ask first."""
    from PIL import PngImagePlugin

    loads = []
    real_load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: (loads.append(self.size), real_load(self))[1])
    im = Image.new("RGBA", (300, 200), (200, 10, 10, 128))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    with pytest.raises(ImageTooLargeError, match="RGBA 300x200"):
        decode_image(buf.getvalue(), max_decode_bytes=500_000)
    assert loads == [], "the PNG was decoded before the memory bound refused it"
    rotated = Image.new("RGB", (30, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 30x20, upright 20x30
    buf = io.BytesIO()
    rotated.save(buf, "PNG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 30)  # its orientation is still applied, after load


def test_the_bound_is_per_call():
    im = Image.new("RGBA", (300, 200), (200, 10, 10, 128))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    with pytest.raises(ImageTooLargeError, match=r"RGBA 300x200: decoding it would take about 1 MB \(9 bytes per pixel\)"):
        decode_image(buf.getvalue(), max_decode_bytes=500_000)
    assert decode_image(buf.getvalue(), max_decode_bytes=600_000).size == (300, 200)
    assert decode_image(buf.getvalue(), max_decode_bytes=None).mode == "RGB"
    assert decode_bytes((300, 200), "RGB") == 300 * 200 * 4


def test_sixteen_bit_conversion_is_exact_and_allocates_no_float64_copy():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = np.asarray(to_rgb(Image.fromarray(values)))[..., 0]
    expected = np.clip(np.rint(values.astype(np.float64) / 65535.0 * 255.0), 0, 255).astype(np.uint8)  # the old conversion
    assert np.array_equal(out, expected)

    big = Image.fromarray(np.full((2000, 2000), 40000, dtype=np.uint16))  # 4 MP: a float64 copy is 32 MB
    tracemalloc.start()
    try:
        rgb = to_rgb(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rgb.getpixel((5, 5)) == (156, 156, 156)
    assert peak < 2 * 4_000_000, f"numpy peak {peak / 1e6:.1f} MB while converting a 4 MP 16-bit image"


def test_transparent_images_are_composited_on_white_as_before():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (60, 80, 4), dtype=np.uint8)
    a[:5, :, 3], a[5:10, :, 3] = 0, 255
    for mode in ("RGBA", "LA"):
        im = Image.fromarray(a, "RGBA").convert(mode)
        rgba = im.convert("RGBA")
        old = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba).convert("RGB")
        assert np.array_equal(np.asarray(to_rgb(im)), np.asarray(old)), mode


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_buffers_decode_without_a_copy(kind):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(buf, "PNG")
    assert decode_image(kind(buf.getvalue())).getpixel((1, 1)) == (10, 200, 10)
    with pytest.raises(InvalidInputError, match="is not an image Pillow can decode"):
        decode_image(kind(b"not an image at all"))
