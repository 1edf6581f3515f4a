"""Scorers, allocators and the budget logic on small hand-checkable examples."""

from __future__ import annotations

import pytest
import torch
from tiny_models import padded_batch, tiny_model
from torch import nn

from adakv import AdaKVCache, prefill_in_chunks, with_cache
from adakv.allocators import AdaKV, Uniform, topk_mask
from adakv.layer import AdaKVLayer
from adakv.scorers import ExpectedAttention, ScoreInputs, SnapKV, StreamingLLM
from adakv.scorers.snapkv import pool_outside_window
from adakv.selection import Selection


def keep_of(selection: Selection, inputs: ScoreInputs) -> torch.Tensor:
    """The keep mask of a one-shot prefill: every real token of the inputs has been seen."""
    return selection.select(inputs, inputs.valid[:, 0].sum(-1)).keep


def kept(mask: torch.Tensor) -> list:
    """Kept positions per (b, h) as nested lists."""
    return [[row.nonzero().flatten().tolist() for row in b] for b in mask]


# -- allocators --------------------------------------------------------------------------------------------------------
def test_uniform_keeps_top_budget_per_head():
    scores = torch.tensor([[[9.0, 8, 7, 6, 5, 4], [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]]])
    assert kept(Uniform()(scores, torch.tensor([2]))) == [[[0, 1], [4, 5]]]


def test_adakv_heads_compete_and_safeguard_protects_weak_head():
    scores = torch.tensor([[[9.0, 8, 7, 6, 5, 4], [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]]])
    budget = torch.tensor([3])  # 6 slots for the layer
    # alpha 0: the strong head wins every slot.
    assert kept(AdaKV(alpha=0.0)(scores, budget)) == [[[0, 1, 2, 3, 4, 5], []]]
    # alpha 1/3: floor(1) each first (positions 0 and 5), then 4 slots jointly -> all to head 0.
    assert kept(AdaKV(alpha=1 / 3)(scores, budget)) == [[[0, 1, 2, 3, 4], [5]]]
    # alpha 1: identical to uniform.
    assert kept(AdaKV(alpha=1.0)(scores, budget)) == [[[0, 1, 2], [3, 4, 5]]]


def test_adakv_gqa_layer_with_uneven_winners():
    scores = torch.tensor([[[0.9, 0.1, 0.8, 0.2], [0.7, 0.6, 0.05, 0.5], [0.3, 0.01, 0.02, 0.4]]])
    mask = AdaKV(alpha=0.0)(scores, torch.tensor([2]))  # 6 of 12: 0.9 .8 .7 .6 .5 .4
    assert kept(mask) == [[[0, 2], [0, 1, 3], [3]]]
    assert int(mask.sum()) == 6


def test_allocators_batch_with_padding_and_own_budgets():
    inf = float("inf")
    scores = torch.tensor(
        [
            [[-inf, -inf, 0.5, 0.9, 0.1, inf], [-inf, -inf, 0.2, 0.3, 0.8, inf]],  # 4 real tokens
            [[0.6, 0.58, 0.2, 0.7, 0.3, inf], [0.5, 0.4, 0.9, 0.05, 0.3, inf]],  # 6 real tokens
        ]
    )
    budget = torch.tensor([2, 3])
    uni = Uniform()(scores, budget)
    assert kept(uni) == [[[3, 5], [4, 5]], [[0, 3, 5], [0, 2, 5]]]
    ada = AdaKV(alpha=0.0)(scores, budget)
    assert kept(ada) == [[[3, 5], [4, 5]], [[0, 1, 3, 5], [2, 5]]]  # 0.58 beats head 1's 0.5
    assert ada.sum((1, 2)).tolist() == [4, 6]
    assert not ada[0, :, :2].any()  # padding never kept


def test_topk_mask_zero_and_varying_k():
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    assert topk_mask(scores, torch.tensor([0, 2])).tolist() == [[False, False, False], [False, True, True]]


def test_adakv_alpha_validation():
    for bad in (-0.1, 1.5, "0.2", True):
        with pytest.raises(ValueError, match="alpha"):
            AdaKV(alpha=bad)


# -- SnapKV ------------------------------------------------------------------------------------------------------------
def _inputs(queries, keys, window, valid=None):
    bsz, _, seq, _ = keys.shape
    if valid is None:
        valid = torch.ones(bsz, seq, dtype=torch.bool)
    return ScoreInputs(queries, keys, torch.randn_like(keys), valid, window, 0.5, None, nn.Identity())


def _one_hot_case():
    """Head 0's window queries look at position 1, head 1's at position 4 (8 tokens, window 2)."""
    keys = torch.zeros(1, 2, 8, 4)
    keys[0, 0, 1, 0] = 10.0
    keys[0, 1, 4, 1] = 10.0
    queries = torch.zeros(1, 2, 8, 4)
    queries[0, 0, :, 0] = 10.0
    queries[0, 1, :, 1] = 10.0
    return queries, keys


def test_snapkv_scores_point_at_attended_tokens():
    queries, keys = _one_hot_case()
    scores = SnapKV(kernel_size=1)(_inputs(queries, keys, window=2))
    assert scores.shape == (1, 2, 8)
    assert scores[0, 0].argmax() == 1 and scores[0, 1].argmax() == 4
    assert scores[0, 0, 1] > 0.99 and scores[0, 1, 4] > 0.99


def test_snapkv_pooling_by_hand():
    s = torch.tensor([[[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.5]]])
    # window 2 is cut off before pooling, so the last two positions never leak into the rest
    assert pool_outside_window(s, 2, "max", 3).tolist() == [[[0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]]
    avg = pool_outside_window(s, 2, "avg", 3)
    torch.testing.assert_close(avg, torch.tensor([[[0.0, 1 / 3, 1 / 3, 1 / 3, 0.0, 0.0, 0.0, 0.0]]]))


def test_snapkv_gqa_mean_and_max():
    """Two query heads share one KV head: one looks at position 1, the other at position 3."""
    keys = torch.zeros(1, 1, 8, 4)
    keys[0, 0, 1, 0] = 10.0
    keys[0, 0, 3, 1] = 10.0
    queries = torch.zeros(1, 2, 8, 4)
    queries[0, 0, :, 0] = 10.0
    queries[0, 1, :, 1] = 2.0  # weaker preference for position 3
    inp = _inputs(queries, keys, window=2)
    mean = SnapKV(kernel_size=1, gqa="mean")(inp)[0, 0]
    mx = SnapKV(kernel_size=1, gqa="max")(inp)[0, 0]
    assert mean[1] > mean[3] > mean[0]
    assert mx[1] > 0.99 and mx[3] == pytest.approx(
        float(torch.softmax(torch.tensor([0, 0, 0, 10.0] + [0] * 3), 0)[3]), rel=1e-3
    )


def test_snapkv_options_validation():
    for kwargs in ({"pooling": "median"}, {"kernel_size": 0}, {"kernel_size": 4}, {"gqa": "sum"}):
        with pytest.raises(ValueError):
            SnapKV(**kwargs)


# -- the whole selection: budget, window, padding ------------------------------------------------------------
def test_selection_keeps_window_and_top_tokens():
    queries, keys = _one_hot_case()
    comp = Selection(3, SnapKV(kernel_size=1), Uniform(), window=2)
    assert kept(keep_of(comp, _inputs(queries, keys, window=2))) == [[[1, 6, 7], [4, 6, 7]]]


def test_selection_budget_rounding_and_padding():
    queries, keys = _one_hot_case()
    queries, keys = queries.repeat(2, 1, 1, 1), keys.repeat(2, 1, 1, 1)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, :3] = False  # 5 real tokens
    comp = Selection(0.3, SnapKV(kernel_size=1), AdaKV(), window=1)
    assert comp.tokens_per_head(torch.tensor([8, 5])).tolist() == [2, 2]  # round(2.4), round(1.5)
    mask = keep_of(comp, _inputs(queries, keys, window=1, valid=valid))
    assert mask.sum((1, 2)).tolist() == [4, 4]
    assert not mask[1, :, :3].any()
    assert mask[:, :, 7].all()  # window always kept


def test_selection_keeps_short_prompt_whole():
    queries, keys = _one_hot_case()
    valid = torch.ones(1, 8, dtype=torch.bool)
    valid[0, :2] = False
    mask = keep_of(Selection(100, SnapKV(), AdaKV(), window=32), _inputs(queries, keys, window=32, valid=valid))
    assert mask.tolist() == [[valid[0].tolist()] * 2]


def test_budget_smaller_than_window_still_exact():
    queries, keys = _one_hot_case()
    mask = keep_of(Selection(2, SnapKV(), AdaKV(), window=32), _inputs(queries, keys, window=32))
    assert kept(mask) == [[[6, 7], [6, 7]]]


@pytest.mark.parametrize("allocator", [Uniform(), AdaKV()])
@pytest.mark.parametrize("budget", [20, 36, 0.2])
def test_pinned_sinks_come_before_the_window(allocator, budget):
    """A scorer's +inf tokens (StreamingLLM's sinks) are kept by rule even when the budget is smaller than the window
    plus the sinks: the window keeps what they leave (StreamingLLM's sinks + most recent at any budget)."""
    from adakv.scorers import StreamingLLM

    gen = torch.Generator().manual_seed(0)
    bsz, heads, seq, dim = 2, 2, 100, 4
    valid = torch.ones(bsz, seq, dtype=torch.bool)
    valid[1, :10] = False  # left padding: the sinks are the first real tokens
    inputs = _inputs(
        torch.randn(bsz, heads, 8, dim, generator=gen), torch.randn(bsz, heads, seq, dim, generator=gen), 32, valid
    )
    n_real = valid.sum(-1)
    keep = Selection(budget, StreamingLLM(sinks=4), allocator, window=32).select(inputs, n_real).keep
    per_head = Selection(budget, StreamingLLM(), allocator, 32).per_head(n_real, 0, 1)
    for b in range(bsz):
        first = seq - int(n_real[b])
        expected = list(range(first, first + 4)) + list(range(seq - int(per_head[b]) + 4, seq))
        for h in range(heads):
            assert keep[b, h].nonzero().flatten().tolist() == expected


# -- pinned tokens (sinks) under chunked prefill ----------------------------------------------------------------------
def _sinks(cache, b: int = 0) -> list[list[int]]:
    layer = next(layer for layer in cache.layers if isinstance(layer, AdaKVLayer))
    return [sorted(p for p in row.tolist() if 0 <= p < 4) for row in layer._positions(view=False)[b]]


@pytest.mark.fast
def test_a_chunked_prefill_keeps_the_sinks_a_one_shot_prefill_keeps():
    """StreamingLLM at 0.1 on 97 tokens in chunks of 32: the first cut's budget (3 of 32) is below its 4 sinks,
    which the whole prompt's budget (10) keeps. The fractional budget's floor at the pinned count keeps all four
    through every cut, as one shot does; a padded sequence (2 real tokens in its first chunk) keeps them as alone."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 97), generator=torch.Generator().manual_seed(0))
    one = AdaKVCache(model, budget=0.1, method="streamingllm", window=8)
    with torch.no_grad():
        model(ids, **with_cache(one))
    gen = AdaKVCache(model, budget=0.1, method="streamingllm", window=8)
    model.generate(ids, **with_cache(gen), max_new_tokens=1, prefill_chunk_size=32, do_sample=False)
    chunks = AdaKVCache(model, budget=0.1, method="streamingllm", window=8)
    prefill_in_chunks(model, chunks, ids, chunk_size=32)
    heads = model.config.num_key_value_heads
    assert _sinks(one) == _sinks(gen) == _sinks(chunks) == [[0, 1, 2, 3]] * heads
    assert one.kept_lengths(0).tolist() == chunks.kept_lengths(0).tolist() == [[10] * heads]

    ids, mask = padded_batch(seq_len=128, pad=30)
    batch = AdaKVCache(model, budget=0.5, method="streamingllm", window=8)
    model.generate(ids, attention_mask=mask, **with_cache(batch), max_new_tokens=1, prefill_chunk_size=32)
    assert _sinks(batch, 0) == [[0, 1, 2, 3]] * heads


@pytest.mark.fast
def test_a_fractional_budget_keeps_at_least_the_pinned_tokens_an_int_budget_is_exact():
    selection = Selection(0.1, StreamingLLM(sinks=6), Uniform(), window=2)
    assert selection.per_head(torch.tensor([20, 100, 3]), 0, 2).tolist() == [6, 10, 3]  # capped at what was seen
    assert Selection(0.1, SnapKV(), Uniform(), 2).per_head(torch.tensor([20]), 0, 2).tolist() == [2]
    assert Selection(0.1, ExpectedAttention(n_sink=4), Uniform(), 2).per_head(torch.tensor([20]), 0, 2).tolist() == [4]
    assert Selection(3, StreamingLLM(sinks=6), Uniform(), 2).per_head(torch.tensor([20]), 0, 2).tolist() == [3]
