"""Scorers: which tokens matter, per (sequence, KV head). One method per file."""

from __future__ import annotations

from .base import ContextScorer, PassAttention, ScoreInputs, Scorer, ScoringPass, StagedScores, window_attention
from .criticalkv import CriticalKV
from .defensivekv import DefensiveKV
from .expected_attention import ExpectedAttention
from .h2o import H2O
from .knorm import KeyNorm
from .kvzip import KVzip
from .random_scores import Random
from .snapkv import SnapKV
from .streamingllm import StreamingLLM
from .tova import TOVA

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (SnapKV, H2O, CriticalKV, DefensiveKV, ExpectedAttention, StreamingLLM, KeyNorm, TOVA, Random, KVzip)
}


def get_scorer(spec: str | Scorer) -> Scorer:
    """Resolve a scorer name or instance."""
    if isinstance(spec, Scorer):
        return spec
    if isinstance(spec, str):
        try:
            return SCORERS[spec.lower()]()
        except KeyError:
            raise ValueError(f"Unknown scorer {spec!r}. Valid names: {', '.join(sorted(SCORERS))}.") from None
    raise TypeError(
        f"scorer must be a name ({', '.join(sorted(SCORERS))}) or a Scorer instance, got {type(spec).__name__}."
    )


__all__ = [
    "SCORERS",
    "TOVA",
    "ContextScorer",
    "PassAttention",
    "ScoringPass",
    "CriticalKV",
    "DefensiveKV",
    "ExpectedAttention",
    "H2O",
    "KVzip",
    "KeyNorm",
    "Random",
    "ScoreInputs",
    "Scorer",
    "SnapKV",
    "StagedScores",
    "StreamingLLM",
    "get_scorer",
    "window_attention",
]
