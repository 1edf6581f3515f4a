"""StreamingLLM scorer (attention sinks + recent tokens)."""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer


class StreamingLLM(Scorer):
    """StreamingLLM: keep the first ``sinks`` tokens (attention sinks) and the most recent ones.

    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
    (arXiv:2309.17453). Score: +inf for the tokens at positions < ``sinks`` (the sequence's first
    real tokens), else the position (later = higher), so a budget keeps sinks + the most recent
    tokens (a float budget is never below ``sinks`` per head: ``pinned_positions``; an int budget below
    it keeps that many of them). Positions, not columns: after a first prompt chunk the sinks stay sinks.
    """

    name = "streamingllm"

    def __init__(self, sinks: int = 4):
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"StreamingLLM sinks must be an int >= 0, got {sinks!r}.")
        self.sinks = sinks

    @property
    def pinned_positions(self) -> int:
        return self.sinks

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        pos = inputs.positions
        scores = pos.float().masked_fill((pos >= 0) & (pos < self.sinks), float("inf"))
        return scores.masked_fill(~inputs.valid, float("-inf"))
