"""CritiPrefill: segment-wise criticality-based sparse prefill attention (Lv, Feng, Xie et al., 2024).

Adjacent queries attend to similar subsets of the past keys. CritiPrefill splits the prompt's queries into
segments of ``segment_size`` and its keys into blocks of ``block_size``, estimates each (segment, block)
pair's criticality from segment-level summaries, and computes each segment's attention only over its
``budgets // block_size`` most critical earlier blocks plus its own segment (causal). Decoding is untouched.

The algorithm, as in the official code (github.com/66RING/CritiPrefill, ``criti_prefill/ops.py``:
``cache_profilling``, ``cache_selection``, ``eattention``; ``criti_prefill/hijack_llama.py``;
``criti_prefill/modeling_patch.py``: ``criti_config``), per layer, with q / k after RoPE:

- Summaries: for segment s and query head h, ``q_max[s]`` / ``q_min[s]`` = elementwise max / min of the
  segment's queries; for block j and KV head, ``k_max[j]`` / ``k_min[j]`` likewise over the block's keys.
- Criticality (the code averages the two query extremes against each key extreme, which is the midpoint):
  ``c_h[s, j] = max( ((q_max + q_min) / 2) . k_max[j],  ((q_max + q_min) / 2) . k_min[j] )``
  (no 1/sqrt(d)), averaged over the G query heads of a KV head: ``c[s, j] = mean_g c_g[s, j]``.
- Only blocks entirely before the segment compete (the segment's own keys are always attended):
  ``p[s, :] = softmax_j(c[s, j])`` over those blocks.
- Layer fusion (the "layer-wise refinement"): ``p <- alpha * p_prev + (1 - alpha) * p`` with alpha = 0.25
  (``pprev`` in the code), ``p_prev`` the fused scores of the previous sparse layer of the same forward;
  the first sparse layer starts the chain.
- Selection: the top ``budgets // block_size`` blocks of ``p[s, :]``; the segment attends to them and,
  causally, to itself.
- Dense: the first ``layer_skip`` layers (default 1: layer 0), every segment starting before
  ``threshold_len`` tokens, and the last segment (which holds the question in long-context QA).

Defaults are the official scripts' (``experiments/needle/run_needle.sh``, ``experiments/lveval/run_lveval.sh``)
and ``criti_config``'s: ``segment_size=512, block_size=32, budgets=2048, threshold_len=4096, layer_skip=1,
layer_fusion=True`` (the needle script and ``criti_config`` turn the fusion on; the LV-Eval script leaves it off;
the command-line default of ``threshold_len`` in ``main.py`` is 1024, the scripts pass 4096).

Deviations from the official code (which is Llama-only, batch 1, flash-attn, a per-segment Python loop):

- Segments and blocks are aligned to the END of the key sequence (the official code aligns them to its start,
  and keeps its partial last segment dense). So the last ``segment_size`` queries are always dense, the
  first segment is the partial one, and a left-padded sequence is segmented exactly as when it runs alone.
  ``threshold_len`` counts the real tokens (padding excluded) before a segment.
- Padding: padded queries and keys are left out of the summaries, blocks made only of padding never
  compete; a segment with no more than ``budgets // block_size`` visible blocks is simply dense.
- The scores are computed and fused in fp32 (the code casts the softmax back to the model dtype).
- With a prefix already in the cache (``L_k > L_q``: a chunk, or a question appended to a cached
  context) the queries are the last ``L_q`` positions and attend to selected blocks of the prefix too.
- Decode steps and prompts too short for any segment to be sparse run dense attention.
- With ``layer_skip=0`` the fusion chain starts at layer 0 (layer 1 fuses with it); the code restarts it at
  layer 1. The default ``layer_skip=1`` is the same in both.
- One Triton launch computes every segment (gathering the selected blocks inside the kernel) where the code
  loops over segments in Python, gathers K/V with ``torch.gather`` and calls flash-attn per segment.

Use it on its own, with any cache (or none), as a context manager::

    from adakv.critiprefill import CritiPrefill, sparse_prefill
    with sparse_prefill(model):       # the paper's defaults; or sparse_prefill(model, budgets=1024, ...)
        out = model.generate(**inputs, past_key_values=DynamicCache(), max_new_tokens=32)

It switches the model's attention implementation to ``critiprefill_sdpa`` (or ``critiprefill_eager``) through
transformers' ``AttentionInterface`` / ``AttentionMaskInterface``, wrapping what the model ran before: every
multi-token forward runs CritiPrefill in the full-attention layers from ``layer_skip`` on; decode steps,
the first layers, sliding-window layers and short prompts run the original function unchanged. The model's
implementation is restored on exit. With eviction, give the policy to the cache instead:
``AdaKVCache(model, budget=0.2, prefill_attention=CritiPrefill(...))``.

Dense layers are decided per call from ``module.layer_idx`` (transformers' attention modules carry it);
``num_layers`` (default: ``module.config.num_hidden_layers``) bounds ``layer_skip`` and ends the fusion chain.
Kernels: the torch path (:mod:`adakv.kernels.block_sparse_reference`) on CPU, the Triton kernel
(:mod:`adakv.kernels.triton_block_sparse`) on CUDA; the block selection is torch on the device, no host sync.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .attention import mask_validity, original_attention
from .kernels import block_sparse_reference as reference
from .policy import PrefillAttention

BACKENDS = ("auto", "torch", "triton")
PREFIX = "critiprefill_"


class CritiPrefill(PrefillAttention):
    """CritiPrefill's policy: parameters, block selection, and the prefill attention (see the module doc).

    Args:
        segment_size: queries per segment (paper: 512).
        block_size: keys per block (paper: 32); ``segment_size`` must be a multiple of it.
        budgets: keys (blocks x block_size) each segment attends to before itself (paper: 2048); a multiple of
            ``block_size``.
        threshold_len: segments starting before this many real tokens run dense (paper: 4096).
        layer_skip: the first ``layer_skip`` layers run dense (paper: 1).
        layer_fusion: fuse each layer's criticality with the previous sparse layer's (paper: on).
        fusion_alpha: weight of the previous layer in the fusion (the code's ``pprev = 0.25``), in [0, 1).
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"``, or ``"triton"`` (CUDA, or the CPU
            with ``TRITON_INTERPRET=1``).
        num_layers: the model's layer count; default ``module.config.num_hidden_layers``.
    """

    def __init__(
        self,
        segment_size: int = 512,
        block_size: int = 32,
        budgets: int = 2048,
        threshold_len: int = 4096,
        layer_skip: int = 1,
        layer_fusion: bool = True,
        fusion_alpha: float = 0.25,
        backend: str = "auto",
        num_layers: int | None = None,
    ):
        for name, value, low in (
            ("segment_size", segment_size, 1),
            ("block_size", block_size, 1),
            ("budgets", budgets, 1),
            ("threshold_len", threshold_len, 0),
            ("layer_skip", layer_skip, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CritiPrefill: {name} must be an int >= {low}, got {value!r}")
        if segment_size % block_size:
            raise ValueError(
                f"CritiPrefill: segment_size ({segment_size}) must be a multiple of block_size ({block_size})"
            )
        if budgets % block_size:
            raise ValueError(f"CritiPrefill: budgets ({budgets}) must be a multiple of block_size ({block_size})")
        if not isinstance(layer_fusion, bool):
            raise ValueError(f"CritiPrefill: layer_fusion must be a bool, got {layer_fusion!r}")
        if isinstance(fusion_alpha, bool) or not isinstance(fusion_alpha, (int, float)) or not 0 <= fusion_alpha < 1:
            raise ValueError(f"CritiPrefill: fusion_alpha must be a number in [0, 1), got {fusion_alpha!r}")
        if backend not in BACKENDS:
            raise ValueError(f"CritiPrefill: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)):
            raise ValueError(f"CritiPrefill: num_layers must be an int or None, got {num_layers!r}")
        if num_layers is not None and layer_skip >= num_layers:
            raise ValueError(
                f"CritiPrefill: layer_skip={layer_skip} leaves no sparse layer in a {num_layers}-layer model"
            )
        self.segment_size = segment_size
        self.block_size = block_size
        self.budgets = budgets
        self.threshold_len = threshold_len
        self.layer_skip = layer_skip
        self.layer_fusion = layer_fusion
        self.fusion_alpha = float(fusion_alpha)
        self.backend = backend
        self.num_layers = num_layers
        self._fused: tuple[int, tuple, torch.Tensor] | None = None  # (layer_idx, key, fused scores)
        self.last_selection: tuple[torch.Tensor, torch.Tensor] | None = None  # (blocks, dense) of the last sparse call

    def __repr__(self) -> str:
        return (
            f"CritiPrefill(segment_size={self.segment_size}, block_size={self.block_size}, budgets={self.budgets}, "
            f"threshold_len={self.threshold_len}, layer_skip={self.layer_skip}, layer_fusion={self.layer_fusion}, "
            f"fusion_alpha={self.fusion_alpha}, backend={self.backend!r})"
        )

    @property
    def top_blocks(self) -> int:
        """Blocks each sparse segment keeps besides its own (``budgets // block_size``)."""
        return self.budgets // self.block_size

    # -- which calls are sparse ---------------------------------------------------------------------------
    def layers_of(self, module: nn.Module) -> int | None:
        if self.num_layers is not None:
            return self.num_layers
        return getattr(getattr(module, "config", None), "num_hidden_layers", None)

    def check_model(self, model: nn.Module) -> None:
        """ValueError if ``layer_skip`` leaves no sparse layer in ``model`` (only full-attention layers can be sparse),
        or the Triton kernel cannot run on its device or with these shapes (called by :func:`sparse_prefill` and
        when an AdaKVCache is built with this policy: before any forward)."""
        config = getattr(model, "config", model)  # a model, or its config (AdaKVCache accepts either)
        n = self.num_layers or getattr(config, "num_hidden_layers", None)
        if n is None and hasattr(config, "get_text_config"):
            n = getattr(config.get_text_config(decoder=True), "num_hidden_layers", None)
        if n is not None and self.layer_skip >= n:
            raise ValueError(f"CritiPrefill: layer_skip={self.layer_skip} leaves no sparse layer in a {n}-layer model")
        full = _full_attention_layers(config)  # sliding-window layers keep the model's attention
        if full == []:
            raise ValueError(
                f"CritiPrefill: {type(config).__name__} has no full-attention layer (sliding-window layers keep the "
                "model's attention), so it would do nothing."
            )
        if full and full[-1] < self.layer_skip:
            raise ValueError(
                f"CritiPrefill: layer_skip={self.layer_skip} leaves no sparse layer in {type(config).__name__}: its "
                f"full-attention layers are {full} (sliding-window layers are never sparse). Use layer_skip <= "
                f"{full[-1]}."
            )
        device = getattr(model, "device", None)
        if self.backend == "triton" and isinstance(device, torch.device):
            self._check_triton_device(device)
        triton = self.backend == "triton" or (
            self.backend == "auto" and isinstance(device, torch.device) and device.type == "cuda"
        )
        if triton:  # the kernel's own limits, refused before a forward has filled some layers' caches
            if self.segment_size % 16:
                raise ValueError(
                    f"CritiPrefill: the Triton kernel needs segment_size a multiple of 16, got {self.segment_size} "
                    "(or use backend='torch')."
                )
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            dim = getattr(text, "head_dim", None)
            if dim is None and getattr(text, "num_attention_heads", None):
                dim = text.hidden_size // text.num_attention_heads
            if dim is not None and dim > 256:
                raise ValueError(
                    f"CritiPrefill: the Triton kernel supports head_dim up to 256, this model has {dim} "
                    "(use backend='torch')."
                )

    def sparse_possible(self, q_len: int, k_len: int) -> bool:
        """Whether any segment of a ``q_len``-query forward over ``k_len`` keys can be sparse (shapes only).

        A sparse segment is not the last one, holds queries, starts at or after ``threshold_len`` and has more
        than ``top_blocks`` blocks before it.
        """
        if q_len <= 1:
            return False
        geo = reference.geometry(q_len, k_len, self.segment_size, self.block_size)
        last = geo.n_seg - 2  # the latest segment that is not the last
        start = last * self.segment_size  # its virtual start
        return (
            last >= geo.q_seg0 and start - geo.pad >= self.threshold_len and start // self.block_size > self.top_blocks
        )

    def applies(self, module: nn.Module, q_len: int, k_len: int) -> bool:
        """For AdaKVCache's prefill: only where it is sparse (dense layers and short prompts keep the model's sdpa)."""
        return self.is_sparse(module, q_len, k_len)

    def is_sparse(self, module: nn.Module, q_len: int, k_len: int) -> bool:
        """Whether CritiPrefill computes this call sparsely (else it is dense attention)."""
        return _layer_idx(module) >= self.layer_skip and self.sparse_possible(q_len, k_len)

    # -- selection ----------------------------------------------------------------------------------------
    def criticality(
        self, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Segment-block criticality of one layer, before softmax and fusion.

        Returns ``scores`` fp32 ``[B, H_kv, n_qseg, n_blk]``, ``visible`` bool ``[B, n_qseg, n_blk]`` (the block is
        before the segment and holds a real token) and ``real_start`` int ``[B, n_qseg]`` (real tokens before each
        query segment), for the segments ``q_seg0 .. n_seg-1`` that hold queries.
        """
        bsz, h_q, q_len, dim = query.shape
        h_kv, k_len = key.shape[1], key.shape[2]
        seg, blk = self.segment_size, self.block_size
        geo = reference.geometry(q_len, k_len, seg, blk)
        n_q = geo.n_seg - geo.q_seg0
        # block summaries over real keys
        kv_valid = F.pad(valid, (geo.pad, 0), value=False)  # [B, L_v]
        keys = F.pad(key, (0, 0, geo.pad, 0)) if geo.pad else key
        hide = ~kv_valid[:, None, :, None]
        k_max = keys.masked_fill(hide, float("-inf")).unflatten(2, (geo.n_blk, blk)).amax(3)
        k_min = keys.masked_fill(hide, float("inf")).unflatten(2, (geo.n_blk, blk)).amin(3)
        block_ok = kv_valid.view(bsz, geo.n_blk, blk).any(-1)  # [B, n_blk]
        k_max = torch.where(block_ok[:, None, :, None], k_max, 0).float()
        k_min = torch.where(block_ok[:, None, :, None], k_min, 0).float()
        # segment summaries over real queries
        lead = k_len - q_len + geo.pad - geo.q_seg0 * seg  # virtual slots before query 0 in its segment
        q_valid = F.pad(valid[:, k_len - q_len :], (lead, 0), value=False)  # [B, n_q * seg]
        queries = F.pad(query, (0, 0, lead, 0)) if lead else query
        hide = ~q_valid[:, None, :, None]
        q_max = queries.masked_fill(hide, float("-inf")).unflatten(2, (n_q, seg)).amax(3)
        q_min = queries.masked_fill(hide, float("inf")).unflatten(2, (n_q, seg)).amin(3)
        seg_ok = q_valid.view(bsz, n_q, seg).any(-1)  # [B, n_q]
        q_mid = torch.where(seg_ok[:, None, :, None], (q_max.float() + q_min.float()) * 0.5, 0.0)
        q_mid = q_mid.view(bsz, h_kv, h_q // h_kv, n_q, dim)
        scores = torch.maximum(
            torch.einsum("bhgsd,bhjd->bhgsj", q_mid, k_max), torch.einsum("bhgsd,bhjd->bhgsj", q_mid, k_min)
        ).mean(2)
        seg_start = (torch.arange(geo.q_seg0, geo.n_seg, device=key.device) * seg)[:, None]  # virtual
        visible = block_ok[:, None, :] & (torch.arange(geo.n_blk, device=key.device) * blk < seg_start)
        seen = F.pad(torch.cumsum(kv_valid, 1), (1, 0))  # seen[:, v]: real keys before virtual position v
        real_start = seen[:, seg_start[:, 0]]
        return scores, visible, real_start

    def select(
        self, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, layer_idx: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks each segment attends to: ``blocks`` int32 ``[B, H_kv, n_seg, top_blocks]`` (sorted, -1 =
        empty) and ``dense`` bool ``[B, H_kv, n_seg]`` (the format of :mod:`adakv.kernels.block_sparse_reference`).

        Runs on the device without a host sync. With ``layer_fusion``, the scores are fused with the previous
        call's when that was an earlier layer of the same forward (same shapes), and kept for the next one.
        """
        bsz, h_kv, k_len = key.shape[0], key.shape[1], key.shape[2]
        q_len = query.shape[2]
        geo = reference.geometry(q_len, k_len, self.segment_size, self.block_size)
        scores, visible, real_start = self.criticality(query, key, valid)
        vis = visible[:, None]  # [B, 1, n_q, n_blk]
        probs = torch.softmax(scores.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
        if self.layer_fusion:
            key_ = (tuple(probs.shape), probs.device)
            prev = self._fused
            if prev is not None and prev[0] < layer_idx and prev[1] == key_:
                probs = self.fusion_alpha * prev[2] + (1.0 - self.fusion_alpha) * probs
            self._fused = (layer_idx, key_, probs)
        n_top = min(self.top_blocks, geo.n_blk)
        top = torch.topk(probs.masked_fill(~vis, -1.0), n_top, dim=-1).indices  # visible blocks first
        taken = torch.gather(vis.expand_as(probs), 3, top)
        top = torch.sort(torch.where(taken, top, geo.n_blk), -1).values  # ascending: memory order
        blocks = torch.where(top < geo.n_blk, top, -1).to(torch.int32)
        n_q = geo.n_seg - geo.q_seg0
        is_last = torch.arange(n_q, device=key.device) == n_q - 1
        dense = (visible.sum(-1) <= self.top_blocks) | (real_start < self.threshold_len) | is_last  # [B, n_q]
        dense = dense[:, None].expand(bsz, h_kv, n_q)
        if geo.q_seg0:  # segments before the queries: never read, kept for a uniform [.., n_seg] layout
            blocks = F.pad(blocks, (0, 0, geo.q_seg0, 0), value=-1)
            dense = F.pad(dense, (geo.q_seg0, 0), value=True)
        return blocks.contiguous(), dense.contiguous()

    def reset(self) -> None:
        """Forget the fused scores kept for the next layer."""
        self._fused = None

    # -- attention ----------------------------------------------------------------------------------------
    def kernel(self, tensor: torch.Tensor) -> Callable:
        """The block-sparse attention implementation for ``tensor``'s device and ``backend``."""
        use_triton = self.backend == "triton" or (self.backend == "auto" and tensor.device.type == "cuda")
        if not use_triton:
            return reference.block_sparse_attention
        self._check_triton_device(tensor.device)
        try:
            from .kernels import triton_block_sparse
        except ImportError as err:
            raise ValueError(f"CritiPrefill(backend='triton'): Triton cannot be imported ({err}).") from err
        return triton_block_sparse.block_sparse_attention

    @staticmethod
    def _check_triton_device(device: torch.device) -> None:
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "CritiPrefill(backend='triton') needs CUDA tensors, or TRITON_INTERPRET=1 to run the Triton kernel on "
                "the CPU (slow; for testing). Use backend='auto' or 'torch' on the CPU."
            )

    def attention(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        valid: torch.Tensor | None,
        scaling: float | None,
        softcap: float | None,
    ) -> torch.Tensor:
        """CritiPrefill attention of one full-attention layer.

        ``query`` ``[B, H_q, L_q, D]`` (after RoPE), ``key`` / ``value`` ``[B, H_kv, L_k, D]`` (``L_k >= L_q``; the
        queries are the last ``L_q`` positions, causal), ``valid`` bool ``[B, L_k]`` (False at padding; None = all
        real). Returns ``[B, L_q, H_q, D]`` in the query's dtype. Layers before ``layer_skip``, decode steps and
        short prompts get dense causal attention from the same kernel.
        """
        layer_idx = _layer_idx(module)
        if getattr(module, "sliding_window", None) is not None:
            raise ValueError(
                f"CritiPrefill runs on full-attention layers only; layer {layer_idx} ({type(module).__name__}) "
                "uses a sliding window: give it the model's own attention."
            )
        if not getattr(module, "is_causal", True):
            raise ValueError(f"CritiPrefill needs causal attention; {type(module).__name__} is not causal.")
        bsz, h_q, q_len, dim = query.shape
        h_kv, k_len = key.shape[1], key.shape[2]
        if key.shape[0] != bsz or h_q % h_kv or k_len < q_len or value.shape != key.shape:
            raise ValueError(
                f"CritiPrefill: query {tuple(query.shape)} does not fit key {tuple(key.shape)} / value "
                f"{tuple(value.shape)} (need H_q a multiple of H_kv and L_k >= L_q)"
            )
        n_layers = self.layers_of(module)
        if n_layers is not None and self.layer_skip >= n_layers:
            raise ValueError(
                f"CritiPrefill: layer_skip={self.layer_skip} leaves no sparse layer in a {n_layers}-layer model"
            )
        if not (layer_idx >= self.layer_skip and self.sparse_possible(q_len, k_len)):
            return self.dense_attention(query, key, value, valid, scaling, softcap)
        if valid is None:
            valid = torch.ones(bsz, k_len, dtype=torch.bool, device=key.device)
        selection = self.select(query, key, valid, layer_idx)
        self.last_selection = selection
        if n_layers is not None and layer_idx >= n_layers - 1:
            self._fused = None  # the chain ends with the model's last layer
        return self._run(query, key, value, valid, scaling, softcap, selection)

    def dense_attention(self, query, key, value, valid, scaling, softcap) -> torch.Tensor:
        """Dense causal attention through the same kernel as :meth:`attention`, with its arguments (the last
        ``L_q`` of ``L_k`` positions are the queries), ``[B, L_q, H_q, D]``."""
        return self._run(query, key, value, valid, scaling, softcap, None)

    def _run(self, query, key, value, valid, scaling, softcap, selection) -> torch.Tensor:
        """The kernel over ``selection`` (``blocks``, ``dense``; None: every block, dense)."""
        bsz, _, q_len, dim = query.shape
        h_kv, k_len = key.shape[1], key.shape[2]
        if valid is None:
            valid = torch.ones(bsz, k_len, dtype=torch.bool, device=key.device)
        if selection is None:
            selection = reference.dense_selection(
                bsz, h_kv, q_len, k_len, self.segment_size, self.block_size, key.device
            )
        scaling = dim**-0.5 if scaling is None else scaling
        attend = self.kernel(query)
        return attend(query, key, value, *selection, valid, scaling, softcap, self.segment_size, self.block_size)


def _full_attention_layers(config) -> list[int] | None:
    """Indices of the full-attention layers of a transformers config (None: not a config that says)."""
    if not hasattr(config, "get_text_config"):
        return None
    try:
        layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except (AttributeError, TypeError, ValueError):
        return None
    return [i for i, kind in enumerate(layer_types) if kind == "full_attention"]


def _layer_idx(module: nn.Module) -> int:
    idx = getattr(module, "layer_idx", None)
    if isinstance(idx, bool) or not isinstance(idx, int):
        raise ValueError(
            f"CritiPrefill decides its dense layers from the attention module's layer_idx; {type(module).__name__} "
            "has none."
        )
    return idx


# -- use without eviction: a context manager over the model's attention implementation ---------------------
_POLICIES: weakref.WeakKeyDictionary[nn.Module, CritiPrefill] = weakref.WeakKeyDictionary()


def _valid_keys(mask: torch.Tensor | None, k_len: int) -> torch.Tensor | None:
    """Bool ``[B, L_k]`` real keys, read from the last query's mask row (it sees every real key), or None."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[-1] < k_len:
        raise ValueError(
            f"CritiPrefill cannot read the key padding from an attention mask of shape {tuple(mask.shape)}"
        )
    return mask_validity(mask, k_len)


def _make(base: str) -> Callable:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        policy = _POLICIES.get(module)
        q_len, k_len = query.shape[2], key.shape[2]
        stock = (
            policy is None
            or kwargs.get("sliding_window") is not None
            or getattr(module, "sliding_window", None) is not None
            or not policy.is_sparse(module, q_len, k_len)
        )
        if stock:
            return original_attention(base, module)(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        if kwargs.get("s_aux") is not None:
            raise ValueError(f"CritiPrefill does not support attention sinks ({type(module).__name__}).")
        if kwargs.get("position_bias") is not None:
            raise ValueError("CritiPrefill does not support an additive position bias.")
        if kwargs.get("is_causal") is False:
            raise ValueError(f"CritiPrefill needs causal attention; {type(module).__name__} was called non-causal.")
        if dropout and module.training:
            raise ValueError("CritiPrefill is for inference: attention dropout is not supported (call model.eval()).")
        valid = _valid_keys(attention_mask, k_len)
        out = policy.attention(module, query, key, value, valid, scaling, kwargs.get("softcap"))
        return out, None

    attention.__name__ = f"{PREFIX}{base}_attention"
    return attention


for _base, _mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
    AttentionInterface.register(PREFIX + _base, _make(_base))
    AttentionMaskInterface.register(PREFIX + _base, _mask)


@contextlib.contextmanager
def sparse_prefill(model: nn.Module, policy: CritiPrefill | None = None, **params: Any) -> Iterator[CritiPrefill]:
    """Run every prefill of ``model`` inside the block with CritiPrefill (any cache, or none).

    ``policy``: a :class:`CritiPrefill`, or its parameters as keywords (``sparse_prefill(model, budgets=1024)``).
    Yields the policy. The model must run ``sdpa`` or ``eager`` attention; inside the block it runs
    ``critiprefill_sdpa`` / ``critiprefill_eager``, and its own implementation is restored on exit (also on error).
    A model with an active :class:`~adakv.AdaKVCache` (implementation ``adakv_*``) is refused: give the policy to
    the cache, ``AdaKVCache(model, ..., prefill_attention=CritiPrefill(...))``.
    """
    if policy is None:
        policy = CritiPrefill(**params)
    elif params:
        raise ValueError("sparse_prefill: give either a CritiPrefill policy or its parameters, not both")
    elif not isinstance(policy, CritiPrefill):
        raise ValueError(f"sparse_prefill: policy must be a CritiPrefill, got {type(policy).__name__}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError("sparse_prefill needs a transformers PreTrainedModel")
    current = config._attn_implementation
    if str(current).startswith("adakv_"):
        raise ValueError(
            f"This model runs adakv's attention ({current!r}): an AdaKVCache is active on it. Pass the policy to the "
            "cache instead: AdaKVCache(model, ..., prefill_attention=CritiPrefill(...)), or call "
            "adakv.restore_attention(model) first."
        )
    if str(current).startswith(PREFIX):
        raise ValueError("sparse_prefill is already active on this model (nested use is not supported)")
    base = "sdpa" if current in (None, "sdpa") else current
    if base not in ("sdpa", "eager"):
        raise ValueError(
            f"CritiPrefill works over 'sdpa' or 'eager' attention; this model uses {current!r}. "
            "Call model.set_attn_implementation('sdpa') first."
        )
    policy.check_model(model)
    modules = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    for m in modules:
        _POLICIES[m] = policy
    policy.reset()
    try:
        model.set_attn_implementation(PREFIX + base)
        yield policy
    finally:
        for m in modules:
            _POLICIES.pop(m, None)
        policy.reset()
        if current is None:
            config._attn_implementation = None
        else:
            model.set_attn_implementation(current)


__all__ = ["BACKENDS", "CritiPrefill", "sparse_prefill"]
