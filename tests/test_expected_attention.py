"""ExpectedAttention: RoPE inversion, the formula on a hand-checked case, end to end on tiny models, errors."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from tiny_models import DEVICE, padded_batch, tiny_model
from torch import nn

from adakv import AdaKVCache, with_cache
from adakv.layer import AdaKVLayer
from adakv.methods import METHODS, get_method
from adakv.replay import record_prefill
from adakv.scorers import SCORERS, ExpectedAttention, ScoreInputs, get_scorer
from adakv.scorers.expected_attention import rope_frequencies, rotate


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prerope_hook(model, family: str, layer: int, store: dict):
    """Record layer ``layer``'s queries before RoPE: q_proj's output (after q_norm for Qwen3), ``[B, H_q, L, D]``."""
    attn = model.model.layers[layer].self_attn
    head_dim = attn.head_dim

    def keep(_module, _inputs, out):
        if family == "qwen3":  # q_norm already works per head: [B, L, H, D]
            store["q"] = out.transpose(1, 2).detach()
        else:
            b, n, _ = out.shape
            store["q"] = out.view(b, n, -1, head_dim).transpose(1, 2).detach()

    target = attn.q_norm if family == "qwen3" else attn.q_proj
    return target.register_forward_hook(keep)


@pytest.mark.fast
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3"])
def test_rope_inversion_recovers_the_prerope_queries(family):
    model = tiny_model(family)
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    layer = types.index("full_attention")
    if family == "phi3":  # Phi3 projects q, k, v together: take the query part of qkv_proj's output
        attn = model.model.layers[layer].self_attn
        store = {}
        n_q = model.config.num_attention_heads * attn.head_dim

        def keep(_module, _inputs, out):
            b, n, _ = out.shape
            store["q"] = out[..., :n_q].view(b, n, -1, attn.head_dim).transpose(1, 2).detach()

        handle = attn.qkv_proj.register_forward_hook(keep)
    else:
        store = {}
        handle = _prerope_hook(model, family, layer, store)
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    try:
        record = record_prefill(model, ids)
    finally:
        handle.remove()
    rec = record.inputs[layer]
    inv_freq = rope_frequencies(rec.module, 40).to(DEVICE)
    group = rec.group_size
    pos = rec.positions.repeat_interleave(group, dim=1)  # [B, H_q, L]
    recovered = rotate(rec.queries.float(), -(pos.float()[..., None] * inv_freq), 2 * inv_freq.shape[0])
    assert torch.allclose(recovered, store["q"].float(), atol=1e-5), (recovered - store["q"]).abs().max()
    assert not torch.allclose(rec.queries.float()[:, :, 1:], store["q"].float()[:, :, 1:], atol=1e-3)  # RoPE did act


@pytest.mark.fast
@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 500.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_frequencies_match_the_models_rotary_embedding(rope):
    model = tiny_model("llama", rope_parameters=dict(rope))
    rotary = model.model.rotary_emb
    pos = torch.arange(50, device=DEVICE)[None]
    cos, sin = rotary(torch.zeros(1, 50, 4, device=DEVICE), pos)
    inv_freq = rope_frequencies(model.model.layers[0].self_attn, 50).to(DEVICE)
    angles = pos[0, :, None].float() * inv_freq
    half = inv_freq.shape[0]
    scale = rotary.attention_scaling  # YaRN scales cos and sin; it cancels in the scorer (see its docstring)
    assert torch.allclose(cos[0, :, :half] / scale, angles.cos(), atol=1e-5)
    assert torch.allclose(sin[0, :, :half] / scale, angles.sin(), atol=1e-5)


class _Module(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx


def _reference_scores(pre_q, q_pos, keys, values, key_pos, theta, future, scaling, n_sink, eps):
    """The formula with Python floats and explicit 2x2 rotations, one KV head, one query head, D = 4."""
    d, half = 4, 2
    inv = [1.0 / theta ** (2 * i / d) for i in range(half)]
    used = [q for q, p in zip(pre_q, q_pos) if p >= n_sink]
    n = len(used)
    mu = [sum(q[i] for q in used) / n for i in range(d)]
    cov = [[sum((q[i] - mu[i]) * (q[j] - mu[j]) for q in used) / n for j in range(d)] for i in range(d)]
    rbar = [[0.0] * d for _ in range(d)]
    for t in future:
        for i in range(half):
            c, s = math.cos(t * inv[i]), math.sin(t * inv[i])
            rbar[i][i] += c / len(future)
            rbar[i + half][i + half] += c / len(future)
            rbar[i][i + half] -= s / len(future)
            rbar[i + half][i] += s / len(future)
    mub = [sum(rbar[i][j] * mu[j] for j in range(d)) for i in range(d)]
    rc = [[sum(rbar[i][k] * cov[k][j] for k in range(d)) for j in range(d)] for i in range(d)]
    covb = [[sum(rc[i][k] * rbar[j][k] for k in range(d)) for j in range(d)] for i in range(d)]
    z = {}
    for j, (k, p) in enumerate(zip(keys, key_pos)):
        if p >= n_sink:
            quad = sum(k[a] * covb[a][b] * k[b] for a in range(d) for b in range(d))
            z[j] = scaling * sum(m * x for m, x in zip(mub, k)) + 0.5 * scaling**2 * quad
    total = sum(math.exp(v) for v in z.values())
    scores = {j: (math.exp(v) / total + eps) * math.sqrt(sum(x * x for x in values[j])) for j, v in z.items()}
    return [scores.get(j, math.inf) for j in range(len(keys))]  # sinks: kept by rule (the reference: max + 1)


@pytest.mark.fast
def test_formula_on_a_hand_checked_case():
    theta, scaling, n_sink, eps = 100.0, 0.5, 1, 0.01
    gen = torch.Generator().manual_seed(3)
    seq = 6
    pre_q = torch.randn(4, 4, generator=gen)  # the queries of the last 4 columns, before RoPE
    keys, values = torch.randn(seq, 4, generator=gen), torch.randn(seq, 4, generator=gen)
    positions = torch.arange(seq)
    inv = 1.0 / theta ** (torch.arange(0, 4, 2).float() / 4)
    q = rotate(pre_q, positions[2:, None].float() * inv, 4)  # post-RoPE, as the layer hands them over
    config = tf.LlamaConfig(hidden_size=4, num_attention_heads=1, num_key_value_heads=1, head_dim=4)
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    inputs = ScoreInputs(
        q[None, None], keys[None, None], values[None, None], torch.ones(1, seq, dtype=torch.bool), 2, scaling, None,
        _Module(config),
    )  # fmt: skip
    scorer = ExpectedAttention(n_future_positions=3, n_sink=n_sink, epsilon=eps)
    got = scorer(inputs)[0, 0]
    want = _reference_scores(
        pre_q.tolist(), [2, 3, 4, 5], keys.tolist(), values.tolist(), list(range(seq)), theta, [6, 7, 8], scaling,
        n_sink, eps,
    )  # fmt: skip
    assert torch.allclose(got, torch.tensor(want), rtol=1e-5), (got, want)
    assert int(got.argmax()) == 0  # the sink


@pytest.mark.fast
def test_one_repeated_query_and_one_future_position_is_that_querys_attention():
    """With every query equal (no covariance) and T = 1 the expected attention is the attention the same query
    would pay from the next position; without value norm and sinks the scores are exactly that softmax."""
    config = tf.LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    gen = torch.Generator().manual_seed(0)
    seq, u = 10, torch.randn(8, generator=gen)
    keys, values = torch.randn(1, 1, seq, 8, generator=gen), torch.randn(1, 1, seq, 8, generator=gen)
    inv = rope_frequencies(_Module(config), seq)
    pos = torch.arange(seq - 3, seq).float()
    q = rotate(u.expand(2, 3, 8), pos[:, None] * inv, 8)[None]  # [1, H_q=2, 3, 8]
    inputs = ScoreInputs(q, keys, values, torch.ones(1, seq, dtype=torch.bool), 3, 0.3, None, _Module(config))
    scores = ExpectedAttention(n_future_positions=1, n_sink=0, use_vnorm=False)(inputs)
    future_q = rotate(u, seq * inv, 8)
    want = torch.softmax(0.3 * keys[0, 0] @ future_q, -1)
    assert torch.allclose(scores[0, 0], want, atol=1e-6)


@pytest.mark.fast
def test_scores_follow_the_reference_algorithm_from_hidden_states():
    """The press's own route: q_proj applied to the prompt's hidden states (sinks dropped), RoPE of the next T
    positions from the model's rotary embedding, averaged; here checked against the scorer's un-rotated queries."""
    model = tiny_model("llama")
    layer, n_sink, horizon = 1, 4, 16
    attn = model.model.layers[layer].self_attn
    seen = {}

    def keep(_module, inputs, _out):
        seen["h"] = inputs[0].detach()

    handle = attn.q_proj.register_forward_hook(keep)
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    try:
        rec = record_prefill(model, ids).inputs[layer]
    finally:
        handle.remove()
    h = seen["h"][:, n_sink:]
    d, heads, kv = attn.head_dim, model.config.num_attention_heads, model.config.num_key_value_heads
    q = (h @ attn.q_proj.weight.T).view(1, -1, heads, d).transpose(1, 2)  # [1, H, n, d]
    mu = q.mean(2)
    cov = torch.einsum("bhni,bhnj->bhij", q - mu[:, :, None], q - mu[:, :, None]) / q.shape[2]
    cos, sin = model.model.rotary_emb(mu, torch.arange(30, 30 + horizon, device=DEVICE)[None])
    rot = torch.zeros(d, d, device=DEVICE)
    rot[d // 2 :, : d // 2], rot[: d // 2, d // 2 :] = torch.eye(d // 2), -torch.eye(d // 2)
    r = (cos[0][:, :, None] * torch.eye(d, device=DEVICE) + sin[0][:, :, None] * rot).mean(0)
    mu, cov = mu @ r.T, r @ cov @ r.T
    k = rec.keys[:, :, n_sink:].repeat_interleave(heads // kv, 1)
    z = torch.einsum("bhd,bhld->bhl", mu, k) / math.sqrt(d) + torch.einsum("bhld,bhde,bhle->bhl", k, cov, k) / d / 2
    want = torch.softmax(z, -1).view(1, kv, heads // kv, -1).mean(2) * rec.values[:, :, n_sink:].norm(dim=-1)
    got = ExpectedAttention(n_future_positions=horizon)(rec)
    assert torch.allclose(got[..., n_sink:], want, rtol=1e-4, atol=1e-7)
    assert bool((got[..., :n_sink] > got[..., n_sink:].amax()).all())  # sinks above everything


@pytest.mark.fast
def test_a_constant_position_shift_does_not_change_the_scores():
    """Left padding without position_ids shifts a sequence's RoPE positions by the pad count; the scorer counts
    positions from the first real token, and only differences matter."""
    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=40, pad=9)
    shifted = _captured(model, ids, mask)  # a bare forward: positions 0.. over padding too, shifted by 9 for row 0
    counted = _captured(model, ids, mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))  # the generate() way
    scorer = ExpectedAttention()
    for layer, rec in shifted.items():
        a, b = scorer(rec), scorer(counted[layer])
        assert torch.allclose(a[rec.valid], b[rec.valid], rtol=1e-4, atol=1e-6), layer


def _captured(model, ids, mask, **kwargs) -> dict:
    """Each layer's ScoreInputs of one prefill."""
    with torch.no_grad():
        cache = AdaKVCache(model, budget=1, scorer=_Capture(), allocator="uniform", window=1)
        model(ids, attention_mask=mask, **kwargs, **with_cache(cache))
    return cache.selection.scorer.seen


class _Capture(ExpectedAttention):
    def __init__(self):
        super().__init__()
        self.seen = {}

    def __call__(self, inputs):
        self.seen[inputs.module.layer_idx] = inputs
        return super().__call__(inputs)


@pytest.mark.fast
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("method", ["expected-attention", "ada-expected-attention"])
def test_end_to_end_left_padded_batch(family, method):
    model = tiny_model(family)
    ids, mask = padded_batch(seq_len=48, pad=7)
    cache = AdaKVCache(model, budget=0.25, method=method, window=4)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 53)
    n_real = mask.sum(-1).tolist()
    for idx, layer in enumerate(cache.layers):
        if not isinstance(layer, AdaKVLayer):
            continue
        kept = cache.kept_lengths(idx)
        heads = kept.shape[1]
        for b, n in enumerate(n_real):
            assert int(kept[b].sum()) == round(0.25 * n) * heads + 4 * heads  # budget, then the appended tokens
        if method == "expected-attention":
            assert all(len(set(row)) == 1 for row in kept.tolist())  # uniform allocation
        held = layer.pos_rows  # positions of the rows kept at compression
        for b in range(2):
            for h in range(heads):
                assert {0, 1, 2, 3} <= set(held[b, h].tolist())  # the attention sinks


@pytest.mark.fast
def test_registered_and_preset():
    assert SCORERS["expected-attention"] is ExpectedAttention
    assert isinstance(get_scorer("expected-attention"), ExpectedAttention)
    scorer, allocator = get_method("ada-expected-attention")
    assert scorer.epsilon == 1e-2 and type(allocator).__name__ == "AdaKV"
    scorer, allocator = get_method("expected-attention")
    assert (scorer.n_future_positions, scorer.n_sink, scorer.epsilon) == (512, 4, 0.0)
    assert type(allocator).__name__ == "Uniform"
    assert "2510.00636" in METHODS["expected-attention"].paper


@pytest.mark.fast
def test_errors():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 6, 4, generator=gen)
    valid = torch.ones(1, 6, dtype=torch.bool)

    def inputs(module):
        return ScoreInputs(keys[:, :, -2:], keys, keys, valid, 2, 0.5, None, module)

    no_rope = tf.LlamaConfig(hidden_size=4, num_attention_heads=1, num_key_value_heads=1, head_dim=4)
    no_rope.rope_parameters = None
    with pytest.raises(ValueError, match="no rotary position embedding"):
        ExpectedAttention()(inputs(_Module(no_rope)))
    weird = tf.LlamaConfig(hidden_size=4, num_attention_heads=1, num_key_value_heads=1, head_dim=4)
    weird.rope_parameters = {"rope_type": "spiral", "rope_theta": 10.0}
    with pytest.raises(ValueError, match="does not support rope_type 'spiral'.*supported: default, dynamic"):
        ExpectedAttention()(inputs(_Module(weird)))
    weird.rope_parameters = {"rope_type": "default", "rope_theta": 10.0, "mrope_section": [1, 1]}
    with pytest.raises(ValueError, match="multimodal RoPE"):
        ExpectedAttention()(inputs(_Module(weird)))
    with pytest.raises(ValueError, match="config and layer_idx"):
        ExpectedAttention()(inputs(nn.Linear(2, 2)))
    for bad in ({"n_future_positions": 0}, {"n_sink": -1}, {"epsilon": -1.0}, {"recent_queries": 0}):
        with pytest.raises(ValueError, match="ExpectedAttention"):
            ExpectedAttention(**bad)


@pytest.mark.fast
def test_recent_queries_uses_only_the_last_ones():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    rec = record_prefill(model, ids).inputs[1]
    last = ScoreInputs(
        rec.queries[:, :, -8:], rec.keys, rec.values, rec.valid, rec.window, rec.scaling, rec.softcap, rec.module,
        positions=rec.positions,
    )  # fmt: skip
    assert torch.allclose(ExpectedAttention(recent_queries=8)(rec), ExpectedAttention()(last))
    assert not torch.allclose(ExpectedAttention()(rec), ExpectedAttention()(last))
