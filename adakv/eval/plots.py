"""PNG figures of a run's results.json (matplotlib, an optional dependency: ``pip install matplotlib``).

* quality: mean score vs budget, a line per method (the full cache dashed), one panel per mode;
  and for runs with ``niah_single``, needle heatmaps (one per mode): score by needle depth x context length
  per method and budget;
* fidelity: greedy agreement, teacher-forced KL and top-1 agreement vs budget;
* speed: KV bytes, peak memory and decode time per token vs context length.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install matplotlib (or adakv[bench])") from exc
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _budget_label(budget: float) -> str:
    return f"{budget:g}" if budget <= 1 else f"{int(budget)} tok/head"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _versus_budget(plt: Any, rows: list[dict], value: str, panel_key: str, title: str, path: Path) -> Path:
    """Mean ``value`` over tasks and lengths vs budget, a line per method, one panel per ``panel_key``."""
    panels = sorted({r[panel_key] for r in rows})
    budgets = sorted({r["budget"] for r in rows if r["method"] != "full"}, key=lambda b: (b > 1, b))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        cells: dict[tuple[str, float], list[float]] = defaultdict(list)
        for r in rows:
            if r[panel_key] == panel:
                cells[r["method"], r["budget"]].append(r[value])
        for method in sorted({m for m, _ in cells} - {"full"}):
            xs = [i for i, b in enumerate(budgets) if (method, b) in cells]
            ax.plot(xs, [_mean(cells[method, budgets[i]]) for i in xs], marker="o", label=method)
        full = [v for (m, _), vs in cells.items() if m == "full" for v in vs]
        if full:
            ax.axhline(_mean(full), color="black", linestyle="--", label="full cache")
        ax.set_xticks(range(len(budgets)), [_budget_label(b) for b in budgets])
        ax.set_xlabel("budget")
        ax.set_ylabel(value)
        ax.set_title(f"{panel_key} = {panel}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _needle_heatmap(plt: Any, outputs: list[dict], mode: str, path: Path) -> Path | None:
    """Score by needle depth (rows) x context length (columns), one panel per method and budget."""
    needle = [o for o in outputs if o["task"] == "niah_single" and o.get("depth") is not None and o["mode"] == mode]
    if not needle:
        return None
    exact = len({o["depth"] for o in needle}) <= 11  # asked-for depths (--depths); random ones are binned
    depth_of = (lambda o: o["depth"]) if exact else (lambda o: round(o["depth"], 1))
    depths = sorted({depth_of(o) for o in needle})
    lengths = sorted({o["length"] for o in needle})
    panels = sorted({(o["method"], o["budget"]) for o in needle}, key=lambda p: (p[0] != "full", p))
    cols = min(4, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(
        rows_n, cols, figsize=(3.4 * cols + 1, 2.9 * rows_n + 0.6), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (method, budget) in zip(axes.flat, panels):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                hits = [
                    o["score"]
                    for o in needle
                    if (o["method"], o["budget"], o["length"]) == (method, budget, n) and depth_of(o) == d
                ]
                if hits:
                    grid[i][j] = _mean(hits)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(method if method == "full" else f"{method} @ {_budget_label(budget)}", fontsize=9)
        ax.set_xlabel("context tokens", fontsize=7)
        ax.set_ylabel("needle depth", fontsize=7)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="score")
    fig.suptitle(f"niah_single, question-{mode}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _speed(plt: Any, rows: list[dict], path: Path) -> Path:
    panels = (("kv_bytes", "K/V held (MiB)", 2**-20), ("peak_bytes", "peak memory (MiB)", 2**-20))
    panels += (("decode_ms", "decode ms / token", 1.0),)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        lines[r["method"], r["budget"], r["batch"]].append(r)
    configs = sorted({(m, b) for m, b, _ in lines}, key=lambda c: (c[0] != "full", c))
    colors = {c: "black" if c[0] == "full" else f"C{i}" for i, c in enumerate(configs)}
    batches = sorted({batch for _, _, batch in lines})
    dashes = dict(zip(batches, ["-", "--", ":", "-."] * len(batches)))
    for ax, (key, label, scale) in zip(axes, panels):
        for (method, budget, batch), pts in sorted(lines.items(), key=lambda kv: (kv[0][0] != "full", kv[0])):
            pts = sorted((p for p in pts if p[key] is not None), key=lambda p: p["length"])
            name = "full cache" if method == "full" else f"{method} @ {_budget_label(budget)}"
            ax.plot(
                [p["length"] for p in pts],
                [p[key] * scale for p in pts],
                marker="o",
                color=colors[method, budget],
                linestyle=dashes[batch],
                label=name if len(batches) == 1 else f"{name}, batch {batch}",
            )
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_results(directory: Path) -> list[Path]:
    """Write the figures of ``directory/results.json`` next to it; returns their paths."""
    plt = _pyplot()
    results = json.loads((Path(directory) / "results.json").read_text())
    kind, rows = results["meta"]["kind"], results["rows"]
    out = Path(directory)
    if kind == "quality":
        made = [_versus_budget(plt, rows, "score", "mode", "task score vs budget", out / "score_vs_budget.png")]
        for mode in ("aware", "agnostic"):
            made.append(_needle_heatmap(plt, results["outputs"], mode, out / f"needle_heatmap_{mode}.png"))
    elif kind == "fidelity":
        made = [
            _versus_budget(plt, [r for r in rows if r["metric"] == m], "value", "mode", title, out / f"{m}.png")
            for m, title in (
                ("agreement", "greedy agreement vs budget"),
                ("kl", "teacher-forced KL (nats) vs budget"),
                ("top1", "teacher-forced top-1 agreement vs budget"),
            )
            if any(r["metric"] == m for r in rows)
        ]
    else:
        made = [_speed(plt, rows, out / "speed.png")]
    return [p for p in made if p is not None]
