"""The attention function adakv registers with transformers, and its activation on a model.

A model whose attention implementation is ``adakv_sdpa`` (or ``adakv_eager``)
runs :func:`_adakv_attention` in every attention layer. When the keys it gets
come from an :class:`~adakv.layer.AdaKVLayer` (a :class:`~adakv.layer.KVHandle`),
it turns the attention mask into the new tokens' validity and hands everything
to the layer, which attends, appends and evicts itself; for any other keys (a
DynamicCache, no cache, sliding-window layers) it calls the implementation the
model had before, so other caches see no change.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .layer import KVHandle

PREFIX = "adakv_"
BASES = ("sdpa", "eager")


def original_attention(base: str, module: nn.Module) -> Callable:
    """The attention function the model used before adakv was activated."""
    if base == "sdpa":
        return sdpa_attention_forward
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its modeling file; use sdpa.")
    return eager


def mask_validity(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Bool ``[B, n]``: which of the last ``n`` key positions are real tokens (not padding), or None if all."""
    if mask is None:
        return None
    row = mask[:, 0, -1, -n:]  # the last query sees every real key before it
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


def _adakv_attention(
    base: str,
    module: nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(key, KVHandle):
        return original_attention(base, module)(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"{type(module).__name__} uses attention sinks, which AdaKVCache does not support yet.")
    handle = key
    if kwargs.get("output_attentions"):
        handle.layer.shared.phase.failed = True  # stock layers before this one may have stored the forward's tokens
        raise ValueError(
            "output_attentions=True: AdaKVCache attends over compacted per-head segments and returns no attention "
            "weights (transformers would hand back empty tuples). Use a DynamicCache to inspect attention; call "
            "cache.reset() before using this cache again."
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    q_len = query.shape[2]
    valid = mask_validity(attention_mask, q_len) if q_len > 1 else None  # a decoded token is always real: no sync

    def dense() -> torch.Tensor:  # the model's own attention over the new tokens alone (a first prompt chunk)
        fn = original_attention("eager" if softcap is not None else base, module)
        return fn(module, query, handle.keys, handle.values, attention_mask, scaling=scaling, **kwargs)[0]

    try:
        out = handle.layer.attend(module, query, handle.keys, handle.values, valid, scaling, softcap, dense)
        return out, None
    finally:
        handle.keys = handle.values = None  # the dense prefill K/V die with this call


def _make(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        return _adakv_attention(base, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{base}_attention"
    return attention


for _base, _mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
    AttentionInterface.register(PREFIX + _base, _make(_base))
    AttentionMaskInterface.register(PREFIX + _base, _mask)


# -- activation ------------------------------------------------------------------------------------------
def is_active(config: PretrainedConfig) -> bool:
    return str(config._attn_implementation).startswith(PREFIX)


def implementation_for(config: PretrainedConfig) -> str:
    """The adakv implementation name that wraps the config's current attention implementation."""
    current = config._attn_implementation
    if is_active(config):
        return current
    base = "sdpa" if current in (None, "sdpa") else current
    from .critiprefill import PREFIX as SPARSE  # critiprefill imports this module

    if isinstance(current, str) and current.startswith(SPARSE):
        raise ValueError(
            "This model is inside adakv.sparse_prefill(...), which is for caches without eviction. For CritiPrefill "
            "with an AdaKVCache, build the cache outside that block with "
            "AdaKVCache(model, ..., prefill_attention=adakv.CritiPrefill(...))."
        )
    if base not in BASES:
        raise ValueError(
            f"AdaKVCache works over 'sdpa' or 'eager' attention; this model uses {current!r}. "
            "Load it with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa')) first."
        )
    return PREFIX + base


def activate(target: nn.Module | PretrainedConfig, name: str) -> None:
    """Switch a model (or a bare config) to adakv's attention function ``name``."""
    if isinstance(target, PretrainedConfig):
        target._attn_implementation = name
    elif target.config._attn_implementation != name:
        target.set_attn_implementation(name)


def restore_attention(model: nn.Module) -> None:
    """Give a model back the attention implementation it had before an AdaKVCache was created for it."""
    current = model.config._attn_implementation
    if str(current).startswith(PREFIX):
        model.set_attn_implementation(current[len(PREFIX) :])
