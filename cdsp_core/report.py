"""Evaluation results for people: the per-class IoU table (Markdown or HTML), the confusion-matrix
plot and the evaluation's HTML page (what the pipeline's evaluate step shows in Kubeflow).

One table for every place that shows per-class IoUs: an evaluation's `report.md`, the pipeline's
HTML report, the MLflow artifact `per_class_iou.md` and the bench's `results.md` (one column per
bench run).
"""

from __future__ import annotations

import base64
import html
import io
import json
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from cdsp_core import data
from cdsp_core.credentials import redact


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


# ---------------------------------------------------------------------------- confusion matrix

def matrix_names(metrics: dict) -> list[str]:
    """The classes of an evaluation's confusion-matrix rows and columns: its `class_names`. A
    metrics.json written before those were recorded has only `per_class_iou`, which leaves out the
    classes absent from both ground truth and prediction: it names the rows only when none is
    absent, else the rows are numbered."""
    n = len(metrics.get("confusion_matrix") or [])
    names = list(metrics.get("class_names") or metrics.get("per_class_iou") or [])
    return names if len(names) == n else [str(i) for i in range(n)]


def confusion_plot(matrix: list[list[int]], names: Sequence[str], path: str | Path | BinaryIO) -> None:
    """The confusion matrix (rows: ground truth) as a PNG, each row divided by its pixel count and
    each cell's share written in it; the figure grows with the number of classes (21 VOC classes
    stay readable)."""
    import numpy as np
    from matplotlib.figure import Figure  # matplotlib only when plotting

    m = np.asarray(matrix, dtype=np.float64)
    n = len(m)
    if m.shape != (n, n) or len(names) != n:
        raise ValueError(f"a confusion matrix of shape {m.shape} needs as many class names as rows, got {len(names)}")
    rows = m.sum(axis=1)
    norm = m / np.maximum(rows, 1)[:, None]
    cell = 0.45  # inches per class: room for "0.00" at 7 pt
    labels = 0.08 * max(map(len, names)) + 0.8  # the tick labels' room, on the left and at the bottom
    side = max(2.5, cell * n)
    fig = Figure(figsize=(side + labels + 1.3, side + labels + 0.7), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fontsize = 9 if n <= 10 else 7
    for i in range(n):
        for j in range(n):
            if m[i, j]:  # empty cells stay blank, so the errors that happen stand out
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=fontsize,
                        color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(range(n), [name if rows[i] else f"{name} (none)" for i, name in enumerate(names)], fontsize=9)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    ax.set_title("confusion matrix: share of each true class's pixels", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.savefig(path, dpi=100, format="png")


# ---------------------------------------------------------------------------- the HTML page

def mlflow_ui_url(tracking_uri: str, route: str) -> str | None:
    """The MLflow UI's address of `route` (e.g. `experiments/1/runs/<id>`, `models/<name>/versions/3`)
    on an http(s) tracking server; None for other stores (a SQLite file has no UI of its own).

    The address asks for the UI's model-training mode (`workflowType`): MLflow 3's side bar otherwise
    starts in, and remembers, its GenAI mode, whatever the experiment's kind."""
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return None
    netloc = parts.netloc.rsplit("@", 1)[-1]  # never a user:password into a page
    mode = "" if "workflowType=" in route else ("&" if "?" in route else "?") + "workflowType=machine_learning"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/", "", "")) + "#/" + route + mode


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d2433;max-width:1280px}
h1{font-size:22px;margin:0 0 16px} h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #dde2ea;
padding-bottom:4px} .cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #dde2ea;border-radius:8px;padding:10px 16px;min-width:130px;background:#f7f9fc}
.card .v{font-size:28px;font-weight:600} .card .k{font-size:12px;color:#5b6472;text-transform:uppercase}
.decision{border-radius:8px;padding:12px 16px;margin:16px 0;font-size:15px}
.promoted{background:#e5f6ea;border:1px solid #5cb176} .kept{background:#fdf1e2;border:1px solid #e0a458}
.warn{background:#fde8e8;border:1px solid #d9534f;border-radius:8px;padding:8px 16px;margin:8px 0}
table{border-collapse:collapse;font-size:14px;margin:4px 0} th,td{border:1px solid #dde2ea;padding:4px 10px}
th{background:#f0f3f8;text-align:left} td{text-align:right} td:first-child{text-align:left}
tr:last-child td{font-weight:600} .legend{display:flex;flex-wrap:wrap;gap:6px 18px;font-size:14px}
.sw{display:inline-block;width:14px;height:14px;border:1px solid #333;vertical-align:-2px;margin-right:6px}
figure{margin:0 0 18px} figcaption{font-size:13px;color:#5b6472} img{max-width:100%;height:auto}
img.pixels{image-rendering:pixelated} code{font-size:13px} a{color:#1f5fbf}
"""


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _mlflow_ref(label: str, text: str, url: str | None) -> str:
    """A link to the MLflow UI, or the ids as text where there is no UI address."""
    if url:
        return (f'<li>{html.escape(label)}: <a href="{html.escape(url)}" target="_blank" rel="noopener">'
                f"{html.escape(text)}</a></li>")
    return f"<li>{html.escape(label)}: <code>{html.escape(text)}</code></li>"


def _miou(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def evaluation_html(eval_dir: str | Path, decision: dict, *, model_name: str, tracking_uri: str = "",
                    experiment_id: str = "", run_id: str = "", parent_run_id: str = "") -> str:
    """The evaluation step's report as one self-contained HTML page (inline CSS, images as data URIs,
    since Kubeflow's UI shows a single HTML file): headline numbers, the champion decision with its
    reason and the champion's mIoU before and after, links to the MLflow runs and model version, the
    per-class IoU table, the colour legend, the confusion matrix and the overlays of `eval_dir`.

    `decision` is `registry.promote_if_better`'s; `eval_dir` an `evaluate.evaluate` output folder.
    """
    folder = Path(eval_dir)
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    version, promoted = str(decision["version"]), bool(decision["promoted"])
    champ_version, champ_miou = decision.get("champion_version"), decision.get("champion_miou")
    esc = html.escape

    cards = [("mIoU", f"{metrics['miou']:.4f}"), ("pixel accuracy", f"{metrics['pixel_acc']:.4f}"),
             ("images", str(metrics.get("n_images", "?"))),
             ("decision", "promoted" if promoted else "not promoted")]
    body = [f"<h1>Evaluation of {esc(model_name)} version {esc(version)} on {esc(metrics.get('split', 'val'))}</h1>",
            '<div class="cards">' + "".join(f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}'
                                            "</div></div>" for k, v in cards) + "</div>",
            f'<div class="decision {"promoted" if promoted else "kept"}"><b>'
            f'{"Promoted to champion" if promoted else "Not promoted; the champion stays"}</b>: '
            f"{esc(decision['reason'])}</div>"]
    body += [f'<div class="warn"><b>warning:</b> {esc(w)}</div>' for w in metrics.get("warnings", [])]

    # the champion before and after this decision, each with its mIoU on this val split where known
    def row(what: str, v: str | None, miou: float | None, change: str = "") -> str:
        return (f"<tr><td>{esc(what)}</td><td>{esc(v or 'none')}</td><td>{_miou(miou) if v else '–'}</td>"
                f"<td>{change}</td></tr>")

    after = (version, metrics["miou"]) if promoted else (champ_version, champ_miou)
    change = f"{metrics['miou'] - champ_miou:+.4f}" if champ_miou is not None else ""
    body += ["<h2>Champion</h2><table><tr><th></th><th>version</th><th>mIoU on this val split</th>"
             "<th>vs champion before</th></tr>",
             row("champion before", champ_version, champ_miou), row("this model", version, metrics["miou"], change),
             row("champion after", *after), "</table>"]
    if champ_version and champ_miou is None:
        body.append("<p>The champion has no mIoU on this val split, so the two were not compared.</p>")

    exp = f"experiments/{experiment_id}/runs/"
    refs = [("model version", f"{model_name} version {version}",
             mlflow_ui_url(tracking_uri, f"models/{urllib.parse.quote(model_name)}/versions/{version}"))]
    if champ_version and champ_version != version:
        refs.append(("previous champion", f"{model_name} version {champ_version}",
                     mlflow_ui_url(tracking_uri, f"models/{urllib.parse.quote(model_name)}/versions/{champ_version}")))
    if run_id:
        refs.append(("evaluation run", run_id, mlflow_ui_url(tracking_uri, exp + run_id) if experiment_id else None))
    if parent_run_id:
        refs.append(("pipeline run", parent_run_id,
                     mlflow_ui_url(tracking_uri, exp + parent_run_id) if experiment_id else None))
    where = "" if mlflow_ui_url(tracking_uri, "") else f" (store {esc(redact(tracking_uri))}, which has no web UI)"
    body += [f"<h2>MLflow{where}</h2><ul>", *(_mlflow_ref(*r) for r in refs), "</ul>"]

    body += ["<h2>Per-class IoU</h2>", iou_table({"IoU": metrics["per_class_iou"]}, as_html=True),
             "<p>Classes in neither the ground truth nor the predictions have no IoU and are left out.</p>"]

    names = matrix_names(metrics)
    colours = data.class_colours(256)
    legend = [(name, colours[i]) for i, name in enumerate(metrics.get("class_names") or [])]
    legend.append(("ignored / unlabelled (255)", colours[data.IGNORE]))
    body += ['<h2>Colours</h2><div class="legend">', *(
        f'<span><span class="sw" style="background:rgb{c}"></span>{esc(name)}</span>' for name, c in legend), "</div>"]

    if metrics.get("confusion_matrix"):
        png = io.BytesIO()
        confusion_plot(metrics["confusion_matrix"], names, png)
        body += ["<h2>Confusion matrix</h2>", f'<img alt="confusion matrix" src="{_png_uri(png.getvalue())}">']

    overlays = sorted((folder / "overlays").glob("*.png"))
    if overlays:
        body.append("<h2>Overlays</h2>")
        body += [f'<figure><img class="pixels" alt="{esc(p.stem)}" src="{_png_uri(p.read_bytes())}">'
                 f"<figcaption>{esc(p.stem)}</figcaption></figure>" for p in overlays]
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>CDSP evaluation: {esc(model_name)} "
            f"version {esc(version)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")
