"""Decode policies: what a compressed layer does while decoding. One policy per file.

``AdaKVCache(..., decode=None)`` keeps every decoded token (the default); ``decode="rescore"`` re-selects
with the cache's own scorer and allocator every few tokens; ``decode="h2o"`` is H2O's accumulated attention.
"""

from __future__ import annotations

from .base import DecodePolicy, DecodeState
from .h2o import H2ODecode
from .rescore import Rescore

DECODE_POLICIES: dict[str, type[DecodePolicy]] = {cls.name: cls for cls in (Rescore, H2ODecode)}


def get_decode_policy(spec: str | DecodePolicy | None) -> DecodePolicy | None:
    """Resolve a decode policy name or instance (None: keep every decoded token)."""
    if spec is None or isinstance(spec, DecodePolicy):
        return spec
    if isinstance(spec, str):
        try:
            return DECODE_POLICIES[spec.lower()]()
        except KeyError:
            raise ValueError(
                f"Unknown decode policy {spec!r}. Valid names: {', '.join(sorted(DECODE_POLICIES))} (or None)."
            ) from None
    raise TypeError(
        f"decode must be None, a name ({', '.join(sorted(DECODE_POLICIES))}) or a DecodePolicy instance, "
        f"got {type(spec).__name__}."
    )


__all__ = ["DECODE_POLICIES", "DecodePolicy", "DecodeState", "H2ODecode", "Rescore", "get_decode_policy"]
