"""Fast plain-torch ragged attention for the CPU (the ``torch`` backend's decode path).

Placeholder: forwards to the reference until the copy-free version lands.
"""

from __future__ import annotations

from .reference import ragged_attention

__all__ = ["ragged_attention"]
