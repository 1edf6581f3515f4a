"""One dense prefill, many compressed caches: for comparing methods on the same prompt cheaply.

The prefill forward does not depend on the eviction method (every layer's
prefill attention is dense; only what is *kept* differs), so a benchmark can
run it once, record each layer's queries/keys/values, and build the cache of
every method from the record with the same code the live path uses
(:meth:`AdaKVLayer.compress_dense`). Decoding then runs through the model as usual.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .cache import AdaKVCache
from .cache_kwarg import with_cache
from .layer import AdaKVLayer
from .prompt import mask_positions
from .scorers import ScoreInputs, Scorer


class _Recorder(Scorer):
    name = "recorder"

    def __init__(self) -> None:
        self.seen: dict[int, ScoreInputs] = {}

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        self.seen[inputs.module.layer_idx] = inputs
        bsz, heads, seq, _ = inputs.keys.shape
        return torch.zeros(bsz, heads, seq, device=inputs.keys.device)


@dataclass
class PrefillRecord:
    """What one prefill leaves behind: per full-attention layer its ScoreInputs, the stock
    (sliding-window) layers' caches, the logits of the last position and the length."""

    inputs: dict[int, ScoreInputs]
    stock_layers: dict[int, object]
    last_logits: torch.Tensor
    length: int


@torch.no_grad()
def record_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> PrefillRecord:
    """Run the dense prefill once and keep what every method's compression needs. Positions count real tokens
    only, as ``generate`` (and :func:`adakv.compress_context`) count them, so that a replayed cache continues with
    ``generate`` like a live one: a bare forward would count a left-padded sequence's padding."""
    recorder = _Recorder()
    cache = AdaKVCache(model, budget=1, scorer=recorder, allocator="uniform", window=1)
    kwargs = {} if attention_mask is None else {"position_ids": mask_positions(attention_mask)}
    out = model(input_ids, attention_mask=attention_mask, **with_cache(cache), **kwargs)
    stock = {i: layer for i, layer in enumerate(cache.layers) if not isinstance(layer, AdaKVLayer)}
    return PrefillRecord(recorder.seen, stock, out.logits[:, -1].clone(), input_ids.shape[1])


@torch.no_grad()
def replay(model, record: PrefillRecord, budget: float | int, **cache_kwargs) -> AdaKVCache:
    """An AdaKVCache in the state the live prefill would have left it in, built from ``record``."""
    if cache_kwargs.get("prefill_attention") is not None:
        raise ValueError(
            "replay rebuilds a cache from a recorded dense prefill, so a prefill_attention policy (CritiPrefill) would "
            "not be applied: build that cache with a live prefill instead."
        )
    cache = AdaKVCache(model, budget, **cache_kwargs)
    for idx, layer in enumerate(cache.layers):
        if not isinstance(layer, AdaKVLayer):
            cache.layers[idx] = copy.copy(record.stock_layers[idx])  # decoding rebinds its tensors, never writes them
            continue
        rec = record.inputs[idx]
        layer.lazy_initialization(rec.keys, rec.values)
        layer.seen = record.length
        layer.compress_dense(rec.queries, rec.keys, rec.values, rec.valid[:, 0], rec.scaling, rec.softcap, rec.module)
    return cache
