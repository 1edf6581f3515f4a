"""The attention function adakv registers with transformers, and its activation on a model.

A model whose attention implementation is ``adakv_sdpa`` (or ``adakv_eager``)
runs :func:`_adakv_attention` in every attention layer. When the keys it gets
come from an :class:`~adakv.layer.AdaKVLayer` (a :class:`KVHandle`), it does the
prefill compression or the ragged attention over the compacted cache; for any
other keys (a DynamicCache, no cache, sliding-window layers) it calls the
implementation the model had before, so other caches see no change.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .kernels import ops_for

if TYPE_CHECKING:
    from .layer import AdaKVLayer

PREFIX = "adakv_"
BASES = ("sdpa", "eager")


class KVHandle:
    """What ``AdaKVLayer.update`` returns in place of key/value tensors.

    It carries the layer and the new tokens' K/V to adakv's attention function.
    Anything else that touches it (a stock attention function) gets a clear error
    instead of a shape error.
    """

    __slots__ = ("layer", "keys", "values")

    def __init__(self, layer: AdaKVLayer, keys: torch.Tensor, values: torch.Tensor):
        self.layer = layer
        self.keys = keys
        self.values = values

    def __getattr__(self, name: str) -> Any:
        raise ValueError(
            "An AdaKVCache's keys reached an attention function that is not adakv's (it asked them for "
            f"{name!r}): the cache was given to a model it was not created for, or whose attention implementation "
            "was switched afterwards. Create the cache for the model that uses it: AdaKVCache(model, ...)."
        )


def original_attention(base: str, module: nn.Module) -> Callable:
    """The attention function the model used before adakv was activated."""
    if base == "sdpa":
        return sdpa_attention_forward
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its modeling file; use sdpa.")
    return eager


def _validity(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Bool ``[B, n]``: which of the last ``n`` key positions are real tokens (not padding), or None if all."""
    if mask is None:
        return None
    row = mask[:, 0, -1, -n:]  # the last query sees every real key before it
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


def _prefill(base, module, query, handle, mask, scaling, kwargs):
    keys, values = handle.keys, handle.values
    softcap = kwargs.get("softcap")
    dense = original_attention("eager" if softcap is not None else base, module)
    out = dense(module, query, keys, values, mask, scaling=scaling, **kwargs)
    bsz, _, seq, _ = keys.shape
    valid = _validity(mask, seq)
    if valid is None:
        valid = torch.ones(bsz, seq, dtype=torch.bool, device=keys.device)
    elif bool((valid[:, 1:] < valid[:, :-1]).any()):
        raise ValueError(
            "AdaKVCache needs left padding, but the attention mask has a 0 after a real token. Set "
            "tokenizer.padding_side = 'left'. If the prompt contains the pad token (e.g. a chat turn end), pass "
            "attention_mask explicitly: generate() otherwise marks every pad-token id as padding."
        )
    handle.layer.compress(query, keys, values, valid, scaling, softcap, module)
    return out


def _append(module, query, handle, mask, scaling, kwargs):
    store = handle.layer.store
    bsz, h_q, q_len, dim = query.shape
    h_kv = handle.keys.shape[1]
    valid = _validity(mask, q_len) if q_len > 1 else None  # a decoded token is always real: no sync
    if valid is not None and bool(valid.all()):
        valid = None
    store.append(handle.keys, handle.values, valid)
    hidden = None
    if valid is not None:
        seen = torch.cumsum(valid.long(), -1)
        hidden = seen[:, -1:] - seen  # valid new tokens after query i, invisible to it
    q = query.reshape(bsz, h_kv, h_q // h_kv, q_len, dim)
    attend = ops_for(query).ragged_attention
    softcap = kwargs.get("softcap")
    out = attend(q, store.keys, store.values, store.start, store.length, scaling, softcap, hidden, store.max_length())
    handle.layer.after_attention(q, scaling, softcap, hidden)
    return out.reshape(bsz, h_q, q_len, dim).transpose(1, 2).contiguous(), None


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
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    try:
        if handle.layer.store is None:
            return _prefill(base, module, query, handle, attention_mask, scaling, kwargs)
        return _append(module, query, handle, attention_mask, scaling, kwargs)
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
