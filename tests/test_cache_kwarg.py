"""adakv passes the cache by the name the installed transformers takes (``cache=`` from 5.24, whose old name
``past_key_values=`` warns and leaves the forward in 5.40): its own forwards raise no such warning, and a user's
``generate(**with_cache(cache))`` decodes exactly as the old spelling."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from tiny_models import ToyTokenizer, padded_batch, tiny_model

from adakv import AdaKVCache, compress_context, prefill_in_chunks, with_cache
from adakv.cache_kwarg import CACHE_KWARG

pytestmark = pytest.mark.fast
MODEL = tiny_model("llama", num_hidden_layers=2)


def _cache_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_the_name_follows_the_installed_transformers():
    renamed = Version(transformers.__version__).release >= (5, 24)
    assert CACHE_KWARG == ("cache" if renamed else "past_key_values")
    assert with_cache(7) == {CACHE_KWARG: 7}


def test_adakv_own_forwards_do_not_warn_about_the_cache_argument():
    ids, mask = padded_batch(seq_len=96, pad=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            prefill_in_chunks(MODEL, AdaKVCache(MODEL, 0.3, window=4), ids, attention_mask=mask, chunk_size=40)
            compress_context(
                MODEL,
                AdaKVCache(MODEL, 0.3, method="kvzip", window=4),
                ids,
                attention_mask=mask,
                tokenizer=ToyTokenizer(),
            )
            chunked = AdaKVCache(MODEL, 0.3, window=4)
            MODEL.generate(ids, attention_mask=mask, max_new_tokens=3, prefill_chunk_size=40, **with_cache(chunked))
    assert _cache_warnings(caught) == []


def test_with_cache_generates_as_past_key_values():
    ids, mask = padded_batch(seq_len=64, pad=5)
    outs = []
    for kwargs in (with_cache(AdaKVCache(MODEL, 0.3, window=4)), {"past_key_values": AdaKVCache(MODEL, 0.3, window=4)}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old name, on a transformers that renamed it
            with torch.no_grad():
                outs.append(MODEL.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kwargs))
    assert torch.equal(outs[0], outs[1])
