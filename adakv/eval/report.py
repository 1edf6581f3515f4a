"""Result files of a run: results.json (meta, rows, outputs), results.csv (rows) and summary.md (a table)."""

from __future__ import annotations

import argparse
import csv
import json
import shlex
from collections import defaultdict
from pathlib import Path
from typing import Any

from adakv.eval.runinfo import machine_line, run_info
from adakv.methods import METHODS, get_method


def _header(kind: str, meta: dict[str, Any]) -> list[str]:
    return [
        f"# adakv-bench {kind}",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['date']}; {machine_line(meta['machine'])}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
    ]


def _speed_summary(rows: list[dict], meta: dict[str, Any]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "" if value is None else format(value, spec)

    mib = 2**20
    lines = _header("speed", meta) + [
        f"model: {meta['model']['spec']} ({meta['model']['cls']}, {meta['model']['dtype']}"
        + (", random weights" if meta["args"].get("random_weights") else "")
        + f"); medians of {meta['args']['repeats']} runs, {meta['args']['decode_steps']} decode steps each; "
        "ratios are to the full cache (DynamicCache) in the same run.",
        "",
        "| context | batch | method | budget | K/V MiB | K/V ratio | peak MiB | peak ratio | prefill s | prefill ratio "
        "| compression share of prefill | decode ms/token | decode ratio |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        cells = [
            str(r["length"]),
            str(r["batch"]),
            r["method"] + (f" ({r['error']})" if r.get("error") else ""),
            f"{r['budget']:g}",
            fmt(None if r["kv_bytes"] is None else r["kv_bytes"] / mib, ".2f"),
            fmt(r["kv_bytes_ratio"], ".3f"),
            fmt(None if r["peak_bytes"] is None else r["peak_bytes"] / mib, ".1f"),
            fmt(r["peak_bytes_ratio"], ".3f"),
            fmt(r["prefill_s"], ".3f"),
            fmt(r["prefill_s_ratio"], ".2f"),
            fmt(r["compress_fraction"], ".1%"),
            fmt(r["decode_ms"], ".2f"),
            fmt(r["decode_ms_ratio"], ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "peak: above the memory in use before the run (CUDA allocator peak on GPU; sampled process RSS on CPU). "
        "compression share: time in AdaKVLayer.compress_dense (a first prompt chunk's scoring, selection, "
        "compaction) / prefill time."
    )
    return "\n".join([*lines, "", note]) + "\n"


def _meta(argv: list[str], args: argparse.Namespace, model: Any, seconds: float) -> dict[str, Any]:
    return {
        "kind": args.kind,
        **run_info("adakv-bench " + shlex.join(argv), model.device),
        "model": dict(
            spec=args.model,
            cls=type(model).__name__,
            dtype=args.dtype,
            parameters=sum(p.numel() for p in model.parameters()),
        ),
        "seconds": round(seconds, 1),
        "args": vars(args),
        **_chunk_scores(args),
    }


def _chunk_scores(args: argparse.Namespace) -> dict[str, Any]:
    """With a chunked prefill, how each method ranked held tokens at later cuts (``--chunk-scores``, else the
    scorer's declared default), so a run's record says which it was."""
    if not getattr(args, "prefill_chunk_size", None):
        return {}
    given = getattr(args, "chunk_scores", None)
    known = [m for m in getattr(args, "methods", []) if m in METHODS]
    return {"chunk_scores": {m: given or get_method(m)[0].chunk_scores for m in known}}


def _summary(kind: str, rows: list[dict], meta: dict[str, Any], modes: list[str]) -> str:
    value = "score" if kind == "quality" else "value"
    head = ["metric"] if kind == "fidelity" else []
    table: dict[tuple, dict[str, Any]] = defaultdict(dict)
    for r in rows:
        table[tuple(r[k] for k in [*head, "task", "length", "method", "budget"])][r["mode"]] = r
    modes = [m for m in [*modes, "teacher_forced"] if any(m in cell for cell in table.values())]
    kv = ["KV bytes vs full"] if kind == "quality" else []
    lines = _header(kind, meta) + [
        f"model: {meta['model']['spec']} ({meta['model']['cls']}, {meta['model']['dtype']}); "
        f"{meta['args']['samples']} samples per cell; the `full` rows are the full cache on the same samples"
        + ("; their fidelity values hold by definition." if kind == "fidelity" else "."),
        "",
        "| " + " | ".join([*head, "task", "length", "method", "budget", *modes, *kv]) + " |",
        "|" + "---|" * (len(head) + 4 + len(modes) + len(kv)),
    ]
    for key, cell in table.items():
        vals = [f"{cell[m][value]:.3f}" if m in cell else "" for m in modes]
        vals += [f"{sum(r['kv_ratio'] for r in cell.values()) / len(cell):.3f}"] if kv else []
        lines.append("| " + " | ".join([*map(str, key[:-1]), f"{key[-1]:g}", *vals]) + " |")
    note = (
        "score: fraction of expected answers in the greedy output (multi: mean over every question of a sample, "
        "each asked from a copy of the context compressed once); KV bytes: held by the cache after decoding (multi: "
        "the compressed context before the questions), vs the full cache, mean over modes."
        if kind == "quality"
        else "agreement: matching greedy prefix / max new tokens; kl: mean next-token KL(full || method) in nats, and "
        "top1: fraction of positions where both rank the same token first, under teacher forcing (task prompts: on "
        "the full cache's greedy continuation; prose: on the real text)."
    )
    return "\n".join([*lines, "", note]) + "\n"


def _write(out: Path, kind: str, rows: list[dict], outputs: list[dict], meta: dict[str, Any], modes: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {"meta": meta, "rows": rows, "outputs": outputs}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = _speed_summary(rows, meta) if kind == "speed" else _summary(kind, rows, meta, modes)
    (out / "summary.md").write_text(summary)
