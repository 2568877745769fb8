"""Evaluation results for people: the per-class IoU table (Markdown or HTML) and the confusion-matrix plot.

One table for every place that shows per-class IoUs: an evaluation's `report.md`, the pipeline's
HTML report, the MLflow artifact `per_class_iou.md` and the bench's `results.md` (one column per
bench run).
"""

from __future__ import annotations

import html
from pathlib import Path


def iou_table(columns: dict[str, dict[str, float]], *, percent: bool = False, as_html: bool = False) -> str:
    """A row per class (in the order the columns name them), a column per entry of `columns`, e.g.
    {"IoU": metrics["per_class_iou"]}, and a last row with each column's mean over its classes.

    IoUs are fractions, shown as 0.1234, or with `percent` as 12.3; a class a column lacks is "–".
    """
    classes = list(dict.fromkeys(c for column in columns.values() for c in column))

    def cell(value: float | None) -> str:
        if value is None:
            return "–"
        return f"{100 * value:.1f}" if percent else f"{value:.4f}"

    rows = [[c, *(cell(column.get(c)) for column in columns.values())] for c in classes]
    rows.append(["mean", *(cell(sum(column.values()) / len(column) if column else None)
                           for column in columns.values())])
    header = ["class", *columns]
    if as_html:
        def tr(cells: list[str], tag: str) -> str:
            return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

        return ("<table border='1' cellpadding='4'>" + tr(header, "th") + "".join(tr(r, "td") for r in rows)
                + "</table>")
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def confusion_plot(matrix: list[list[int]], names: list[str], path: str | Path) -> None:
    """A row-normalised confusion matrix (rows: ground truth) as a PNG."""
    import numpy as np
    from matplotlib.figure import Figure  # matplotlib only when plotting

    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(m)
    size = max(4.0, 0.4 * n + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (each row sums to 1)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
