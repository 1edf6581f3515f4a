"""Evaluation of KV-cache eviction: RULER-style tasks, fidelity metrics vs the full cache, and a command line
(``python -m adakv.eval --help``)."""

from .metrics import (
    continuation_logprobs,
    full_cache,
    greedy_agreement,
    greedy_decode,
    prose_split,
    teacher_forced_kl,
)
from .tasks import HAYSTACKS, TASKS, EncodedSample, Sample, encode_sample, make_samples, prompt_layout, score

__all__ = [
    "HAYSTACKS",
    "TASKS",
    "EncodedSample",
    "Sample",
    "continuation_logprobs",
    "encode_sample",
    "full_cache",
    "greedy_agreement",
    "greedy_decode",
    "make_samples",
    "prompt_layout",
    "prose_split",
    "score",
    "teacher_forced_kl",
]
