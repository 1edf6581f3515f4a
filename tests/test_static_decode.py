"""reserve=N: a decode step with fixed shapes and no host tensor op, traced whole by torch.compile."""

from __future__ import annotations

import pytest
import torch
from tiny_models import compiled_decode_matches_eager, padded_batch, tiny_model

from adakv import AdaKVCache, with_cache


@pytest.mark.fast
@pytest.mark.parametrize("new_tokens", [12, 40])  # within the reserve, and past it (the growth path takes over)
def test_reserve_gives_the_same_tokens_as_the_default(new_tokens):
    model = tiny_model("qwen2")
    ids, mask = padded_batch(seq_len=60, pad=8)
    outs = []
    for reserve in (None, 16):
        cache = AdaKVCache(model, 0.3, window=4, reserve=reserve)
        with torch.no_grad():
            outs.append(
                model.generate(
                    ids, attention_mask=mask, **with_cache(cache), max_new_tokens=new_tokens, do_sample=False
                )
            )
        if reserve:
            # the reserve is real capacity: every segment got it at compaction
            assert cache.layers[0].store.width >= int(cache.kept_lengths(0).max()) - new_tokens + 16
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_decode_step_has_no_graph_break(backend):
    """torch.compile(fullgraph=True) of a whole decode step (model forward of one token through the cache, torch
    backend) traces without a break, and its logits equal the eager step's at every step."""
    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=40, pad=5)
    caches = [AdaKVCache(model, 0.5, window=4, reserve=16, backend="torch") for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            logits = model(ids, attention_mask=mask, **with_cache(cache)).logits
    compiled_decode_matches_eager(model, caches, logits[:, -1:].argmax(-1), mask, backend, steps=5)
    assert torch.equal(caches[0].kept_lengths(0), caches[1].kept_lengths(0))
    assert caches[1].layers[0].n_real.tolist() == caches[0].layers[0].n_real.tolist()


@pytest.mark.fast
def test_reserve_argument_checked():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="reserve must be None or an int >= 0"):
        AdaKVCache(model, 0.5, reserve=-1)
