"""Encoded test images for the demo tests: every colour mode a phone or a user might send, and bad files."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (20, 40, 230)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(rgb: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    return encode(Image.new("RGB", size, rgb), "JPEG", quality=95)


def png_rgba(rgba: tuple[int, int, int, int], size: tuple[int, int] = (64, 64)) -> bytes:
    return encode(Image.new("RGBA", size, rgba), "PNG")


def jpeg_cmyk(cmyk: tuple[int, int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    return encode(Image.new("CMYK", size, cmyk), "JPEG", quality=95)


def png_16bit_grey(value: int = 50000, size: tuple[int, int] = (40, 30)) -> bytes:
    im = Image.fromarray(np.full(size[::-1], value, dtype=np.uint16))
    return encode(im, "PNG")


def gif_palette(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 40)) -> bytes:
    return encode(Image.new("RGB", size, rgb).convert("P"), "GIF")


def truncated_jpeg(rgb: tuple[int, int, int] = RED) -> bytes:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)), "JPEG")
    return data[: len(data) // 3]


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny file whose header claims ``width`` x ``height`` pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
