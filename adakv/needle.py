"""A tiny RULER-style single-needle ("needle in a haystack") prompt builder.

A 7-digit "special magic number" for a random key word is hidden at a sentence
boundary at relative ``depth`` of a haystack of real prose. The prompt is split
into a context prefix (chat header + document) and a question suffix so that
question-agnostic KV-cache compression can prefill and compress the context
first and append the question afterwards: ``cat(context_ids, question_ids)``
is token-for-token the full prompt.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import torch

LICENSE_DIR = Path("/usr/share/common-licenses")
PREFERRED_HAYSTACK = LICENSE_DIR / "GPL-3"
KEYS = (
    "apple",
    "river",
    "lantern",
    "falcon",
    "meadow",
    "copper",
    "harbor",
    "violin",
    "glacier",
    "pepper",
    "saddle",
    "orchid",
    "Lisbon",
    "Nairobi",
    "Oslo",
    "Kyoto",
    "Denver",
    "Toronto",
    "Santiago",
    "Cairo",
    "Helsinki",
    "Dublin",
    "Madrid",
    "Seoul",
)
INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize them. I will quiz you about the numbers afterwards.\n\n"
)
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


def prompt_layout(tokenizer: Any, instruction: str, context: str, question: str, answer_prefix: str) -> tuple[str, int]:
    """The full prompt string and the char index where the question part begins.

    The user turn is instruction + context + blank line + question, chat-formatted
    (SmolLM2's template inserts its default system message), and the answer prefix
    follows the assistant header. A tokenizer without a chat template (a base
    model) gets BOS + the user text + newline, then the answer prefix.
    """
    marker = "\x00QUESTION\x00"
    user = f"{instruction}{context}{marker}\n\n{question}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = f"{tokenizer.bos_token or ''}{user}\n"
    return text.replace(marker, "") + answer_prefix, text.index(marker)


@dataclass
class NeedleSample:
    """One needle-in-a-haystack example plus its tokenized prompt pieces."""

    tokenizer: Any = field(repr=False, compare=False)
    context: str = field(repr=False)  # document text containing the needle
    question: str
    answer: str  # the 7-digit number as a string
    key: str
    depth: float
    needle: str

    @property
    def answer_prefix(self) -> str:
        """Text appended after the generation prompt, which the model continues."""
        return f"The special magic number for {self.key} is"

    @cached_property
    def _layout(self) -> tuple[str, int]:
        """Full prompt string and the character index where the question part starts."""
        return prompt_layout(self.tokenizer, INSTRUCTION, self.context, self.question, self.answer_prefix)

    def prompt_text(self) -> str:
        """The full prompt as a string (chat template + answer prefix)."""
        return self._layout[0]

    @cached_property
    def _ids_and_split(self) -> tuple[torch.Tensor, int]:
        text, split_char = self._layout
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = [start for start, _ in enc["offset_mapping"]]
        if split_char not in starts:
            raise ValueError("question does not start at a token boundary; adjust the prompt format")
        ids = torch.tensor([enc["input_ids"]], dtype=torch.long)
        return ids, starts.index(split_char)

    def full_prompt_ids(self) -> torch.Tensor:
        """``(1, n)`` token ids of the whole prompt, ending with the answer prefix."""
        return self._ids_and_split[0].clone()

    def context_prompt_ids(self) -> torch.Tensor:
        """``(1, k)`` ids of the question-agnostic prefix: chat header + instruction + document."""
        ids, split = self._ids_and_split
        return ids[:, :split].clone()

    def question_ids(self) -> torch.Tensor:
        """``(1, n - k)`` ids of the question, end of turn, assistant header and answer prefix."""
        ids, split = self._ids_and_split
        return ids[:, split:].clone()


def make_needle_sample(tokenizer: Any, context_tokens: int, depth: float, seed: int, digits: int = 7) -> NeedleSample:
    """Build a sample whose context prefix is about ``context_tokens`` tokens long.

    ``context_tokens`` counts the whole ``context_prompt_ids()`` (chat header,
    instruction and document); the question part adds ~30 more tokens.

    ``depth`` in [0, 1] is the relative position of the needle in the document;
    ``seed`` picks the key, the number and where in the (cyclically repeated)
    haystack the document starts.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = rng.choice(KEYS)
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    answer = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    needle = f"The special magic number for {key} is {answer}."
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    text, split = prompt_layout(tokenizer, INSTRUCTION, "", question, "")
    overhead = len(tokenizer.encode(text[:split], add_special_tokens=False))
    budget = context_tokens - overhead - len(tokenizer.encode(" " + needle, add_special_tokens=False))
    sents = haystack_sentences(tokenizer)
    chosen: list[str] = []
    used, i = 0, rng.randrange(len(sents))
    while used < budget:
        sent, n_tok = sents[i % len(sents)]
        if chosen and used + n_tok - budget > budget - used:
            break  # adding this sentence would overshoot more than stopping undershoots
        chosen.append(sent)
        used, i = used + n_tok, i + 1
    chosen.insert(round(depth * len(chosen)), needle)
    return NeedleSample(
        tokenizer=tokenizer,
        context=" ".join(chosen),
        question=question,
        answer=answer,
        key=key,
        depth=depth,
        needle=needle,
    )


def is_correct(generated_text: str, sample: NeedleSample) -> bool:
    """True if the answer number appears (as a whole number) in the generated text."""
    text = re.sub(r"(?<=\d)[,\s](?=\d)", "", generated_text)
    return re.search(rf"(?<!\d){re.escape(sample.answer)}(?!\d)", text) is not None


__all__ = [
    "NeedleSample",
    "prompt_layout",
    "make_needle_sample",
    "is_correct",
    "haystack_text",
    "haystack_sentences",
    "KEYS",
]
