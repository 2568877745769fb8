"""report: the one per-class IoU table (Markdown and HTML) every report shows, and the confusion plot."""

from __future__ import annotations

import base64
import html
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from cdsp_core import data, report


def test_iou_table_markdown_one_column_per_entry_and_a_mean_row():
    table = report.iou_table({"IoU": {"background": 0.8, "cat": 0.45}})
    assert table.splitlines() == ["| class | IoU |", "| --- | ---: |", "| background | 0.8000 |", "| cat | 0.4500 |",
                                  "| mean | 0.6250 |"]
    # the bench's: percent, a column per run, "–" where a run lacks a class
    runs = report.iou_table({"cdsp": {"background": 0.8, "cat": 0.5}, "scribble-only": {"background": 0.7}},
                            percent=True)
    assert "| class | cdsp | scribble-only |" in runs and "| cat | 50.0 | – |" in runs
    assert "| mean | 65.0 | 70.0 |" in runs


def test_iou_table_html_escapes_class_names():
    table = report.iou_table({"IoU": {"<b>cat</b>": 0.5}}, as_html=True)
    assert table.startswith("<table") and "&lt;b&gt;cat&lt;/b&gt;" in table and "<b>cat" not in table
    assert "<th>class</th><th>IoU</th>" in table and "<td>0.5000</td>" in table


def test_confusion_plot_grows_with_the_classes_and_needs_a_name_per_row(tmp_path):
    report.confusion_plot([[9, 1], [2, 3]], ["background", "cat"], tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    sizes = {}
    for n in (5, 21):
        m = (np.eye(n) * 90 + 1).astype(int).tolist()
        report.confusion_plot(m, data.VOC_CLASSES[:n], tmp_path / f"{n}.png")
        with Image.open(tmp_path / f"{n}.png") as im:
            sizes[n] = im.size
    assert sizes[21][0] > 1000 and sizes[21][0] - sizes[5][0] >= 16 * 40  # about 45 px per class
    with pytest.raises(ValueError, match="as many class names as rows"):
        report.confusion_plot([[1, 0], [0, 1]], ["background"], tmp_path / "bad.png")


def test_matrix_names_come_from_the_evaluation_not_from_the_present_classes():
    """per_class_iou leaves out a class absent from ground truth and prediction, so it cannot name
    the rows of the matrix: before class_names were recorded the plot had numbers for names."""
    matrix = [[5, 1, 0], [1, 4, 0], [0, 0, 0]]
    metrics = {"confusion_matrix": matrix, "per_class_iou": {"background": 0.7, "cat": 0.6},
               "class_names": ["background", "cat", "dog"]}
    assert report.matrix_names(metrics) == ["background", "cat", "dog"]
    del metrics["class_names"]  # an older metrics.json
    assert report.matrix_names(metrics) == ["0", "1", "2"]
    assert report.matrix_names({**metrics, "confusion_matrix": matrix[:2]}) == ["background", "cat"]


def test_mlflow_ui_urls_only_for_a_web_server():
    assert report.mlflow_ui_url("http://mlflow.kubeflow:5000", "experiments/1/runs/abc") == \
        "http://mlflow.kubeflow:5000/#/experiments/1/runs/abc?workflowType=machine_learning"
    assert report.mlflow_ui_url("https://u:secret@host/mlflow/", "models/m/versions/2") == \
        "https://host/mlflow/#/models/m/versions/2?workflowType=machine_learning"  # model training, not GenAI
    assert report.mlflow_ui_url("sqlite:////tmp/mlflow.db", "experiments/1") is None


def write_evaluation(folder, metrics: dict) -> None:
    """An evaluation folder as evaluate.evaluate writes it (metrics.json and an overlay)."""
    (folder / "overlays").mkdir(parents=True)
    Image.new("RGB", (30, 20), (10, 200, 30)).save(folder / "overlays" / "val_1.png")
    (folder / "metrics.json").write_text(json.dumps(metrics))


METRICS = {"miou": 0.625, "pixel_acc": 0.9, "per_class_iou": {"background": 0.8, "<b>cat</b>": 0.45},
           "confusion_matrix": [[90, 10, 0], [20, 30, 0], [0, 0, 0]], "class_names": ["background", "<b>cat</b>",
                                                                                     "dog"],
           "n_images": 2, "split": "val", "warnings": ["never predicted, though in the ground truth: dog"]}


def test_evaluation_html_says_what_was_decided_against_which_champion_with_links(tmp_path):
    write_evaluation(tmp_path / "eval", METRICS)
    decision = {"promoted": True, "reason": "mIoU 0.6250 beats champion version 3 (0.5000) on val split ab12",
                "version": "4", "miou": 0.625, "champion_version": "3", "champion_miou": 0.5}
    page = report.evaluation_html(tmp_path / "eval", decision, model_name="cdsp-segmenter",
                                  tracking_uri="http://mlflow:5000", experiment_id="7", run_id="r1", parent_run_id="p1")
    assert "Promoted to champion" in page and html.escape(decision["reason"]) in page
    assert "<td>champion before</td><td>3</td><td>0.5000</td>" in page
    assert "<td>this model</td><td>4</td><td>0.6250</td><td>+0.1250</td>" in page
    assert "<td>champion after</td><td>4</td><td>0.6250</td>" in page
    assert "mIoU</div><div class=\"v\">0.6250" in page and "0.9000" in page
    assert "never predicted, though in the ground truth: dog" in page
    for url in ("http://mlflow:5000/#/models/cdsp-segmenter/versions/4", "http://mlflow:5000/#/models/cdsp-segmenter/"
                "versions/3", "http://mlflow:5000/#/experiments/7/runs/r1", "http://mlflow:5000/#/experiments/7/runs/p1"):
        assert f'href="{url}?workflowType=machine_learning"' in page
    assert "<td>&lt;b&gt;cat&lt;/b&gt;</td><td>0.4500</td>" in page and "<b>cat</b>" not in page  # the IoU table
    # self-contained: the confusion matrix and each overlay embedded, nothing fetched from elsewhere
    images = re.findall(r'<img[^>]* src="([^"]*)"', page)
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") for src in images)
    assert base64.b64decode(images[1].split(",", 1)[1]) == (tmp_path / "eval" / "overlays" / "val_1.png").read_bytes()
    with Image.open(io.BytesIO(base64.b64decode(images[0].split(",", 1)[1]))) as im:
        assert im.format == "PNG" and im.width > 300
    assert "<link" not in page and "<script" not in page
    for name, (r, g, b) in zip(["background", "&lt;b&gt;cat&lt;/b&gt;", "dog"], data.class_colours(3)):
        assert f'background:rgb({r}, {g}, {b})"></span>{name}</span>' in page  # the legend: every class


def test_evaluation_html_without_a_web_ui_or_champion_shows_ids_and_a_veto(tmp_path):
    write_evaluation(tmp_path / "eval", {**METRICS, "warnings": ["the model predicts a single class: background"]})
    decision = {"promoted": False, "reason": "the model predicts a single class: background (mIoU 0.6250): "
                "not a usable segmenter", "version": "1", "miou": 0.625, "champion_version": None,
                "champion_miou": None}
    page = report.evaluation_html(tmp_path / "eval", decision, model_name="cdsp-segmenter",
                                  tracking_uri="sqlite:////tmp/mlflow.db", experiment_id="0", run_id="r1")
    assert "Not promoted" in page and "not a usable segmenter" in page
    assert "<td>champion before</td><td>none</td><td>–</td>" in page
    assert "<td>champion after</td><td>none</td><td>–</td>" in page
    assert "href=" not in page and "<code>r1</code>" in page and "<code>cdsp-segmenter version 1</code>" in page
