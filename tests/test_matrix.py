"""Every scorer x allocator (and every preset), one-shot and chunked, batch 2 with left padding: the invariants
each allocator promises hold, or the combination is refused when the cache is built."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ToyTokenizer, padded_batch, tiny_model

from adakv import (
    ALLOCATORS,
    METHODS,
    SCORERS,
    AdaKV,
    AdaKVCache,
    ContextScorer,
    KVzip,
    LayerAdaptive,
    PyramidKV,
    StreamingLLM,
    Uniform,
    compress_context,
    with_cache,
)
from adakv.layer import AdaKVLayer
from adakv.scorers import ExpectedAttention
from adakv.storage import MIN_SLACK

BUDGET, WINDOW, PAD, SEQ = 0.3, 4, 9, 64
MODEL = tiny_model("llama", num_hidden_layers=3)


def _check(cache: AdaKVCache, mask: torch.Tensor) -> None:
    layers = [layer for layer in cache.layers if isinstance(layer, AdaKVLayer)]
    allocator = cache.selection.allocator
    heads = MODEL.config.num_key_value_heads
    n = mask.sum(-1).cpu()
    per_head = torch.floor(n * BUDGET + 0.5).long()
    kept = torch.stack([layer.kept_lengths() for layer in layers])  # [layers, B, H]
    scorer = cache.selection.scorer
    sinks = {StreamingLLM: "sinks", KVzip: "sinks", ExpectedAttention: "n_sink"}.get(type(scorer))
    sinks = 0 if sinks is None else getattr(scorer, sinks)  # pinned with +inf: kept first
    for layer in layers:
        rows = layer._positions(view=False).cpu()
        layer_budget = cache.selection.per_head(n, layer.rank, layer.num_compressed)
        for b in range(2):
            protect = int(min(WINDOW, per_head[b], max(int(layer_budget[b]) - sinks, 0)))
            for h in range(heads):
                seg = rows[b, h][rows[b, h] >= 0].tolist()
                assert len(seg) == int(layer.kept_lengths()[b, h])  # no padding held (it has no position)
                assert seg == sorted(set(seg)) and all(0 <= p < n[b] for p in seg)
                assert set(range(int(n[b]) - protect, int(n[b]))) <= set(seg)  # the window is kept
                assert set(range(min(sinks, int(layer_budget[b])))) <= set(seg)  # so are the sinks
    if isinstance(allocator, Uniform):
        assert (kept == per_head[None, :, None]).all()
    elif isinstance(allocator, (AdaKV, PyramidKV)):
        if isinstance(allocator, AdaKV):
            assert (kept.sum(-1) == heads * per_head[None]).all()
        assert (kept.sum((0, 2)) == len(layers) * heads * per_head).all()
    elif isinstance(allocator, LayerAdaptive):
        assert (kept.sum((0, 2)) == len(layers) * heads * per_head).all()
    else:  # a new allocator must say what it promises here
        raise AssertionError(f"no invariant known for {allocator!r}")
    token_bytes = 2 * (MODEL.config.hidden_size // MODEL.config.num_attention_heads) * 4
    slack_rows = len(layers) * 2 * heads * MIN_SLACK
    assert cache.kv_bytes() <= (int(kept.sum()) + slack_rows) * token_bytes


def _run(cache: AdaKVCache, chunk: int | None) -> torch.Tensor:
    ids, mask = padded_batch(seq_len=SEQ, pad=PAD)
    if isinstance(cache.selection.scorer, ContextScorer):  # scored by passes over the context (KVzip)
        compress_context(MODEL, cache, ids, attention_mask=mask, tokenizer=ToyTokenizer(), chunk_size=chunk)
        return mask
    kwargs = {} if chunk is None else {"prefill_chunk_size": chunk}
    with torch.no_grad():
        MODEL.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=1, do_sample=False, **kwargs)
    return mask


@pytest.mark.parametrize("chunk", [None, 24])
@pytest.mark.parametrize("allocator", sorted(ALLOCATORS))
@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_scorer_allocator_matrix(scorer, allocator, chunk):
    cache = AdaKVCache(MODEL, BUDGET, scorer=scorer, allocator=allocator, window=WINDOW)
    _check(cache, _run(cache, chunk))


@pytest.mark.parametrize("chunk", [None, 24])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_preset(method, chunk):
    cache = AdaKVCache(MODEL, BUDGET, method=method, window=WINDOW)
    _check(cache, _run(cache, chunk))


@pytest.mark.parametrize("decode", ["rescore", "h2o"])
@pytest.mark.parametrize("allocator", sorted(ALLOCATORS))
def test_decode_policy_matrix(decode, allocator):
    """Decode policies either run within their bound with each allocator or are refused up front."""
    if decode == "rescore" and allocator == "layer-adaptive":
        with pytest.raises(ValueError, match="per-layer allocator"):
            AdaKVCache(MODEL, 16, allocator=allocator, decode=decode, window=WINDOW)
        return
    cache = AdaKVCache(MODEL, 16, allocator=allocator, decode=decode, window=WINDOW)
    ids, mask = padded_batch(seq_len=SEQ, pad=PAD)
    with torch.no_grad():
        MODEL.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=40, min_new_tokens=40)
    heads = MODEL.config.num_key_value_heads
    for layer in cache.layers:
        # rescore: the layer's budget (16 per head on average over layers) + the tokens since the last
        # re-selection; h2o: each head's own target (its prefill allocation, at least the int budget) + its slack
        if decode == "rescore":
            bound = heads * (cache.selection.per_head(layer.n_real, layer.rank, layer.num_compressed) + 16)
        else:
            bound = layer.decode_state.target.sum(-1) + 16 * heads
        assert (layer.kept_lengths().sum(-1) <= bound).all()


@pytest.mark.parametrize("chunk", [None, 24])
@pytest.mark.parametrize("scorer", ["snapkv", "kvzip"])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_layer_adaptive_safeguard_through_the_cache(scorer, alpha, chunk):
    """LayerAdaptive(alpha) through the cascade (snapkv) and the one selection over all layers (kvzip): the total
    stays the budget, and every (layer, sequence, head) keeps at least floor(alpha * per-head budget); alpha=1 is a
    uniform split, which a global top-k on this model is not."""
    cache = AdaKVCache(MODEL, BUDGET, scorer=scorer, allocator=LayerAdaptive(alpha=alpha), window=WINDOW)
    mask = _run(cache, chunk)
    _check(cache, mask)
    per_head = torch.floor(mask.sum(-1) * BUDGET + 0.5).long()
    kept = torch.stack([layer.kept_lengths() for layer in cache.layers if isinstance(layer, AdaKVLayer)]).cpu()
    floor = torch.floor(per_head * alpha).long()
    assert (kept >= floor[None, :, None]).all()
    if alpha == 1.0:
        assert (kept == per_head[None, :, None]).all()
    plain = AdaKVCache(MODEL, BUDGET, scorer=scorer, allocator=LayerAdaptive(), window=WINDOW)
    _run(plain, chunk)
    kept0 = torch.stack([layer.kept_lengths() for layer in plain.layers if isinstance(layer, AdaKVLayer)]).cpu()
    assert not (kept0 == per_head[None, :, None]).all()  # without the floor the split is uneven here
