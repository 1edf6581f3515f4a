"""Tiny random-weight decoders of every supported family (a few layers, hidden 64)."""

from __future__ import annotations

import os

import torch
import transformers as tf

from adakv import with_cache

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# `ADAKV_TEST_DEVICE=cuda` runs the model tests on a GPU (with the Triton kernels compiled, not interpreted).
DEVICE = torch.device(os.environ.get("ADAKV_TEST_DEVICE", "cpu"))

FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 16}),
    "gemma2": (
        tf.Gemma2Config,
        tf.Gemma2ForCausalLM,
        {"head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0},
    ),
    "gemma3": (
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        {
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
    ),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
}


def tiny_model(family: str, seed: int = 0, **overrides) -> tf.PreTrainedModel:
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Random init gives near-uniform logits; sharper weights make greedy decoding decisive.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.to(DEVICE)


def padded_batch(seq_len: int = 48, pad: int = 7, seed: int = 0, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the first left-padded by ``pad`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, :pad] = 0
    mask[0, :pad] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


class ToyTokenizer:
    """Enough of a tokenizer for prompts a scorer builds (KVzip's) on a tiny model: no chat template."""

    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [3 + (ord(c) * 7) % 250 for c in text.strip()][:6] or [3]


def nan_alloc(*shape, dtype, device) -> torch.Tensor:
    """A kernel module's ``_alloc`` for tests: scratch and outputs start as NaN, so unwritten elements show."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def compiled_decode_matches_eager(model, caches, tok, mask, compile_backend: str, steps: int) -> None:
    """Decode ``steps`` tokens through ``caches[0]`` eagerly and through ``caches[1]`` with the step compiled by
    ``torch.compile(fullgraph=True)`` (so any graph break fails); the logits must agree at every step."""

    def step(cache, tok, attention_mask):
        return model(tok, attention_mask=attention_mask, **with_cache(cache)).logits

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend, dynamic=True)
    torch._dynamo.reset()
    with torch.no_grad():
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
            eager = step(caches[0], tok, mask)
            traced = compiled(caches[1], tok, mask)
            torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
            tok = eager[:, -1:].argmax(-1)


def run_benchmark(script: str, argv: list[str]) -> dict:
    """``benchmarks/<script>``'s ``main(argv)`` in this process (its ``--threads`` restored afterwards)."""
    import runpy
    from pathlib import Path

    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / script))["main"]
    before = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(before)
