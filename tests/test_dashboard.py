"""The MLflow dashboard answers "which model is better, and why" at a glance: a tiny `cdsp bench` and
the pipeline's own steps write into the session's real `mlflow server`, and what a person sees there
is read back through the MLflow client: run names, params, per-epoch curves (step = epoch, 1..n),
headline results on the runs of the runs table, the compare page, descriptions, the registry."""

from __future__ import annotations

import inspect
import json
import re
import urllib.parse
import uuid

import pytest
from kfp import dsl
from PIL import Image
from test_bench import TINY
from test_registry import TinySegmenter
from tiny_data import tiny_dataset

from cdsp_core import cli, registry, tracking
from components import stages
from pipelines import local_run


def children(client, parent) -> dict[str, object]:
    """Stage name -> the nested runs of `parent` (an MLflow Run)."""
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}'")
    return {r.data.tags[tracking.TAG_STAGE]: r for r in runs}


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_a_bench_reads_at_a_glance(mlflow_env, mlflow_service, tmp_path, capsys):
    client = mlflow_env
    experiment = f"bench-{uuid.uuid4().hex[:8]}"
    data = tiny_dataset(tmp_path / "data", n_train=4, n_val=2, size=32)
    out = tmp_path / "bench"
    rows = ["scribble-only", "scribble-only-drop0.5"]  # neither needs stage 1: the test stays short
    assert cli.main(["bench", "--data", str(data), "--out", str(out), "--runs", ",".join(rows), "--seeds", "1",
                     "--seed", "3", "--bench-experiment", experiment, *TINY, "--epochs", "2",
                     "--curve-val-images", "1"]) == 0
    printed = capsys.readouterr().out
    bench_id = json.loads((out / "bench.json").read_text())["bench_id"]
    results = json.loads((out / "results.json").read_text())
    exp = client.get_experiment_by_name(experiment)

    # The experiment says what its runs are, that mIoU is a fraction, and which bench came last.
    note = exp.tags[tracking.NOTE_TAG]
    assert "`<row> · s<seed>`" in note and "fractions in [0, 1]" in note and f"Latest bench: `{bench_id}`" in note

    # One run per (row, seed), named so; the bench id as a tag; the headline results on the run itself.
    runs = client.search_runs([exp.experiment_id], f"tags.`cdsp.bench` = '{bench_id}'")
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {f"{row} · s3" for row in rows} | {f"summary · {bench_id}"}
    per_seed = {(r["name"], seed): m for r in results["runs"] for seed, m in zip(r["seeds"], r["miou"]["per_seed"])}
    for row in rows:
        for seed in (3,):
            run = by_name[f"{row} · s{seed}"]
            assert run.data.tags["cdsp.bench_run"] == row and run.data.tags["cdsp.seed"] == str(seed)
            metrics = run.data.metrics
            assert metrics["miou"] == pytest.approx(per_seed[row, seed], abs=5e-5)  # logged to 4 decimals
            assert 0 <= metrics["pixel_acc"] <= 1 and "iou_background" in metrics
            assert run.data.params["bench_run"] == row and run.data.params["seed"] == str(seed)
            # the curves are on the run people click, one point per epoch (val_miou on the first val
            # image: --curve-val-images 1), and on its training run, named after it, with its settings
            for key in ("loss", "loss_seg", "lr", "images_per_sec", "val_miou"):
                assert steps(client, run.info.run_id, key) == [1, 2], key
            training = children(client, run)["train_segmenter"]
            assert training.info.run_name == f"{row} · s{seed} / train_segmenter"
            assert training.data.params["epochs"] == "2" and training.data.params["l_seg"] == "1.0"
            assert training.data.params["scribbles"] == run.data.params["scribbles"]
            assert steps(client, training.info.run_id, "loss") == [1, 2]
    assert by_name["scribble-only-drop0.5 · s3"].data.params["scribbles"] == "drop(0.5)"
    assert by_name["scribble-only · s3"].data.params["scribbles"] == "clean"

    # It ends with the compare page of exactly those runs, on this server.
    line = next(x for x in printed.splitlines() if x.startswith("compare in MLflow"))
    assert line.startswith("compare in MLflow (2 runs): ")
    url = line.split(": ", 1)[1]
    assert url.startswith(f"{mlflow_service.url}/#/compare-runs?")
    query = urllib.parse.parse_qs(urllib.parse.unquote(url.split("?", 1)[1]))
    assert json.loads(query["runs"][0]) == [by_name[f"{row} · s3"].info.run_id for row in rows]
    assert json.loads(query["experiments"][0]) == [exp.experiment_id]
    assert results["mlflow"]["compare_url"] == url and "(the runs are in" not in printed

    # ... and with the runs table in a saved view: the results as columns, best first, this bench only.
    assert exp.tags[tracking.KIND_TAG] == tracking.TRAINING_KIND  # opens as model training, not GenAI
    line = next(x for x in printed.splitlines() if x.startswith("runs table with the results"))
    view_url = line.split(": ", 1)[1]
    assert view_url == results["mlflow"]["runs_url"] == \
        f"{mlflow_service.url}/#/experiments/{exp.experiment_id}/runs?viewStateShareKey={bench_id}" \
        "&workflowType=machine_learning"
    view = json.loads(exp.tags[f"{tracking.SHARED_VIEW_TAG}{bench_id}"])
    columns = [c.split("`")[1] for c in view["selectedColumns"]]
    assert columns == ["miou", "pixel_acc", "pseudo_miou", "bench_run", "scribbles", "seed"]
    run = by_name["scribble-only · s3"]
    assert {"miou", "pixel_acc"} <= set(run.data.metrics) and {"bench_run", "scribbles", "seed"} <= set(run.data.params)
    assert view["orderByKey"] == "metrics.`miou`" and view["orderByAsc"] is False
    assert len(client.search_runs([exp.experiment_id], view["searchFilter"])) == len(rows)


def call(component, arguments: dict, **given):
    """A component's function in this process, as kfp's executor calls it (tests/test_schedule.py)."""
    names = inspect.signature(component).parameters
    return component(**given, **{n: arguments[n] for n in names if n not in given and n in arguments})


def test_a_pipeline_run_reads_at_a_glance(mlflow_env, tmp_path, monkeypatch, one_torch_thread):
    client = mlflow_env
    monkeypatch.setattr(registry, "MODEL_NAME", f"cdsp-segmenter-{uuid.uuid4().hex[:6]}")
    data = tiny_dataset(tmp_path / "data", n_train=4, n_val=2, size=32)
    args = local_run.pipeline_arguments("cpu", {
        "data_uri": str(data), "external_pseudo_uri": str(data / "SegmentationClass"), "epochs": 3,
        "warmup_epochs": 0, "batch_size": 2, "crop_size": 32, "workers": 0, "n_overlays": 2, "device": "cpu"})
    run_id = f"dash-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "steps"
    prepared = dsl.Dataset(uri=str(out / "prepared"), metadata={})
    assert call(stages.data_prep, args, prepared=prepared, data_report=dsl.Markdown(uri=str(out / "report.md")),
                fingerprint=str(out / "fingerprint"), mlflow_run_id=str(out / "run_id"), pipeline_run_id=run_id,
                pipeline_run_name="nightly retrain 7") is True
    run = {"mlflow_run_id": (out / "run_id").read_text(), "pipeline_run_id": run_id}
    pseudo = dsl.Dataset(uri=str(out / "pseudo"), metadata={})
    call(stages.pseudo_label, args, prepared=prepared, classifier=dsl.Model(uri=str(out / "cls"), metadata={}),
         pseudo_labels=pseudo, pseudo_metrics=dsl.Metrics(uri=str(out / "m1")), **run)
    model = dsl.Model(uri=str(out / "model"), metadata={})
    version = call(stages.train_segmenter, args, prepared=prepared, pseudo_labels=pseudo, model=model,
                   train_metrics=dsl.Metrics(uri=str(out / "m2")), **run)
    metrics = dsl.Metrics(uri=str(out / "m3"))
    assert call(stages.evaluate, args, prepared=prepared, model=model, metrics=metrics,
                report=dsl.HTML(uri=str(out / "report.html")), evaluation=dsl.Artifact(uri=str(out / "eval")),
                fingerprint=(out / "fingerprint").read_text(), model_version=version, **run) is True
    evaluation = json.loads((out / "eval" / "metrics.json").read_text())

    # The pipeline run is named after the KFP run; its experiment says what is where.
    parent = client.get_run(run["mlflow_run_id"])
    assert parent.info.run_name == "nightly retrain 7"
    note = client.get_experiment(parent.info.experiment_id).tags[tracking.NOTE_TAG]
    assert "fractions in [0, 1]" in note and "step = epoch" in note
    # The headline results are on the pipeline run itself (the runs table shows them).
    m = parent.data.metrics
    assert m["miou"] == pytest.approx(evaluation["miou"], abs=5e-5)
    assert m["pixel_acc"] == pytest.approx(evaluation["pixel_acc"], abs=5e-5)
    assert {f"iou_{c}" for c in evaluation["per_class_iou"]} <= set(m) and m["promoted"] == 1.0
    assert m["pseudo_miou"] == pytest.approx(1.0)  # ground truth as the pseudo-labels

    # Each stage run is named after it and holds its stage's settings.
    stage_runs = children(client, parent)
    assert set(stage_runs) == {"data_prep", "pseudo_label", "train_segmenter", "evaluate"}
    for stage, r in stage_runs.items():
        assert r.info.run_name == f"nightly retrain 7 / {stage}"
    training = stage_runs["train_segmenter"]
    assert training.data.params["epochs"] == "3" and training.data.params["batch_size"] == "2"
    assert stage_runs["evaluate"].data.params["n_overlays"] == "2"
    # The pictures, as files MLflow's artifact view shows as images: labelled overlays, the
    # confusion matrix, the HTML report.
    evaluated = stage_runs["evaluate"].info.run_id
    top = {a.path for a in client.list_artifacts(evaluated)}
    assert {"confusion_matrix.png", "report.html", "overlays"} <= top
    overlays = [a.path for a in client.list_artifacts(evaluated, "overlays")]
    assert len(overlays) == 2 and all(p.endswith(".png") for p in overlays)
    local = client.download_artifacts(evaluated, overlays[0], str(tmp_path / "seen"))
    assert min(Image.open(local).size) >= 256  # 32-px images, upscaled to be read
    # Per-epoch curves, step = epoch (1..n), with no extra point from the final summary.
    for key in ("val_miou", "loss", "loss_seg", "lr", "images_per_sec"):
        assert steps(client, training.info.run_id, key) == [1, 2, 3], key
    history = json.loads((out / "model" / "history.json").read_text())
    assert [p.value for p in sorted(client.get_metric_history(training.info.run_id, "val_miou"),
                                    key=lambda p: p.step)] == pytest.approx([h["val_miou"] for h in history])
    assert training.data.metrics["best_val_miou"] == pytest.approx(max(h["val_miou"] for h in history), abs=5e-5)

    # The registry: a described model, and a version whose description agrees with its tags,
    # naming the run that trained it; also after a re-score on a newer val split.
    name = registry.MODEL_NAME
    assert client.get_registered_model(name).description == registry.MODEL_DESCRIPTION
    first = client.get_model_version(name, version)
    assert first.tags[registry.TAG_SOURCE_RUN_NAME] == "nightly retrain 7 / train_segmenter"
    assert "`nightly retrain 7 / train_segmenter`" in first.description
    assert described_miou(first) == pytest.approx(float(first.tags[registry.TAG_MIOU]), abs=5e-5)
    assert first.description.startswith("**Champion**")

    second = tracking.start_pipeline_run(f"dash-{uuid.uuid4().hex[:8]}", run_name="nightly retrain 8")
    with tracking.stage_run(second, "train_segmenter"):  # a stand-in network: a quick export
        newer = registry.log_segmenter(out / "model", model=TinySegmenter())
    with tracking.stage_run(second, "evaluate"):
        decision = registry.promote_if_better(newer, 0.9, val_split="val-b", champion_miou=0.25)
    assert decision["promoted"]
    first, newer_mv = client.get_model_version(name, version), client.get_model_version(name, newer)
    assert first.tags[registry.TAG_MIOU] == "0.250000" and first.tags[registry.TAG_VAL_SPLIT] == "val-b"
    assert described_miou(first) == 0.25 and "on val split val-b" in first.description.splitlines()[0]
    assert first.description.startswith(f"Not the champion (version {newer} is)")
    assert "Re-scored: measured again on val split val-b" in first.description
    assert described_miou(newer_mv) == 0.9 and newer_mv.description.startswith("**Champion**")
    assert "`nightly retrain 8 / train_segmenter`" in newer_mv.description


def described_miou(mv) -> float:
    """The mIoU a version's description states first (what a person reads)."""
    return float(re.search(r"mIoU (\d\.\d{4})", mv.description).group(1))
