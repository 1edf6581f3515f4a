"""Named presets: the published methods as scorer + allocator pairs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .allocators import AdaKV, Allocator, LayerAdaptive, PyramidKV, Uniform
from .scorers import (
    H2O,
    TOVA,
    CriticalKV,
    DefensiveKV,
    ExpectedAttention,
    KeyNorm,
    KVzip,
    Random,
    Scorer,
    SnapKV,
    StreamingLLM,
)


@dataclass(frozen=True)
class Method:
    scorer: Callable[[], Scorer]
    allocator: Callable[[], Allocator]
    paper: str


METHODS: dict[str, Method] = {
    "snapkv": Method(SnapKV, Uniform, "SnapKV, Li et al. 2024 (arXiv:2404.14469)"),
    "ada-snapkv": Method(SnapKV, AdaKV, "Ada-KV, Feng et al. NeurIPS 2025 (arXiv:2407.11550)"),
    "pyramidkv": Method(SnapKV, PyramidKV, "PyramidKV, Cai et al. 2024 (arXiv:2406.02069)"),
    "h2o": Method(H2O, Uniform, "H2O, Zhang et al. NeurIPS 2023 (arXiv:2306.14048)"),
    "ada-h2o": Method(H2O, AdaKV, "H2O scores with Ada-KV allocation (arXiv:2407.11550)"),
    "criticalkv": Method(CriticalKV, Uniform, "CriticalKV, Feng et al. 2025 (arXiv:2502.03805)"),
    "ada-criticalkv": Method(CriticalKV, AdaKV, "CriticalAdaKV, Feng et al. 2025 (arXiv:2502.03805)"),
    "defensivekv": Method(DefensiveKV, lambda: AdaKV(alpha=0.0), "DefensiveKV, Feng et al. 2025 (arXiv:2510.13334)"),
    "layer-defensivekv": Method(DefensiveKV, LayerAdaptive, "Layer-DefensiveKV, Feng et al. 2025 (arXiv:2510.13334)"),
    "expected-attention": Method(
        ExpectedAttention, Uniform, "Expected Attention, Devoto et al. 2025 (arXiv:2510.00636), kvpress defaults"
    ),
    "ada-expected-attention": Method(
        lambda: ExpectedAttention(epsilon=1e-2),
        AdaKV,
        "Expected Attention (epsilon 1e-2) with Ada-KV, as kvpress's benchmark registry (arXiv:2510.00636)",
    ),
    "kvzip": Method(KVzip, LayerAdaptive, "KVzip, Kim et al. NeurIPS 2025 (arXiv:2505.23416): one budget over layers"),
    "kvzip+": Method(
        lambda: KVzip(normalize=True), LayerAdaptive, "KVzip+ (kvpress / KVzap, arXiv:2601.07891): ||W_O v|| / ||h||"
    ),
    "kvzip-defensive": Method(
        lambda: KVzip(defensive=True),
        LayerAdaptive,
        "KVzip scores with DefensiveKV's pooling, prior correction and value term (adakv's combination; "
        "arXiv:2505.23416 + arXiv:2510.13334)",
    ),
    "streamingllm": Method(StreamingLLM, Uniform, "StreamingLLM, Xiao et al. ICLR 2024 (arXiv:2309.17453)"),
    "tova": Method(TOVA, Uniform, "TOVA, Oren et al. 2024 (arXiv:2401.06104)"),
    "knorm": Method(KeyNorm, Uniform, "Knorm, Devoto et al. EMNLP 2024 (arXiv:2406.11430)"),
    "random": Method(Random, Uniform, "random baseline"),
}


def get_method(name: str) -> tuple[Scorer, Allocator]:
    """Fresh scorer and allocator of a named preset."""
    if not isinstance(name, str) or name.lower() not in METHODS:
        raise ValueError(f"Unknown method {name!r}. Valid methods: {', '.join(METHODS)}.")
    method = METHODS[name.lower()]
    return method.scorer(), method.allocator()
