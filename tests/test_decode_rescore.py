"""decode="rescore": re-selection every few decoded tokens with the cache's own scorer and allocator."""

from __future__ import annotations

import pytest
import torch
from tiny_models import padded_batch, tiny_model
from transformers import AttentionInterface, DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from adakv import AdaKVCache, Rescore, SnapKV, with_cache
from adakv.layer import AdaKVLayer
from adakv.storage import MIN_SLACK

pytestmark = pytest.mark.fast
RECORDED: list[torch.Tensor] = []


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    RECORDED.append(query.detach().clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("test_recording_sdpa", _recording_attention)
AttentionMaskInterface.register("test_recording_sdpa", sdpa_mask)


def test_rescore_matches_a_dense_simulation():
    """One layer, one KV head (4 query heads), batch 1, int budget. A DynamicCache model whose evicted positions
    are masked out, with SnapKV (no pooling) + uniform top-k re-computed densely from recorded queries every
    `interval` tokens, must give the same logits and hold the same positions at every step."""
    ours = tiny_model("llama", num_hidden_layers=1, num_key_value_heads=1)
    ref = tiny_model("llama", num_hidden_layers=1, num_key_value_heads=1)
    ref.set_attn_implementation("test_recording_sdpa")
    budget, window, interval, prompt_len = 12, 4, 5, 40
    ids = torch.randint(3, 256, (1, prompt_len), generator=torch.Generator().manual_seed(5)).to(ours.device)
    cache = AdaKVCache(
        ours, budget, scorer=SnapKV(kernel_size=1), allocator="uniform", window=window, decode=Rescore(interval)
    )
    dense = DynamicCache(config=ref.config)
    scaling = ref.model.layers[0].self_attn.scaling

    def select(held: list[int], queries: torch.Tensor) -> list[int]:
        """Dense SnapKV: the last `window` queries (query i is held token len - w + i) over the held keys."""
        if len(held) <= budget:
            return held
        keys = dense.layers[0].keys[0, 0, held].double()  # [n, D]
        q = queries[0, :, -window:].double()  # [G, w, D]
        logits = q @ keys.T * scaling
        n = len(held)
        causal = torch.arange(n)[None, :] <= torch.arange(n - window, n)[:, None]
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        scores = probs.mean((0, 1))
        rest = sorted(range(n - window), key=lambda j: -float(scores[j]))[: budget - window]
        return sorted([held[j] for j in rest] + held[n - window :])

    with torch.no_grad():
        RECORDED.clear()
        a = ours(ids, **with_cache(cache)).logits
        out = ref(ids, **with_cache(dense))
        torch.testing.assert_close(a, out.logits)
        recent = RECORDED[-1]  # [1, H_q, L, D]
        held = select(list(range(prompt_len)), recent)
        tok, reselections = a[:, -1:].argmax(-1), 0
        for step in range(1, 31):
            pos = prompt_len + step - 1
            mask = torch.zeros(1, pos + 1, dtype=torch.long, device=ours.device)
            mask[0, held + [pos]] = 1
            la = ours(tok, **with_cache(cache)).logits
            RECORDED.clear()
            out = ref(tok, attention_mask=mask, **with_cache(dense))
            torch.testing.assert_close(la, out.logits, rtol=1e-4, atol=1e-5)
            held.append(pos)
            recent = torch.cat([recent, RECORDED[-1]], 2)[:, :, -window:]
            if step % interval == 0:
                before, held = held, select(held, recent)
                reselections += held != before
            layer = cache.layers[0]
            assert layer._positions(view=False)[0, 0].tolist() == held, step
            tok = la.argmax(-1)
    assert reselections >= 4


def test_rescore_bounds_every_step_with_batch_padding_and_beam_search():
    model = tiny_model("qwen2", num_key_value_heads=2, num_attention_heads=4)
    ids, mask = padded_batch(seq_len=80, pad=11)
    budget, interval = 24, 8
    cache = AdaKVCache(model, budget, window=4, allocator="adakv", decode=Rescore(interval=interval))
    layers = [layer for layer in cache.layers if isinstance(layer, AdaKVLayer)]
    heads = model.config.num_key_value_heads
    token_bytes = 2 * (model.config.hidden_size // model.config.num_attention_heads) * 4
    worst = []

    class Watch(LogitsProcessor):
        def __call__(self, input_ids, scores):
            for layer in layers:
                worst.append((int(layer.store.lengths().sum(-1).max()), layer.nbytes()))
            return scores

    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=mask,
            **with_cache(cache),
            max_new_tokens=60,
            min_new_tokens=60,
            num_beams=2,
            num_return_sequences=2,
            logits_processor=LogitsProcessorList([Watch()]),
        )
    rows = 4  # 2 sequences x 2 beams
    assert max(held for held, _ in worst) <= heads * (budget + interval)
    assert max(nbytes for _, nbytes in worst) <= rows * heads * (budget + interval + MIN_SLACK) * token_bytes
    final = torch.stack([layer.kept_lengths().sum(-1) for layer in layers])
    assert (final >= heads * budget).all()  # cut back to the budget, not below
    # Ada-KV may move budget between heads over time: heads are uneven
    assert any(len(set(layer.kept_lengths()[0].tolist())) > 1 for layer in layers)


def test_rescore_float_budget_follows_tokens_seen_and_arguments():
    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=60, pad=0)
    cache = AdaKVCache(model, 0.25, window=4, allocator="uniform", decode="rescore")
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=49, min_new_tokens=49)
    seen = 60 + 48  # tokens forwarded through the cache
    assert cache.kept_lengths(0).tolist() == [[27, 27], [27, 27]]  # round(0.25 * 108) at the last re-selection
    assert cache.layers[0].n_real.tolist() == [seen, seen]
    with pytest.raises(ValueError, match="Rescore interval must be an int >= 1"):
        Rescore(interval=0)
