"""``kimchi_edge.runtime.sysinfo``: the one implementation of percentiles, memory, load average, libcuda and image suffixes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kimchi_edge.runtime import sysinfo
from tests.conftest import REPO


def test_percentiles_match_numpy():
    rng = np.random.default_rng(3)
    values = rng.lognormal(2.0, 0.6, 257).tolist()
    p = sysinfo.percentiles(values)
    want = np.percentile(values, [50, 90, 99])
    assert [p["p50"], p["p90"], p["p99"]] == pytest.approx(want.tolist(), rel=1e-12)
    assert p["mean"] == pytest.approx(float(np.mean(values)))
    assert (p["min"], p["max"], p["n"]) == (min(values), max(values), 257)
    assert all(type(p[k]) is float for k in ("p50", "p90", "p99", "mean", "min", "max")) and type(p["n"]) is int


def test_percentiles_of_few_samples_interpolate_like_numpy():
    assert sysinfo.percentiles([10.0, 20.0]) == {"p50": 15.0, "p90": 19.0, "p99": 19.9, "mean": 15.0, "min": 10.0, "max": 20.0, "n": 2}
    assert sysinfo.percentiles([7])["p99"] == 7.0


def test_percentiles_of_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        sysinfo.percentiles([])


@pytest.mark.skipif(not hasattr(os, "getloadavg"), reason="this OS has no load average")
def test_loadavg_is_three_non_negative_numbers():
    load = sysinfo.loadavg()
    assert len(load) == 3 and all(isinstance(x, float) and x >= 0 for x in load)
    if Path("/proc/loadavg").is_file():
        proc = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
        assert load == pytest.approx(proc, abs=0.5)  # same source, read a moment apart


def test_memory_now_and_peak_are_positive():
    mem = sysinfo.memory_mb()
    assert mem["VmHWM"] > 1
    assert sysinfo.peak_rss_mb() == pytest.approx(mem["VmHWM"], rel=0.5)
    if sys.platform.startswith("linux"):
        assert 1 < mem["VmRSS"] <= mem["VmHWM"] + 1e-6


def test_peak_rss_grows_when_memory_is_touched():
    """In a fresh process: 200 MiB written to -> the peak rises by about that much (not a constant, not KiB vs MiB)."""
    code = textwrap.dedent(
        """
        import json
        from kimchi_edge.runtime import sysinfo
        before = sysinfo.peak_rss_mb()
        block = bytearray(200 * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        print(json.dumps({"before": before, "after": sysinfo.peak_rss_mb()}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 150 < r["after"] - r["before"] < 400, r


def test_cuda_facts_always_have_the_three_keys():
    facts = sysinfo.cuda_device_facts()
    assert set(facts) == {"gpu", "compute_capability", "cuda_driver"}
    if sysinfo.load_libcuda() is None:
        assert facts == {"gpu": None, "compute_capability": None, "cuda_driver": None}
    if facts["compute_capability"] is not None:
        assert re.fullmatch(r"\d+\.\d+", facts["compute_capability"])
    assert sysinfo.can_load_library("libsurely-not-a-library-kimchi.so") is False


def test_every_stage_scans_the_same_image_suffixes():
    from kimchi_edge.runtime import predict_cli

    assert predict_cli.IMAGE_SUFFIXES is sysinfo.IMAGE_SUFFIXES
    assert all(s.startswith(".") and s == s.lower() for s in sysinfo.IMAGE_SUFFIXES)
    assert {".jpg", ".jpeg", ".png", ".webp"} <= sysinfo.IMAGE_SUFFIXES
    data = pytest.importorskip("kimchi_edge.train.data", reason="kimchi_edge.train imports without fastai only partly")
    assert data.IMAGE_SUFFIXES is sysinfo.IMAGE_SUFFIXES


#: Source text that means "another copy of a sysinfo helper".
TWINS = {
    "percentiles": re.compile(r"np\.percentile\(|numpy\.percentile\("),
    "peak RSS": re.compile(r"ru_maxrss|\"VmHWM:\"|'VmHWM:'|/proc/self/status"),
    "load average": re.compile(r"getloadavg|/proc/loadavg"),
    "libcuda": re.compile(r"libcuda\.so|nvcuda\.dll"),
    "image suffixes": re.compile(r"[\"']\.jpg[\"'][^\n]*[\"']\.png[\"']"),  # a list of image endings, not a JPEG check
}


def test_each_helper_exists_once():
    """No stage keeps its own copy of a sysinfo helper (the twins this module replaced)."""
    offenders = []
    for folder in ("runtime", "train", "convert", "bench", "mobile_demo", "kimchi_edge"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "sysinfo.py":
                continue
            text = path.read_text(encoding="utf-8")
            for what, pattern in TWINS.items():
                for m in pattern.finditer(text):
                    offenders.append(f"{path.relative_to(REPO)}: {what}: {m.group(0)}")
    assert offenders == []
