"""DefensiveKV scorer: worst-case (defensive) aggregation times the normalized value term."""

from __future__ import annotations

import torch
from torch import nn

from .base import ScoreInputs, Scorer, window_attention
from .criticalkv import check_output_projections, value_perturbation
from .pooling import pool_positions


class DefensiveKV(Scorer):
    """DefensiveKV: guard against the tokens mean aggregation would wrongly drop.

    Feng et al., "Taming the Fragility of KV Cache Eviction in LLM Inference", 2025
    (arXiv:2510.13334; code github.com/FFY0/DefensiveKV).

    With A the fp32 attention of the last w window queries (causal inside the
    window) restricted to the n = L - w prefix tokens:

    1. each query row (per query head g and window query i) is average-pooled
       along the token positions j (kernel 5, zero padding) and rescaled to its original mass:
       P_ij = pool(A_i)_j * sum_j A_ij / sum_j pool(A_i)_j;
    2. worst case instead of mean: r_j = max over g and i of P_ij;
    3. prior correction: r_j <- max(r_j, mean_j r_j) (mean over the real prefix tokens);
    4. value term: N_hj = (1/G) sum_g ||v_j W_O^(g)||_1, normalized across the KV heads
       of the layer per token, Ñ_hj = N_hj / sum_h' N_h'j;
    5. s_hj = r_hj * Ñ_hj.

    Once earlier evictions have left gaps (a later prompt chunk, a decode-time rescoring), the pooling of
    step 1 is still over positions and the sum of step 4 is over token j's heads (matched by position; the
    heads that evicted it estimated by the mean of those that hold it), not over columns: the official code
    only scores a contiguous prompt. The mean of step 3 is over the held prefix tokens (``floor_mean="held"``,
    the default); ``floor_mean="seen"`` divides their sum by every prefix token the sequence has seen instead
    (the evicted ones counted with risk 0: sum_{j held} r_j / n_seen), on the reasoning that the window's
    attention evicted tokens would have drawn now falls on the held ones. The held mean is raised by the
    survivors of earlier cuts and puts more candidates of a later cut on the floor, where step 4 ranks them;
    measured on SmolLM2 (README, *Chunked prefill*) the seen mean lost more 7-digit needles at 2k tokens and
    fewer at 4k, so it is opt-in. On a one-shot prompt both are the paper's mean.

    Allocation is Ada-KV (the ``defensivekv`` preset), or one budget across layers
    (``layer-defensivekv``). The official code additionally force-keeps the tokens
    holding ~90% of the window's unpooled attention mass; that step is not part of
    the published aggregation and is left out here.

    Args:
        kernel_size: width of the row-wise average pooling (odd, >= 1).
        floor_mean: ``"held"`` (default) or ``"seen"``: what the prior correction's mean divides by once
            tokens were evicted (above); the same on a one-shot prompt.
    """

    name = "defensivekv"
    chunk_scores = "max"  # measured on chunked prefill (README, *Chunked prefill*): fewer needles lost than "latest"

    def __init__(self, kernel_size: int = 5, floor_mean: str = "held"):
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"DefensiveKV kernel_size must be an odd int >= 1, got {kernel_size!r}.")
        if floor_mean not in ("seen", "held"):
            raise ValueError(f"DefensiveKV floor_mean must be 'seen' or 'held', got {floor_mean!r}.")
        self.kernel_size, self.floor_mean = kernel_size, floor_mean

    def check_model(self, model: nn.Module) -> None:
        check_output_projections(model)

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        risk = defensive_aggregation(
            window_attention(inputs),
            inputs.valid,
            self.kernel_size,
            inputs.positions,
            self.floor_mean == "seen",
            inputs.lookahead > 0,
        )
        return risk * head_share_of_value(inputs)


def defensive_aggregation(
    attn: torch.Tensor,
    valid: torch.Tensor,
    kernel_size: int,
    positions: torch.Tensor | None = None,
    over_seen: bool = False,
    probe: bool = False,
) -> torch.Tensor:
    """Steps 1-3: ``attn`` ``[B, H, G, w, L]`` (window queries over all keys), ``valid`` ``[B, H, L]``, the
    tokens' ``positions`` ``[B, H, L]`` (None: contiguous) -> risk ``[B, H, L]``. ``over_seen``: the floor's mean
    divides by the prefix tokens seen (the first window token's position), not only by those held; ``probe``: the
    window is a lookahead probe placed at the prompt's end, so the tokens seen end at the last prefix token."""
    seq, w = attn.shape[-1], attn.shape[-2]
    prefix = torch.ones(seq, dtype=torch.bool, device=attn.device)
    prefix[seq - w :] = False
    attn = attn * prefix  # window columns are not scored (they are kept anyway)
    # worst case over the group and the window queries
    risk = pool_rows(attn, prefix, kernel_size, positions).amax(dim=(2, 3))
    seen = None
    if over_seen and positions is not None and w < seq:
        if probe:  # the prefix ends with the chunk's last token, contiguous with what came before
            seen = positions[:, :, : seq - w].amax(-1, keepdim=True).clamp(min=-1) + 1
        else:  # tokens before the window: its first token's position (evicted ones counted)
            seen = positions[:, :, seq - w : seq - w + 1]
    return floor_at_mean(risk, valid & prefix, seen)


def pool_rows(
    attn: torch.Tensor, keep: torch.Tensor, kernel_size: int, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Step 1: each attention row ``[B, H, G, w, L]`` (zero outside ``keep``) average-pooled over token positions
    (zero padding; ``positions`` ``[B, H, L]``, None: contiguous), zeroed outside ``keep`` again and rescaled to
    the row's original mass."""
    mass = attn.sum(-1, keepdim=True)
    if positions is not None:
        positions = positions[:, :, None, None, :]  # one position per key column, for every query row
    pooled = pool_positions(attn, positions, kernel_size, "avg").masked_fill(~keep, 0.0)
    return pooled * (mass / pooled.sum(-1, keepdim=True).clamp_min(1e-30))


def floor_at_mean(risk: torch.Tensor, real: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Step 3, the prior correction: ``risk`` ``[B, H, L]`` raised to its per-head mean over the ``real`` tokens;
    ``seen`` ``[B, H, 1]`` (optional): how many tokens the mean is over when more were seen than are held (the
    evicted ones count as 0; never fewer than the held ones)."""
    count = real.sum(-1, keepdim=True)
    if seen is not None:
        count = torch.maximum(count, seen.to(count.dtype))
    mean = (risk * real).sum(-1, keepdim=True) / count.clamp_min(1)
    return torch.maximum(risk, mean)


def head_share_of_value(inputs: ScoreInputs) -> torch.Tensor:
    """Step 4: the value term N_hj normalized across the layer's KV heads, N_hj / sum_h' N_h'j ``[B, H, L]``.

    Token j is matched across heads by position: after a first prompt chunk (or a decode-time rescoring) each
    head holds different tokens, so column j of one head is not token j of another. The heads that evicted j
    no longer have its value; the sum over all H heads is estimated as H times the mean over the S_j heads that
    hold it, (H / |S_j|) sum_{h' in S_j} N_h'j. Summing over S_j alone would give a token that other heads
    evicted a larger share (1 when one head holds it) and so a higher score for having been evicted elsewhere.
    On a one-shot prompt every head holds every token and this is the paper's sum."""
    real = inputs.valid & (inputs.positions >= 0)
    # padding columns hold whatever the storage's slack rows held (even NaN): their values count nowhere
    value = value_perturbation(inputs).masked_fill(~real, 0.0)
    bsz, heads = value.shape[:2]
    index = inputs.positions.clamp(min=0).reshape(bsz, -1)
    width = inputs.n_positions if inputs.n_positions is not None else int(index.max()) + 1 if index.numel() else 1
    total = value.new_zeros(bsz, width).scatter_add_(-1, index, value.reshape(bsz, -1))
    holders = value.new_zeros(bsz, width).scatter_add_(-1, index, real.to(value.dtype).reshape(bsz, -1))
    estimate = total * heads / holders.clamp_min(1.0)
    return value / estimate.gather(-1, index).reshape(value.shape).clamp_min(1e-30)
