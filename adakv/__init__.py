"""adakv: real head-wise KV-cache eviction for HuggingFace transformers.

from adakv import AdaKVCache
cache = AdaKVCache(model, budget=0.2)
out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
"""

from .allocators import ALLOCATORS, AdaKV, Allocator, LayerAdaptive, PyramidKV, Uniform
from .attention import restore_attention
from .cache import AdaKVCache, kv_bytes
from .methods import METHODS
from .scorers import (
    H2O,
    SCORERS,
    TOVA,
    CriticalKV,
    DefensiveKV,
    KeyNorm,
    Random,
    ScoreInputs,
    Scorer,
    SnapKV,
    StreamingLLM,
)

__version__ = "0.1.0"

__all__ = [
    "ALLOCATORS",
    "H2O",
    "METHODS",
    "SCORERS",
    "TOVA",
    "AdaKV",
    "AdaKVCache",
    "Allocator",
    "CriticalKV",
    "DefensiveKV",
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
]
