"""A layer's life: chunked prefill, cross-layer allocation with staged scorers, reset, copies, batch reordering."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import padded_batch, tiny_model

from adakv import AdaKVCache, SnapKV, prefill_in_chunks, with_cache
from adakv.layer import AdaKVLayer

pytestmark = pytest.mark.fast


def compressed(cache):
    return [layer for layer in cache.layers if isinstance(layer, AdaKVLayer)]


def per_head(mask: torch.Tensor, budget: float) -> torch.Tensor:
    return torch.floor(mask.sum(-1) * budget + 0.5).long()


def held_positions(layer: AdaKVLayer) -> list[list[list[int]]]:
    rows = layer._positions(view=False)
    return [[[int(p) for p in seg if p >= 0] for seg in b] for b in rows.cpu()]


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_generate_prefill_chunks_are_compressed_to_the_budget(family):
    """generate(prefill_chunk_size=N): after every chunk each sequence holds its allocation of the real tokens
    seen so far (never the whole prompt), and after the prompt the same totals as a one-shot prefill."""
    model = tiny_model(family)
    ids, mask = padded_batch(seq_len=150, pad=40)
    budget, window, chunk = 0.2, 8, 32
    cache = AdaKVCache(model, budget=budget, window=window, allocator="adakv")
    layers = compressed(cache)
    heads = model.config.num_key_value_heads
    trace = []

    def spy(module, args, kwargs, output):
        layer = cache.layers[module.layer_idx]
        if isinstance(layer, AdaKVLayer) and layer.store is not None and len(trace) < 1000:
            trace.append((layer.n_real.clone(), layer.store.lengths().sum(-1)))

    for block in model.model.layers:
        block.self_attn.register_forward_hook(spy, with_kwargs=True)
    with torch.no_grad():
        model.generate(
            ids, attention_mask=mask, **with_cache(cache), max_new_tokens=1, do_sample=False, prefill_chunk_size=chunk
        )
    assert len({int(n.sum()) for n, _ in trace}) >= 150 // chunk  # one state per chunk
    for n_real, held in trace:
        allowed = torch.where(n_real > 0, torch.floor(n_real * budget + 0.5).long().clamp(min=1), 0) * heads
        assert (held <= allowed).all(), (n_real, held, allowed)
    final = per_head(mask, budget) * heads
    for layer in layers:
        assert layer.store.lengths().sum(-1).tolist() == final.tolist()  # max_new_tokens=1: nothing appended
        for b, segs in enumerate(held_positions(layer)):
            n = int(mask[b].sum())
            for seg in segs:  # positions strictly increasing, never padding, the window always kept
                assert seg == sorted(set(seg)) and seg[0] >= 0 and seg[-1] == n - 1
                assert set(range(n - window, n)) <= set(seg)


def test_chunk_covering_the_prompt_equals_one_shot():
    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=64, pad=9)
    outs, kept = [], []
    for chunk in (None, 64):
        cache = AdaKVCache(model, budget=0.3, window=4)
        kwargs = {} if chunk is None else {"prefill_chunk_size": chunk}
        with torch.no_grad():
            outs.append(
                model.generate(
                    ids, attention_mask=mask, **with_cache(cache), max_new_tokens=6, do_sample=False, **kwargs
                )
            )
        kept.append(cache.kept_lengths(0))
    assert torch.equal(outs[0], outs[1]) and torch.equal(kept[0], kept[1])


def test_three_ways_of_chunking_agree_and_a_question_is_appended_whole():
    model = tiny_model("qwen2")
    ids, mask = padded_batch(seq_len=120, pad=30)
    doc, question = slice(0, 100), slice(100, 120)

    def via_generate():
        cache = AdaKVCache(model, budget=0.25, window=8)
        with torch.no_grad():
            model.generate(
                ids[:, doc],
                attention_mask=mask[:, doc],
                **with_cache(cache),
                max_new_tokens=1,
                do_sample=False,
                prefill_chunk_size=40,
            )
        return cache

    def via_helper():
        cache = AdaKVCache(model, budget=0.25, window=8)
        prefill_in_chunks(model, cache, ids[:, doc], 40, attention_mask=mask[:, doc], lookahead=False, hold_final=False)
        return cache

    def via_context():
        cache = AdaKVCache(model, budget=0.25, window=8)
        with torch.no_grad(), cache.compressing():
            for lo in range(0, 100, 40):
                hi = min(lo + 40, 100)
                pos = (mask[:, :hi].cumsum(-1) - 1).clamp(min=0)[:, lo:hi]
                model(ids[:, lo:hi], attention_mask=mask[:, :hi], position_ids=pos, **with_cache(cache))
        return cache

    a, b, c = via_generate(), via_helper(), via_context()
    for layer_a, layer_b, layer_c in zip(compressed(a), compressed(b), compressed(c)):
        assert torch.equal(layer_b.store.lengths(), layer_c.store.lengths())
        assert held_positions(layer_b) == held_positions(layer_c)
        assert torch.equal(layer_a.store.lengths(), layer_b.store.lengths())
        assert held_positions(layer_a) == held_positions(layer_b)
    before = b.kept_lengths(0)
    with torch.no_grad():  # the question is appended and kept whole (question-agnostic use)
        model(ids[:, question], attention_mask=mask, **with_cache(b))
    assert torch.equal(b.kept_lengths(0), before + 20)


def test_chunking_errors_come_before_any_work():
    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=64)
    cache = AdaKVCache(model, budget=0.3, window=16)
    with pytest.raises(ValueError, match="smaller than this AdaKVCache's observation window"), torch.no_grad():
        model.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=2, prefill_chunk_size=8)
    assert cache.get_seq_length() == 0 and cache.layers[0].store is None
    with pytest.raises(ValueError, match="chunk_size must be an int >= the cache's observation window"):
        prefill_in_chunks(model, cache, ids, 8)
    prefill_in_chunks(model, cache, ids, 32, attention_mask=mask)
    with pytest.raises(ValueError, match="needs an empty cache"):
        prefill_in_chunks(model, cache, ids, 32)


def test_two_stage_scorer_with_cross_layer_allocator_cascades():
    """criticalkv + layer-adaptive used to skip the cascade (every layer the same totals). Now layers get
    different shares and the global total is exact; the first stage is a per-layer floor."""
    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = padded_batch(seq_len=80, pad=10)
    cache = AdaKVCache(model, budget=0.25, window=4, scorer="criticalkv", allocator="layer-adaptive")
    with torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(cache))
    heads = model.config.num_key_value_heads
    kept = torch.stack([layer.kept_lengths() for layer in compressed(cache)])  # [layers, B, H]
    assert kept.sum((0, 2)).tolist() == (per_head(mask, 0.25) * heads * 4).tolist()
    assert len(set(kept[:, 1].sum(-1).tolist())) > 1


def test_a_scorer_attribute_no_longer_switches_decode_eviction():
    class Lookalike(SnapKV):
        accumulate_decode = True

    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=64)
    kept = []
    for scorer in (Lookalike(), SnapKV()):
        cache = AdaKVCache(model, budget=0.25, window=4, scorer=scorer, allocator="uniform")
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=40, min_new_tokens=40)
        kept.append(cache.kept_lengths(0))
    # every decoded token kept (39 forwarded after the prompt): no policy hidden in an attribute
    assert torch.equal(kept[0], kept[1]) and torch.equal(kept[0], per_head(mask, 0.25)[:, None].expand(-1, 2) + 39)


def test_reset_gives_a_fresh_cache_and_crop_offload_refuse():
    model = tiny_model("llama")
    ids, mask = padded_batch()
    cache = AdaKVCache(model, budget=0.3, window=4, method="layer-defensivekv", decode="h2o")
    runs = []
    for _ in range(2):
        with torch.no_grad():
            runs.append(model.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=5))
        lengths = cache.kept_lengths(0)
        cache.reset()
        layer = cache.layers[0]
        assert cache.get_seq_length() == 0 and layer.store is None and layer.decode_state is None
        assert layer.cascade_scores is None and layer.n_real is None
    assert torch.equal(runs[0], runs[1]) and lengths.sum() > 0
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(3)
    with pytest.raises(NotImplementedError, match="offloading"):
        cache.layers[0].offload()


@pytest.mark.parametrize("decode", ["h2o", "rescore"])
def test_deepcopy_mid_generation_with_a_live_decode_policy(decode):
    from adakv.decode import Rescore

    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=64)
    policy = Rescore(interval=4) if decode == "rescore" else decode
    cache = AdaKVCache(model, budget=20, window=4, decode=policy, allocator="adakv")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=10, min_new_tokens=10)
        twin = copy.deepcopy(cache)
        state, twin_state = cache.layers[0].decode_state, twin.layers[0].decode_state
        assert state is not twin_state and type(state) is type(twin_state)
        more = torch.cat([out, out[:, -1:]], -1)
        more_mask = torch.cat([mask, torch.ones_like(more[:, mask.shape[1] :])], -1)
        a = model.generate(more, attention_mask=more_mask, **with_cache(cache), max_new_tokens=20, min_new_tokens=20)
        b = model.generate(more, attention_mask=more_mask, **with_cache(twin), max_new_tokens=20, min_new_tokens=20)
    assert torch.equal(a, b)
    assert torch.equal(cache.kept_lengths(0), twin.kept_lengths(0))


def test_batch_reordering_moves_every_piece_of_layer_state():
    """A cache filled with the batch reversed equals one filled in order and then reordered, piece by piece."""
    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=70, pad=12)
    kwargs = dict(budget=0.3, window=4, method="layer-defensivekv", decode="h2o")
    forward, backward = AdaKVCache(model, **kwargs), AdaKVCache(model, **kwargs)
    with torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(forward))
        model(ids.flip(0), attention_mask=mask.flip(0), **with_cache(backward))
    forward.batch_select_indices(torch.tensor([1, 0]))
    for mine, theirs in zip(compressed(forward), compressed(backward)):
        assert torch.equal(mine.store.lengths(), theirs.store.lengths())
        assert torch.equal(mine.n_real, theirs.n_real)
        assert torch.equal(mine._positions(view=False), theirs._positions(view=False))
        for name in ("scores", "target"):
            a, b = getattr(mine.decode_state, name), getattr(theirs.decode_state, name)
            torch.testing.assert_close(a[..., : b.shape[-1]], b, rtol=1e-4, atol=1e-5)
        k_mine, inside = mine.store.view(mine.store.keys)
        k_theirs, _ = theirs.store.view(theirs.store.keys)
        torch.testing.assert_close(k_mine[inside], k_theirs[inside], rtol=1e-4, atol=1e-5)


class _LayerBiased(SnapKV):
    """SnapKV with layer 0's scores scaled far down: the cascade moves its budget to the later layers, so after
    the first chunk the layers hold very different counts."""

    def __call__(self, inputs):
        scores = super().__call__(inputs)
        return scores * (1e-6 if inputs.layer == 0 else 1.0)


@pytest.mark.parametrize("budget", [24, 0.5])
@pytest.mark.parametrize("lookahead", [False, True])
def test_cascade_over_chunks_keeps_the_global_budget(budget, lookahead):
    """A cross-layer allocator in a chunked prefill: a layer whose held tokens plus the chunk fit its share still
    competes with the others (it used to skip the cascade, and the next layer refused to run), and after the
    prompt every sequence holds exactly its global budget over the layers."""
    layers = 3
    model = tiny_model("llama", num_hidden_layers=layers)
    ids, mask = padded_batch(seq_len=150, pad=40)
    cache = AdaKVCache(model, budget, window=4, scorer=_LayerBiased(), allocator="layer-adaptive")
    prefill_in_chunks(model, cache, ids, 32, attention_mask=mask, lookahead=lookahead)
    n = mask.sum(-1)
    allowed = n.clamp(max=budget) if isinstance(budget, int) else per_head(mask, budget)
    held = sum(layer.store.lengths().sum(-1) for layer in compressed(cache))
    assert held.tolist() == (allowed * 2 * layers).tolist()  # 2 KV heads per layer
    assert min(int(layer.store.lengths().sum()) for layer in compressed(cache)) < int(held.sum()) // (2 * layers)


@pytest.mark.parametrize("length", [64, 65, 66])
def test_a_one_token_last_generate_chunk_is_compressed(length):
    """generate(prefill_chunk_size=32) on 65 tokens ends its prefill with a one-token chunk: it is a prompt chunk
    like the others (it used to be appended as if decoded), so the budget is the one-shot budget."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(0))
    cache = AdaKVCache(model, 0.2, window=4, allocator="uniform")
    with torch.no_grad():
        model.generate(ids, **with_cache(cache), max_new_tokens=1, do_sample=False, prefill_chunk_size=32)
    assert cache.kept_lengths(0).flatten().tolist() == [round(length * 0.2)] * 2


def test_tied_scores_are_broken_the_same_way_in_any_batch():
    """SnapKV's max pooling gives neighbours equal scores; the allocators keep the earlier of tied tokens whatever
    the rest of the batch (topk's choice among ties changed with the batch, so a sequence prefilled next to another
    kept other tokens than next to itself)."""
    model = tiny_model("qwen2", num_key_value_heads=2, num_attention_heads=4).double()
    ids, mask = padded_batch(seq_len=60, pad=11)
    mixed, twin = (AdaKVCache(model, 0.3, window=4, allocator="uniform") for _ in range(2))
    with torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(mixed))
        model(ids[[0, 0]], attention_mask=mask[[0, 0]], **with_cache(twin))
    mixed.batch_select_indices(torch.tensor([0, 0]))
    for a, b in zip(compressed(mixed), compressed(twin)):
        assert held_positions(a) == held_positions(b)
