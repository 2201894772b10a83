"""``learn.model`` -> a traced TorchScript file (eval mode, float32 NCHW input already normalised).

Unlike the ONNX artifacts, the TorchScript file is the raw network: feed it
``kimchi_edge.runtime.preprocess.Preprocessor.normalize(batch)``.  torch is imported inside the functions, so
importing this module costs nothing and the gate can skip TorchScript where torch is absent.
"""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kimchi_edge.runtime.fsutil import atomic_write_bytes
from kimchi_edge.runtime.manifest import ModelMeta

from .errors import ConversionError


def torchscript_from_learner(learn: Any, meta: ModelMeta, out_path: str | Path) -> dict[str, Any]:
    """Trace ``learn.model`` (eval) and save it to ``out_path`` atomically.

    Args:
        learn: a fastai learner or a bare ``torch.nn.Module``.
        meta: gives the input size.
        out_path: the ``.pt`` file to write.

    Returns:
        Details for the manifest: input shape, torch version, seconds, the traced-vs-eager difference.

    Raises:
        ConversionError: tracing fails or the traced module disagrees with the eager one.
    """
    import torch

    t0 = time.perf_counter()
    model = getattr(learn, "model", learn).eval().cpu().float()
    pre = meta.preprocessing
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, pre.height, pre.width, generator=gen)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, example, check_trace=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"cannot trace {meta.architecture} to TorchScript: {first[:300]}") from exc
    with torch.no_grad():
        x = torch.randn(3, 3, pre.height, pre.width, generator=gen)
        eager = model(x)
        diff = float((traced(x) - eager).abs().max())
        scale = float(eager.abs().max())
    if diff > 1e-3 * max(1.0, scale):
        raise ConversionError(f"traced TorchScript disagrees with the eager model: max |Δlogit| {diff:.3g}")
    buf = io.BytesIO()
    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; the artifact is still what users ask for
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.save` is deprecated", category=FutureWarning)
        torch.jit.save(traced, buf)
    atomic_write_bytes(Path(out_path), buf.getvalue())
    return {"input_shape": ["N", 3, pre.height, pre.width], "traced_vs_eager_max_abs_diff": diff,
            "seconds": round(time.perf_counter() - t0, 2)}


def load_torchscript(path: str | Path, *, threads: int | None = None) -> Any:
    """Load a TorchScript artifact on the CPU in eval mode."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").eval()


def torchscript_logits(module: Any, batch: np.ndarray) -> np.ndarray:
    """Run a loaded TorchScript module on a float32 NCHW normalised batch; returns logits."""
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).float().numpy()
