"""RULER-style synthetic long-context tasks with a fixed seed, and their prompts: the one needle generator.

Every generator returns a :class:`Sample` (instruction, context, question, expected answers). :func:`encode_sample`
builds the chat prompt and splits it into ``context_ids`` (chat header + instruction + context) and ``question_ids``
(question, end of turn, assistant header, answer prefix) whose concatenation is the tokenized full prompt
token-for-token, so a context can be compressed before its question is seen (question-agnostic mode).
``context_tokens`` is the target length of ``context_ids``.

:func:`niah` writes every needle-in-a-haystack prompt (``adakv.needle`` is a thin view of it for one needle).
Needle values have 7 digits by default (RULER's; several tokens for most tokenizers: what short needles hide);
``digits=4`` is the short variant. :func:`questions` lists every question a sample's context can answer, for the
multi-question protocol (compress the context once, ask each question from a copy of the compressed cache).
:data:`OPEN_TASKS` are open-ended (a summary or a continuation asked after the document): no expected answer,
for the fidelity metrics only. :func:`score` is the one answer-matching helper.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .haystack import HAYSTACKS, _haystack, _ntok, word_pool

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
DEFAULT_DIGITS = 7  # needle values: RULER's 7 digits; digits=4 is the short variant


def layout(tokenizer: Any, instruction: str, context: str, question: str, answer_prefix: str) -> tuple[str, int]:
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
class Sample:
    """One task instance. ``answers`` are the strings the output must contain (all of them for full score)."""

    task: str
    context: str = field(repr=False)
    question: str
    answers: list[str]
    instruction: str = ""
    answer_prefix: str = ""
    max_new_tokens: int = 32  # enough for a correct answer (RULER-style per-task default)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncodedSample:
    """``full_ids == cat(context_ids, question_ids)``, each of shape ``(1, n)``."""

    full_ids: torch.Tensor
    context_ids: torch.Tensor
    question_ids: torch.Tensor


def prompt_layout(tokenizer: Any, sample: Sample) -> tuple[str, int]:
    """The full prompt string and the character index where the question part starts
    (:func:`layout` with the sample's instruction, context, question and answer prefix)."""
    return layout(tokenizer, sample.instruction, sample.context, sample.question, sample.answer_prefix)


def encode_sample(tokenizer: Any, sample: Sample) -> EncodedSample:
    """Tokenize the full prompt once and split it at the token where the question part begins.

    If the question does not start on a token boundary, the token straddling it goes to
    the question part, so ``context_ids`` never sees any of the question.
    """
    text, split_char = prompt_layout(tokenizer, sample)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    split = sum(1 for start, _ in enc["offset_mapping"] if start < split_char)
    if split and enc["offset_mapping"][split - 1][1] > split_char:
        split -= 1
    ids = torch.tensor([enc["input_ids"]], dtype=torch.long)
    return EncodedSample(ids, ids[:, :split].clone(), ids[:, split:].clone())


# -- contexts ---------------------------------------------------------------------------------------------------------


def _body_budget(tokenizer: Any, context_tokens: int, sample: Sample, needed: int, strict: bool = True) -> int:
    """Tokens left for the context body after chat header and instruction; refuses if ``needed`` do not fit
    (``strict=False``: returns what is left, possibly less)."""
    text, split = prompt_layout(tokenizer, sample)
    budget = context_tokens - len(tokenizer.encode(text[:split], add_special_tokens=False))
    if budget < needed and strict:
        raise ValueError(
            f"context_tokens={context_tokens} is too short for task {sample.task!r}: it needs at least "
            f"{context_tokens - budget + needed} tokens."
        )
    return budget


def _with_needles(
    tokenizer: Any,
    sample: Sample,
    context_tokens: int,
    haystack: str,
    needles: list[str],
    rng: random.Random,
    depth: float | None = None,
    strict: bool = True,
) -> Sample:
    """Fill ``sample.context`` with haystack and insert ``needles`` (order kept) at random sentence boundaries,
    or a single needle at relative ``depth`` (0 = first sentence, 1 = after the last). ``strict=False``: a
    ``context_tokens`` too short for the needles gives a document of the needles alone instead of an error."""
    needle_tokens = sum(_ntok(tokenizer, n) for n in needles)
    budget = _body_budget(tokenizer, context_tokens, sample, needle_tokens, strict)
    sents = _haystack(tokenizer, haystack, max(budget - needle_tokens, 0), rng)
    if depth is None:
        positions = sorted(rng.randint(0, len(sents)) for _ in needles)
    else:
        positions = [round(depth * len(sents))]
    for pos, needle in reversed(list(zip(positions, needles))):
        sents.insert(pos, needle)
    sample.context = " ".join(sents)
    achieved = [round(p / max(len(sents) - len(needles), 1), 3) for p in positions]
    sample.meta["depths"] = achieved if depth is None else [depth]  # asked-for depths label heatmap rows
    return sample


def _fit(tokenizer: Any, budget: int, build: Callable[[int], str], per_item: float) -> str:
    """Choose the item count whose body text is ~``budget`` tokens (a few rescaling passes)."""
    count = max(1, int(budget / per_item))
    for _ in range(3):
        text = build(count)
        count = max(1, round(count * budget / max(_ntok(tokenizer, text), 1)))
    return build(count)


# -- tasks ------------------------------------------------------------------------------------------------------------

NIAH_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize them. I will quiz you about the numbers afterwards.\n\n"
)


def _niah_ask(asked: list[str], values: int) -> tuple[str, str]:
    """RULER's question and answer prefix for the numbers of the keys ``asked``, ``values`` numbers per key."""
    which = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + f", and {asked[-1]}"
    one = values == 1 and len(asked) == 1
    question = (
        f"What {'is the special magic number' if one else 'are all the special magic numbers'} for {which} "
        "mentioned in the provided text?"
    )
    prefix = (
        f"The special magic number{'' if one else 's'} for {which} mentioned in the provided text "
        f"{'is' if one else 'are'}"
    )
    return question, prefix


def niah(
    task: str,
    tokenizer: Any,
    context_tokens: int,
    rng: random.Random,
    haystack: str,
    keys: int = 1,
    values: int = 1,
    queries: int = 1,
    digits: int = DEFAULT_DIGITS,
    depth: float | None = None,
    strict: bool = True,
) -> Sample:
    """The needle generator: ``keys`` x ``values`` needles ``The special magic number for KEY is N.`` (N with
    ``digits`` digits, distinct) in the haystack; asks for the numbers of the first ``queries`` keys (-1: all).

    ``depth`` places a single needle at that relative depth (default: random positions). ``strict=False``: a
    ``context_tokens`` too short for the needles gives a document of the needles alone. ``meta``: ``keys``,
    ``asked``, ``values`` (key -> its numbers), ``depths`` and ``questions`` (one per key, for :func:`questions`).
    """
    if depth is not None and keys * values != 1:
        raise ValueError(f"depth places a single needle; task {task!r} has {keys * values}.")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be an int >= 1, got {digits!r}")
    names = rng.sample(KEYS, keys)
    numbers = [str(x) for x in rng.sample(range(10 ** (digits - 1), 10**digits), keys * values)]
    per_key = {k: numbers[i * values : (i + 1) * values] for i, k in enumerate(names)}
    lead = "One of the special magic numbers" if values > 1 else "The special magic number"
    needles = [f"{lead} for {k} is {v}." for k in names for v in per_key[k]]
    rng.shuffle(needles)
    asked = names[:queries] if queries > 0 else names
    question, prefix = _niah_ask(asked, values)
    answers = [v for k in asked for v in per_key[k]]
    each = [[*_niah_ask([k], values), per_key[k], 8 + values * (digits + 3)] for k in names]
    sample = Sample(
        task,
        "",
        question,
        answers,
        NIAH_INSTRUCTION,
        prefix,
        8 + len(answers) * (digits + 3),
        {"keys": names, "asked": asked, "values": per_key, "questions": [[q, a, p, n] for q, p, a, n in each]},
    )
    return _with_needles(tokenizer, sample, context_tokens, haystack, needles, rng, depth, strict)


def _niah_variant(task: str, doc: str, **fixed: int) -> Callable[..., Sample]:
    def generate(tokenizer: Any, context_tokens: int, rng: random.Random, haystack: str, **options: int) -> Sample:
        return niah(task, tokenizer, context_tokens, rng, haystack, **{**fixed, **options})

    generate.__name__, generate.__qualname__, generate.__doc__ = task, task, doc
    return generate


niah_single = _niah_variant("niah_single", "One needle; asks for its number.")
niah_multikey = _niah_variant("niah_multikey", "Needles for ``keys=4`` keys; asks for one.", keys=4)
niah_multivalue = _niah_variant("niah_multivalue", "One key with ``values=4`` numbers; all must appear.", values=4)
niah_multiquery = _niah_variant("niah_multiquery", "Needles for ``keys=4`` keys; asks for all.", keys=4, queries=-1)


def variable_tracking(
    tokenizer: Any,
    context_tokens: int,
    rng: random.Random,
    haystack: str,
    chains: int = 1,
    hops: int = 4,
    digits: int = 5,
) -> Sample:
    """``VAR A = 12345.`` then ``VAR B = VAR A.`` ... (``hops`` links); answer: every name holding the first value."""
    names: list[str] = []
    while len(names) < chains * (hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [name] if name not in names else []
    values = [str(x) for x in rng.sample(range(10 ** (digits - 1), 10**digits), chains)]
    links = [names[c * (hops + 1) : (c + 1) * (hops + 1)] for c in range(chains)]
    statements = [
        [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        for chain, value in zip(links, values)
    ]
    needles: list[str] = []
    while any(statements):  # random interleaving of the chains, each kept in order
        needles.append(rng.choice([s for s in statements if s]).pop(0))
    each = [
        [
            f"Find all variables that are assigned the value {value} in the text above.",
            chain,
            f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables are "
            f"assigned the value {value}, they are:",
            8 + 8 * (hops + 1),
        ]
        for chain, value in zip(links, values)
    ]
    sample = Sample(
        "variable_tracking",
        "",
        each[0][0],
        links[0],
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
        each[0][2],
        each[0][3],
        {"chains": links, "values": values, "questions": each},
    )
    return _with_needles(tokenizer, sample, context_tokens, haystack, needles, rng)


def common_words(tokenizer: Any, context_tokens: int, rng: random.Random, haystack: str, common: int = 5) -> Sample:
    """A numbered word list where ``common`` words repeat several times more often than the others (no haystack)."""
    prefix = f"Answer: The top {common} words that appear most often in the list are:"
    question = f"What are the {common} most common words in the above list?"
    instruction = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n\n"
    )
    banned = set(re.findall(r"[a-z]+", f"{prefix} {question} {instruction}".lower()))
    words = rng.sample([w for w in word_pool() if w not in banned], len(word_pool()) // 2)
    top, rest, seed = words[:common], words[common:], rng.random()
    sample = Sample("common_words", "", question, top, instruction, prefix, 8 + 4 * common)

    def build(n: int) -> str:
        f_common = max(3, int(0.4 * n) // common)
        f_rare = max(1, f_common // 5)
        n_rare = max(1, min(len(rest), (n - common * f_common) // f_rare))
        items = top * f_common + rest[:n_rare] * f_rare
        random.Random(seed).shuffle(items)
        sample.meta.update(common_count=f_common, rare_count=f_rare)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    sample.context = _fit(tokenizer, _body_budget(tokenizer, context_tokens, sample, 20 * common), build, 5.0)
    return sample


def frequent_words(
    tokenizer: Any, context_tokens: int, rng: random.Random, haystack: str, top: int = 3, alpha: float = 2.0
) -> Sample:
    """A stream of coded words with Zipf(``alpha``) frequencies; answer: the ``top`` most frequent (no haystack)."""
    seed = rng.random()
    sample = Sample(
        "frequent_words",
        "",
        f"What are the {top} most frequently appeared coded words in the above coded text?",
        [],
        "Read the following coded text and track the frequency of each coded word. "
        f"Find the {top} most frequently appeared coded words.\n\n",
        f"Answer: According to the coded text above, the {top} most frequently appeared words are:",
        8 + 5 * top,
    )

    def build(n: int) -> str:
        r = random.Random(seed)
        zeta = sum(k**-alpha for k in range(1, n + 1))
        counts = [c for c in (int(n / (zeta * k**alpha)) for k in range(1, n + 1)) if c > 0] + [0]
        for i in reversed(range(top)):  # strictly decreasing head: the answer is unambiguous
            counts[i] = max(counts[i], counts[i + 1] + 1)
        counts = counts[:-1] + [1] * max(0, n - sum(counts))
        coded: dict[str, None] = {}  # insertion-ordered set
        while len(coded) < len(counts):
            coded.setdefault("".join(r.choices(string.ascii_lowercase, k=r.randint(3, 5))))
        stream = [w for w, c in zip(coded, counts) for _ in range(c)]
        r.shuffle(stream)
        sample.answers = list(coded)[:top]
        sample.meta["counts"] = counts[: top + 1]
        return " ".join(stream)

    sample.context = _fit(tokenizer, _body_budget(tokenizer, context_tokens, sample, 20 * top), build, 2.5)
    return sample


_FIRST = ("Amara", "Tobias", "Ingrid", "Mateo", "Priya", "Oskar", "Leila", "Damien", "Yuki", "Fenna", "Rafael")
_LAST = ("Lindqvist", "Okafor", "Castellano", "Vasquez", "Thornbury", "Nakamura", "Abernathy", "Kowalczyk", "Delacroix")
_SLOTS = {
    "town": ("Brindlemoor", "Oakhaven", "Wrenfield", "Saltmarsh", "Quillby", "Ashcombe", "Larkspur Hollow", "Dunmere"),
    "job": ("beekeeper", "cartographer", "glassblower", "clockmaker", "lighthouse keeper", "luthier", "falconer"),
    "code": ("tangerine", "marzipan", "zeppelin", "quicksilver", "bramble", "lodestar", "whirligig", "tamarind"),
}
_FACTS = (  # fact, question, slot; the answer prefix is the fact up to the answer
    ("{p} was born in the town of {town}.", "In which town was {p} born?", "town"),
    ("{p} works as a {job}.", "What is the job of {p}?", "job"),
    ("The secret password of {p} is {code}.", "What is the secret password of {p}?", "code"),
)


def qa(tokenizer: Any, context_tokens: int, rng: random.Random, haystack: str, distractors: int = 2) -> Sample:
    """A fact about a fictional person hidden among ``distractors`` facts about others; a question about it."""
    people = rng.sample([f"{a} {b}" for a in _FIRST for b in _LAST], distractors + 1)
    facts, each = [], []
    for person in people:
        fact, ask, slot = rng.choice(_FACTS)
        value = rng.choice(_SLOTS[slot])
        facts.append(fact.format(p=person, **{slot: value}))
        prefix = fact.split("{" + slot + "}")[0].format(p=person).rstrip()
        each.append([ask.format(p=person), [value], prefix, 16])
    rng.shuffle(facts)
    question, answers, prefix, max_new = each[0]
    sample = Sample(
        "qa",
        "",
        question,
        answers,
        "Answer the question based on the given document. Only give me "
        "the answer and do not output any other words.\n\nThe following is the document.\n\n",
        prefix,
        max_new,
        {"person": people[0], "questions": each},
    )
    return _with_needles(tokenizer, sample, context_tokens, haystack, facts, rng)


OPEN_INSTRUCTION = "Read the following text carefully.\n\n"
_OPEN_QUESTIONS = {
    "summary": "Summarize the text above in a few sentences.",
    "continuation": "Continue the text above: write the next few sentences, in the same style.",
}


def _open_task(task: str) -> Callable[..., Sample]:
    def generate(tokenizer: Any, context_tokens: int, rng: random.Random, haystack: str) -> Sample:
        sample = Sample(task, "", _OPEN_QUESTIONS[task], [], OPEN_INSTRUCTION, "", 64)
        budget = _body_budget(tokenizer, context_tokens, sample, 16)
        sample.context = " ".join(_haystack(tokenizer, haystack, budget, rng))
        return sample

    generate.__name__ = generate.__qualname__ = task
    generate.__doc__ = f"Open-ended: a document of haystack text, then {_OPEN_QUESTIONS[task]!r} (no answer to match)."
    return generate


TaskFn = Callable[..., Sample]
TASKS: dict[str, TaskFn] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
    "qa": qa,
}
OPEN_TASKS: dict[str, TaskFn] = {name: _open_task(name) for name in _OPEN_QUESTIONS}


def make_samples(
    task: str,
    tokenizer: Any,
    n: int,
    context_tokens: int,
    seed: int = 0,
    haystack: str = "prose",
    depths: list[float] | None = None,
    **options: Any,
) -> list[Sample]:
    """``n`` samples of ``task`` (:data:`TASKS` or :data:`OPEN_TASKS`) with a context prompt of ~``context_tokens``
    tokens; same seed, same samples.

    ``options`` go to the generator (e.g. ``digits=4`` for the needle tasks). ``depths`` (niah_single only):
    sample i has its needle at ``depths[i % len(depths)]``, for depth x length heatmaps.
    """
    generators = {**TASKS, **OPEN_TASKS}
    if task not in generators:
        raise ValueError(f"Unknown task {task!r}. Valid tasks: {', '.join(generators)}.")
    if haystack not in HAYSTACKS:
        raise ValueError(f"Unknown haystack {haystack!r}. Valid haystacks: {', '.join(HAYSTACKS)}.")
    if depths and task != "niah_single":
        raise ValueError(f"depths place the single needle of niah_single; task {task!r} does not take them.")
    return [
        generators[task](
            tokenizer,
            context_tokens,
            random.Random(f"{task}/{seed}/{i}"),
            haystack,
            **options,
            **({"depth": depths[i % len(depths)]} if depths else {}),
        )
        for i in range(n)
    ]


def questions(sample: Sample) -> list[Sample]:
    """Every question the sample's context answers, each a :class:`Sample` with the same instruction and context
    (so the same ``context_ids``): one per key for the needle tasks (all of that key's numbers), one per chain for
    variable tracking, one per person for QA; the sample itself for tasks with a single question. The sample's own
    question is not among them for niah_multiquery (which asks every key at once): each key is asked alone."""
    asked = sample.meta.get("questions")
    if not asked:
        return [sample]
    return [
        dataclasses.replace(
            sample, question=q, answers=list(a), answer_prefix=p, max_new_tokens=n, meta={**sample.meta, "question": i}
        )
        for i, (q, a, p, n) in enumerate(asked)
    ]


def _normalize(text: str) -> str:
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # 1,234,567 -> 1234567


def score(sample: Sample, generated_text: str) -> float:
    """RULER string-match-all: the fraction of expected answers found (whole words, case-insensitive; thousands
    separators ``1,234,567`` are read as ``1234567``). The one answer-matching helper of adakv (``adakv.needle``'s
    ``is_correct`` is ``score == 1``)."""
    if not sample.answers:
        raise ValueError(
            f"Task {sample.task!r} is open-ended (no expected answer): measure it with the fidelity metrics."
        )
    text = _normalize(generated_text)
    found = sum(
        re.search(rf"(?<![0-9A-Za-z]){re.escape(a)}(?![0-9A-Za-z])", text, re.IGNORECASE) is not None
        for a in sample.answers
    )
    return found / len(sample.answers)


__all__ = [
    "DEFAULT_DIGITS",
    "EncodedSample",
    "HAYSTACKS",
    "KEYS",
    "NIAH_INSTRUCTION",
    "OPEN_TASKS",
    "Sample",
    "TASKS",
    "encode_sample",
    "layout",
    "make_samples",
    "niah",
    "prompt_layout",
    "questions",
    "score",
]
