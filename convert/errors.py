"""Errors of the convert stage: both are :class:`kimchi_edge.runtime.errors.KimchiEdgeError`, so the CLI prints one line."""

from __future__ import annotations

from kimchi_edge.runtime.errors import KimchiEdgeError, UsageError


class LearnerError(UsageError):
    """``learner.pkl`` is missing, corrupt, or needs code that is not importable here (exit 2)."""


class ConversionError(KimchiEdgeError):
    """The model cannot be turned into an artifact (an unexportable op, a graph that fails its checks)."""
