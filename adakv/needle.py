"""A single-needle ("needle in a haystack") prompt, for the demo, the examples and quick checks.

A ``digits``-digit "special magic number" for a random key word is hidden at a sentence boundary at relative
``depth`` of a haystack of real prose. This is a view of the harness's one needle generator
(:func:`adakv.eval.tasks.niah`, task ``niah_single``): same document, needle, question and answer matching
(:func:`adakv.eval.tasks.score`); only the answer prefix is this module's shorter one.
The prompt is split into a context prefix (chat header + document) and a question suffix so that
question-agnostic KV-cache compression can prefill and compress the context first and append the question
afterwards: ``cat(context_ids, question_ids)`` is token-for-token the full prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from .eval.haystack import LICENSE_DIR, haystack_sentences, haystack_text
from .eval.tasks import DEFAULT_DIGITS, KEYS, NIAH_INSTRUCTION, EncodedSample, Sample, encode_sample, niah, score
from .eval.tasks import layout as prompt_layout

INSTRUCTION = NIAH_INSTRUCTION


@dataclass
class NeedleSample:
    """One needle-in-a-haystack example plus its tokenized prompt pieces.

    Built by :func:`make_needle_sample`, or by hand (e.g. several needles' questions over one shared document).
    """

    tokenizer: Any = field(repr=False, compare=False)
    context: str = field(repr=False)  # document text containing the needle
    question: str
    answer: str  # the number, as a string
    key: str
    depth: float
    needle: str

    @property
    def answer_prefix(self) -> str:
        """Text appended after the generation prompt, which the model continues: the short form this module has
        always used (the demo's, the examples' and the notebook's figures were measured with it); the harness's
        ``niah_single`` ends with RULER's longer "... for KEY mentioned in the provided text is"."""
        return f"The special magic number for {self.key} is"

    def task_sample(self) -> Sample:
        """The same example as a harness :class:`~adakv.eval.tasks.Sample` (task ``niah_single``)."""
        return Sample(
            "niah_single",
            self.context,
            self.question,
            [self.answer],
            INSTRUCTION,
            self.answer_prefix,
            8 + len(self.answer) + 3,
            {"keys": [self.key], "asked": [self.key], "depths": [self.depth]},
        )

    @cached_property
    def _encoded(self) -> EncodedSample:
        return encode_sample(self.tokenizer, self.task_sample())

    def prompt_text(self) -> str:
        """The full prompt as a string (chat template + answer prefix)."""
        return prompt_layout(self.tokenizer, INSTRUCTION, self.context, self.question, self.answer_prefix)[0]

    def full_prompt_ids(self) -> torch.Tensor:
        """``(1, n)`` token ids of the whole prompt, ending with the answer prefix."""
        return self._encoded.full_ids.clone()

    def context_prompt_ids(self) -> torch.Tensor:
        """``(1, k)`` ids of the question-agnostic prefix: chat header + instruction + document."""
        return self._encoded.context_ids.clone()

    def question_ids(self) -> torch.Tensor:
        """``(1, n - k)`` ids of the question, end of turn, assistant header and answer prefix."""
        return self._encoded.question_ids.clone()


def make_needle_sample(
    tokenizer: Any, context_tokens: int, depth: float, seed: int, digits: int = DEFAULT_DIGITS
) -> NeedleSample:
    """Build a sample whose context prefix is about ``context_tokens`` tokens long.

    ``context_tokens`` counts the whole ``context_prompt_ids()`` (chat header, instruction and document); the
    question part adds ~40 more tokens. A length too short for any haystack gives a document of the needle alone.
    ``depth`` in [0, 1] is the relative position of the needle in the document; ``seed`` picks the key, the
    number and where in the (cyclically repeated) haystack the document starts. ``digits``: 7 by default
    (RULER's); 4 is the short variant.
    """
    rng = random.Random(seed)
    made = niah("niah_single", tokenizer, context_tokens, rng, "prose", digits=digits, depth=depth, strict=False)
    key, answer = made.meta["keys"][0], made.answers[0]
    return NeedleSample(
        tokenizer=tokenizer,
        context=made.context,
        question=made.question,
        answer=answer,
        key=key,
        depth=depth,
        needle=f"The special magic number for {key} is {answer}.",
    )


def is_correct(generated_text: str, sample: NeedleSample | Sample) -> bool:
    """True if every expected number appears (as a whole number) in the generated text
    (:func:`adakv.eval.tasks.score` == 1)."""
    task_sample = sample.task_sample() if isinstance(sample, NeedleSample) else sample
    return score(task_sample, generated_text) == 1.0


__all__ = [
    "INSTRUCTION",
    "KEYS",
    "LICENSE_DIR",
    "NeedleSample",
    "haystack_sentences",
    "haystack_text",
    "is_correct",
    "make_needle_sample",
    "prompt_layout",
]
