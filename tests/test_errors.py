"""Bad input gets a clear error, raised before anything is changed."""

from __future__ import annotations

import pytest
import torch
from tiny_models import COMMON, padded_batch, tiny_model
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from adakv import AdaKVCache, with_cache
from adakv.scorers import KVzip


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 0}, "int >= 1|>= 1"),
        ({"budget": -3}, ">= 1"),
        ({"budget": 0.0}, r"\(0, 1\]"),
        ({"budget": -0.5}, r"\(0, 1\]"),
        ({"budget": 1.5}, r"\(0, 1\]"),
        ({"budget": float("nan")}, r"\(0, 1\]"),
        ({"budget": "0.2"}, "must be a number"),
        ({"budget": None}, "must be a number"),
        ({"budget": True}, "must be a number"),
        ({"budget": 0.2, "window": 0}, "window"),
        ({"budget": 0.2, "window": 2.5}, "window"),
        ({"budget": 0.2, "scorer": "snapkvv"}, "Valid names: .*snapkv"),
        ({"budget": 0.2, "allocator": "fair"}, "Valid names: adakv, .*uniform"),
    ],
)
def test_bad_arguments_raise_and_leave_model_unchanged(model, kwargs, match):
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match=match):
        AdaKVCache(model, **kwargs)
    assert model.config._attn_implementation == before


def test_wrong_types(model):
    with pytest.raises(TypeError, match="Scorer instance"):
        AdaKVCache(model, budget=0.2, scorer=3)
    with pytest.raises(TypeError, match="Allocator instance"):
        AdaKVCache(model, budget=0.2, allocator=object())
    with pytest.raises(TypeError, match="PreTrainedModel"):
        AdaKVCache("meta-llama/Llama-3.1-8B", budget=0.2)


class NoInterfaceConfig(PretrainedConfig):
    model_type = "adakv-test-no-interface"


class NoInterfaceModel(PreTrainedModel):
    """A model with its own hard-wired attention (no AttentionInterface)."""

    config_class = NoInterfaceConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(4, 4)
        self.post_init()


def test_model_without_attention_interface_is_named():
    model = NoInterfaceModel(NoInterfaceConfig(num_hidden_layers=1))
    with pytest.raises(ValueError, match="NoInterfaceModel does not run its attention through"):
        AdaKVCache(model, budget=0.2)


def test_unsupported_attention_implementation():
    config = tiny_model("llama").config
    config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        AdaKVCache(config, budget=0.2)
    assert config._attn_implementation == "flex_attention"


def test_cache_reused_with_another_model_shape(model):
    ids, mask = padded_batch()
    cache = AdaKVCache(model, budget=0.5)
    other = tiny_model("llama", num_key_value_heads=4)
    AdaKVCache(other, budget=0.5)  # activated, but the first cache is the one passed
    with pytest.raises(ValueError, match=r"\(kv_heads, head_dim\) = \(2, 16\)"):
        other(ids, attention_mask=mask, **with_cache(cache))
    deeper = tiny_model("llama", num_hidden_layers=5)
    AdaKVCache(deeper, budget=0.5)
    with pytest.raises(ValueError, match="made for a model with 3 layers"):
        deeper(ids, attention_mask=mask, **with_cache(AdaKVCache(model, budget=0.5)))


def test_attention_switched_away_after_creation():
    model = tiny_model("llama")
    ids, mask = padded_batch()
    cache = AdaKVCache(model, budget=0.5)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="no longer uses adakv's attention"):
        model.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=2)
    assert model.config._attn_implementation == "sdpa"


def test_cache_of_one_model_used_by_another_unactivated_model(model):
    """Same shape, but the second model never had adakv activated: the stock attention meets our keys."""
    ids, mask = padded_batch()
    twin = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="not adakv's"):
        twin(ids, attention_mask=mask, **with_cache(AdaKVCache(model, budget=0.5)))


def test_right_padding_is_refused(model):
    ids, mask = padded_batch()
    right = torch.flip(mask, [-1])
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        model(ids, attention_mask=right, **with_cache(AdaKVCache(model, budget=0.5)))


def test_right_padded_question_appended_to_a_compressed_cache_is_refused(model):
    ids, mask = padded_batch()
    cache = AdaKVCache(model, budget=0.5)
    with torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(cache))
        question = torch.ones(ids.shape[0], 5, dtype=mask.dtype)
        left, right = question.clone(), question.clone()
        left[0, :2] = 0  # a left-padded question is fine
        right[0, -2:] = 0
        with pytest.raises(ValueError, match="padding_side = 'left'"):
            model(ids[:, :5], attention_mask=torch.cat([mask, right], -1), **with_cache(cache))
        cache.reset()
        model(ids, attention_mask=mask, **with_cache(cache))
        model(ids[:, :5], attention_mask=torch.cat([mask, left], -1), **with_cache(cache))
    assert cache.layers[0].n_real.tolist() == (mask.sum(-1) + left.sum(-1)).tolist()


def test_replay_refuses_a_prefill_attention_policy(model):
    from adakv import CritiPrefill
    from adakv.replay import record_prefill, replay

    ids, mask = padded_batch()
    record = record_prefill(model, ids, mask)
    with pytest.raises(ValueError, match="prefill_attention"):
        replay(model, record, 0.5, prefill_attention=CritiPrefill())


def test_model_with_only_sliding_layers_is_refused():
    model = tiny_model("mistral", sliding_window=16)
    with pytest.raises(ValueError, match="only sliding-window layers"):
        AdaKVCache(model, budget=0.2)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("decode", ["rescore", "h2o"])
@pytest.mark.parametrize("normalize", [False, True])  # KVzip, KVzip+
def test_decode_policies_refuse_context_scorers(model, normalize, decode):
    """KVzip's scores come from its own passes: a decode policy has no prompt queries to start from (rescore used
    to crash mid-generation, h2o to start from all-zero scores). Refused when the cache is built."""
    with pytest.raises(ValueError, match="decode=None"):
        AdaKVCache(model, 0.2, scorer=KVzip(normalize=normalize), allocator="adakv", decode=decode)


def test_constructor_arguments_are_checked():
    from adakv import CriticalKV, LayerAdaptive, PyramidKV, Uniform
    from adakv.scorers import Random

    for base in ("kvzip", KVzip(normalize=True), CriticalKV()):
        with pytest.raises(ValueError, match="base scorer"):
            CriticalKV(base=base)
    for heads in ("adakv", LayerAdaptive()):
        with pytest.raises(TypeError, match="per-layer Allocator"):
            PyramidKV(heads=heads)
    assert isinstance(PyramidKV(heads=Uniform()).heads, Uniform)
    for seed in ("a", 1.5, True):
        with pytest.raises(TypeError, match="seed must be an int"):
            Random(seed=seed)


def test_a_refused_forward_makes_the_cache_refuse_until_reset(model):
    """A forward refused part-way (right padding) leaves layers that disagree: the next use says to reset (it used
    to fail with an unrelated shape error), and after reset() the cache works."""
    ids, mask = padded_batch(seq_len=60, pad=7)
    right_ids, right_mask = torch.roll(ids, -7, 1), torch.roll(mask, -7, 1)
    cache = AdaKVCache(model, 0.2, window=4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="left padding"):
            model(right_ids, attention_mask=right_mask, **with_cache(cache))
        with pytest.raises(ValueError, match=r"cache.reset\(\)"):
            model(ids, attention_mask=mask, **with_cache(cache))
        cache.reset()
        fresh = AdaKVCache(model, 0.2, window=4)
        for c in (cache, fresh):
            model(ids, attention_mask=mask, **with_cache(c))
    assert torch.equal(cache.kept_lengths(0), fresh.kept_lengths(0))


def test_a_cache_built_inside_sparse_prefill_is_pointed_to_prefill_attention():
    from adakv import sparse_prefill

    model = tiny_model("llama")  # not the shared one: an AdaKVCache made earlier activated adakv's attention there
    with sparse_prefill(model, layer_skip=0), pytest.raises(ValueError, match="prefill_attention=adakv.CritiPrefill"):
        AdaKVCache(model, 0.2)


def _small(config_cls, model_cls, **extra):
    import transformers as tf

    config = getattr(tf, config_cls)(**{**COMMON, "num_hidden_layers": 2, **extra})
    return getattr(tf, model_cls)(config).eval()


@pytest.mark.parametrize("method", ["expected-attention", "ada-expected-attention"])
def test_expected_attention_refuses_interleaved_rope_when_built(method):
    """Cohere rotates interleaved pairs: undoing it as half-split RoPE would give wrong query statistics."""
    cohere = _small("CohereConfig", "CohereForCausalLM", use_qk_norm=False)
    with pytest.raises(ValueError, match="half-split RoPE"):
        AdaKVCache(cohere, 0.3, method=method)
    AdaKVCache(cohere, 0.3, method="snapkv")  # a scorer without pre-RoPE queries is fine
    AdaKVCache(tiny_model("llama"), 0.3, method=method)  # half-split
    # built from the config, the scorer meets the model at the first forward: refused there (it used to score)
    cache = AdaKVCache(cohere.config, 0.3, method=method)
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="half-split RoPE"), torch.no_grad():
        cohere(ids, **with_cache(cache))
    with pytest.raises(ValueError, match="failed"), torch.no_grad():  # refused until reset, as after any failure
        cohere(ids, **with_cache(cache))


@pytest.mark.parametrize("method", ["kvzip", "kvzip+", "kvzip-defensive", "defensivekv", "ada-criticalkv"])
def test_scorers_reading_o_proj_refuse_a_model_without_one_when_built(method):
    neox = _small("GPTNeoXConfig", "GPTNeoXForCausalLM")  # its output projection is `dense`
    with pytest.raises(ValueError, match="o_proj"):
        AdaKVCache(neox, 0.3, method=method)
    AdaKVCache(neox, 0.3, method="snapkv")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_output_attentions_is_refused_not_returned_empty(family):
    """The compacted segments have no dense attention matrix: output_attentions=True used to give empty tuples."""
    model = tiny_model(family)
    model.set_attn_implementation("eager")
    cache = AdaKVCache(model, 0.5, window=4)
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="output_attentions=True"), torch.no_grad():
        model(ids, output_attentions=True, **with_cache(cache))
    cache.reset()
    with torch.no_grad():
        model(ids, **with_cache(cache))


@pytest.mark.fast
@pytest.mark.parametrize("budget", ["1.5", "0"])
def test_the_demo_says_why_a_budget_is_refused(budget, capsys):
    from adakv.demo import main

    with pytest.raises(SystemExit):
        main(["--budget", budget])
    assert "must be in (0, 1]" in capsys.readouterr().err  # was argparse's "invalid _budget value"


@pytest.mark.fast
def test_allocator_options_that_would_be_dropped_are_refused():
    """Two settings that did nothing without a word: CriticalKV's per-head second stage under a cross-layer
    allocator (its second stage competes across layers), and a PyramidKV nested as another PyramidKV's heads (only
    the outer schedule sets layer budgets)."""
    from adakv import CriticalKV, LayerAdaptive, PyramidKV

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="second_stage='per-head'.*cross-layer"):
        AdaKVCache(model, 10, scorer=CriticalKV(second_stage="per-head"), allocator=LayerAdaptive())
    AdaKVCache(model, 10, scorer=CriticalKV(), allocator=LayerAdaptive())  # the default stage works with it
    with pytest.raises(TypeError, match="inner PyramidKV"):
        PyramidKV(heads=PyramidKV(beta=2))
