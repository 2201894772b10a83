"""Bundles for the demo tests, made from the shared colour bundle (``tests/conftest.py``)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Mapping

from kimchi_edge.runtime.manifest import read_manifest, write_manifest

#: The gate's figures recorded on the colour bundle's one artifact (as convert's gate writes them).
VERDICT = {"status": "pass", "top1": 0.912, "delta_points": -0.25, "agreement": 0.987}
#: ``manifest.gate`` for it.
GATE = {"passed": True, "images": 120, "artifacts": {"onnx-fp32": {"status": "pass"}}}


def gated_copy(src: Path, dst: Path, gate: Mapping[str, Any] = GATE, verdict: Mapping[str, Any] = VERDICT) -> Path:
    """Copy the bundle ``src`` to ``dst`` with an accuracy-gate run recorded in its manifest."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    art = dataclasses.replace(m.artifacts[0], details={"gate": dict(verdict)})
    write_manifest(dst, m.replace(artifacts=(art,), gate=dict(gate)))
    return dst
