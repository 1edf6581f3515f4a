"""What every saved figure records about its run: the command, date, machine, versions and git state.

One helper for the harness (`adakv-bench`) and the scripts under ``benchmarks/``, so that every JSON they
write can be compared with another by the same keys.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers

import adakv

_SOURCE = Path(adakv.__file__).resolve().parents[1]  # the checkout, when adakv is installed editable


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def versions() -> dict[str, str]:
    out = {
        "adakv": adakv.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        out["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pass
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def machine(device: torch.device | str | None = None) -> dict[str, Any]:
    """The host, its load when called (a busy machine explains slow figures) and the GPU if ``device`` is CUDA."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "arch": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict[str, Any]) -> str:
    """``machine()`` as one line for a Markdown header."""
    where = info.get("gpu") or f"CPU ({info['cpu']})"
    return f"{info['platform']}, {info['cpu_count']} CPUs, {info['torch_threads']} torch threads, {where}"


def git_state() -> dict[str, Any]:
    """Commit and whether tracked files differ from it. Outside a git checkout (adakv installed into a folder of its
    own, as ``benchmarks/gpu_suite.sh`` does on a device machine whose copy has no history) the commit is
    ``$ADAKV_COMMIT`` when the caller set it, else None, and ``dirty`` is None (unknown)."""

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=_SOURCE, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": os.environ.get("ADAKV_COMMIT") or None, "dirty": None}


def run_info(command: str, device: torch.device | str | None = None) -> dict[str, Any]:
    return {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device),
        "versions": versions(),
        "git": git_state(),
    }


def summary_header(title: str, info: dict[str, Any]) -> list[str]:
    """The first lines of a benchmark's ``summary.md``: its title, then the command, date, machine and versions of
    ``info`` (a :func:`run_info` record)."""
    return [
        f"# {title}",
        "",
        f"`{info['command']}`",
        "",
        f"{info['date']}; {machine_line(info['machine'])}; {info['versions']}",
        "",
    ]
