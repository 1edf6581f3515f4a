"""CritiPrefill: block-sparse attention (torch path and Triton kernel), block selection, sparse_prefill, errors.

The Triton kernel runs through Triton's interpreter on the CPU (TRITON_INTERPRET=1, set by conftest.py).
Outputs are allocated NaN-filled, so an element a kernel forgets to write shows.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import DEVICE, FAMILIES, padded_batch, tiny_model
from transformers import DynamicCache

from adakv import with_cache
from adakv.critiprefill import CritiPrefill, sparse_prefill
from adakv.kernels import block_sparse_reference as reference
from adakv.kernels import triton_block_sparse  # imported after conftest.py set TRITON_INTERPRET

pytestmark = pytest.mark.fast
# where the Triton kernel runs: a GPU when there is one and the interpreter is off (benchmarks/gpu_suite.sh tests),
# else the CPU through the interpreter; the models follow ADAKV_TEST_DEVICE, except where a test runs the kernel
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
KERNEL_DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
KERNELS = {"torch": reference.block_sparse_attention, "triton": triton_block_sparse.block_sparse_attention}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def nan_alloc(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(reference, "_alloc", nan_alloc)
    monkeypatch.setattr(triton_block_sparse, "_alloc", nan_alloc)


def dense_attention(q, k, v, valid, scaling, softcap):
    """Plain causal attention with key padding (repeat K/V, fp32): the independent oracle. ``[B, L_q, H_q, D]``."""
    group = q.shape[1] // k.shape[1]
    q_len, k_len = q.shape[2], k.shape[2]
    kk, vv = (x.float().repeat_interleave(group, 1) for x in (k, v))
    logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), kk) * scaling
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    logits = logits.masked_fill(~(causal[None, None] & valid[:, None, None, :].cpu()), float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(logits, -1), vv).transpose(1, 2)


def random_inputs(gen, bsz, h_kv, group, q_len, k_len, dim, dtype, pad):
    q = torch.randn(bsz, h_kv * group, q_len, dim, generator=gen).to(dtype)
    k = torch.randn(bsz, h_kv, k_len, dim, generator=gen).to(dtype)
    v = torch.randn(bsz, h_kv, k_len, dim, generator=gen).to(dtype)
    valid = torch.ones(bsz, k_len, dtype=torch.bool)
    valid[0, :pad] = False  # left padding on the first sequence
    return q, k, v, valid


def all_blocks(bsz, h_kv, q_len, k_len, seg, blk):
    """Every block before each segment selected explicitly (the gather path, not the dense flag)."""
    geo = reference.geometry(q_len, k_len, seg, blk)
    blocks = torch.full((bsz, h_kv, geo.n_seg, max(geo.n_blk, 1)), -1, dtype=torch.int32)
    for s in range(geo.n_seg):
        n = s * seg // blk
        blocks[:, :, s, :n] = torch.arange(n, dtype=torch.int32)
    return blocks, torch.zeros(bsz, h_kv, geo.n_seg, dtype=torch.bool)


def run(name, q, k, v, blocks, dense, valid, scaling, softcap, seg, blk):
    dev = KERNEL_DEVICE if name == "triton" else "cpu"
    args = [x.to(dev) for x in (q, k, v, blocks, dense, valid)]
    return KERNELS[name](*args, scaling, softcap, seg, blk).cpu()


def real_rows(valid, q_len):
    """Queries that see at least one real key (under left padding: the real queries)."""
    return valid[:, -q_len:]


# -- (a) every block selected == dense attention ------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(
    bsz=st.integers(1, 2),
    h_kv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4]),
    k_len=st.integers(1, 80),
    q_frac=st.sampled_from([1.0, 1.0, 0.5, 0.1]),
    dim=st.sampled_from([16, 64, 80, 128, 256]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    softcap=st.sampled_from([None, 5.0]),
    seg_blk=st.sampled_from([(16, 16), (32, 8), (16, 4), (64, 32)]),
    pad=st.integers(0, 9),
    explicit=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_block_selected_equals_dense(
    bsz, h_kv, group, k_len, q_frac, dim, dtype, softcap, seg_blk, pad, explicit, seed
):
    seg, blk = seg_blk
    q_len = max(1, int(k_len * q_frac))
    pad = min(pad, k_len - 1)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, valid = random_inputs(gen, bsz, h_kv, group, q_len, k_len, dim, dtype, pad)
    if explicit:
        blocks, dense = all_blocks(bsz, h_kv, q_len, k_len, seg, blk)
    else:
        blocks, dense = reference.dense_selection(bsz, h_kv, q_len, k_len, seg, blk, "cpu")
    scaling = dim**-0.5
    want = dense_attention(q, k, v, valid, scaling, softcap)
    rows = real_rows(valid, q_len)
    for name in KERNELS:
        got = run(name, q, k, v, blocks, dense, valid, scaling, softcap, seg, blk)
        assert got.dtype == dtype and got.shape == (bsz, q_len, h_kv * group, dim)
        assert torch.isfinite(got.float()).all(), name  # every element written; padding rows give 0
        torch.testing.assert_close(got.float()[rows], want[rows], atol=TOL[dtype], rtol=TOL[dtype], msg=name)


# -- (b) torch path vs Triton kernel vs the masked oracle on random selections -------------------------------
def random_selection(gen, bsz, h_kv, q_len, k_len, seg, blk, n_slots):
    geo = reference.geometry(q_len, k_len, seg, blk)
    blocks = torch.full((bsz, h_kv, geo.n_seg, n_slots), -1, dtype=torch.int32)
    for b in range(bsz):
        for h in range(h_kv):
            for s in range(geo.n_seg):
                before = s * seg // blk
                take = torch.randperm(before, generator=gen)[: int(torch.randint(0, n_slots + 1, (1,), generator=gen))]
                slots = torch.randperm(n_slots, generator=gen)[: len(take)]  # empty slots anywhere
                blocks[b, h, s, slots] = take.int()
    dense = torch.rand(bsz, h_kv, geo.n_seg, generator=gen) < 0.25
    return blocks, dense


@settings(max_examples=10, deadline=None)
@given(
    bsz=st.integers(1, 2),
    h_kv=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    k_len=st.integers(17, 110),
    q_frac=st.sampled_from([1.0, 0.6]),
    dim=st.sampled_from([32, 64, 96]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    softcap=st.sampled_from([None, 3.0]),
    seg_blk=st.sampled_from([(16, 4), (32, 16), (16, 16)]),
    n_slots=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_random_selection_torch_triton_and_oracle_agree(
    bsz, h_kv, group, k_len, q_frac, dim, dtype, softcap, seg_blk, n_slots, seed
):
    seg, blk = seg_blk
    q_len = max(1, int(k_len * q_frac))
    gen = torch.Generator().manual_seed(seed)
    q, k, v, valid = random_inputs(gen, bsz, h_kv, group, q_len, k_len, dim, dtype, pad=5)
    blocks, dense = random_selection(gen, bsz, h_kv, q_len, k_len, seg, blk, n_slots)
    mask = reference.selection_mask(blocks, dense, valid, q_len, seg, blk)
    want = reference.masked_attention(q.float(), k.float(), v.float(), mask, dim**-0.5, softcap)
    got_torch = run("torch", q, k, v, blocks, dense, valid, dim**-0.5, softcap, seg, blk)
    got_triton = run("triton", q, k, v, blocks, dense, valid, dim**-0.5, softcap, seg, blk)
    for got in (got_torch, got_triton):
        assert torch.isfinite(got.float()).all()
        torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_selection_mask_hand_checked():
    """8 keys, 2 segments of 4, blocks of 2: segment 1 takes block 0 only (and itself, causally)."""
    valid = torch.ones(1, 8, dtype=torch.bool)
    blocks = torch.tensor([[[[-1], [0]]]], dtype=torch.int32)
    dense = torch.tensor([[[True, False]]])
    mask = reference.selection_mask(blocks, dense, valid, 8, 4, 2)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 1, 1, 0],
            [1, 1, 0, 0, 1, 1, 1, 1],
        ]
    )
    assert torch.equal(mask, expected)


# -- (c) the selection logic -----------------------------------------------------------------------------
def _keys_with_block_values(values):
    """Keys [1, 1, 2 * len(values), 2]: block j holds (values[j][0], 0) and (values[j][1], 0)."""
    x = torch.tensor(values, dtype=torch.float32).reshape(-1)
    return torch.stack([x, torch.zeros_like(x)], -1)[None, None]


def test_selection_hand_checked():
    # 16 tokens, segments of 4, blocks of 2 -> 4 segments, 8 blocks; one block per segment (budgets = 2)
    policy = CritiPrefill(segment_size=4, block_size=2, budgets=2, threshold_len=0, layer_skip=0, layer_fusion=False)
    key = _keys_with_block_values([[0.1, 0.3], [0.9, 0.2], [0.5, 0.4], [-3.0, 0.7], [0, 0], [0, 0], [0, 0], [0, 0]])
    valid = torch.ones(1, 16, dtype=torch.bool)
    # positive queries: criticality = q . k_max  -> segment 1 (blocks 0, 1 visible) takes block 1 (0.9);
    # segment 2 (blocks 0..3) takes block 1 too; segment 0 sees no block (dense), segment 3 is the last (dense)
    query = torch.tensor([1.0, 0.0]).expand(1, 1, 16, 2)
    blocks, dense = policy.select(query, key, valid)
    assert dense[0, 0].tolist() == [True, False, False, True]
    assert blocks[0, 0, 1].tolist() == [1] and blocks[0, 0, 2].tolist() == [1]
    # negative queries: criticality = max(-k_max, -k_min) = -k_min -> the block with the smallest key wins
    blocks, dense = policy.select(-query, key, valid)
    assert blocks[0, 0, 1].tolist() == [0] and blocks[0, 0, 2].tolist() == [3]
    # segment-level summary: the midpoint of the segment's max and min queries, per dimension
    q = torch.zeros(1, 1, 16, 2)
    q[0, 0, 8:12] = torch.tensor([[3.0, 0.0], [-2.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # midpoint (0.5, 0) in segment 2
    scores, visible, real_start = policy.criticality(q, key, valid)
    want = 0.5 * torch.tensor([0.3, 0.9, 0.5, 0.7])  # 0.5 * k_max (k_min is below it)
    torch.testing.assert_close(scores[0, 0, 2, :4], want)
    assert visible[0].sum(-1).tolist() == [0, 2, 4, 6] and real_start[0].tolist() == [0, 4, 8, 12]
    # budgets of two blocks: segment 1 sees only two, so it is dense; threshold_len moves the first sparse segment
    two = CritiPrefill(segment_size=4, block_size=2, budgets=4, threshold_len=0, layer_skip=0, layer_fusion=False)
    assert two.select(query, key, valid)[1][0, 0].tolist() == [True, True, False, True]
    late = CritiPrefill(segment_size=4, block_size=2, budgets=2, threshold_len=5, layer_skip=0, layer_fusion=False)
    assert late.select(query, key, valid)[1][0, 0].tolist() == [True, True, False, True]


def test_selection_groups_average_over_query_heads_and_layers_fuse():
    policy = CritiPrefill(segment_size=4, block_size=2, budgets=2, threshold_len=0, layer_skip=0, fusion_alpha=0.25)
    key = _keys_with_block_values([[1.0, 1.0], [2.0, 2.0], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0]])
    valid = torch.ones(1, 16, dtype=torch.bool)
    up = torch.tensor([1.0, 0.0]).expand(1, 1, 16, 2)
    # two query heads on one KV head: +1 and -3 -> mean criticality of block 0 is (1 - 1) / 2 ... block 1: (2 - 2) / 2
    query = torch.cat([up, -3 * up], 1)
    scores, _, _ = policy.criticality(query, key, valid)
    torch.testing.assert_close(scores[0, 0, 1, :2], torch.tensor([(1.0 - 3.0) / 2, (2.0 - 6.0) / 2]))
    # layer fusion: the second layer's probabilities are 0.25 * previous + 0.75 * its own
    policy.select(up, key, valid, layer_idx=0)
    first = policy._fused[2].clone()
    policy.select(-up, key, valid, layer_idx=1)
    own = torch.softmax(torch.tensor([-1.0, -2.0]), 0)
    torch.testing.assert_close(policy._fused[2][0, 0, 1, :2], 0.25 * first[0, 0, 1, :2] + 0.75 * own)
    # a new forward (layer 0 again) starts a new chain
    policy.select(-up, key, valid, layer_idx=0)
    torch.testing.assert_close(policy._fused[2][0, 0, 1, :2], own)


def test_selection_of_a_left_padded_sequence_equals_it_alone():
    policy = CritiPrefill(segment_size=8, block_size=4, budgets=8, threshold_len=8, layer_skip=0, layer_fusion=False)
    gen = torch.Generator().manual_seed(0)
    q, k, _, _ = random_inputs(gen, 1, 2, 2, 60, 60, 16, torch.float32, 0)
    pad = 13
    qp = torch.cat([torch.randn(1, 4, pad, 16, generator=gen), q], 2)
    kp = torch.cat([torch.randn(1, 2, pad, 16, generator=gen), k], 2)
    batch_q, batch_k = torch.cat([qp, torch.randn_like(qp)]), torch.cat([kp, torch.randn_like(kp)])
    valid = torch.ones(2, 60 + pad, dtype=torch.bool)
    valid[0, :pad] = False
    alone = policy.select(q, k, torch.ones(1, 60, dtype=torch.bool))
    padded = policy.select(batch_q, batch_k, valid)
    n = alone[1].shape[2]
    shift = (padded[1].shape[2] - n) * 8 // 4  # blocks are numbered from the (virtual) start
    shifted = torch.where(padded[0][0, :, -n:] >= 0, padded[0][0, :, -n:] - shift, -1)
    assert torch.equal(padded[1][0, :, -n:], alone[1][0]) and torch.equal(shifted, alone[0][0])
    assert not alone[1].all()  # something to compare: some segment is sparse
    assert padded[1][0, :, :-n].all()  # the padding-only segments in front are dense (and hold no query)


# -- (d) end to end on tiny models ------------------------------------------------------------------------
SMALL = dict(segment_size=16, block_size=4, budgets=8, threshold_len=16)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sparse_prefill_with_dynamic_cache_batch_left_padding(family):
    model = tiny_model(family)
    ids, mask = padded_batch(seq_len=80, pad=9)
    before = model.config._attn_implementation
    with torch.no_grad():
        want = model(ids, attention_mask=mask, **with_cache(DynamicCache(config=model.config))).logits
        with sparse_prefill(model, **SMALL) as policy:
            assert model.config._attn_implementation == "critiprefill_" + before
            cache = DynamicCache(config=model.config)
            got = model(ids, attention_mask=mask, **with_cache(cache)).logits
            sparse = policy.last_selection
            assert sparse is not None and not sparse[1].all()  # some segment really was sparse
            # a decode step after the sparse prefill goes through the original attention
            step = model(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), **with_cache(cache))
            assert torch.isfinite(step.logits).all()
        assert model.config._attn_implementation == before
        real = mask.bool()
        assert torch.isfinite(got[real]).all()
        assert cache.get_seq_length() == ids.shape[1] + 1
        # every block kept (the selection replaced by all of them): the same logits as the stock model
        policy = CritiPrefill(**SMALL)
        policy.select = lambda query, key, valid, layer_idx=0: all_blocks(
            key.shape[0], key.shape[1], query.shape[2], key.shape[2], 16, 4
        )
        with sparse_prefill(model, policy):
            full = model(ids, attention_mask=mask, **with_cache(DynamicCache(config=model.config))).logits
        torch.testing.assert_close(full[real], want[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sparse_prefill_triton_interpreted_matches_torch_and_generates(family):
    model = tiny_model(family).to(KERNEL_DEVICE)
    ids, mask = (t.to(KERNEL_DEVICE) for t in padded_batch(seq_len=80, pad=9))
    params = dict(segment_size=16, block_size=8, budgets=16, threshold_len=16)
    with torch.no_grad():
        with sparse_prefill(model, backend="torch", **params):
            want = model(ids, attention_mask=mask).logits  # no cache at all
        with sparse_prefill(model, backend="triton", **params):
            got = model(ids, attention_mask=mask).logits
            out = model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
    assert out.shape == (2, 83)


def test_left_padded_row_equals_the_sequence_alone():
    model = tiny_model("qwen3")
    ids, mask = padded_batch(seq_len=90, pad=11)
    with torch.no_grad(), sparse_prefill(model, **SMALL):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() derives them
        batch = model(ids, attention_mask=mask, position_ids=positions).logits[0, 11:]
        alone = model(ids[:1, 11:]).logits[0]
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-4)


def test_short_prompts_and_first_layers_run_the_stock_attention():
    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=40, pad=3)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with sparse_prefill(model) as policy:  # paper defaults: 40 tokens is far below threshold_len
            got = model(ids, attention_mask=mask).logits
        assert policy.last_selection is None
    assert torch.equal(got, want)
    policy = CritiPrefill(**SMALL)
    assert not policy.sparse_possible(1, 4000) and not policy.sparse_possible(40, 40)
    assert policy.sparse_possible(80, 80)


def test_restored_on_error():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="boom"), sparse_prefill(model, **SMALL):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


# -- (e) errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"segment_size": 0}, "segment_size must be an int >= 1"),
        ({"segment_size": 100, "block_size": 32}, "multiple of block_size"),
        ({"budgets": 100}, "budgets .* multiple of block_size"),
        ({"block_size": 2.5}, "block_size must be an int"),
        ({"threshold_len": -1}, "threshold_len"),
        ({"layer_skip": True}, "layer_skip"),
        ({"layer_fusion": 1}, "layer_fusion must be a bool"),
        ({"fusion_alpha": 1.0}, r"fusion_alpha .*\[0, 1\)"),
        ({"backend": "cuda"}, "backend must be one of auto, torch, triton"),
        ({"layer_skip": 4, "num_layers": 4}, "leaves no sparse layer"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CritiPrefill(**kwargs)


def test_errors_of_sparse_prefill():
    model = tiny_model("llama").to(KERNEL_DEVICE)  # (the Triton refusal below is checked where the kernel runs)
    with (
        pytest.raises(ValueError, match="leaves no sparse layer in a 3-layer model"),
        sparse_prefill(model, layer_skip=3),
    ):
        pass
    with pytest.raises(ValueError, match="Triton kernel needs segment_size a multiple of 16"):
        with sparse_prefill(model, backend="triton", segment_size=8, block_size=4, budgets=8):
            pass
    with pytest.raises(ValueError, match="either a CritiPrefill policy or its parameters"):
        with sparse_prefill(model, CritiPrefill(), budgets=64):
            pass
    with sparse_prefill(model), pytest.raises(ValueError, match="already active"), sparse_prefill(model):
        pass
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "adakv_sdpa"  # what an active AdaKVCache looks like
    try:
        with pytest.raises(ValueError, match=r"AdaKVCache\(model, \.\.\., prefill_attention=CritiPrefill"):
            with sparse_prefill(model):
                pass
    finally:
        model.config._attn_implementation = "sdpa"
    model.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match="'sdpa' or 'eager'"), sparse_prefill(model):
            pass
    finally:
        model.config._attn_implementation = "sdpa"


def test_layer_skip_is_checked_against_the_full_attention_layers():
    """Sliding-window layers are never sparse: a layer_skip past the last full-attention layer (Gemma-3 ends with
    sliding layers), or a model with only sliding layers, is refused up front, not run with nothing sparse."""
    from adakv import AdaKVCache

    gemma = tiny_model("gemma3")  # sliding, full, sliding
    assert gemma.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match=r"full-attention layers are \[1\].*layer_skip <= 1"):
        with sparse_prefill(gemma, layer_skip=2):
            pass
    with pytest.raises(ValueError, match=r"full-attention layers are \[1\]"):
        AdaKVCache(gemma, 0.5, prefill_attention=CritiPrefill(layer_skip=2))
    with sparse_prefill(gemma, layer_skip=1):
        pass
    with pytest.raises(ValueError, match="has no full-attention layer"):
        with sparse_prefill(tiny_model("mistral", sliding_window=64)):
            pass


def test_errors_of_the_attention_entry(monkeypatch):
    q, k, v, valid = random_inputs(torch.Generator().manual_seed(0), 1, 1, 2, 64, 64, 16, torch.float32, 0)
    policy = CritiPrefill(**SMALL)
    with pytest.raises(ValueError, match="layer_idx"):
        policy.attention(torch.nn.Module(), q, k, v, valid, None, None)
    gemma3 = tiny_model("gemma3")
    sliding = gemma3.model.layers[0].self_attn
    with pytest.raises(ValueError, match="sliding window"):
        policy.attention(sliding, q, k, v, valid, None, None)
    full = gemma3.model.layers[1].self_attn
    with pytest.raises(ValueError, match="H_q a multiple of H_kv"):
        policy.attention(full, q, k.expand(1, 3, 64, 16), v.expand(1, 3, 64, 16), valid, None, None)
    out = policy.attention(full, q, k, v, None, None, None)  # valid None: no padding
    torch.testing.assert_close(out, CritiPrefill(**SMALL).attention(full, q, k, v, valid, None, None))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        CritiPrefill(backend="triton").attention(full, q, k, v, valid, None, None)
    with pytest.raises(ValueError, match="segment_size a multiple of 16"):
        triton_block_sparse.block_sparse_attention(
            q, k, v, *reference.dense_selection(1, 1, 64, 64, 8, 4, "cpu"), valid, 0.1, None, 8, 4
        )
    with pytest.raises(ValueError, match="valid must be bool"):
        reference.block_sparse_attention(
            q, k, v, *reference.dense_selection(1, 1, 64, 64, 8, 4, "cpu"), valid.int(), 0.1, None, 8, 4
        )


def test_interpreter_flag_is_set():
    if DEVICE == "cpu" and not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"


# -- (f) with eviction: AdaKVCache(prefill_attention=CritiPrefill(...)) ------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_adakv_cache_with_sparse_prefill(family):
    """The first prompt chunk's attention comes from CritiPrefill; with every block kept it equals the dense
    prefill exactly (same tokens, same kept sets); with its sparse selection the budget is still exact."""
    from adakv import AdaKVCache

    model = tiny_model(family)
    ids, mask = padded_batch(seq_len=80, pad=9)

    def run(policy):
        cache = AdaKVCache(model, 0.25, window=4, method="defensivekv", prefill_attention=policy)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=4, do_sample=False)
        return out, cache

    want, dense_cache = run(None)
    every = CritiPrefill(**SMALL)
    calls = []

    def all_selected(query, key, valid, layer_idx=0):
        calls.append(layer_idx)
        return all_blocks(key.shape[0], key.shape[1], query.shape[2], key.shape[2], 16, 4)

    every.select = all_selected
    got, cache = run(every)
    assert calls and torch.equal(got, want)
    for mine, theirs in zip(cache.layers, dense_cache.layers):
        if hasattr(mine, "kept_lengths"):
            assert torch.equal(mine.kept_lengths(), theirs.kept_lengths())
    sparse = CritiPrefill(**SMALL)
    out, cache = run(sparse)
    assert sparse.last_selection is not None and not sparse.last_selection[1].all()
    assert out.shape == want.shape
    per_head = torch.floor(mask.sum(-1) * 0.25 + 0.5).long()
    for layer in cache.layers:
        if hasattr(layer, "kept_lengths"):  # defensivekv: Ada-KV totals per layer, 3 decoded tokens per head
            assert (layer.kept_lengths().sum(-1) - 3 * layer.kept_lengths().shape[1] == per_head * 2).all()
    with pytest.raises(TypeError, match="prefill_attention must be a PrefillAttention"):
        AdaKVCache(model, 0.25, prefill_attention=object())


def test_a_lookahead_probe_does_not_move_the_sparse_segments():
    """prefill_in_chunks' probe (the prompt's last window, run after the first chunk, then forgotten) is not part of
    CritiPrefill's segments: with nothing evicted, the chunk's K/V and the logits equal those without a probe. The
    segments are aligned to the end of the keys, so a probe in them shifted every segment by its length."""
    from adakv import AdaKVCache, prefill_in_chunks

    model = tiny_model("llama")
    doc = torch.randint(3, 256, (1, 100), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def held(lookahead):
        policy = CritiPrefill(**SMALL)
        cache = AdaKVCache(model, 1.0, window=8, prefill_attention=policy)
        logits = prefill_in_chunks(model, cache, doc, chunk_size=72, lookahead=lookahead)
        assert not policy.last_selection[1].all()  # some segment of the first chunk was sparse
        layer = cache.layers[2]
        return layer.store.view(layer.store.keys)[0], logits

    (k_probe, l_probe), (k_none, l_none) = held(True), held(False)
    torch.testing.assert_close(k_probe, k_none, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_probe, l_none, rtol=1e-4, atol=1e-4)
