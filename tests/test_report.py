"""report: the one per-class IoU table (Markdown and HTML) every report shows, and the confusion plot."""

from __future__ import annotations

from PIL import Image

from cdsp_core import report


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


def test_confusion_plot_is_a_png(tmp_path):
    report.confusion_plot([[9, 1], [2, 3]], ["background", "cat"], tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
