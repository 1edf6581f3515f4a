"""What an AdaKVCache is built from: its policies (explicit objects, chosen once) and the state its layers share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .cascade import Cascade
from .decode import DecodePolicy
from .kernels.block_sparse_reference import masked_attention
from .prompt import PromptPhase
from .scorers import ContextScorer
from .selection import Selection

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class PrefillAttention(ABC):
    """A policy that computes a layer's attention over its first prompt chunk (instead of the model's dense
    attention), e.g. CritiPrefill's block-sparse prefill. Later chunks and decoding are not affected."""

    def applies(self, module: nn.Module, q_len: int, k_len: int) -> bool:
        """Whether :meth:`attention` replaces the model's own attention for this layer and shape (else dense); the
        lengths are the first chunk's, without a lookahead probe (:func:`adakv.prefill_in_chunks`)."""
        return True

    def check_model(self, model: nn.Module | PretrainedConfig) -> None:
        """Refuse, with a ValueError, a model (or config) this policy cannot work with (called when the cache is
        built, before any work)."""
        return None

    @abstractmethod
    def attention(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        valid: torch.Tensor,
        scaling: float,
        softcap: float | None,
    ) -> torch.Tensor:
        """Output ``[B, L_q, H_q, D]`` of ``query`` ``[B, H_q, L_q, D]`` over dense ``key``/``value``
        ``[B, H_kv, L_k, D]`` (the queries are the last L_q keys, causal); ``valid`` bool ``[B, L_k]``. Under a
        lookahead probe it gets the first chunk alone; the probe's rows go to :meth:`dense_attention`."""

    def dense_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        valid: torch.Tensor | None,
        scaling: float,
        softcap: float | None,
    ) -> torch.Tensor:
        """Dense causal attention of the last L_q of L_k positions, same arguments and output as :meth:`attention`:
        a lookahead probe's rows (the prompt's last window, run after the first chunk and then forgotten), kept out
        of :meth:`attention` so that the probe does not change how the chunk itself is attended. Default: plain
        torch in fp32 (a window's rows: small); a policy with a faster dense path of its own overrides it."""
        bsz, _, q_len, _ = query.shape
        h_kv, k_len = key.shape[1], key.shape[2]
        rows = torch.arange(k_len - q_len, k_len, device=key.device)[:, None]
        mask = (torch.arange(k_len, device=key.device)[None, :] <= rows)[None, None]  # causal [1, 1, L_q, L_k]
        if valid is not None:
            mask = mask & valid[:, None, None, :]
        return masked_attention(query, key, value, mask.expand(bsz, h_kv, q_len, k_len), scaling, softcap)


@dataclass
class CachePolicy:
    """Everything that varies between caches, fixed when the cache is built.

    selection: budget, scorer, allocator, window; decode: what happens while decoding (None keeps every
    decoded token); backend: the kernels' backend name (None: Triton on CUDA, torch elsewhere), resolved
    per layer from the first tensor's device; prefill_attention: None for the model's own attention;
    reserve: rows reserved per segment at every compaction for the tokens to come (None: a small slack
    that grows geometrically). With a reserve, a decode step has fixed shapes and no host tensor op.
    chunk_scores: ``"latest"`` or ``"max"``, how held tokens are scored at a later prompt chunk's cut.
    """

    selection: Selection
    decode: DecodePolicy | None = None
    backend: str | None = None
    prefill_attention: PrefillAttention | None = None
    reserve: int | None = None
    chunk_scores: str = "latest"


CHUNK_SCORES = ("latest", "max")


class SharedState:
    """Per-cache state the compressed layers share: the prompt phase of the current forward, and the
    cross-layer cascade when the allocator splits one budget over layers."""

    def __init__(self, policy: CachePolicy):
        self.phase = PromptPhase(isinstance(policy.selection.scorer, ContextScorer))
        self.cascade = Cascade(policy.selection.allocator) if policy.selection.cross_layer else None
