"""Text sources for the task contexts: haystack sentences (real prose or repeated filler) and a word pool.

Prose is the license texts in ``/usr/share/common-licenses`` (GPL-3 first), or deterministic generated
filler where there are none; sentence token counts are cached per tokenizer.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

LICENSE_DIR = Path("/usr/share/common-licenses")
PREFERRED_HAYSTACK = LICENSE_DIR / "GPL-3"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _filler_text(n_sentences: int = 400) -> str:
    """Deterministic generated prose, used only when no license text is available."""
    rng = random.Random(0)
    subj = ["The committee", "A traveler", "The old engineer", "Every student", "The council"]
    verb = ["reviewed", "described", "carried", "repaired", "questioned", "admired"]
    obj = ["the bridge", "a long letter", "the harvest", "the quiet library", "an old map"]
    tail = ["before dawn", "with great care", "during the storm", "for many years", "at the market"]
    return " ".join(
        f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} {rng.choice(tail)}." for _ in range(n_sentences)
    )


@lru_cache(maxsize=1)
def haystack_text() -> str:
    """Real prose for the haystack, whitespace-normalised to a single line.

    Reads ``/usr/share/common-licenses/GPL-3``, else the other license files
    there, else falls back to deterministic generated filler; never fails.
    """
    candidates = [PREFERRED_HAYSTACK]
    if LICENSE_DIR.is_dir():
        candidates += sorted(p for p in LICENSE_DIR.iterdir() if p != PREFERRED_HAYSTACK)
    for path in candidates:
        try:
            text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        except OSError:
            continue
        if len(text) > 2000:
            return text
    return _filler_text()


@lru_cache(maxsize=4)
def haystack_sentences(tokenizer: Any) -> tuple[tuple[str, int], ...]:
    """Haystack sentences with their (approximate, in-context) token counts."""
    sents = [s for s in _SENTENCE_END.split(haystack_text()) if s]
    return tuple((s, len(tokenizer.encode(" " + s, add_special_tokens=False))) for s in sents)


HAYSTACKS = ("prose", "filler")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


def _ntok(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(" " + text, add_special_tokens=False))


@lru_cache(maxsize=8)
def _units(tokenizer: Any, haystack: str) -> tuple[tuple[str, int], ...]:
    if haystack == "prose":
        return haystack_sentences(tokenizer)
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
