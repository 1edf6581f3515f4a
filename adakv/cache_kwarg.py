"""How the installed transformers takes a cache: ``cache=`` from 5.24 on, ``past_key_values=`` before.

transformers 5.24 renamed the argument of ``generate`` and of the models' forward; the old name still works there
with a FutureWarning and goes from the forward in 5.40. adakv's own calls (prompt chunks, scoring passes, the
harness, the demo) pass the cache through :func:`with_cache`, so they run warning-free on either side of the rename.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version

CACHE_KWARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def with_cache(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the name this transformers' ``generate`` and forward take: ``model(ids,
    **with_cache(cache))``."""
    return {CACHE_KWARG: cache}


__all__ = ["CACHE_KWARG", "with_cache"]
