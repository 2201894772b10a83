"""Training screening applies the runtime's decode limits: a decompression bomb dropped into a class folder is
left out (with the reason that lands in ``split.json``'s ``excluded``), refused from its header, never decoded."""

from __future__ import annotations

import time

from PIL import Image

from kimchi_edge.train.data import scan_dataset
from tests.runtime.test_decode_limits import png_header


def test_a_30000_by_30000_png_in_a_class_folder_is_excluded_not_trained_on(tmp_path):
    for label, rgb in (("배추김치", (200, 30, 30)), ("오이 소박이", (30, 200, 30))):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), rgb).save(tmp_path / label / f"{i}.png")
    bomb = tmp_path / "배추김치" / "huge.png"
    bomb.write_bytes(png_header(30_000, 30_000))  # 2.7 GB of RGB once decoded, ~100 bytes on disk
    rgba = tmp_path / "오이 소박이" / "big-rgba.png"
    rgba.write_bytes(png_header(8_000, 8_000, colour_type=6))  # 64 MP: under the pixel limit, over the decoded-memory bound

    t0 = time.perf_counter()
    scan = scan_dataset(tmp_path, workers=2)
    took = time.perf_counter() - t0

    trained = {scan.relative(p) for p, _ in scan.train + scan.valid + scan.test}
    assert "배추김치/huge.png" not in trained and "오이 소박이/big-rgba.png" not in trained
    assert len(trained) == 6
    reasons = {e["file"]: e["reason"] for e in scan.excluded}
    assert set(reasons) == {"배추김치/huge.png", "오이 소박이/big-rgba.png"}
    assert "30000x30000 = 900,000,000 pixels, over the limit of 80,000,000 pixels" in reasons["배추김치/huge.png"]
    assert "RGBA 8000x8000: decoding it would take about 576 MB" in reasons["오이 소박이/big-rgba.png"]
    assert took < 30, f"screening took {took:.1f} s: was something decoded?"
