"""Expected Attention scorer: the attention future queries are expected to pay, from the statistics of past ones."""

from __future__ import annotations

import sys

import torch
from torch import nn

from .base import ScoreInputs, Scorer, attention_modules

# Elements of one chunk of the [B, H_kv, G, chunk, D] products in the covariance term.
CHUNK_ELEMENTS = 1 << 24


class ExpectedAttention(Scorer):
    """Expected Attention: rank each token by the attention that *future* queries are expected to pay to it.

    Devoto, Jeblick and Jégou, "Expected Attention: KV Cache Compression by Estimating Attention from Future
    Queries Distribution", 2025 (arXiv:2510.00636); reference code: NVIDIA/kvpress,
    ``kvpress/presses/expected_attention_press.py`` (``ExpectedAttentionPress``), whose defaults are used here.

    The queries are modelled as Gaussian before RoPE. Per query head, with u_i the pre-RoPE queries the scorer
    is given (the whole prompt in a one-shot prefill; the chunk for a later prompt chunk; the recent queries
    when re-scoring while decoding), leaving out the first ``n_sink`` positions and padding:

    1. mu = mean_i u_i and Sigma = (1/N) sum_i (u_i - mu)(u_i - mu)^T (biased, as in the reference code);
    2. the average RoPE rotation over the next ``n_future_positions`` positions t = n, ..., n + T - 1 (n: the
       position after the last token seen), Rbar = (1/T) sum_t R_t (an average of rotations, not a rotation);
       mubar = Rbar mu, Sigmabar = Rbar Sigma Rbar^T;
    3. a Gaussian query q ~ N(mubar, Sigmabar) gives E[exp(s q.k_j)] = exp(s mubar.k_j + s^2/2 k_j^T Sigmabar k_j),
       s the layer's logit scale, so the expected attention of key j is the softmax over the keys j of
       z_j = s mubar.k_j + (s^2 / 2) k_j^T Sigmabar k_j;
    4. mean over the G query heads of the KV group;
    5. value-norm weighting (the paper's expected contribution to the residual stream, measured as in the
       reference code): score_j = (a_j + epsilon) * ||v_j||_2;
    6. the first ``n_sink`` positions (attention sinks) are kept: they score +inf, which the cache keeps by rule
       before the window (the reference code gives them the sequence's max + 1, which ranks the same, but would let
       a window larger than the rest of the budget push them out).

    Pre-RoPE queries come from inverting RoPE on the post-RoPE queries with ``ScoreInputs.positions`` and the
    model's rotary frequencies, built from the attention module's config (``rope_parameters``; per layer type
    where they are nested, as in Gemma 3; the types of transformers' ``ROPE_INIT_FUNCTIONS``, the length-dependent
    ``dynamic``/``longrope`` evaluated at the length seen). Only the differences of positions matter: a
    sequence whose real RoPE positions are shifted by a constant (left padding without ``position_ids``) gets
    the same scores, because the inversion and the future rotations shift together. RoPE's attention scaling
    (YaRN, LongRoPE) is left in the recovered queries; the future queries carry it too, so it cancels.
    A model without RoPE (or a layer without it), multimodal RoPE or an unknown type is refused with a
    ValueError.

    Defaults and deviations from the reference code:
    - ``n_future_positions=512``, ``n_sink=4``, ``use_covariance=True``, ``use_vnorm=True``, ``epsilon=0.0``:
      as ``ExpectedAttentionPress``; the ``ada-expected-attention`` preset uses ``epsilon=1e-2`` with Ada-KV,
      as kvpress's evaluation registry does for its ``expected_attention`` entry.
    - The reference projects the prompt's hidden states with ``q_proj`` (plus ``q_norm`` for Qwen3/Gemma3);
      here the queries the attention layer computed are un-rotated, which is the same (tested), works for any
      family with half-split RoPE, and needs no hidden states.
    - The logit scale s is the layer's ``scaling`` (1/sqrt(d) in the reference, and for most models); Gemma 2's
      logit soft-capping is not applied to the expected logits (the expectation of a capped exponent has no
      closed form).
    - The future positions start after the last position of each sequence (the reference: after the number of
      hidden states it was given); ``recent_queries`` (default None: all) restricts the statistics to the last
      queries.
    - The cache keeps its observation window (the last ``window`` tokens) whatever the scores: with the default
      window of 32 these tokens count inside the budget; the reference keeps only the sinks by rule.

    Args:
        n_future_positions: T, the number of future positions whose RoPE rotations are averaged.
        n_sink: the first positions kept as attention sinks and left out of the query statistics.
        use_covariance: include the covariance term (False: mean query only).
        use_vnorm: multiply by the value norm.
        epsilon: added to the expected attention before the value-norm weighting.
        recent_queries: use only the last this-many (valid, non-sink) queries for the statistics; None: all.
    """

    name = "expected-attention"

    def __init__(
        self,
        n_future_positions: int = 512,
        n_sink: int = 4,
        use_covariance: bool = True,
        use_vnorm: bool = True,
        epsilon: float = 0.0,
        recent_queries: int | None = None,
    ):
        if not _is_int(n_future_positions) or n_future_positions < 1:
            raise ValueError(f"ExpectedAttention n_future_positions must be an int >= 1, got {n_future_positions!r}.")
        if not _is_int(n_sink) or n_sink < 0:
            raise ValueError(f"ExpectedAttention n_sink must be an int >= 0, got {n_sink!r}.")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or epsilon < 0:
            raise ValueError(f"ExpectedAttention epsilon must be a number >= 0, got {epsilon!r}.")
        if recent_queries is not None and (not _is_int(recent_queries) or recent_queries < 1):
            raise ValueError(f"ExpectedAttention recent_queries must be None or an int >= 1, got {recent_queries!r}.")
        self.n_future_positions = int(n_future_positions)
        self.n_sink = int(n_sink)
        self.use_covariance = bool(use_covariance)
        self.use_vnorm = bool(use_vnorm)
        self.epsilon = float(epsilon)
        self.recent_queries = recent_queries

    @property
    def pinned_positions(self) -> int:
        return self.n_sink

    def check_model(self, model: nn.Module) -> None:
        for module in attention_modules(model):
            _rope_parameters(module)  # refuses a layer whose RoPE it cannot undo
            _check_half_split(module, strict=True)

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        keys, values, valid, positions = inputs.keys, inputs.values, inputs.valid, inputs.positions
        bsz, h_kv, seq, dim = keys.shape
        group, q_len = inputs.group_size, inputs.queries.shape[2]
        # the RoPE layout was checked when the cache was built (check_model)
        config, params, kind, layer_type = _rope_parameters(inputs.module)
        seen = None  # the length seen: a host read, only for the length-dependent RoPE types
        if kind in LENGTH_DEPENDENT:
            seen = int(positions.max()) + 1 if positions.numel() else 1
        inv_freq = _frequencies(config, params, kind, layer_type, seen).to(keys.device)
        rot = 2 * inv_freq.shape[0]
        if rot > dim:
            raise ValueError(f"The rotary frequencies cover {rot} dimensions but the heads have {dim}.")

        # 1. pre-RoPE query statistics, per query head
        q_pos = positions[:, :, seq - q_len :]  # [B, H_kv, Q]
        used = valid[:, :, seq - q_len :] & (q_pos >= self.n_sink)
        if self.recent_queries is not None:
            after = used.flip(-1).long().cumsum(-1).flip(-1)  # used queries at or after each column
            used = used & (after <= self.recent_queries)
        q = inputs.queries.float().reshape(bsz, h_kv, group, q_len, dim)
        angles = q_pos.clamp(min=0).float()[:, :, None, :, None] * inv_freq  # [B, H_kv, 1, Q, rot/2]
        pre = rotate(q, -angles, rot)
        weight = used[:, :, None, :, None].float()
        count = weight.sum(3, keepdim=True).clamp(min=1.0)
        mean = (pre * weight).sum(3, keepdim=True) / count  # [B, H_kv, G, 1, D]
        cov = None
        if self.use_covariance:
            centered = (pre - mean) * weight
            cov = torch.einsum("bhgqi,bhgqj->bhgij", centered, centered) / count  # [B, H_kv, G, D, D]
        mean = mean.squeeze(3)

        # 2. average rotation over the next n_future_positions positions of each sequence
        start = positions.amax(dim=(1, 2)).clamp(min=-1) + 1  # [B]
        future = start[:, None].float() + torch.arange(self.n_future_positions, device=keys.device).float()
        future_angles = future[..., None] * inv_freq  # [B, T, rot/2]
        avg = average_rotation(future_angles.cos().mean(1), future_angles.sin().mean(1), dim)  # [B, D, D]
        mean = torch.einsum("bij,bhgj->bhgi", avg, mean)
        if cov is not None:
            cov = torch.einsum("bij,bhgjk,blk->bhgil", avg, cov, avg)

        # 3. expected logits and their softmax over the scored keys
        k = keys.float()
        s = inputs.scaling
        logits = s * torch.einsum("bhgd,bhld->bhgl", mean, k)
        if cov is not None:
            logits = logits + 0.5 * s * s * _quadratic(k, cov)
        scored = valid & (positions >= self.n_sink)
        logits = logits.masked_fill(~scored[:, :, None], float("-inf"))
        attn = torch.softmax(logits, dim=-1).nan_to_num(0.0)

        # 4.-6. group mean, value norm, sinks
        scores = attn.mean(2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values.float().norm(dim=-1)
        return scores.masked_fill(valid & (positions < self.n_sink), float("inf"))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _quadratic(keys: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """k_j^T Sigma_g k_j for every key j and query head g: ``[B, H, L, D]`` x ``[B, H, G, D, D]`` -> ``[B, H, G, L]``,
    in chunks of keys so the intermediate stays bounded."""
    bsz, heads, seq, dim = keys.shape
    group = cov.shape[2]
    out = torch.empty(bsz, heads, group, seq, dtype=keys.dtype, device=keys.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, bsz * heads * group * dim))
    for lo in range(0, seq, chunk):
        k = keys[:, :, lo : lo + chunk]
        out[..., lo : lo + chunk] = torch.einsum("bhld,bhgde,bhle->bhgl", k, cov, k)
    return out


def rotate(x: torch.Tensor, angles: torch.Tensor, rot: int) -> torch.Tensor:
    """Half-split RoPE (transformers' ``rotate_half`` convention) of the first ``rot`` dimensions of ``x``
    by ``angles`` ``[..., rot/2]`` (broadcast against ``x``); dimensions past ``rot`` pass through."""
    half = rot // 2
    x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def average_rotation(cos: torch.Tensor, sin: torch.Tensor, dim: int) -> torch.Tensor:
    """The matrix ``[B, D, D]`` acting like :func:`rotate` with cosines ``cos`` and sines ``sin`` ``[B, rot/2]``
    (averages of them give the average rotation); identity past ``rot``."""
    bsz, half = cos.shape
    out = torch.eye(dim, dtype=cos.dtype, device=cos.device).repeat(bsz, 1, 1)
    idx = torch.arange(half, device=cos.device)
    out[:, idx, idx] = cos
    out[:, idx + half, idx + half] = cos
    out[:, idx, idx + half] = -sin
    out[:, idx + half, idx] = sin
    return out


# RoPE types whose frequencies depend on the length seen (ROPE_INIT_FUNCTIONS' seq_len)
LENGTH_DEPENDENT = ("dynamic", "longrope")


def rope_frequencies(module: nn.Module, seq_len: int | None = None) -> torch.Tensor:
    """The inverse frequencies (fp32, ``[rot/2]``) of the RoPE that ``module`` (an attention module with ``.config``
    and ``.layer_idx``) applies, built from its config as the model's rotary embedding builds them.

    ``seq_len``: the length seen, for the length-dependent types (``dynamic``, ``longrope``). Raises ValueError for
    a model or layer without RoPE, multimodal RoPE, unknown types and RoPE that is not half-split."""
    _check_half_split(module, strict=False)
    return _frequencies(*_rope_parameters(module), seq_len=seq_len)


def _frequencies(config, params: dict, kind: str, layer_type: str | None, seq_len: int | None) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        base = float(params["rope_theta"])
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    inv_freq, _ = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len, layer_type=layer_type)
    return inv_freq.float().cpu()


def _rope_parameters(module: nn.Module) -> tuple:
    """``(config, rope parameters, rope type, layer type)`` of ``module``'s RoPE; refuses a module without RoPE,
    with multimodal RoPE or an unknown type."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = getattr(module, "config", None)
    layer_idx = getattr(module, "layer_idx", None)
    name = type(module).__name__
    if config is None or layer_idx is None:
        raise ValueError(f"ExpectedAttention needs the attention module's config and layer_idx; {name} lacks them.")
    params = getattr(config, "rope_parameters", None)
    if not params:
        raise ValueError(
            f"ExpectedAttention un-rotates RoPE queries, but {type(config).__name__} has no rotary position "
            "embedding (no rope_parameters). Use a scorer that does not need pre-RoPE queries (e.g. 'snapkv')."
        )
    layer_type = None
    layer_types = getattr(config, "layer_types", None)
    if isinstance(params, dict) and layer_types and layer_types[layer_idx] in params:  # per layer type (Gemma 3)
        layer_type = layer_types[layer_idx]
        params = params[layer_type]
    if not params:
        raise ValueError(f"Layer {layer_idx} of {type(config).__name__} has no rotary position embedding.")
    kind = params.get("rope_type", params.get("type", "default"))
    if "mrope_section" in params or "mrope" in str(kind):
        raise ValueError(f"ExpectedAttention does not support multimodal RoPE (rope_type {kind!r}).")
    if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"ExpectedAttention does not support rope_type {kind!r} of {type(config).__name__}; supported: "
            f"default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}."
        )
    return config, params, kind, layer_type


def _check_half_split(module: nn.Module, strict: bool) -> None:
    """Refuse a model whose RoPE is not half-split (:func:`rotate` undoes only that one): its modeling file's
    ``rotate_half`` must map (x1, x2) to (-x2, x1) over the two halves (Cohere and GLM interleave the pairs).
    ``strict`` (when a cache is built for a model): a modeling file without ``rotate_half`` is refused too; while
    scoring, a module from elsewhere (a test's stand-in) is let through."""
    modeling = sys.modules.get(type(module).__module__)
    rotate_half = getattr(modeling, "rotate_half", None)
    if rotate_half is None and not strict:
        return
    probe = torch.arange(1.0, 9.0)
    if rotate_half is None or not torch.equal(rotate_half(probe), torch.cat([-probe[4:], probe[:4]])):
        raise ValueError(
            f"ExpectedAttention un-rotates the queries with half-split RoPE (transformers' rotate_half), but "
            f"{type(module).__name__} applies RoPE another way (interleaved pairs or its own function). Use a scorer "
            "that does not need pre-RoPE queries (e.g. 'snapkv' or 'defensivekv')."
        )
