"""Allocators: how many tokens each (sequence, KV head) keeps, and which."""

from __future__ import annotations

from .adakv import AdaKV
from .base import Allocator, CrossLayerAllocator, topk_mask
from .layer_adaptive import LayerAdaptive
from .pyramidkv import PyramidKV
from .uniform import Uniform

ALLOCATORS: dict[str, type[Allocator]] = {cls.name: cls for cls in (Uniform, AdaKV, PyramidKV, LayerAdaptive)}


def get_allocator(spec: str | Allocator) -> Allocator:
    """Resolve an allocator name or instance."""
    if isinstance(spec, Allocator):
        return spec
    if isinstance(spec, str):
        try:
            return ALLOCATORS[spec.lower()]()
        except KeyError:
            raise ValueError(f"Unknown allocator {spec!r}. Valid names: {', '.join(sorted(ALLOCATORS))}.") from None
    raise TypeError(
        f"allocator must be a name ({', '.join(sorted(ALLOCATORS))}) or an Allocator instance, "
        f"got {type(spec).__name__}."
    )


__all__ = [
    "ALLOCATORS",
    "AdaKV",
    "Allocator",
    "CrossLayerAllocator",
    "LayerAdaptive",
    "PyramidKV",
    "Uniform",
    "get_allocator",
    "topk_mask",
]
