"""StreamingLLM scorer (attention sinks + recent tokens)."""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer


class StreamingLLM(Scorer):
    """StreamingLLM: keep the first ``sinks`` tokens (attention sinks) and the most recent ones.

    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
    (arXiv:2309.17453). Score: +inf for the first ``sinks`` real tokens, else the position
    (later = higher), so any budget keeps sinks + the most recent tokens.
    """

    name = "streamingllm"

    def __init__(self, sinks: int = 4):
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"StreamingLLM sinks must be an int >= 0, got {sinks!r}.")
        self.sinks = sinks

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        bsz, heads, seq, _ = inputs.keys.shape
        rank = torch.cumsum(inputs.valid.long(), -1)  # 1-based index among real tokens
        scores = torch.arange(seq, device=rank.device, dtype=torch.float32).expand(bsz, seq).clone()
        scores = scores.masked_fill((rank <= self.sinks) & inputs.valid, float("inf"))
        return scores[:, None, :].expand(bsz, heads, seq).clone()
