"""The method catalogue: each scorer / allocator on a small example worked out by hand or densely."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adakv.allocators import AdaKV, PyramidKV, Uniform
from adakv.scorers import H2O, TOVA, CriticalKV, KeyNorm, Random, ScoreInputs, Scorer, StagedScores, StreamingLLM
from adakv.scorers.criticalkv import value_perturbation
from adakv.selection import Selection


def keep_of(selection: Selection, inputs: ScoreInputs) -> torch.Tensor:
    """The keep mask of a one-shot prefill: every real token of the inputs has been seen."""
    return selection.select(inputs, inputs.valid[:, 0].sum(-1)).keep


def kept(mask):
    return [[row.nonzero().flatten().tolist() for row in b] for b in mask]


def make_inputs(bsz=1, h_kv=2, group=1, seq=8, dim=4, valid=None, seed=0, module=None, window=2):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, h_kv * group, seq, dim, generator=gen)
    k = torch.randn(bsz, h_kv, seq, dim, generator=gen)
    v = torch.randn(bsz, h_kv, seq, dim, generator=gen)
    if valid is None:
        valid = torch.ones(bsz, seq, dtype=torch.bool)
    return ScoreInputs(q, k, v, valid, window, dim**-0.5, None, module or nn.Identity())


def dense_h2o(inp: ScoreInputs) -> torch.Tensor:
    q, k = inp.queries.double(), inp.keys.double()
    bsz, h_kv, seq, _ = k.shape
    group = q.shape[1] // h_kv
    k = k.repeat_interleave(group, 1)
    logits = q @ k.transpose(-1, -2) * inp.scaling
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    valid = inp.valid[:, 0]
    allowed = causal[None] & valid[:, None, :] & valid[:, :, None]
    probs = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
    return probs.sum(2).reshape(bsz, h_kv, group, seq).mean(2)


@pytest.mark.parametrize("block_elements", [1, 64, 1 << 20])
def test_h2o_blockwise_equals_dense(block_elements):
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[1, :6] = False
    inp = make_inputs(bsz=2, h_kv=2, group=3, seq=37, dim=8, valid=valid, seed=1)
    out = H2O(block_elements=block_elements)(inp)
    torch.testing.assert_close(out.double(), dense_h2o(inp), rtol=1e-5, atol=1e-6)
    assert torch.allclose(out[1, :, :6], torch.zeros(2, 6))  # padding gets no attention


def test_h2o_hand_example():
    """Two tokens, identical keys: query 0 gives token 0 mass 1, query 1 splits 1/2 + 1/2."""
    q = torch.zeros(1, 1, 2, 2)
    k = torch.ones(1, 1, 2, 2)
    inp = ScoreInputs(q, k, k, torch.ones(1, 2, dtype=torch.bool), 1, 1.0, None, nn.Identity())
    assert H2O()(inp).tolist() == [[[1.5, 0.5]]]


def test_streamingllm_keeps_sinks_and_recent():
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :3] = False
    inp = make_inputs(bsz=2, seq=10, valid=valid)
    mask = keep_of(Selection(5, StreamingLLM(sinks=2), Uniform(), window=1), inp)
    assert kept(mask) == [[[0, 1, 7, 8, 9]] * 2, [[3, 4, 7, 8, 9]] * 2]


def test_knorm_keeps_small_keys():
    inp = make_inputs(h_kv=1, seq=4)
    inp.keys[0, 0] = torch.tensor([[3.0, 0, 0, 0], [0.5, 0, 0, 0], [2.0, 0, 0, 0], [1.0, 0, 0, 0]])
    assert KeyNorm()(inp).tolist() == [[[-3.0, -0.5, -2.0, -1.0]]]


def test_tova_uses_last_query_only():
    inp = make_inputs(h_kv=1, group=2, seq=5, dim=2)
    inp.keys.zero_()
    inp.keys[0, 0, 1, 0] = 5.0
    inp.queries.zero_()
    inp.queries[0, :, -1, 0] = 4.0  # only the last query looks at token 1
    scores = TOVA()(inp)
    p = torch.softmax(torch.tensor([0.0, 20.0 / 2**0.5, 0, 0, 0]), 0)
    torch.testing.assert_close(scores[0, 0], p)


def test_random_is_seeded():
    inp = make_inputs()
    assert torch.equal(Random(seed=3)(inp), Random(seed=3)(inp))
    assert not torch.equal(Random(seed=3)(inp), Random(seed=4)(inp))


class _OProj(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.o_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.o_proj.weight.data = weight


def test_value_perturbation_by_hand():
    # 1 KV head, 2 query heads of head_dim 2, hidden 2: W_O columns [0:2] for head 0, [2:4] for head 1
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
    inp = make_inputs(h_kv=1, group=2, seq=2, dim=2, module=_OProj(weight))
    inp.values[0, 0] = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    # token 0: head0 W v = (1, 1) -> 2; head1 (2, -1) -> 3; mean 2.5. token 1: (0,3) -> 3; (0,-3) -> 3; mean 3
    assert value_perturbation(inp).tolist() == [[[2.5, 3.0]]]


def test_value_perturbation_in_half_precision_matches_fp32():
    # the products run in the model's dtype on CUDA (tensor cores), the L1 norm is summed in fp32: random bf16
    # inputs give the fp32 result to bf16 rounding, and scores stay fp32
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 4 * 16, generator=gen)
    inp = make_inputs(h_kv=2, group=2, seq=300, dim=16, module=_OProj(weight))
    exact = value_perturbation(inp, dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16):
        got = value_perturbation(inp, chunk_elements=64 * 4 * 7, dtype=dtype)  # several chunks
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, exact.float(), rtol=1e-2, atol=0.0)
    torch.testing.assert_close(value_perturbation(inp), exact.float(), rtol=1e-5, atol=0.0)  # fp32 off CUDA


class Fixed(Scorer):
    def __init__(self, scores):
        self.scores = torch.tensor(scores)

    def __call__(self, inputs):
        return self.scores.clone()


def test_criticalkv_two_stage_selection():
    """second_stage="per-head" (CriticalKV's code): stage 1 keeps floor(half the head's budget) by the base score,
    the window inside (it ranks first); stage 2 fills the head's budget by (s + eps) * N. "joint" (default): stage 1
    keeps the window plus half of the rest."""
    weight = torch.eye(2).repeat(1, 1)  # 1 query head, W_O = I: N_j = ||v_j||_1
    inp = make_inputs(h_kv=1, group=1, seq=6, dim=2, module=_OProj(weight), window=1)
    inp.values[0, 0] = torch.tensor([[1.0, 0], [10.0, 0], [0.1, 0], [8.0, 0], [1.0, 0], [1.0, 0]])
    base = [[[0.9, 0.1, 0.95, 0.2, 0.3, 0.0]]]
    plain = keep_of(Selection(4, Fixed(base), Uniform(), window=1), inp)
    assert kept(plain) == [[[0, 2, 4, 5]]]
    for stage in ("joint", "per-head"):
        crit = keep_of(Selection(4, CriticalKV(Fixed(base), second_stage=stage), Uniform(), window=1), inp)
        # stage 1: 2 slots -> window {5} + {2}; stage 2: (s+eps)*N = [.9, 1.0, .095, 1.6, .3] -> {3, 1}
        assert kept(crit) == [[[1, 2, 3, 5]]]
    # budget 3, per-head: stage 1 is floor(1.5) = 1 slot, the window's own: {5}, then {3, 1}
    per_head = CriticalKV(Fixed(base), second_stage="per-head")
    assert kept(keep_of(Selection(3, per_head, Uniform(), window=1), inp)) == [[[1, 3, 5]]]
    # joint: stage 1 is the window + floor(0.5 * 2) = 1 more: {5, 2}, then {3}
    assert kept(keep_of(Selection(3, CriticalKV(Fixed(base)), Uniform(), window=1), inp)) == [[[2, 3, 5]]]
    with pytest.raises(ValueError, match="second_stage"):
        CriticalKV(second_stage="both")
    with pytest.raises(ValueError, match="o_proj"):
        keep_of(Selection(3, CriticalKV(Fixed(base)), Uniform(), window=1), make_inputs(h_kv=1, seq=6, window=1))


class Staged(Scorer):
    def __init__(self, first, second):
        self.first, self.second = torch.tensor(first), torch.tensor(second)
        self.per_head = True

    def __call__(self, inputs):
        return StagedScores(self.first.clone(), self.second.clone(), 0.5, per_head=self.per_head)


def test_staged_scores_fix_each_heads_total_by_the_first_stage():
    """per_head: with Ada-KV, the heads' totals come from the first-stage (base) scores; the second stage fills
    each head's own total and does not move budget between heads, however its scales differ (CriticalAdaKVPress).
    Without it (CriticalKV's default "joint"), the heads compete again on the second stage."""
    inp = make_inputs(h_kv=2, seq=8, window=1)
    gen = torch.Generator().manual_seed(1)
    first = torch.rand(1, 2, 8, generator=gen)
    first[0, 0] *= 10  # head 0 wins the base competition
    second = torch.rand(1, 2, 8, generator=gen)
    second[0, 1] *= 1000  # head 1 would win a second competition
    staged = Staged(first.tolist(), second.tolist())
    keep = keep_of(Selection(4, staged, AdaKV(alpha=0.0), window=1), inp)
    base_only = keep_of(Selection(4, Fixed(first.tolist()), AdaKV(alpha=0.0), window=1), inp)
    assert keep.sum(-1).tolist() == base_only.sum(-1).tolist()
    assert keep.sum(-1)[0, 0] > keep.sum(-1)[0, 1]
    staged.per_head = False
    joint = keep_of(Selection(4, staged, AdaKV(alpha=0.0), window=1), inp)
    assert joint.sum(-1)[0, 1] > keep.sum(-1)[0, 1]  # head 1 wins budget back on its second-stage scores


def test_criticalkv_option_validation():
    for kwargs in ({"first_stage": 0.0}, {"first_stage": 1.5}, {"eps": -1.0}):
        with pytest.raises(ValueError):
            CriticalKV(**kwargs)


def test_pyramidkv_budgets_decrease_and_average():
    pyr = PyramidKV(beta=4)
    budget, n = torch.tensor([40]), torch.tensor([1000])
    per_layer = [int(pyr.layer_budget(budget, n, layer, 5, window=8)) for layer in range(5)]
    # b = 32: top = 8 + 32/4 = 16, bottom = 8 + 64 - 8 = 64, linear in between
    assert per_layer == [64, 52, 40, 28, 16]
    assert sum(per_layer) / 5 == 40
    # a prompt shorter than 2b = 64 tokens: the same budget in every layer (the official code's fallback)
    short = [int(pyr.layer_budget(torch.tensor([40]), torch.tensor([50]), layer, 5, window=8)) for layer in range(5)]
    assert short == [40] * 5
    # just above it the bottom layer (8 + 64 - 1.6 = 70.4) is capped at the prompt (66)
    flat = PyramidKV(beta=20)
    capped = [int(flat.layer_budget(torch.tensor([40]), torch.tensor([66]), layer, 5, window=8)) for layer in range(5)]
    assert capped[0] == 66 and capped == sorted(capped, reverse=True) and sum(capped) == 200
    with pytest.raises(ValueError, match="beta"):
        PyramidKV(beta=0.5)


def test_pyramidkv_through_compressor_uses_layer_index():
    inp = make_inputs(h_kv=2, seq=100, window=4)
    masks = []
    for layer in range(3):
        inp.layer, inp.num_layers = layer, 3
        masks.append(keep_of(Selection(20, Random(), PyramidKV(), window=4), inp))
    counts = [int(m.sum()) // 2 for m in masks]
    assert counts[0] > counts[1] > counts[2] and abs(sum(counts) / 3 - 20) <= 1


def test_adakv_with_staged_scores_keeps_exact_budget():
    weight = torch.randn(8, 8)
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :9] = False
    inp = make_inputs(bsz=2, h_kv=2, group=2, seq=50, dim=2, valid=valid, module=_OProj(weight), window=4)
    mask = keep_of(Selection(0.3, CriticalKV(), AdaKV(), window=4), inp)
    assert mask.sum((1, 2)).tolist() == [2 * 15, 2 * 12]
    assert not mask[1, :, :9].any()


# -- DefensiveKV and layer-adaptive allocation ----------------------------------------------------------------------
def test_defensive_aggregation_by_hand():
    from adakv.scorers.defensivekv import defensive_aggregation

    attn = torch.zeros(1, 1, 1, 2, 5)  # 2 window queries, 3 prefix tokens
    attn[0, 0, 0, 0, :3] = torch.tensor([0.6, 0.0, 0.3])
    attn[0, 0, 0, 1, :3] = torch.tensor([0.1, 0.9, 0.0])
    valid = torch.ones(1, 5, dtype=torch.bool)
    # kernel 1: worst case [0.6, 0.9, 0.3] (mean aggregation would rank token 0 below token 1 by less);
    # prior correction raises everything below the mean 0.6
    risk = defensive_aggregation(attn, valid, 1)[0, 0]
    torch.testing.assert_close(risk[:3], torch.tensor([0.6, 0.9, 0.6]))
    # kernel 3, zero padding, each row rescaled to its own mass (0.9 and 1.0)
    row0 = torch.tensor([0.2, 0.3, 0.1]) * (0.9 / 0.6)
    row1 = torch.tensor([1 / 3, 1 / 3, 0.3]) * (1.0 / (2 / 3 + 0.3))
    worst = torch.maximum(row0, row1)
    expected = torch.maximum(worst, worst.mean())
    torch.testing.assert_close(defensive_aggregation(attn, valid, 3)[0, 0, :3], expected)


def test_defensivekv_value_term_is_normalized_across_heads():
    from adakv.scorers import DefensiveKV, window_attention
    from adakv.scorers.defensivekv import defensive_aggregation

    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    inp = make_inputs(h_kv=2, group=2, seq=12, dim=2, module=_OProj(weight), window=3)
    n = value_perturbation(inp)
    expected = defensive_aggregation(window_attention(inp), inp.valid, 5) * n / n.sum(1, keepdim=True)
    torch.testing.assert_close(DefensiveKV()(inp), expected)


def test_layer_adaptive_top_over_pieces():
    from adakv.allocators import LayerAdaptive

    inf = float("inf")
    earlier = torch.tensor([[[5.0, 1.0, -inf], [3.0, 0.5, 0.2]]])
    current = torch.tensor([[[4.0, 0.1], [2.0, 6.0]]])
    masks = LayerAdaptive().across_layers([earlier, current], torch.tensor([4]))  # 6 > 5 > 4 > 3
    assert masks[0].tolist() == [[[True, False, False], [True, False, False]]]
    assert masks[1].tolist() == [[[True, False], [False, True]]]


def test_layer_adaptive_safeguard_floor_per_layer_and_head():
    """alpha > 0: each (layer, head) keeps its own best floor(alpha * average per head) first, padding never; the
    rest of the total goes to the best remaining scores; alpha=0 is the plain top-k; one layer alone equals Ada-KV
    with the same alpha."""
    from adakv.allocators import LayerAdaptive

    inf = float("inf")
    # two layers x 2 heads, batch 2; layer 0 scores far below layer 1, one head of layer 0 has padding
    earlier = torch.tensor(
        [[[0.5, 0.4, 0.3, -inf], [0.2, 0.1, 0.05, 0.01]], [[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2]]]
    )
    current = torch.tensor(
        [[[9.0, 8.0, 7.0, 6.0], [5.0, 4.0, 3.0, 2.0]], [[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, -2.0, -3.0]]]
    )
    total = torch.tensor([8, 8])  # average per head 2 over 2 layers x 2 heads
    plain = LayerAdaptive().across_layers([earlier, current], total)
    assert kept(plain[0])[0] == [[], []]  # row 0: the global top-8 is all of layer 1
    assert kept(plain[1])[0] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    masks = LayerAdaptive(alpha=0.5).across_layers([earlier, current], total)  # floor(0.5 * 2) = 1 each
    assert kept(masks[0])[0] == [[0], [0]]
    assert kept(masks[1])[0] == [[0, 1, 2, 3], [0, 1]]  # after the floors, 9 8 7 6 5 4 are the best remaining
    # row 1: floors .9 / .5 / 4 / 0, then the best 4 remaining of everything: 3 2 1 .8
    assert kept(masks[0])[1] == [[0, 1], [0]]
    assert kept(masks[1])[1] == [[0, 1, 2, 3], [0]]
    for m in (plain, masks):
        assert [int(sum(x[b].sum() for x in m)) for b in range(2)] == [8, 8]
    full = LayerAdaptive(alpha=1.0).across_layers([earlier, current], total)  # every (layer, head) its 2
    assert [kept(x)[0] for x in full] == [[[0, 1], [0, 1]], [[0, 1], [0, 1]]]
    # a head with fewer candidates than its floor keeps what it has, never its padding
    short = torch.tensor([[[1.0, -inf, -inf, -inf], [1.0, 0.5, 0.2, 0.1]]])
    one = LayerAdaptive(alpha=1.0).across_layers([short, current[:1]], torch.tensor([8]))
    assert not bool(one[0][0, 0, 1:].any())
    assert int(one[0].sum() + one[1].sum()) == 8  # the floor it could not fill goes to the joint part
    # a layer that lost every token (an empty piece) takes no part
    empty = LayerAdaptive(alpha=0.5).across_layers([torch.zeros(2, 2, 0), current], torch.tensor([3, 5]))
    assert empty[0].shape == (2, 2, 0) and empty[1].sum((1, 2)).tolist() == [3, 5]
    assert LayerAdaptive().across_layers([torch.zeros(2, 2, 0), current], torch.tensor([3, 5]))[1].sum() == 8
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 4, 10, generator=gen)
    budget = torch.tensor([3, 5, 2])
    for alpha in (0.0, 0.2, 0.5, 1.0):
        assert torch.equal(LayerAdaptive(alpha)(scores, budget), AdaKV(alpha)(scores, budget))
    with pytest.raises(ValueError, match="LayerAdaptive alpha"):
        LayerAdaptive(alpha=1.5)
