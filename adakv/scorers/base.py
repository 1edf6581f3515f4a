"""What a scorer sees and returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ScoreInputs:
    """One layer's prefill, as handed to a scorer.

    queries: ``[B, H_q, L, D]`` (after RoPE); keys, values: ``[B, H_kv, L, D]``;
    valid: bool ``[B, L]``, False at padding; window: size of the observation
    window (the last ``window`` prompt tokens); scaling and softcap: the layer's
    attention logit scale and optional tanh soft-capping; module: the attention
    module (for ``o_proj`` and head counts); layer / num_layers: this layer's
    index among the cache's compressed layers, and their count.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    window: int
    scaling: float
    softcap: float | None
    module: nn.Module
    layer: int = 0
    num_layers: int = 1

    @property
    def group_size(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]


@dataclass
class StagedScores:
    """Two-stage selection, returned by scorers such as CriticalKV.

    The allocator first keeps ``first_fraction`` of the budget by ``first``; the
    rest of the budget is then filled by ``second`` (both ``[B, H_kv, L]``).
    """

    first: torch.Tensor
    second: torch.Tensor
    first_fraction: float


class Scorer(ABC):
    """Maps a layer's prefill to token scores ``[B, H_kv, L]`` (float32, higher = keep).

    Scores at padding positions are ignored, and the observation window is
    always kept by the cache, so a scorer need not special-case either.
    """

    name: str = "scorer"

    @abstractmethod
    def __call__(self, inputs: ScoreInputs) -> torch.Tensor | StagedScores: ...

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


def window_attention(inputs: ScoreInputs) -> torch.Tensor:
    """Softmax attention of the last ``window`` queries over all keys, fp32 ``[B, H_kv, G, w, L]``.

    Causal inside the window, padding keys masked; computed per KV group without
    repeating keys.
    """
    q, k = inputs.queries, inputs.keys
    bsz, h_kv, seq, dim = k.shape
    w = min(inputs.window, seq)
    q_win = q[:, :, seq - w :].float().reshape(bsz, h_kv, inputs.group_size, w, dim)
    logits = torch.einsum("bhgwd,bhld->bhgwl", q_win, k.float()) * inputs.scaling
    if inputs.softcap is not None:
        logits = torch.tanh(logits / inputs.softcap) * inputs.softcap
    q_pos = torch.arange(seq - w, seq, device=k.device)
    k_pos = torch.arange(seq, device=k.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & inputs.valid[:, None, :]  # [B, w, L]
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0)  # padded query rows see nothing
