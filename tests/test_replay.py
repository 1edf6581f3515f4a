"""One recorded prefill replayed into many methods' caches equals running each method live."""

from __future__ import annotations

import pytest
import torch
from tiny_models import padded_batch, tiny_model

from adakv import AdaKVCache, with_cache
from adakv.prompt import mask_positions
from adakv.replay import record_prefill, replay


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_replay_matches_live_prefill(family):
    model = tiny_model(family)
    ids, mask = padded_batch(seq_len=60)
    _assert_replay_matches_live(model, ids, mask, ("ada-snapkv", "criticalkv", "layer-defensivekv", "pyramidkv"))


def _assert_replay_matches_live(model, ids, mask, methods):
    """Each method: generate on a fresh cache == the recorded prefill's first token, then generate on the replay."""
    record = record_prefill(model, ids, mask)
    first = record.last_logits.argmax(-1, keepdim=True)
    ids2, mask2 = torch.cat([ids, first], -1), torch.cat([mask, torch.ones_like(first)], -1)
    for method in methods:
        with torch.no_grad():
            live = model.generate(
                ids,
                attention_mask=mask,
                **with_cache(AdaKVCache(model, 0.3, window=4, method=method)),
                max_new_tokens=6,
                do_sample=False,
            )
            cache = replay(model, record, 0.3, window=4, method=method)
            again = model.generate(ids2, attention_mask=mask2, **with_cache(cache), max_new_tokens=5, do_sample=False)
        assert torch.equal(live, again), method


def test_replay_question_agnostic_matches_live():
    model = tiny_model("qwen3")
    ids, mask = padded_batch(seq_len=70)
    record = record_prefill(model, ids[:, :50], mask[:, :50])
    outs = []
    for cache in (AdaKVCache(model, 0.4, window=4, method="defensivekv"), None):
        with torch.no_grad():
            if cache is None:
                cache = replay(model, record, 0.4, window=4, method="defensivekv")
            else:
                ctx = mask[:, :50]
                model(ids[:, :50], attention_mask=ctx, position_ids=mask_positions(ctx), **with_cache(cache))
            outs.append(
                model.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=5, do_sample=False)
            )
    assert torch.equal(*outs)


def test_replay_matches_live_generate_on_a_deeply_padded_batch():
    """Sequences padded by most of the batch's width: the recorded prefill counts positions over real tokens, as
    generate does (counting the padding rotated the stored keys elsewhere: the padded rows' tokens differed)."""
    model = tiny_model("llama", num_hidden_layers=4)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 256, (3, 90), generator=gen)
    mask = torch.ones_like(ids)
    for row, real in ((1, 30), (2, 12)):
        ids[row, : 90 - real], mask[row, : 90 - real] = 0, 0
    _assert_replay_matches_live(
        model, ids.to(model.device), mask.to(model.device), ("streamingllm", "expected-attention", "ada-criticalkv")
    )
