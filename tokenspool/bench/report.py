"""What a benchmark prints and writes: an aligned table, a JSON document, a PNG of latency against load."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenspool.bench.targets import REPORT_ORDER


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as an aligned text table; ``columns`` are (key, heading)."""
    cells = [[heading for _key, heading in columns]]
    cells += [[fmt(row.get(key, "")) for key, _heading in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(widths[i]) for i, cell in enumerate(line)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def plot_latency(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """TTFT and inter-token latency (p50 solid, p99 dashed) against load, one colour per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({row["target"] for row in rows}, key=REPORT_ORDER.index)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("ttft", "time to first token (ms)"), ("itl", "inter-token latency (ms)"), ("e2e", "end to end (ms)"))
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for target in targets:
            mine = sorted((row for row in rows if row["target"] == target), key=lambda row: row["level"])
            levels = [row["level"] for row in mine]
            (line,) = ax.plot(levels, [row[f"{metric}_p50_ms"] for row in mine], marker="o", label=f"{target} p50")
            ax.plot(
                levels,
                [row[f"{metric}_p99_ms"] for row in mine],
                marker="x",
                linestyle="--",
                color=line.get_color(),
                label=f"{target} p99",
            )
        mode = rows[0]["mode"] if rows else "closed"
        ax.set_xlabel("concurrent streams" if mode == "closed" else "requests per second")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
