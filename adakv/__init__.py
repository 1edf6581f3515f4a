"""adakv: real head-wise KV-cache eviction for HuggingFace transformers.

from adakv import AdaKVCache
cache = AdaKVCache(model, budget=0.2)
out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)  # cache=cache from transformers 5.24
"""

from .allocators import ALLOCATORS, AdaKV, Allocator, CrossLayerAllocator, LayerAdaptive, PyramidKV, Uniform
from .attention import restore_attention
from .cache import AdaKVCache, kv_bytes
from .cache_kwarg import with_cache
from .context import compress_context, score_context, settle_context
from .critiprefill import CritiPrefill, sparse_prefill
from .decode import DECODE_POLICIES, DecodePolicy, H2ODecode, Rescore
from .methods import METHODS
from .policy import PrefillAttention
from .prompt import prefill_in_chunks
from .scorers import (
    H2O,
    SCORERS,
    TOVA,
    ContextScorer,
    CriticalKV,
    DefensiveKV,
    KeyNorm,
    KVzip,
    Random,
    ScoreInputs,
    Scorer,
    SnapKV,
    StreamingLLM,
)

__version__ = "0.1.0"

__all__ = [
    "ALLOCATORS",
    "DECODE_POLICIES",
    "CrossLayerAllocator",
    "DecodePolicy",
    "H2ODecode",
    "PrefillAttention",
    "Rescore",
    "compress_context",
    "score_context",
    "settle_context",
    "sparse_prefill",
    "CritiPrefill",
    "prefill_in_chunks",
    "H2O",
    "METHODS",
    "SCORERS",
    "TOVA",
    "AdaKV",
    "AdaKVCache",
    "Allocator",
    "CriticalKV",
    "DefensiveKV",
    "ContextScorer",
    "KVzip",
    "KeyNorm",
    "LayerAdaptive",
    "PyramidKV",
    "Random",
    "ScoreInputs",
    "Scorer",
    "SnapKV",
    "StreamingLLM",
    "Uniform",
    "kv_bytes",
    "restore_attention",
    "with_cache",
]
