"""KVzip through adakv.compress_context: scoring passes, then one selection; checked against a dense simulation."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import ToyTokenizer, padded_batch, tiny_model
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import adakv.layer
from adakv import AdaKVCache, KVzip, compress_context, score_context, settle_context, with_cache
from adakv.layer import AdaKVLayer
from adakv.prompt import mask_positions

pytestmark = pytest.mark.fast
RECORDED: list[tuple[torch.Tensor, torch.Tensor]] = []


def _recording(module, query, key, value, attention_mask, **kwargs):
    RECORDED.append((query.detach().clone(), key.detach().clone()))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("test_kvzip_recording", _recording)
AttentionMaskInterface.register("test_kvzip_recording", sdpa_mask)


@pytest.mark.parametrize("variant,kv_heads,layers", [("kvzip", 1, 1), ("defensive", 2, 2), ("normalize", 2, 2)])
def test_kvzip_matches_a_dense_simulation(variant, kv_heads, layers, monkeypatch):
    """4 query heads: in every layer the kept positions are the top scores of an independent dense computation
    of KVzip's reconstruction scores (``defensive``: rows pooled, prior-corrected, times the value term;
    ``normalize``: KVzip+, each attention times ||W_O^(g) v_j|| / ||h_t||). With 2 layers the second layer's
    pass queries depend on the first layer's pass attention, which is checked that way. With one layer and
    head, decoding afterwards equals a DynamicCache model whose evicted positions are masked out."""
    defensive, normalize = variant == "defensive", variant == "normalize"
    monkeypatch.setattr(adakv.layer, "PASS_BLOCK", 7)  # the pass attends in several query blocks
    ours = tiny_model("llama", num_hidden_layers=layers, num_key_value_heads=kv_heads)
    ref = tiny_model("llama", num_hidden_layers=layers, num_key_value_heads=kv_heads)
    ref.set_attn_implementation("test_kvzip_recording")
    gain = torch.rand(ours.config.hidden_size, generator=torch.Generator().manual_seed(5)) * 2
    for m in (ours, ref):  # unit RMSNorm gains would give every token the same ||h||, hiding KVzip+'s term
        for block in m.model.layers:
            block.input_layernorm.weight.data.copy_(gain)
    length, budget, window, sinks = 40, 14, 3, 2
    scorer = KVzip(chunk_size=16, sinks=sinks, overlap=3, defensive=defensive, normalize=normalize)
    ids = torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(2)).to(ours.device)
    cache = AdaKVCache(ours, budget, scorer=scorer, allocator="uniform", window=window)
    tok = ToyTokenizer()
    compress_context(ours, cache, ids, tokenizer=tok)

    dense = DynamicCache(config=ref.config)
    attn = ref.model.layers[0].self_attn
    scaling, group, dim = attn.scaling, 4 // kv_heads, attn.head_dim
    hidden = {}
    for i, block in enumerate(ref.model.layers):
        block.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: hidden.__setitem__(i, kw["hidden_states"][0].double()), with_kwargs=True
        )
    with torch.no_grad():
        ref(ids, **with_cache(dense))
        scores = torch.zeros(layers, kv_heads, length, dtype=torch.float64)
        for step in scorer.passes(ids, torch.ones_like(ids), tok):
            n = step.ids.shape[1]
            RECORDED.clear()
            ref(step.ids, **with_cache(dense), position_ids=torch.arange(length, length + n)[None])
            dense.crop(-n)
            lo, hi = int(step.span_start[0]), int(step.span_end[0])
            cols = torch.zeros(length + n, dtype=torch.bool)
            cols[:sinks] = True
            cols[lo:hi] = True
            cols[length:] = True
            causal = torch.arange(length + n)[None, :] <= torch.arange(length, length + n)[:, None]
            for layer_idx in range(layers):
                w = ref.model.layers[layer_idx].self_attn.o_proj.weight.double()  # [hidden, H_q * D]
                values = dense.layers[layer_idx].values[0].double()  # [H, L, D]
                for h in range(kv_heads):
                    q = RECORDED[layer_idx][0][0, h * group : (h + 1) * group].double()  # [G, n, D]
                    k = RECORDED[layer_idx][1][0, h].double()  # [L + n, D]
                    probs = torch.softmax((q @ k.T * scaling).masked_fill(~(causal & cols), float("-inf")), -1)
                    if normalize:  # ||v_j W_O^(g)^T||_2 of the context tokens (the pass's own are not scored)
                        v = torch.cat([values[h], values.new_zeros(n, dim)])
                        out = torch.stack(
                            [v @ w[:, (h * group + g) * dim : (h * group + g + 1) * dim].T for g in range(group)]
                        )
                        probs = probs * out.norm(dim=-1)[:, None, :] / hidden[layer_idx].norm(dim=-1)[None, :, None]
                    row = torch.zeros_like(probs)
                    row[..., lo:hi] = probs[..., lo:hi]
                    if defensive:  # average-pool each row over the span (kernel 5, zero padding), keep its mass
                        pooled = torch.nn.functional.avg_pool1d(row.reshape(-1, 1, length + n), 5, 1, 2)
                        pooled = pooled.reshape(row.shape)
                        span = torch.zeros_like(pooled)
                        span[..., lo:hi] = pooled[..., lo:hi]
                        row = span * row.sum(-1, keepdim=True) / span.sum(-1, keepdim=True)
                    best = scores[layer_idx, h, lo:hi]
                    scores[layer_idx, h, lo:hi] = torch.maximum(best, row[..., lo:hi].amax((0, 1)))
    for layer_idx in range(layers):
        layer_scores = scores[layer_idx]
        if defensive:
            w = ref.model.layers[layer_idx].self_attn.o_proj.weight.double()
            values = dense.layers[layer_idx].values[0].double()
            layer_scores = torch.maximum(layer_scores, layer_scores.mean(-1, keepdim=True))
            norms = torch.stack(
                [
                    torch.stack(
                        [
                            (values[h] @ w[:, (h * group + g) * dim : (h * group + g + 1) * dim].T).abs().sum(-1)
                            for g in range(group)
                        ]
                    ).mean(0)
                    for h in range(kv_heads)
                ]
            )  # [H, L]
            layer_scores = layer_scores * norms / norms.sum(0, keepdim=True)
        layer_scores[:, :sinks] = float("inf")
        layer_scores[:, length - window :] = float("inf")
        expected = [sorted(layer_scores[h].topk(budget).indices.tolist()) for h in range(kv_heads)]
        assert cache.layers[layer_idx]._positions(view=False)[0].tolist() == expected, layer_idx
    assert cache.get_seq_length() == length
    if kv_heads > 1 or layers > 1:  # the masked reference needs one mask for every head and layer
        return

    mask = torch.zeros(1, length, dtype=torch.long)
    mask[0, expected[0]] = 1
    with torch.no_grad():
        nxt = torch.tensor([[7]])
        for pos in range(length, length + 6):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], -1)
            a = ours(nxt, **with_cache(cache)).logits
            b = ref(nxt, attention_mask=mask, **with_cache(dense)).logits
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            nxt = a.argmax(-1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("normalize", [False, True])
def test_kvzip_batch_padding_global_budget_and_restored_stock_layers(family, normalize):
    model = tiny_model(family)
    ids, mask = padded_batch(seq_len=70, pad=12)
    cache = AdaKVCache(model, 0.3, scorer=KVzip(chunk_size=24, normalize=normalize), allocator="layer-adaptive")
    compress_context(model, cache, ids, attention_mask=mask, tokenizer=ToyTokenizer())
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=mask_positions(mask), **with_cache(reference))
    layers = [layer for layer in cache.layers if isinstance(layer, AdaKVLayer)]
    heads = model.config.num_key_value_heads
    per_head = torch.floor(mask.sum(-1) * 0.3 + 0.5).long()
    kept = torch.stack([layer.kept_lengths() for layer in layers])
    assert kept.sum((0, 2)).tolist() == (per_head * heads * len(layers)).tolist()  # one budget over layers
    for layer in layers:
        rows = layer._positions(view=False)
        held = rows[rows >= 0]
        assert (held < mask.sum(-1).max()).all()  # no pass token left behind
        assert layer.context_scores is None and cache.get_seq_length() == 70
    for mine, theirs in zip(cache.layers, reference.layers):
        if not isinstance(mine, AdaKVLayer):  # sliding-window layers: exactly the context's, pass tokens gone
            assert torch.equal(mine.keys, theirs.keys)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 75)


def test_kvzip_errors():
    model = tiny_model("llama")
    ids, mask = padded_batch()
    cache = AdaKVCache(model, 0.3, scorer="kvzip")
    with pytest.raises(ValueError, match="compress the context with adakv.compress_context"), torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(cache))
    with pytest.raises(ValueError, match="pass tokenizer="):
        compress_context(model, AdaKVCache(model, 0.3, scorer="kvzip"), ids, attention_mask=mask)
    with pytest.raises(ValueError, match="KVzip chunk_size must be an int >= 1"):
        KVzip(chunk_size=0)
    full = AdaKVCache(model, 0.3)
    compress_context(model, full, ids, attention_mask=mask)  # any other scorer: a plain prefill
    with pytest.raises(ValueError, match="needs an empty cache"):
        compress_context(model, full, ids, attention_mask=mask)


@pytest.mark.parametrize("method", ["kvzip", "kvzip+"])
def test_score_once_settle_many_budgets(method):
    """score_context + settle_context on copies at several budgets keeps exactly what compress_context keeps at
    each budget; a scored cache refuses forwards until settled."""
    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=60, pad=10)
    tok = ToyTokenizer()
    scored = AdaKVCache(model, 0.5, method=method)
    score_context(model, scored, ids, attention_mask=mask, tokenizer=tok)
    with pytest.raises(ValueError, match="call adakv.settle_context"), torch.no_grad():
        model(ids[:, :3], attention_mask=torch.cat([mask, torch.ones_like(ids[:, :3])], -1), **with_cache(scored))
    for budget in (0.2, 0.5, 7):
        settled = copy.deepcopy(scored)
        settle_context(model, settled, budget=budget)
        assert settled.selection.budget == budget
        direct = AdaKVCache(model, budget, method=method)
        compress_context(model, direct, ids, attention_mask=mask, tokenizer=tok)
        for a, b in zip(settled.layers, direct.layers):
            assert torch.equal(a._positions(view=False), b._positions(view=False))
            assert torch.equal(a.store.lengths(), b.store.lengths())
        with pytest.raises(ValueError, match="needs a cache scored by score_context"):
            settle_context(model, settled)
    with pytest.raises(ValueError, match="score_context runs a ContextScorer's passes"):
        score_context(model, AdaKVCache(model, 0.5), ids, attention_mask=mask, tokenizer=tok)
    scored.reset()  # forgets the scored context: it is an empty KVzip cache again, not one waiting to be settled
    with pytest.raises(ValueError, match="compress the context with adakv.compress_context"), torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(scored))


def test_a_padded_sequence_is_scored_as_alone():
    """The context prefill counts positions over real tokens (as generate and the passes do): a left-padded
    sequence's reconstruction scores equal its scores alone (its passes used to start `pad` positions early)."""
    from adakv import KVzip, score_context

    model = tiny_model("llama", num_hidden_layers=2, rope_theta=10.0)
    length, pad = 60, 10
    ids = torch.randint(3, 256, (2, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :pad], mask[0, :pad] = 0, 0

    def scores(i, m):
        cache = AdaKVCache(model, 0.3, scorer=KVzip(), allocator="uniform")
        score_context(model, cache, i, attention_mask=m, tokenizer=ToyTokenizer())
        return [layer.context_scores[0] for layer in cache.layers if isinstance(layer, AdaKVLayer)]

    for both, alone in zip(scores(ids, mask), scores(ids[:1, pad:], mask[:1, pad:])):
        torch.testing.assert_close(both[:, : length - pad], alone, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("index", [[1, 0], [1], [0, 0, 1]])
def test_a_scored_cache_reordered_settles_as_the_settled_cache_reordered(index):
    """Beam search, num_return_sequences or a user's batch_select_indices between score_context and settle_context:
    the reconstruction scores move with their sequences (they stayed in the old order, so a sequence settled on
    another's scores)."""
    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=60, pad=30)
    scored = AdaKVCache(model, 0.3, scorer=KVzip(chunk_size=24), allocator="adakv", window=4)
    score_context(model, scored, ids, attention_mask=mask, tokenizer=ToyTokenizer())
    moved, settled = copy.deepcopy(scored), copy.deepcopy(scored)
    moved.batch_select_indices(torch.tensor(index))
    settle_context(model, moved)
    settle_context(model, settled)
    settled.batch_select_indices(torch.tensor(index))
    for a, b in zip(moved.layers, settled.layers):
        assert torch.equal(a.store.lengths(), b.store.lengths())
        assert torch.equal(a._positions(view=False), b._positions(view=False))
