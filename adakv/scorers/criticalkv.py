"""CriticalKV: output-perturbation-aware selection wrapped around a base scorer."""

from __future__ import annotations

import torch
from torch import nn

from .base import ContextScorer, ScoreInputs, Scorer, StagedScores, attention_modules

# Elements of one chunk of v W_O products ([B, G, chunk, D]).
CHUNK_ELEMENTS = 1 << 24


def output_projection(module: nn.Module) -> torch.Tensor:
    """The attention module's ``o_proj`` weight ``[hidden, H_q * head_dim]``, or a clear error."""
    proj = getattr(module, "o_proj", None)
    weight = getattr(proj, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"This scorer needs the attention output projection, but {type(module).__name__} has no 2-D "
            "`o_proj.weight`. Use a scorer without a value term (e.g. 'snapkv')."
        )
    return weight


def check_output_projections(model: nn.Module) -> None:
    """Refuse (ValueError) a model whose attention modules lack the 2-D ``o_proj`` a value term reads."""
    for module in attention_modules(model):
        output_projection(module)


def value_perturbation(
    inputs: ScoreInputs, chunk_elements: int = CHUNK_ELEMENTS, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """N_j = (1/G) sum_g || v_j W_O^(g) ||_1 per KV head, fp32 ``[B, H_kv, L]``.

    W_O^(g) is the ``head_dim x hidden`` slice of o_proj that query head g's output
    goes through: how far token j's value can move the layer's output.

    The products v_j W_O^(g) (L x H_q x head_dim x hidden multiply-adds: as much as a prefill's attention at
    32k tokens) run in ``dtype``; by default the model's on CUDA (tensor cores; the norm is summed in fp32) and
    fp32 elsewhere (CPUs have no fast half-precision matmul in general).
    """
    values = inputs.values
    bsz, h_kv, seq, dim = values.shape
    group = inputs.group_size
    weight = output_projection(inputs.module)
    hidden = weight.shape[0]
    if weight.shape[1] != h_kv * group * dim:
        raise ValueError(
            f"o_proj of {type(inputs.module).__name__} has {weight.shape[1]} inputs; expected H_q * head_dim = "
            f"{h_kv * group * dim}."
        )
    if dtype is None:
        dtype = values.dtype if values.is_cuda else torch.float32
    w = weight.to(dtype).reshape(hidden, h_kv, group, dim)  # query head h*G+g reads columns of slice (h, g)
    out = torch.empty(bsz, h_kv, seq, dtype=torch.float32, device=values.device)
    chunk = max(1, chunk_elements // max(1, bsz * group * hidden))
    for h in range(h_kv):
        w_h = w[:, h].permute(1, 2, 0)  # [G, d, hidden]
        for lo in range(0, seq, chunk):
            v = values[:, h, lo : lo + chunk].to(dtype)  # [B, c, d]
            proj = torch.einsum("bcd,gdo->bgco", v, w_h)
            out[:, h, lo : lo + chunk] = proj.abs().sum(-1, dtype=torch.float32).mean(1)
    return out


class CriticalKV(Scorer):
    """CriticalKV: select by attention *and* by how much a token's value moves the output.

    Feng et al., "Identify Critical KV Cache in LLM Inference from an Output
    Perturbation Perspective", 2025 (arXiv:2502.03805).

    With s the base score (SnapKV by default) and N_j = (1/G) sum_g ||v_j W_O^(g)||_1:
    first keep ``first_stage`` of the budget by s (by default the window plus ``first_stage`` of the rest: see
    ``second_stage``), then fill the rest by (s + eps) * N_j.
    Works with any allocator (``ada-criticalkv`` = CriticalKV + Ada-KV).

    How the two stages share a per-layer allocator's budget (``second_stage``):
    - ``"joint"`` (default; a deviation): stage 1 keeps the window plus ``first_stage`` of the rest of the
      budget by s, through the allocator; then the heads compete again, through the allocator, for the rest
      by (s + eps) * N_j, so budget can move to heads whose values move the output more.
    - ``"per-head"`` (the authors' code, CriticalAdaKVPress): the allocator fixes each head's total B_h once
      from s; the head keeps floor(first_stage * B_h) by s (window inside), then fills its own B_h by
      (s + eps) * N_j.
    With Uniform both give every head the same total. Measured on SmolLM2 (24 needles of 4 digits at 2k tokens,
    `benchmarks/results/methods_needle_after_review/`), ``ada-criticalkv`` answered 0.917 / 0.625 question-aware
    at 0.2 and 0.708 / 0.417 question-agnostic at 0.5 ("joint" / "per-head"; 14 needles lost, none gained, over
    its four cells), so "joint" stays the default.

    Args:
        base: the base scorer (name or instance).
        first_stage: fraction of the budget chosen by the base score, in (0, 1].
        eps: keeps tokens with a tiny base score comparable, 1e-4 as in the paper.
        second_stage: ``"joint"`` or ``"per-head"`` (above).
    """

    name = "criticalkv"

    def __init__(
        self, base: str | Scorer = "snapkv", first_stage: float = 0.5, eps: float = 1e-4, second_stage: str = "joint"
    ):
        from . import get_scorer

        if isinstance(first_stage, bool) or not isinstance(first_stage, (int, float)) or not 0.0 < first_stage <= 1.0:
            raise ValueError(f"CriticalKV first_stage must be in (0, 1], got {first_stage!r}.")
        if not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"CriticalKV eps must be >= 0, got {eps!r}.")
        self.base = get_scorer(base)
        if isinstance(self.base, (ContextScorer, CriticalKV)):
            raise ValueError(
                f"CriticalKV needs a base scorer that scores from the prompt's queries (snapkv, h2o, ...), not "
                f"{self.base!r}: a context scorer's passes or another two-stage scorer cannot run inside it."
            )
        if second_stage not in ("joint", "per-head"):
            raise ValueError(f"CriticalKV second_stage must be 'joint' or 'per-head', got {second_stage!r}.")
        self.first_stage = float(first_stage)
        self.eps = float(eps)
        self.second_stage = second_stage

    @property
    def pinned_positions(self) -> int:
        return self.base.pinned_positions

    def check_model(self, model: nn.Module) -> None:
        self.base.check_model(model)
        check_output_projections(model)

    def __call__(self, inputs: ScoreInputs) -> StagedScores:
        base = self.base(inputs)
        if isinstance(base, StagedScores):
            raise ValueError("CriticalKV needs a plain base scorer, not another two-stage one.")
        base = base.float()
        second = (base + self.eps) * value_perturbation(inputs)
        return StagedScores(base, second, self.first_stage, per_head=self.second_stage == "per-head")
