"""Kernels of adakv, installed as ``adakv.kernels``.

Every operation has a pure-torch reference in :mod:`adakv.kernels.reference`;
the fast paths (Triton, flash-attn) live beside it and are tested against it.
"""

from .reference import append_, compact_, copy_segments_, ragged_attention

__all__ = ["append_", "compact_", "copy_segments_", "ragged_attention"]
