"""Text sources for the task contexts: haystack sentences (prose or repeated filler) and a word pool.

Prose comes from :func:`adakv.needle.haystack_sentences`; the word pool from the license texts in
:data:`adakv.needle.LICENSE_DIR`. Sentence token counts are cached per tokenizer.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Any

from ..needle import LICENSE_DIR, haystack_sentences

HAYSTACKS = ("prose", "filler")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


def _ntok(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(" " + text, add_special_tokens=False))


@lru_cache(maxsize=8)
def _units(tokenizer: Any, haystack: str) -> tuple[tuple[str, int], ...]:
    if haystack == "prose":
        return haystack_sentences(tokenizer)  # the needle task's sentences, counted the same way
    return tuple((s, _ntok(tokenizer, s)) for s in FILLER)


def _haystack(tokenizer: Any, haystack: str, n_tokens: int, rng: random.Random) -> list[str]:
    """Sentences (cyclically from a seeded start for prose, from the top for filler) totalling ~``n_tokens``;
    the last one is cut at a word to fit."""
    units = _units(tokenizer, haystack)
    i = rng.randrange(len(units)) if haystack == "prose" else 0
    chosen: list[str] = []
    used = 0
    while used < n_tokens:
        sent, n = units[i % len(units)]
        if used + n > n_tokens:
            words = sent.split()
            chosen += [" ".join(words[: int(len(words) * (n_tokens - used) / n)])]
            break
        chosen.append(sent)
        used, i = used + n, i + 1
    return [s for s in chosen if s]


@lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    """Distinct lowercase English words from the license texts (pseudo-words if there are none)."""
    text = (
        " ".join(p.read_text(errors="replace") for p in sorted(LICENSE_DIR.glob("*")) if p.is_file())
        if LICENSE_DIR.is_dir()
        else ""
    )
    words = sorted({w.lower() for w in re.findall(r"\b[A-Za-z]{4,10}\b", text)})
    if len(words) < 500:
        rng = random.Random(0)
        syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
        words = sorted({"".join(rng.choices(syllables, k=rng.randint(2, 3))) for _ in range(3000)})
    return tuple(words)
