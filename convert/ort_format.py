"""ONNX -> ONNX Runtime's own mobile format (``.ort``) and the operator list for a reduced ONNX Runtime build.

Uses ONNX Runtime's converter (``python -m onnxruntime.tools.convert_onnx_models_to_ort``), the tool its docs
name for Android/iOS apps: ``Fixed`` optimisation style for ``--target_platform arm`` by default (what a phone's CPU
runs; NNAPI/CoreML apps want ``Runtime`` style, see docs/MOBILE.md).  The ``.ort`` file is gated like every other
artifact: ONNX Runtime on this machine runs it, the gate compares it with the learner.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import ConversionError

ORT_FILE = "model.ort"
OPS_CONFIG = "model.required_operators.config"


def ort_from_onnx(onnx_path: Path, bundle: Path, *, style: str = "Fixed", target_platform: str = "arm",
                  timeout_s: float = 600) -> dict:
    """Write ``bundle/model.ort`` and ``bundle/model.required_operators.config`` from ``onnx_path``.

    Returns:
        Details for the manifest entry (style, target platform, operator config file, the operators).

    Raises:
        ConversionError: the converter failed (its last line says why).
    """
    if style not in ("Fixed", "Runtime"):
        raise ValueError(f"style must be 'Fixed' or 'Runtime', got {style!r}")
    with tempfile.TemporaryDirectory(prefix="kimchi-ort-") as tmp:
        src = Path(tmp) / "model.onnx"
        shutil.copyfile(onnx_path, src)
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(src), "--output_dir", str(out),
               "--optimization_style", style, "--target_platform", target_platform]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        produced = sorted(out.glob("*.ort"))
        configs = sorted(out.glob("*.config"))
        if proc.returncode != 0 or not produced:
            last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            raise ConversionError(f"ONNX Runtime's .ort converter failed: {last[:300]}")
        shutil.copyfile(produced[0], bundle / ORT_FILE)
        ops = []
        if configs:
            shutil.copyfile(configs[0], bundle / OPS_CONFIG)
            ops = [line.strip() for line in (bundle / OPS_CONFIG).read_text(encoding="utf-8").splitlines()
                   if line.strip() and not line.startswith("#")]
    return {"optimization_style": style, "target_platform": target_platform,
            "required_operators_config": OPS_CONFIG if ops else None, "operators": ops,
            "converter": "onnxruntime.tools.convert_onnx_models_to_ort"}
