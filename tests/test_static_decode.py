"""reserve=N: a decode step with fixed shapes and no host tensor op, traced whole by torch.compile."""

from __future__ import annotations

import pytest
import torch
from tiny_models import DEVICE, compiled_decode_matches_eager, padded_batch, tiny_model

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


def test_generate_compiles_the_decode_step_past_the_reserve():
    """generate(compile_config=...) compiles the decode step of a cache with a reserve (fullgraph: any re-layout
    inside the step would fail the trace), refills the reserve between steps, and gives the eager tokens."""
    from transformers import CompileConfig

    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=60, pad=8)
    outs, kept = [], []
    configs = [None, CompileConfig(backend="aot_eager", fullgraph=True, dynamic=True)]
    if DEVICE.type == "cuda":  # (gpu_suite.sh) what generate does there by default: inductor, CUDA graphs
        configs.append(CompileConfig())
    for compile_config in configs:
        if compile_config is not None:
            compile_config._compile_all_devices = True  # transformers compiles on CUDA by default; here on the CPU
            torch._dynamo.reset()
        # on CUDA the default backend: Triton's ops, registered for torch.compile
        cache = AdaKVCache(model, 0.3, window=4, reserve=16, backend="torch" if DEVICE.type == "cpu" else None)
        assert cache.is_compileable
        with torch.no_grad():
            outs.append(
                model.generate(
                    ids,
                    attention_mask=mask,
                    **with_cache(cache),
                    max_new_tokens=40,  # 2.5 reserves: two refills
                    do_sample=False,
                    compile_config=compile_config,
                    disable_compile=compile_config is None,  # (on CUDA generate would compile by default)
                )
            )
        kept.append(cache.kept_lengths(0))
    assert hasattr(model, "_compiled_call")  # generate took the compiled forward
    for out, lengths in zip(outs[1:], kept[1:]):
        assert torch.equal(out, outs[0]) and torch.equal(lengths, kept[0])
    # a new cache (new tensors) reuses the compiled step: nothing is recompiled
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    cache = AdaKVCache(model, 0.3, window=4, reserve=16, backend="torch" if DEVICE.type == "cpu" else None)
    with torch.no_grad():
        again = model.generate(
            ids,
            attention_mask=mask,
            **with_cache(cache),
            max_new_tokens=40,
            do_sample=False,
            compile_config=configs[-1],
        )
    assert torch.equal(again, outs[0]) and counters["stats"]["unique_graphs"] == graphs


@pytest.mark.fast
def test_make_room_refills_the_reserve_and_keeps_the_tokens():
    model = tiny_model("qwen2")
    ids, mask = padded_batch(seq_len=40, pad=5)
    cache = AdaKVCache(model, 0.5, window=4, reserve=20)
    with torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(cache))
    store = cache.layers[1].store
    assert store.has_room(20) and not store.has_room(21)
    cache.make_room(20)  # room enough: nothing moves
    assert store.has_room(20)
    b, h = store.shape
    for _ in range(19):  # decode-like appends into the reserve
        store.append(torch.randn(b, h, 1, 16, device=DEVICE), torch.randn(b, h, 1, 16, device=DEVICE))
    lengths, (keys, inside) = store.lengths(), store.view(store.keys)
    cache.make_room(2)  # one row left: every segment gets the reserve again
    assert store.has_room(20) and not store.has_room(21)
    assert torch.equal(store.lengths(), lengths)
    keys_after, inside_after = store.view(store.keys)
    assert torch.equal(inside_after, inside) and torch.equal(keys_after[inside], keys[inside])


@pytest.mark.fast
def test_compileable_only_with_a_reserve_and_no_decode_policy():
    model = tiny_model("llama")
    assert not AdaKVCache(model, 0.5).is_compileable
    assert AdaKVCache(model, 0.5, reserve=8).is_compileable
    assert not AdaKVCache(model, 0.5, reserve=8, decode="rescore").is_compileable


def test_compiled_generate_runs_its_chunked_prefill_eager():
    """generate compiles the chunks of its prefill too when the cache is compileable: inside that loop the cache
    says it is not, so the chunks (a last one of one token included) are compressed as without compilation."""
    from transformers import CompileConfig

    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=49, pad=5)  # 6 chunks of 8 and one of 1
    runs = []
    for compile_config in (None, CompileConfig(backend="aot_eager", fullgraph=True, dynamic=True)):
        if compile_config is not None:
            compile_config._compile_all_devices = True
            torch._dynamo.reset()
        cache = AdaKVCache(model, 10, window=4, reserve=16, backend="torch" if DEVICE.type == "cpu" else None)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                **with_cache(cache),
                max_new_tokens=1,  # the prompt's own forwards only: kept as the prefill left them
                do_sample=False,
                prefill_chunk_size=8,
                compile_config=compile_config,
                disable_compile=compile_config is None,
            )
        runs.append((out, cache.kept_lengths(0)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert int(runs[1][1].sum(-1).max()) <= 2 * 10  # within the budget of 10 per head


@pytest.mark.fast
def test_a_reserve_fixes_the_addresses_a_compiled_step_mutates():
    """With a reserve the buffers and metadata are tagged as static addresses (CUDA graphs need it), through
    re-layouts too; without one nothing is tagged."""
    model = tiny_model("qwen2")
    ids, mask = padded_batch(seq_len=40, pad=5)
    for reserve in (None, 16):
        cache = AdaKVCache(model, 0.5, window=4, reserve=reserve)
        with torch.no_grad():
            model(ids, attention_mask=mask, **with_cache(cache))
        store = cache.layers[0].store
        tagged = [getattr(t, "_dynamo_static_input_type", None) for t in (store.keys, store.values, store.length)]
        assert tagged == (["unguarded"] * 3 if reserve else [None] * 3)  # as StaticCache's: no recompile per cache
        if reserve:
            cache.batch_select_indices(torch.tensor([1, 0], device=DEVICE))  # a re-layout: new tensors, tagged
            assert getattr(store.keys, "_dynamo_static_input_type", None) == "unguarded"


def test_eager_prompt_chunks_with_a_reserve_take_the_ragged_path():
    """The fixed-width path (every segment's reserve attended) is for decode steps and traced code: eager prompt
    chunks and questions of a reserve cache attend over the held rows only, as without a reserve (it used to pad
    every chunk to the widest capacity: twice the peak memory and 2.3x the time measured at 8k tokens)."""
    from adakv import prefill_in_chunks

    model = tiny_model("llama")
    ids, mask = padded_batch(seq_len=96, pad=5)
    caches = {}
    for reserve in (None, 24):
        cache = AdaKVCache(model, 0.3, reserve=reserve)
        widths = []
        prefill_in_chunks(model, cache, ids, 32, attention_mask=mask)
        ops = cache.layers[0].ops
        static = ops.ragged_attention_static
        ops.ragged_attention_static = lambda *a, **k: widths.append(a[1].shape) or static(*a, **k)
        try:
            with torch.no_grad():
                question = torch.ones(ids.shape[0], 6, dtype=mask.dtype, device=mask.device)
                model(ids[:, :6], attention_mask=torch.cat([mask, question], -1), **with_cache(cache))
        finally:
            ops.ragged_attention_static = static
        assert widths == []
        caches[reserve] = cache
    for a, b in zip(caches[None].layers, caches[24].layers):
        assert torch.equal(a.kept_lengths(), b.kept_lengths())


def test_a_compiled_model_called_directly_needs_make_room_past_the_reserve():
    """Called directly (not through generate), a compiled model builds its mask inside the trace, so nothing refills
    the reserve: with make_room before each step it decodes past the reserve as eager does; without it, a full
    segment under fullgraph=True fails with the advice (it failed on a data-dependent guard with no hint)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def step(cache, tok):
        return model(tok, **with_cache(cache)).logits[:, -1:]

    compiled = torch.compile(step, fullgraph=True, backend="eager", dynamic=True)
    torch._dynamo.reset()
    caches = [AdaKVCache(model, 1.0, reserve=16, backend="torch") for _ in range(3)]
    with torch.no_grad():
        for cache in caches:
            tok = model(ids, **with_cache(cache)).logits[:, -1:].argmax(-1)
        first = tok
        for _ in range(20):  # past the 16 reserved rows
            eager = step(caches[0], tok)
            caches[1].make_room(1)
            torch.testing.assert_close(compiled(caches[1], tok), eager, rtol=1e-5, atol=1e-5)
            tok = eager.argmax(-1)
        with pytest.raises(Exception, match="make_room"):
            tok = first
            for _ in range(20):
                tok = compiled(caches[2], tok).argmax(-1)
