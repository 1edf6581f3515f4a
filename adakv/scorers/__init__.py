"""Scorers: which tokens matter, per (sequence, KV head)."""

from __future__ import annotations

from .base import Scorer, ScoreInputs, window_attention
from .snapkv import SnapKV

SCORERS: dict[str, type[Scorer]] = {"snapkv": SnapKV}


def get_scorer(spec: str | Scorer) -> Scorer:
    """Resolve a scorer name or instance."""
    if isinstance(spec, Scorer):
        return spec
    if isinstance(spec, str):
        try:
            return SCORERS[spec.lower()]()
        except KeyError:
            raise ValueError(f"Unknown scorer {spec!r}. Valid names: {', '.join(sorted(SCORERS))}.") from None
    raise TypeError(f"scorer must be a name ({', '.join(sorted(SCORERS))}) or a Scorer instance, got {type(spec).__name__}.")


__all__ = ["SCORERS", "Scorer", "ScoreInputs", "SnapKV", "get_scorer", "window_attention"]
