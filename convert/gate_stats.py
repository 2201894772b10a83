"""The gate's statistics: accuracy, agreement and their 95 % intervals (numpy only, no policy).

Wilson intervals for proportions; for the paired accuracy difference, Wilson intervals of the discordant
pairs combined by MOVER (images both sides get right, or both get wrong, cancel).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["compare", "paired_difference_interval", "wilson_interval"]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n``."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference_interval(cand: np.ndarray, ref: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Interval of ``mean(cand) - mean(ref)`` for paired 0/1 outcomes on the same images.

    The difference is ``(b - c) / n`` where ``b`` counts images only the candidate gets right and
    ``c`` those only the reference gets right; everything else cancels.  The interval combines the
    Wilson intervals of ``b / n`` and ``c / n`` by MOVER (Zou & Donner's "method of variance estimates
    recovery", Newcombe's square-and-add).  It stays honest when the two agree on every image: with
    no discordant pair in ``n`` images it is about ``±(3.84 / n)`` (the Wilson bound of 0 / n), not
    the degenerate ``[0, 0]`` of a bootstrap.
    """
    cand, ref = np.asarray(cand, bool), np.asarray(ref, bool)
    n = len(cand)
    if n == 0:
        return (-1.0, 1.0)
    b = int(np.sum(cand & ~ref))
    c = int(np.sum(~cand & ref))
    pb, pc = b / n, c / n
    lb, ub = wilson_interval(b, n, z)
    lc, uc = wilson_interval(c, n, z)
    delta = pb - pc
    lo = delta - math.sqrt((pb - lb) ** 2 + (uc - pc) ** 2)
    hi = delta + math.sqrt((ub - pb) ** 2 + (pc - lc) ** 2)
    return (max(-1.0, lo), min(1.0, hi))


def compare(ref_probs: np.ndarray, cand_probs: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """All gate metrics of one candidate against the reference (fractions, not percent)."""
    n = len(targets)
    ref_pred, cand_pred = ref_probs.argmax(1), cand_probs.argmax(1)
    ref_ok, cand_ok = ref_pred == targets, cand_pred == targets
    agree = cand_pred == ref_pred
    dp = np.abs(cand_probs - ref_probs)
    per_class = {}
    for i, lab in enumerate(labels):
        m = targets == i
        k = int(m.sum())
        ra = float(ref_ok[m].mean()) if k else float("nan")
        ca = float(cand_ok[m].mean()) if k else float("nan")
        per_class[lab] = {"n": k, "reference_top1": ra, "top1": ca, "delta": ca - ra if k else float("nan")}
    delta = float(cand_ok.mean() - ref_ok.mean())
    return {
        "n": n,
        "top1": float(cand_ok.mean()),
        "top1_interval": wilson_interval(int(cand_ok.sum()), n),
        "delta": delta,
        "delta_interval": paired_difference_interval(cand_ok, ref_ok),
        "agreement": float(agree.mean()),
        "agreement_interval": wilson_interval(int(agree.sum()), n),
        "disagreements": int((~agree).sum()),
        "max_abs_dprob": float(dp.max()) if dp.size else 0.0,
        "mean_abs_dprob": float(dp.mean()) if dp.size else 0.0,
        "per_class": per_class,
    }
