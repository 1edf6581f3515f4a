"""adakv: real head-wise KV-cache eviction for HuggingFace transformers.

    from adakv import AdaKVCache
    cache = AdaKVCache(model, budget=0.2)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
"""

from .allocators import ALLOCATORS, AdaKV, Allocator, Uniform
from .attention import restore_attention
from .cache import AdaKVCache
from .scorers import SCORERS, Scorer, ScoreInputs, SnapKV

__version__ = "0.1.0"

__all__ = [
    "ALLOCATORS",
    "SCORERS",
    "AdaKV",
    "AdaKVCache",
    "Allocator",
    "ScoreInputs",
    "Scorer",
    "SnapKV",
    "Uniform",
    "restore_attention",
]
