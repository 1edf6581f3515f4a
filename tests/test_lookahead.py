"""Chunked prefill with a lookahead probe: every chunk is scored from the prompt's final window, which is
attended and then forgotten (not kept, not counted, never stored by the stock sliding-window layers)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import padded_batch, tiny_model

from adakv import AdaKVCache, SnapKV, compress_context, prefill_in_chunks, with_cache
from adakv.layer import AdaKVLayer
from adakv.prompt import chunk_bounds

pytestmark = pytest.mark.fast


def compressed(cache):
    return [layer for layer in cache.layers if isinstance(layer, AdaKVLayer)]


def held_positions(layer: AdaKVLayer) -> list[list[list[int]]]:
    rows = layer._positions(view=False)
    return [[[int(p) for p in seg if p >= 0] for seg in b] for b in rows.cpu()]


class Recorder(SnapKV):
    """SnapKV that keeps the queries and candidate count of every call at one layer."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.calls: list[tuple[torch.Tensor, int]] = []
        self.positions: list[torch.Tensor] = []

    def __call__(self, inputs):
        if inputs.module.layer_idx == self.layer_idx:
            self.calls.append((inputs.queries.clone(), inputs.keys.shape[2]))
            self.positions.append(inputs.positions.clone())
        return super().__call__(inputs)


def test_chunk_bounds_give_the_last_chunk_a_whole_window():
    assert chunk_bounds(100, 40, 8) == [(0, 40), (40, 80), (80, 100)]
    assert chunk_bounds(83, 40, 8) == [(0, 40), (40, 75), (75, 83)]
    assert chunk_bounds(30, 40, 8) == [(0, 30)]
    assert chunk_bounds(80, 40, 8) == [(0, 40), (40, 80)]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_probe_leaves_no_trace(family):
    """budget 1 keeps every token: a chunked prefill with lookahead must then equal a one-shot prefill exactly
    (logits, held positions, seen tokens, and the greedy continuation): a probe token left in any layer
    (compressed or stock sliding-window) would change them."""
    model = tiny_model(family)
    ids, mask = padded_batch(seq_len=90, pad=20)
    window = 8
    one = AdaKVCache(model, budget=1.0, window=window)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() and prefill_in_chunks count them
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=positions, **with_cache(one)).logits[:, -1]
    chunked = AdaKVCache(model, budget=1.0, window=window)
    logits = prefill_in_chunks(model, chunked, ids, 32, attention_mask=mask)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-4)
    assert chunked.get_seq_length() == one.get_seq_length() == 90
    for a, b in zip(compressed(one), compressed(chunked)):
        assert held_positions(a) == held_positions(b)
        assert torch.equal(a.n_real, b.n_real)
    for idx, layer in enumerate(one.layers):
        if not isinstance(layer, AdaKVLayer):
            torch.testing.assert_close(chunked.layers[idx].keys, layer.keys)
    step = torch.full((ids.shape[0], 1), 5)
    full_mask = torch.cat([mask, torch.ones_like(step)], -1)
    kwargs = dict(attention_mask=full_mask, position_ids=mask.sum(-1, keepdim=True))
    with torch.no_grad():
        after = [model(step, **with_cache(c), **kwargs).logits[:, -1] for c in (one, chunked)]
    torch.testing.assert_close(after[1], after[0], atol=1e-5, rtol=1e-4)


def test_every_chunk_is_scored_from_the_prompts_final_window():
    """At the first layer, a query depends only on its token and position: the probe's queries in every chunk
    must be the one-shot prefill's window queries."""
    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=100, pad=10)
    window = 8
    one_scorer, chunk_scorer = Recorder(0), Recorder(0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = AdaKVCache(model, 0.3, scorer=one_scorer, window=window)
        model(ids, attention_mask=mask, position_ids=positions, **with_cache(cache))
    prefill_in_chunks(model, AdaKVCache(model, 0.3, scorer=chunk_scorer, window=window), ids, 32, attention_mask=mask)
    ((one_q, _),) = one_scorer.calls
    final = one_q[:, :, -window:]
    assert len(chunk_scorer.calls) == 4  # chunks [0,32) [32,64) [64,92) [92,100)
    for queries, _ in chunk_scorer.calls:
        torch.testing.assert_close(queries[:, :, -window:], final, atol=1e-5, rtol=1e-4)
    # the scorer is told the probe's own positions (where RoPE put it), like the one-shot window's
    final_positions = one_scorer.positions[0][..., -window:]
    assert final_positions[0, 0].tolist() == list(range(100 - 10 - window, 100 - 10))
    for chunk_positions in chunk_scorer.positions:
        assert torch.equal(chunk_positions[..., -window:], final_positions)
    plain = Recorder(0)
    prefill_in_chunks(
        model, AdaKVCache(model, 0.3, scorer=plain, window=window), ids, 32, attention_mask=mask, lookahead=False
    )
    assert not torch.allclose(plain.calls[0][0][:, :, -window:], final)  # without it: the chunk's own end


@pytest.mark.parametrize("hold_final", [True, False])
@pytest.mark.parametrize("method", ["ada-snapkv", "criticalkv", "layer-defensivekv"])
def test_lookahead_keeps_the_budget_and_never_the_probe(method, hold_final):
    """After every chunk each sequence holds at most its allocation (hold_final: the whole prompt's budget,
    capped at the real tokens seen; else the budget of the tokens seen; the probe never counted, nothing kept
    by rule but the real final window); afterwards the same totals as a one-shot prefill."""
    model = tiny_model("llama", num_hidden_layers=3)
    ids, mask = padded_batch(seq_len=150, pad=40)
    budget, window = 0.2, 8
    cache = AdaKVCache(model, budget=budget, window=window, method=method)
    heads = model.config.num_key_value_heads
    trace = []

    def spy(module, args, kwargs, output):
        layer = cache.layers[module.layer_idx]
        if layer.store is not None:
            trace.append((module.layer_idx, layer.n_real.clone(), layer.store.lengths().sum(-1), layer.seen))

    hooks = [block.self_attn.register_forward_hook(spy, with_kwargs=True) for block in model.model.layers]
    try:
        prefill_in_chunks(model, cache, ids, 32, attention_mask=mask, hold_final=hold_final)
    finally:
        for hook in hooks:
            hook.remove()
    assert cache.shared.phase.final_tokens is None  # a question appended later is sized as usual
    layers = len(model.model.layers)
    n = mask.sum(-1)
    above_seen_budget = False
    for i, (idx, n_real, held, seen) in enumerate(trace):
        seen_budget = torch.where(n_real > 0, torch.floor(n_real * budget + 0.5).long().clamp(min=1), 0) * heads
        allowed = seen_budget
        if hold_final:
            allowed = torch.minimum(torch.floor(n * budget + 0.5).long(), n_real) * heads
        assert seen == 32 * (i // layers + 1) or seen == 150
        assert (n_real == (mask[:, :seen].sum(-1))).all()
        if method != "layer-defensivekv":  # the cascade settles its total over the layers, checked below
            assert (held <= allowed).all(), (idx, n_real, held, allowed)
            above_seen_budget |= bool((held > seen_budget).any())
    if method != "layer-defensivekv":  # early chunks keep up to the final budget only with hold_final
        assert above_seen_budget == hold_final
    per_head = torch.floor(n * budget + 0.5).long()
    totals = sum(layer.store.lengths().sum(-1) for layer in compressed(cache))
    assert totals.tolist() == (per_head * heads * layers).tolist()
    for layer in compressed(cache):
        assert layer.get_seq_length() == 150
        for b, segs in enumerate(held_positions(layer)):
            for seg in segs:  # strictly increasing real positions: no probe duplicate
                assert seg == sorted(set(seg)) and (not seg or (seg[0] >= 0 and seg[-1] <= int(n[b]) - 1))


def test_lookahead_errors():
    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=64, pad=60)  # a sequence with 4 real tokens < window
    cache = AdaKVCache(model, budget=0.3, window=8)
    with pytest.raises(ValueError, match="lookahead=False"):
        prefill_in_chunks(model, cache, ids, 16, attention_mask=mask)
    assert cache.get_seq_length() == 0
    with pytest.raises(TypeError, match="lookahead must be True or False"):
        prefill_in_chunks(model, cache, ids, 16, attention_mask=mask, lookahead="yes")
    prefill_in_chunks(model, cache, ids, 16, attention_mask=mask, lookahead=False)


def test_compress_context_takes_the_lookahead_of_prefill_in_chunks():
    """compress_context(chunk_size=...) passes lookahead on: the refusal's advice (lookahead=False) can be followed
    there too, and each setting keeps what prefill_in_chunks keeps."""
    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=64, pad=60)  # a sequence with 4 real tokens < window
    with pytest.raises(ValueError, match="lookahead=False"):
        compress_context(model, AdaKVCache(model, budget=0.3, window=8), ids, attention_mask=mask, chunk_size=16)
    with pytest.raises(TypeError, match="lookahead must be True or False"):
        compress_context(model, AdaKVCache(model, budget=0.3, window=8), ids, chunk_size=16, lookahead=None)
    ids, mask = padded_batch(seq_len=64, pad=10)
    for lookahead in (False, True):
        mine, theirs = (AdaKVCache(model, budget=0.3, window=8) for _ in range(2))
        compress_context(model, mine, ids, attention_mask=mask, chunk_size=16, lookahead=lookahead)
        prefill_in_chunks(model, theirs, ids, 16, attention_mask=mask, lookahead=lookahead)
        for a, b in zip(compressed(mine), compressed(theirs)):
            assert held_positions(a) == held_positions(b)


@pytest.mark.parametrize("lookahead", [False, True])
def test_defensivekv_seen_mean_counts_only_tokens_seen_under_a_probe(monkeypatch, lookahead):
    """floor_mean="seen" divides by the tokens the sequence has seen before the window: under a lookahead the window
    is the probe, placed at the prompt's end, and the tokens seen end with the chunk (not at the probe)."""
    import adakv.scorers.defensivekv as defensive
    from adakv import DefensiveKV

    seen = []
    floor = defensive.floor_at_mean

    def spy(risk, real, count=None):
        seen.append(sorted(set(count.flatten().tolist())))
        return floor(risk, real, count)

    monkeypatch.setattr(defensive, "floor_at_mean", spy)
    model = tiny_model("llama", num_hidden_layers=1)
    ids = torch.randint(3, 200, (1, 64), generator=torch.Generator().manual_seed(0))
    cache = AdaKVCache(model, 0.25, scorer=DefensiveKV(floor_mean="seen"), allocator="adakv", window=8)
    prefill_in_chunks(model, cache, ids, 16, lookahead=lookahead)
    # chunks end at 16, 32, 48, 64; without a probe the window is the chunk's last 8 tokens
    assert seen == ([[16], [32], [48], [56]] if lookahead else [[8], [24], [40], [56]])


def test_a_custom_prefill_attention_takes_the_chunk_and_leaves_the_probe_to_its_dense_default():
    """A PrefillAttention that implements only `attention` (the interface's one abstract method) works under the
    lookahead probe: the probe's rows go to the base class's dense default, and the cache equals a dense prefill's."""
    import torch.nn.functional as F

    from adakv import PrefillAttention

    class PlainSdpa(PrefillAttention):
        def __init__(self):
            self.shapes = []

        def attention(self, module, query, key, value, valid, scaling, softcap):
            self.shapes.append((query.shape[2], key.shape[2]))
            group = query.shape[1] // key.shape[1]
            k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
            return F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling).transpose(1, 2)

    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    policy = PlainSdpa()
    mine, dense = AdaKVCache(model, 0.5, window=8, prefill_attention=policy), AdaKVCache(model, 0.5, window=8)
    prefill_in_chunks(model, mine, ids, 16)
    prefill_in_chunks(model, dense, ids, 16)
    assert policy.shapes and all(shape == (16, 16) for shape in policy.shapes)  # the first chunk alone, no probe
    for a, b in zip(compressed(mine), compressed(dense)):
        assert held_positions(a) == held_positions(b)
        torch.testing.assert_close(a.store.view(a.store.keys)[0], b.store.view(b.store.keys)[0])
