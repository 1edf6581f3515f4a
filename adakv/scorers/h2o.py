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

    ``accumulate_decode=True`` is H2O's decoding policy: each decoded query's
    attention is added to the held tokens' scores, and a head that has grown 16
    tokens past what it kept after the prompt (an int budget: past the budget)
    is cut back to it, the recent window kept and the rest by accumulated score
    (:mod:`adakv.decode_eviction`). Memory then stays bounded however long the
    generation; without it the prompt is compressed once and decoded tokens are
    all kept.
    """

    name = "h2o"

    def __init__(self, block_elements: int = BLOCK_ELEMENTS, accumulate_decode: bool = False):
        if isinstance(block_elements, bool) or not isinstance(block_elements, int) or block_elements < 1:
            raise ValueError(f"block_elements must be an int >= 1, got {block_elements!r}.")
        if not isinstance(accumulate_decode, bool):
            raise TypeError(f"accumulate_decode must be True or False, got {accumulate_decode!r}.")
        self.block_elements = block_elements
        self.accumulate_decode = accumulate_decode

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        return accumulated_attention(inputs, self.block_elements)


def accumulated_attention(inputs: ScoreInputs, block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    q, k, valid = inputs.queries, inputs.keys, inputs.valid
    bsz, h_kv, seq, dim = k.shape
    group = inputs.group_size
    keys = k.float()
    k_pos = torch.arange(seq, device=k.device)
    block = max(1, block_elements // max(1, bsz * h_kv * group * seq))
    scores = torch.zeros(bsz, h_kv, seq, dtype=torch.float32, device=k.device)
    for lo in range(0, seq, block):
        hi = min(seq, lo + block)
        q_blk = q[:, :, lo:hi].float().reshape(bsz, h_kv, group, hi - lo, dim)
        logits = torch.einsum("bhgqd,bhld->bhgql", q_blk, keys) * inputs.scaling
        if inputs.softcap is not None:
            logits = torch.tanh(logits / inputs.softcap) * inputs.softcap
        allowed = (k_pos[None, :] <= torch.arange(lo, hi, device=k.device)[:, None])[None] & valid[:, None, :]
        allowed = allowed & valid[:, lo:hi, None]  # padded queries contribute nothing
        logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
        lse = torch.logsumexp(logits, -1, keepdim=True).nan_to_num(neginf=0.0)
        probs = torch.exp(logits - lse)  # rows of -inf give exp(-inf) = 0
        scores += probs.sum(3).mean(2)
    return scores
