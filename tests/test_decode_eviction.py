"""H2O's decoding-time policy: accumulated attention of decoded queries, bounded per-head memory."""

from __future__ import annotations

import pytest
import torch
from tiny_models import padded_batch, tiny_model
from transformers import DynamicCache

from adakv import H2O, AdaKVCache, H2ODecode, with_cache
from adakv.layer import AdaKVLayer

SLACK = H2ODecode().slack


def test_decode_eviction_matches_a_dense_simulation_of_h2o():
    """One layer, one KV head (4 query heads), batch 1: H2O simulated on a DynamicCache with eager attention
    (attention weights read from the model, evicted positions masked out) must give the same logits, the same
    accumulated scores for the held tokens and the same held count at every step."""
    ours = tiny_model("llama", num_hidden_layers=1, num_key_value_heads=1)
    ref = tiny_model("llama", num_hidden_layers=1, num_key_value_heads=1)
    ref.set_attn_implementation("eager")
    budget, window, prompt_len = 12, 4, 40
    ids = torch.randint(3, 256, (1, prompt_len), generator=torch.Generator().manual_seed(3)).to(ours.device)
    cache = AdaKVCache(ours, budget, scorer="h2o", decode="h2o", allocator="uniform", window=window)
    dense = DynamicCache(config=ref.config)

    def cut_back(held: list[int], scores: dict[int, float]) -> list[int]:
        recent = held[-window:]
        rest = sorted(held[:-window], key=lambda p: -scores[p])[: budget - window]
        return sorted(rest + recent)

    with torch.no_grad():
        a = ours(ids, **with_cache(cache)).logits
        out = ref(ids, **with_cache(dense), output_attentions=True)
        torch.testing.assert_close(a, out.logits)
        prob = out.attentions[0][0].float()  # [heads, L, L]
        scores = dict(enumerate(prob.sum(1).mean(0).tolist()))
        held = cut_back(list(range(prompt_len)), scores)
        tok, evictions = a[:, -1:].argmax(-1), 0
        for _ in range(45):
            pos = prompt_len + _  # position of the new token
            mask = torch.zeros(1, pos + 1, dtype=torch.long, device=ours.device)
            mask[0, held + [pos]] = 1
            la = ours(tok, **with_cache(cache)).logits
            out = ref(tok, attention_mask=mask, **with_cache(dense), output_attentions=True)
            torch.testing.assert_close(la, out.logits, rtol=1e-4, atol=1e-5)
            held.append(pos)
            scores[pos] = 0.0
            step = out.attentions[0][0, :, 0].float().mean(0)  # [pos + 1]
            for p in held:
                scores[p] += float(step[p])
            if len(held) > budget + SLACK:
                held, evictions = cut_back(held, scores), evictions + 1
            layer = cache.layers[0]
            assert cache.kept_lengths(0).tolist() == [[len(held)]]
            torch.testing.assert_close(
                layer.decode_state.scores[0, 0, : len(held)].cpu(),
                torch.tensor([scores[p] for p in held]),
                rtol=1e-4,
                atol=1e-6,
            )
            tok = la.argmax(-1)
    assert evictions >= 2


def test_decode_eviction_bounds_every_head_in_batch_and_beam_search():
    model = tiny_model("qwen2", num_key_value_heads=2, num_attention_heads=4)
    ids, mask = padded_batch(seq_len=80, pad=11)
    new = 50
    cache = AdaKVCache(model, 0.25, scorer=H2O(), decode="h2o", allocator="adakv", window=4)
    with torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(cache))
    targets = {i: cache.kept_lengths(i) for i in range(3)}
    assert any(len(set(t.flatten().tolist())) > 1 for t in targets.values())  # Ada-KV: uneven heads
    for i, t in targets.items():
        assert torch.equal(cache.layers[i].decode_state.target, t)
    cache.batch_repeat_interleave(2)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            **with_cache(cache),
            max_new_tokens=new,
            do_sample=False,
            num_beams=2,
            num_return_sequences=2,
        )
    assert out.shape == (4, 80 + new)
    for i, t in targets.items():
        held = cache.kept_lengths(i)
        limit = t.repeat_interleave(2, 0) + SLACK
        assert (held <= limit).all(), (i, held, limit)
        assert cache.layers[i].decode_state.scores.shape[:2] == held.shape
    plain = AdaKVCache(model, 0.25, scorer=H2O(), allocator="adakv", window=4)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, **with_cache(plain), max_new_tokens=new, do_sample=False)
    assert torch.equal(plain.kept_lengths(0), targets[0] + new - 1)  # without it every decoded token stays


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_int_budget_context_then_question(family):
    """A short context (kept whole: it may grow to the int budget), then a padded multi-token question, then
    decoding; gemma2 adds soft-capping and sliding layers (left alone)."""
    model = tiny_model(family)
    ids, mask = padded_batch(seq_len=36, pad=3)
    cache = AdaKVCache(model, 30, scorer="h2o", decode="h2o", allocator="uniform", window=4)
    with torch.no_grad():
        model(ids[:, :20], attention_mask=mask[:, :20], **with_cache(cache))
        compressed = [i for i, layer in enumerate(cache.layers) if hasattr(layer, "decode_state")]
        assert all(cache.layers[i].decode_state.target.eq(30).all() for i in compressed)
        model.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=40, do_sample=False)
    for i in compressed:
        held = cache.kept_lengths(i)
        assert (held <= 30 + SLACK).all() and (held >= 30).all()


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="moved to the cache"):
        H2O(accumulate_decode=True)
    with pytest.raises(ValueError, match="block_elements must be an int >= 1"):
        H2O(block_elements=0)
    with pytest.raises(ValueError, match="per-layer allocator"):
        AdaKVCache(model, 0.2, scorer="h2o", decode="rescore", allocator="layer-adaptive")
    with pytest.raises(ValueError, match="Unknown decode policy"):
        AdaKVCache(model, 0.2, decode="forever")
    with pytest.raises(TypeError, match="decode must be None"):
        AdaKVCache(model, 0.2, decode=3)


def test_h2o_keeps_pyramid_budgets_within_the_bound():
    """decode="h2o" with an int budget and PyramidKV: a cut head keeps its own (pyramid) allocation as its target;
    only a prompt within the budget may grow to it (the upper layers' small budgets used to be raised to the
    average, 274 rows per sequence against the bound of 240)."""
    from adakv import H2ODecode

    model = tiny_model("qwen2", num_key_value_heads=2, num_attention_heads=4)
    ids, mask = padded_batch(seq_len=200, pad=11)
    budget, layers_n, heads = 24, model.config.num_hidden_layers, 2
    cache = AdaKVCache(model, budget, scorer="h2o", window=4, allocator="pyramidkv", decode=H2ODecode())
    tok = torch.full((2, 1), 5)
    peak = 0
    with torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(cache))
        layers = [layer for layer in cache.layers if isinstance(layer, AdaKVLayer)]
        targets = [layer.decode_state.target for layer in layers]
        assert targets[0].min() > budget > targets[-1].max()  # the pyramid is kept
        for _ in range(60):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            model(tok, attention_mask=mask, **with_cache(cache))
            peak = max(peak, int(sum(layer.store.lengths().sum(-1) for layer in layers).max()))
    assert peak <= layers_n * heads * (budget + 16)


def _padded_question(decode):
    """Sequence 0's decode state after a question appended with 3 padded tokens in a batch, and alone."""
    model = tiny_model("llama", num_hidden_layers=1)
    gen = torch.Generator().manual_seed(0)
    ctx, q = torch.randint(3, 256, (2, 40), generator=gen), torch.randint(3, 256, (2, 8), generator=gen)
    qmask = torch.ones(2, 8, dtype=torch.long)
    qmask[0, :3], q[0, :3] = 0, 0

    def run(rows, ids, qm):
        cache = AdaKVCache(model, 24, scorer="h2o", window=8, allocator="uniform", decode=decode)
        with torch.no_grad():
            model(ctx[rows], **with_cache(cache))
            full = torch.cat([torch.ones(len(rows), 40, dtype=torch.long), qm], 1)
            model(ids, attention_mask=full, position_ids=40 + (qm.cumsum(-1) - 1).clamp(min=0), **with_cache(cache))
        return cache.layers[0].decode_state

    return run([0, 1], q, qmask), run([0], q[:1, 3:], qmask[:1, 3:])


def test_padded_queries_count_for_no_decode_policy():
    """A padded question row pays no attention in H2O's accumulation and is not one of Rescore's window queries:
    sequence 0's state is the same in the batch as alone (the pads used to add +1 each / fill the window)."""
    from adakv import H2ODecode, Rescore

    both, alone = _padded_question(H2ODecode())
    n = alone.scores.shape[-1]
    torch.testing.assert_close(both.scores[0, :, :n], alone.scores[0], atol=1e-5, rtol=1e-5)
    both, alone = _padded_question(Rescore(interval=100))
    torch.testing.assert_close(both.queries[:1], alone.queries, atol=1e-6, rtol=1e-6)


def test_rescore_window_is_the_caches_even_after_a_short_last_chunk():
    """generate(prefill_chunk_size=16) on 83 tokens ends with a 3-token chunk: Rescore's window stays the cache's
    (it used to shrink to 3 queries for the whole generation)."""
    from adakv import Rescore

    model = tiny_model("llama", num_hidden_layers=1)
    ids = torch.randint(3, 256, (1, 83), generator=torch.Generator().manual_seed(0))
    cache = AdaKVCache(model, 0.3, window=8, allocator="uniform", decode=Rescore())
    with torch.no_grad():
        model.generate(ids, **with_cache(cache), max_new_tokens=12, do_sample=False, prefill_chunk_size=16)
    state = cache.layers[0].decode_state
    assert state.window == 8 and state.queries.shape[2] == 8


def test_h2o_state_follows_the_cross_layer_cascade(monkeypatch):
    """With a cross-layer allocator the cascade cuts earlier layers after their own cut started the H2O state:
    each held row's H2O score must stay its own token's, and each head's target within what it holds."""
    from adakv.decode.h2o import H2ODecode as Policy
    from adakv.selection import pack_kept

    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=48, pad=7)
    scored = {}  # layer rank -> {(b, h, position): score} at the layer's own cut
    start = Policy.start

    def recording(self, layer, inputs, choice, previous):
        state = start(self, layer, inputs, choice, previous)
        positions = pack_kept(inputs.positions, choice.keep, fill=-1)
        scored[layer.rank] = {
            (b, h, int(p)): float(state.scores[b, h, m])
            for (b, h, m), p in zip(
                torch.cartesian_prod(*map(torch.arange, positions.shape)).tolist(), positions.flatten().tolist()
            )
            if p >= 0
        }
        return state

    monkeypatch.setattr(Policy, "start", recording)
    cache = AdaKVCache(model, 0.3, method="layer-defensivekv", decode="h2o", window=4)
    with torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(cache))
    for layer in cache.layers:
        state, held = layer.decode_state, layer._positions(view=False)
        lengths = layer.store.lengths()
        assert bool((state.target <= lengths).all())
        for (b, h, m), p in zip(torch.cartesian_prod(*map(torch.arange, held.shape)).tolist(), held.flatten().tolist()):
            if p >= 0:
                assert float(state.scores[b, h, m]) == scored[layer.rank][(b, h, p)]
    # the cascade did cut earlier layers after their own cut
    assert sum(len(v) for v in scored.values()) > sum(int(layer.store.lengths().sum()) for layer in cache.layers)


def test_a_policy_that_cannot_follow_the_cascade_is_refused_when_built():
    from adakv.decode.base import DecodePolicy, DecodeState

    class Keep(DecodeState):
        def after_append(self, layer, module, q, scaling, softcap, hidden, valid) -> None:
            pass

        def select_batch(self, index) -> None:
            pass

    class KeepAll(DecodePolicy):
        name = "keep-all"

        def start(self, layer, inputs, choice, previous):
            return Keep()

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="cannot follow"):
        AdaKVCache(model, 0.3, method="layer-defensivekv", decode=KeepAll())
    AdaKVCache(model, 0.3, method="defensivekv", decode=KeepAll())
    AdaKVCache(model, 0.3, method="layer-defensivekv", decode="h2o")


@pytest.mark.parametrize("decode", ["rescore", "h2o"])
@pytest.mark.parametrize("allocator", [None, "adakv"])  # None: KVzip's preset, one budget over the layers
def test_a_context_scorer_is_refused_with_its_own_reason_first(decode, allocator):
    """With KVzip no decode policy works; the refusal says so first (it used to name the cross-layer allocator and
    suggest a per-layer one or decode='h2o', both then refused for the context scorer)."""
    kwargs = {"method": "kvzip"} if allocator is None else {"scorer": "kvzip", "allocator": allocator}
    with pytest.raises(ValueError, match="has none to start from. Use decode=None"):
        AdaKVCache(tiny_model("llama"), 0.3, decode=decode, **kwargs)


def _question_then_decode(model, ctx, questions, steps=24):
    """Prompt ``ctx`` [B, L] (all real), then left-padded ``questions`` (0 = padding) appended in one forward,
    then greedy steps; returns (kept lengths of layer 0 after the question, decoded tokens [B, steps])."""
    from adakv import Rescore

    cache = AdaKVCache(model, 24, window=8, decode=Rescore(interval=8))
    q_mask = (questions != 0).long()
    with torch.no_grad():
        model(ctx, **with_cache(cache))
        mask = torch.cat([torch.ones_like(ctx), q_mask], 1)
        positions = ctx.shape[1] + (q_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(questions, attention_mask=mask, position_ids=positions, **with_cache(cache))
        kept, tokens, tok = cache.kept_lengths(0), [], out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = model(tok, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1, **with_cache(cache))
            tok = out.logits[:, -1:].argmax(-1)
            tokens.append(tok)
    return kept, torch.cat(tokens, 1)


def test_rescore_counts_each_sequences_real_tokens():
    """Rescore's interval counts a sequence's own real tokens: a question's padding does not bring its next
    re-selection forward, and a sequence batched with a longer question decodes as it does alone (it was re-selected
    with the other's schedule before)."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randint(3, 256, (2, 40), generator=gen)
    short, long = torch.randint(3, 256, (1, 2), generator=gen), torch.randint(3, 256, (1, 10), generator=gen)
    alone = _question_then_decode(model, ctx[:1], short)
    padded = _question_then_decode(model, ctx[:1], torch.cat([torch.zeros(1, 8, dtype=torch.long), short], 1))
    assert torch.equal(alone[0], padded[0]) and torch.equal(alone[1], padded[1])
    questions = torch.cat([torch.cat([torch.zeros(1, 8, dtype=torch.long), short], 1), long])
    batch = _question_then_decode(model, ctx, questions)
    other = _question_then_decode(model, ctx[1:], long)
    assert torch.equal(batch[0][:1], alone[0]) and torch.equal(batch[1][:1], alone[1])
    assert torch.equal(batch[0][1:], other[0]) and torch.equal(batch[1][1:], other[1])


def test_rescore_count_restarts_at_a_prompt_cut():
    """A prompt chunk cut after appended tokens starts Rescore's count afresh (every sequence was just cut); only a
    decode-time re-selection keeps the counts of the sequences it did not cut."""
    from adakv import Rescore

    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 80), generator=torch.Generator().manual_seed(0))
    cache = AdaKVCache(model, 16, window=8, decode=Rescore(interval=16))
    with torch.no_grad():
        model(ids[:, :40], **with_cache(cache))
        model(ids[:, 40:50], **with_cache(cache))  # a 10-token question: 6 to go
        layer = cache.layers[0]
        assert (layer.decode_state.next_at - layer.n_real).tolist() == [6]
        with cache.compressing():
            model(ids[:, 50:80], **with_cache(cache))  # a prompt chunk: cut back, the count starts again
    assert (layer.decode_state.next_at - layer.n_real).tolist() == [16]


def test_rescore_scores_with_queries_aligned_to_their_columns(monkeypatch):
    """At a re-selection the scorer reads query i at column L - Q + i. With a budget under the window plus the
    scorer's sinks (Expected Attention pins 4), a head holds fewer recent tokens than the window: the queries
    are cut to those, not aligned with sink columns (which gave the oldest queries positions 0-3)."""
    from adakv.scorers import ExpectedAttention

    seen = []
    original = ExpectedAttention.__call__

    def recording(self, inputs):
        q = inputs.queries.shape[2]
        seen.append((inputs.positions[..., -q:].clone(), inputs.positions.amax(-1, keepdim=True)))
        return original(self, inputs)

    monkeypatch.setattr(ExpectedAttention, "__call__", recording)
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 200), generator=torch.Generator().manual_seed(0))
    cache = AdaKVCache(model, 16, method="ada-expected-attention", decode="rescore")
    with torch.no_grad():
        model.generate(ids, **with_cache(cache), max_new_tokens=40, min_new_tokens=40, do_sample=False)
    reselections = seen[model.config.num_hidden_layers :]  # after the prompt's cuts
    assert reselections
    for tail, last in reselections:
        want = last - tail.shape[-1] + 1 + torch.arange(tail.shape[-1])
        assert torch.equal(tail, want.expand_as(tail))
