"""AdaKVCache inside transformers' generate and forward, on tiny models of every supported family."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, padded_batch, tiny_model
from transformers import DynamicCache

from adakv import AdaKVCache, Scorer, Uniform, with_cache
from adakv.layer import AdaKVLayer

NEW = 10


def generate(model, cache, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **with_cache(cache), **kwargs)


def adakv_layers(cache):
    return [i for i, layer in enumerate(cache.layers) if isinstance(layer, AdaKVLayer)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_budget_is_token_identical_to_dynamic_cache(family):
    """budget 1.0, or an int budget above the prompt length: greedy and beam search, batch 2 left-padded."""
    model = tiny_model(family)
    ids, mask = padded_batch()
    for budget, kwargs in ((1.0, {}), (10_000, {}), (1.0, {"num_beams": 3})):
        ref = generate(model, DynamicCache(config=model.config), ids, mask, do_sample=False, **kwargs)
        out = generate(model, AdaKVCache(model, budget=budget), ids, mask, do_sample=False, **kwargs)
        assert torch.equal(ref, out), (family, budget, kwargs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compressed_generation_keeps_budget_per_layer(family):
    model = tiny_model(family)
    ids, mask = padded_batch(seq_len=64, pad=9)
    cache = AdaKVCache(model, budget=0.25, window=4)
    with torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(cache))
    real = mask.sum(-1)  # 55 and 64 real tokens -> 14 and 16 per head
    per_head = torch.floor(real * 0.25 + 0.5).long()
    layers = adakv_layers(cache)
    assert layers, "no layer was compressed"
    for idx in layers:
        kept = cache.kept_lengths(idx)
        assert kept.sum(-1).tolist() == (per_head * kept.shape[1]).tolist()
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(dense))
    full_bytes = sum(dense.layers[i].keys.nbytes * 2 for i in layers)
    ours = sum(cache.layers[i].nbytes() for i in layers)
    assert ours < 0.6 * full_bytes
    out = generate(model, cache, torch.cat([ids, ids[:, :1]], -1), torch.cat([mask, mask[:, :1] * 0 + 1], -1))
    assert out.shape == (2, ids.shape[1] + 1 + NEW)


def test_kept_lengths_differ_across_heads():
    model = tiny_model("llama", num_key_value_heads=4, num_attention_heads=8)
    ids, mask = padded_batch(seq_len=96)
    cache = AdaKVCache(model, budget=0.2, window=4)
    with torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(cache))
    assert any(len(set(cache.kept_lengths(i)[1].tolist())) > 1 for i in adakv_layers(cache))


class KeepOldest(Scorer):
    """Head- and layer-independent: prefers early tokens, so every head keeps the same positions."""

    def __call__(self, inputs):
        bsz, heads, seq, _ = inputs.keys.shape
        return -torch.arange(seq, dtype=torch.float32, device=inputs.keys.device).expand(bsz, heads, seq).clone()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_positions_stay_right_without_position_ids(family):
    """Evicting the same tokens in every head equals masking them out of a DynamicCache; decoding without
    position_ids then shows that the cache reports the logical length (RoPE positions unchanged)."""
    model = tiny_model(family)
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(5)).to(model.device)
    budget, window = 12, 4
    cache = AdaKVCache(model, budget=budget, scorer=KeepOldest(), allocator=Uniform(), window=window)
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        a = model(ids, **with_cache(cache)).logits
        b = model(ids, **with_cache(dense)).logits
        torch.testing.assert_close(a, b)
        keep2d = torch.zeros(1, 40, dtype=torch.long, device=model.device)
        keep2d[0, : budget - window] = 1
        keep2d[0, -window:] = 1
        tok = a[:, -1:].argmax(-1)
        for step in range(6):
            keep2d = torch.cat([keep2d, torch.ones_like(keep2d[:, :1])], -1)
            la = model(tok, **with_cache(cache)).logits  # no mask, no position_ids
            lb = model(tok, attention_mask=keep2d, **with_cache(dense)).logits
            if family == "gemma3":  # its sliding layers see the evicted tokens; compare the compressed layer only
                break
            torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
            tok = la.argmax(-1)
    assert cache.get_seq_length() == dense.get_seq_length()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_question_agnostic_and_second_turn(family):
    """Prefill a context, then generate from context + question (a multi-token append), then a second turn."""
    model = tiny_model(family)
    ids, mask = padded_batch(seq_len=56)
    ctx, ctx_mask = ids[:, :40], mask[:, :40]
    results = []
    for cache in (DynamicCache(config=model.config), AdaKVCache(model, budget=1.0)):
        with torch.no_grad():
            model(ctx, attention_mask=ctx_mask, **with_cache(cache))
        first = generate(model, cache, ids, mask, do_sample=False)
        turn2 = torch.cat([first, ids[:, 40:48]], -1)
        second = generate(model, cache, turn2, torch.ones_like(turn2).masked_fill(turn2 == 0, 0), do_sample=False)
        results.append((first, second))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])  # gemma3: a sliding-window layer runs first
def test_question_agnostic_compressed_then_beam_search(family):
    model = tiny_model(family)
    ids, mask = padded_batch(seq_len=72)
    cache = AdaKVCache(model, budget=0.3, window=4)
    with torch.no_grad():
        model(ids[:, :60], attention_mask=mask[:, :60], **with_cache(cache))
    with pytest.raises(ValueError, match="batch_repeat_interleave"):
        generate(model, cache, ids, mask, do_sample=False, num_beams=2)
    cache.batch_repeat_interleave(2)
    first = next(i for i, layer in enumerate(cache.layers) if isinstance(layer, AdaKVLayer))
    before = cache.kept_lengths(first)
    assert torch.equal(before[0], before[1]) and torch.equal(before[2], before[3])
    out = generate(model, cache, ids, mask, do_sample=False, num_beams=2, num_return_sequences=2)
    assert out.shape == (4, 72 + NEW)
    assert (cache.kept_lengths(first) == before + 12 + NEW - 1).all()


def test_sampling_matches_dynamic_cache_at_full_budget():
    model = tiny_model("mistral")
    ids, mask = padded_batch()
    outs = []
    for cache in (DynamicCache(config=model.config), AdaKVCache(model, budget=1.0)):
        torch.manual_seed(123)
        outs.append(generate(model, cache, ids, mask, do_sample=True, top_k=20, temperature=1.5))
    assert torch.equal(*outs)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_other_caches_unchanged_after_activation(family):
    model = tiny_model(family)
    ids, mask = padded_batch()
    before = [
        generate(model, DynamicCache(config=model.config), ids, mask, do_sample=False),
        generate(model, None, ids, mask, do_sample=False, use_cache=False),
    ]
    with torch.no_grad():
        logits_before = model(ids, attention_mask=mask).logits
    original = model.config._attn_implementation
    AdaKVCache(model, budget=0.2)
    assert model.config._attn_implementation == "adakv_" + original
    after = [
        generate(model, DynamicCache(config=model.config), ids, mask, do_sample=False),
        generate(model, None, ids, mask, do_sample=False, use_cache=False),
    ]
    with torch.no_grad():
        logits_after = model(ids, attention_mask=mask).logits
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert torch.equal(logits_before, logits_after)


def test_restore_and_introspection():
    from adakv import restore_attention

    model = tiny_model("llama")
    ids, mask = padded_batch()
    cache = AdaKVCache(model, budget=0.5, window=4)
    generate(model, cache, ids, mask, do_sample=False)
    text = cache.stats()
    assert "adakv" in text and str(cache.kv_bytes()) in text
    assert cache.kv_bytes() == sum(cache.layers[i].nbytes() for i in adakv_layers(cache))
    assert cache.get_seq_length() == ids.shape[1] + NEW - 1
    restore_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_multi_token_append_on_compressed_cache_matches_masked_dense():
    """Appending several tokens at once to a compressed cache (causal, bottom-right aligned) equals a
    DynamicCache whose evicted positions are masked out, batch 2 with left padding."""
    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=64, pad=6)
    ctx, ctx_mask, new = ids[:, :48], mask[:, :48], ids[:, 48:]
    budget, window = 20, 4
    cache = AdaKVCache(model, budget=budget, scorer=KeepOldest(), allocator=Uniform(), window=window)
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ctx, attention_mask=ctx_mask, **with_cache(cache))
        model(ctx, attention_mask=ctx_mask, **with_cache(dense))
        keep2d = torch.zeros_like(ctx_mask)
        for row in range(2):
            real = ctx_mask[row].nonzero().flatten()
            keep2d[row, real[: budget - window]] = 1
            keep2d[row, real[-window:]] = 1
        full_mask = torch.cat([ctx_mask, torch.ones_like(new)], -1)
        positions = (full_mask.cumsum(-1) - 1)[:, 48:]
        got = model(new, attention_mask=full_mask, position_ids=positions, **with_cache(cache)).logits
        want = model(
            new,
            attention_mask=torch.cat([keep2d, torch.ones_like(new)], -1),
            position_ids=positions,
            **with_cache(dense),
        ).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert cache.kept_lengths(0).tolist() == [[budget + 16] * 2] * 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model = tiny_model("qwen2").to(dtype)
    ids, mask = padded_batch()
    ref = generate(model, DynamicCache(config=model.config), ids, mask, do_sample=False)
    cache = AdaKVCache(model, budget=1.0)
    assert torch.equal(ref, generate(model, cache, ids, mask, do_sample=False))
    assert cache.layers[0].store.keys.dtype == dtype
    compressed = AdaKVCache(model, budget=0.3, window=4, method="ada-criticalkv")
    out = generate(model, compressed, ids, mask, do_sample=False)
    assert out.shape == ref.shape and compressed.kv_bytes() < 0.6 * cache.kv_bytes()


def test_cache_from_config_only():
    model = tiny_model("phi3")
    ids, mask = padded_batch()
    ref = generate(model, DynamicCache(config=model.config), ids, mask, do_sample=False)
    out = generate(model, AdaKVCache(model.config, budget=1.0), ids, mask, do_sample=False)
    assert model.config._attn_implementation == "adakv_sdpa"
    assert torch.equal(ref, out)


@pytest.mark.parametrize("method", ["ada-snapkv", "layer-defensivekv"])
def test_dropped_cache_frees_its_memory_without_the_garbage_collector(method):
    """No reference cycles: a benchmark creating caches in a loop must not accumulate them."""
    import gc
    import weakref

    model = tiny_model("llama")
    ids, mask = padded_batch()
    gc.collect()
    gc.disable()
    try:
        cache = AdaKVCache(model, budget=0.3, window=4, method=method)
        generate(model, cache, ids, mask, do_sample=False)
        cache_ref, store_ref = weakref.ref(cache), weakref.ref(cache.layers[0].store)
        del cache
        assert cache_ref() is None and store_ref() is None
    finally:
        gc.enable()


def test_deepcopy_empty_cross_layer_cache_and_filled_cache():
    """A deep copy has its own layers (the cross-layer allocator follows them) and shares the model's config."""
    import copy

    model = tiny_model("llama")
    ids, mask = padded_batch()
    original = AdaKVCache(model, budget=0.3, window=4, method="layer-defensivekv")
    twin = copy.deepcopy(original)
    assert twin._config is original._config and twin.shared.cascade is not original.shared.cascade
    assert all(a is b for a, b in zip(twin.shared.cascade.layers, twin.layers))
    out_twin = generate(model, twin, ids, mask, do_sample=False)
    assert original.layers[0].store is None  # filling the copy left the original empty
    out_orig = generate(model, original, ids, mask, do_sample=False)
    assert torch.equal(out_twin, out_orig)
    again = copy.deepcopy(original)  # a filled cache: same continuation from both
    more = torch.cat([out_orig, out_orig[:, -3:]], -1)
    more_mask = torch.cat([mask, torch.ones_like(out_orig[:, mask.shape[1] :]), torch.ones_like(more[:, -3:])], -1)
    a = generate(model, again, more, more_mask, do_sample=False)
    b = generate(model, original, more, more_mask, do_sample=False)
    assert torch.equal(a, b)
