"""H2O scorer (accumulated attention), computed block-wise."""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer

# Elements of one query block's logits ([B, H_q, block, L]); bounds the scorer's extra memory.
BLOCK_ELEMENTS = 1 << 24


class H2O(Scorer):
    """H2O: heavy hitters are the tokens that received the most attention.

    Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
    Large Language Models", NeurIPS 2023 (arXiv:2306.14048).

    s_j = sum over prompt queries i >= j of A_ij, with A = softmax(q_i K^T * scaling)
    under the causal and padding mask, averaged over the G query heads of a KV group.

    Computed one block of queries at a time: each block's rows get their
    log-sum-exp over all keys, and the column sums of exp(logit - lse) are
    accumulated, so no L x L matrix ever exists (memory ~ block x L per head).

    Deviation: the official code keeps a separate recent set (``recent_ratio``, half of the budget in its
    examples) besides the heavy hitters; here the recent set is the cache's observation window (``window``,
    32 by default) and the rest of the budget goes to the heavy hitters. ``window=`` sets the recent share.

    H2O's decoding policy (accumulating decoded queries' attention and evicting as the
    generation grows) is a decode policy of the cache: ``AdaKVCache(..., decode="h2o")``
    (:mod:`adakv.decode.h2o`).
    """

    name = "h2o"

    def __init__(self, block_elements: int = BLOCK_ELEMENTS, **removed):
        if "accumulate_decode" in removed:
            raise TypeError(
                "H2O(accumulate_decode=...) moved to the cache: AdaKVCache(model, budget, scorer='h2o', decode='h2o')."
            )
        if removed:
            raise TypeError(f"H2O got unexpected arguments {sorted(removed)}.")
        if isinstance(block_elements, bool) or not isinstance(block_elements, int) or block_elements < 1:
            raise ValueError(f"block_elements must be an int >= 1, got {block_elements!r}.")
        self.block_elements = block_elements

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        return accumulated_attention(inputs, self.block_elements)


def accumulated_attention(inputs: ScoreInputs, block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """s_j = sum over the queries i (query i at column L - Q + i, causal) of A_ij, mean over the KV group."""
    q, k, valid = inputs.queries, inputs.keys, inputs.valid
    bsz, h_kv, seq, dim = k.shape
    n_q, offset = q.shape[2], inputs.query_offset
    group = inputs.group_size
    keys = k.float()
    k_col = torch.arange(seq, device=k.device)
    block = max(1, block_elements // max(1, bsz * h_kv * group * seq))
    scores = torch.zeros(bsz, h_kv, seq, dtype=torch.float32, device=k.device)
    for lo in range(0, n_q, block):
        hi = min(n_q, lo + block)
        q_blk = q[:, :, lo:hi].float().reshape(bsz, h_kv, group, hi - lo, dim)
        logits = torch.einsum("bhgqd,bhld->bhgql", q_blk, keys) * inputs.scaling
        if inputs.softcap is not None:
            logits = torch.tanh(logits / inputs.softcap) * inputs.softcap
        q_col = torch.arange(offset + lo, offset + hi, device=k.device)
        allowed = (k_col[None, :] <= q_col[:, None])[None, None] & valid[:, :, None, :]  # [B, H, q, L]
        allowed = allowed & valid[:, :, offset + lo : offset + hi, None]  # padded queries contribute nothing
        logits = logits.masked_fill(~allowed[:, :, None], float("-inf"))
        lse = torch.logsumexp(logits, -1, keepdim=True).nan_to_num(neginf=0.0)
        probs = torch.exp(logits - lse)  # rows of -inf give exp(-inf) = 0
        scores += probs.sum(3).mean(2)
    return scores
