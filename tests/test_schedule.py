"""Scheduled retraining, run with kfp's local runner on data in a real S3-compatible store.

One story, three pipeline runs of the very DAG that `make pipeline` compiles:
A. data on s3:// (moto's server), no champion yet: the whole DAG runs and the model becomes champion;
B. the same data again (what a recurring run does): the KFP condition skips training and says so;
C. new scribbles in the bucket (more strokes on one image, and a new image scribbled in CVAT, its
   export converted by `convert-scribbles`) and a changed val split: data prep reads exactly what
   changed since the champion's data and says so, it trains again (with external
   pseudo-labels, also on s3://), re-evaluates the champion on the new val split and promotes the
   new model only if its mIoU beats the champion's there (these steps run in-process, see below).
Then `cdsp suggest` names the next images to scribble. MLflow is a real SQLite database, telemetry
goes to a real Pushgateway.
"""

from __future__ import annotations

import html
import inspect
import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from kfp import dsl
from PIL import Image
from test_annotations import cvat_xml, polyline

from cdsp_core import cli, config, datastore, registry, storage, synth, tracking
from components import stages
from pipelines import local_run
from pipelines.cdsp_pipeline import PIPELINE_NAME

# Tiny settings: 8 train / 4 val images of 32 px, one epoch of each stage, ResNet-18.
TINY = {"cls_backbone": "resnet18", "cls_epochs": 1, "cls_batch_size": 8, "cls_crop_size": 32, "cls_workers": 0,
        "cls_amp": False, "cam_scales": "1.0", "backbone": "resnet18", "epochs": 1, "batch_size": 8, "crop_size": 32,
        "warmup_epochs": 0, "workers": 0, "amp": False, "n_overlays": 1, "device": "cpu"}
STAGES = {"data_prep", "train_classifier", "pseudo_label", "train_segmenter", "evaluate"}


def _client():
    """A client whose registry is this test's server, whatever earlier tests set globally."""
    from mlflow import MlflowClient

    uri = tracking.tracking_uri()
    return MlflowClient(uri, registry_uri=uri)


def cli_flags(settings: dict) -> list[str]:
    """The `python -m pipelines.local_run` flags that give these settings."""
    out = []
    for name, value in settings.items():
        if isinstance(value, bool):
            out.append(config.flag(name) if value else "--no-" + config.flag(name)[2:])
        else:
            out += [config.flag(name), str(value)]
    return out


def mlflow_children(parent_run_id: str) -> dict[str, str]:
    """Stage name -> run id of the nested runs of an MLflow parent run."""

    client = _client()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {r.data.tags[tracking.TAG_STAGE]: r.info.run_id for r in runs}


def call(component, arguments: dict, **given):
    """One component's function, called in this process: `given` artifacts and upstream outputs,
    every other input from the pipeline arguments (as the DAG wires them)."""
    names = inspect.signature(component).parameters
    return component(**given, **{n: arguments[n] for n in names if n not in given and n in arguments})


def add_scribbles(s3, bucket: str, key: str, gt_path: Path) -> int:
    """An annotator adds strokes: some unlabelled pixels of one scribble get their true class."""
    scribble = np.array(Image.open(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())))
    gt = np.array(Image.open(gt_path))
    new = (scribble == 255) & (gt != 255)
    new[::2, :] = False  # every other row: new strokes, not the full mask
    scribble[new] = gt[new]
    buf = io.BytesIO()
    Image.fromarray(scribble).save(buf, format="PNG")
    s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
    return int(new.sum())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_unchanged_data_skips_training_and_new_scribbles_retrain(tmp_path, monkeypatch, capsys, request,
                                                                 s3_service, pushgateway_service):
    for k, v in s3_service.env().items():
        monkeypatch.setenv(k, v)  # the pipeline's steps inherit the environment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    gateway = pushgateway_service
    monkeypatch.setenv("PUSHGATEWAY_URL", gateway.url)
    s3 = s3_service.client()
    bucket = s3_service.new_bucket("scribbles")
    data = synth.make_dataset(tmp_path / "data", n_train=8, n_val=4, size=32)
    storage.upload_dir(data, f"s3://{bucket}/voc")
    args = local_run.pipeline_arguments("cpu", {**TINY, "data_uri": f"s3://{bucket}/voc"})

    # A. the first run trains everything and promotes (there is no champion yet)
    a = local_run.run(args, tmp_path / "out")
    run_a = Path(a["run_dir"])
    assert a["trained"] and a["promoted"]
    assert 0.0 <= a["metrics"]["miou"] <= 1.0 and "background" in a["metrics"]["per_class_iou"]
    assert set(a["metrics"]["per_class_iou"]) <= set(synth.CLASSES)
    assert "| background |" in a["report"]
    prepared = run_a / "data-prep" / "prepared"
    record = json.loads((prepared / datastore.DATASET).read_text())
    assert record["n_train"] == 8
    assert record["cost"]["downloaded"] == record["cost"]["listed"] - 2  # not synth.json, its marker
    assert sorted(p.name for p in prepared.iterdir()) == [datastore.DATASET]  # the files are in the data store
    store = tmp_path / "out" / "runs" / "datastore"
    assert record["store"] == str(store) and datastore.read_record(str(store), record["run"])["manifest"] == \
        record["manifest"]
    for step in ("train-classifier/classifier", "train-segmenter/model"):
        assert (run_a / step / "model.pt").is_file(), step
    page_a = (run_a / "evaluate" / "report").read_text()
    assert "data:image/png;base64," in page_a and "Promoted to champion</b>: no champion yet" in page_a
    champion = registry.champion_info()
    assert champion["fingerprint"] == a["fingerprint"] and champion["miou"] == pytest.approx(
        a["metrics"]["miou"], abs=1e-6)
    parent = (run_a / "data-prep" / "mlflow_run_id").read_text()
    children = mlflow_children(parent)
    assert set(children) == STAGES

    assert _client().get_metric_history(children["train_segmenter"], "loss")
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=10) as r:
        pushed = r.read().decode()
    label = f'pipeline_run="{_client().get_run(parent).data.tags[tracking.TAG_PIPELINE_RUN]}"'
    ours = [line for line in pushed.splitlines() if label in line]  # the gateway is the session's
    assert any(line.startswith("cdsp_stage_last_success_timestamp_seconds{") and 'job="cdsp_train_segmenter"' in line
               for line in ours)
    assert any(line.startswith("cdsp_training_loss{") for line in ours)

    # B. same data (a recurring run): the condition skips training, and the CLI says so
    capsys.readouterr()
    assert local_run.main(["--out", str(tmp_path / "out"), "--data-uri", f"s3://{bucket}/voc",
                           *cli_flags(TINY)]) == 0
    printed = capsys.readouterr().out
    assert "Training skipped" in printed and a["fingerprint"][:16] in printed
    run_b = max((p for p in (tmp_path / "out" / "runs").iterdir() if p.name.startswith(PIPELINE_NAME)),
                key=lambda p: p.stat().st_mtime)
    assert run_b != run_a and sorted(p.name for p in run_b.iterdir()) == ["data-prep"]
    report_b = (run_b / "data-prep" / "data_report").read_text()
    assert "skip training" in report_b and "0 downloaded" in report_b
    assert "nothing added, changed or removed" in report_b
    assert registry.champion_info()["version"] == champion["version"]

    # C. new scribbles, and a val split that changed too: it trains again, with pseudo-labels from
    # elsewhere (s3://), and re-evaluates the champion on the new val split before deciding. The
    # steps run in this process here, each as kfp's executor would call it: through the local
    # runner every step would pay its own torch and MLflow imports again (~10 s on this machine).
    added = add_scribbles(s3, bucket, "voc/pascal_2012_scribble/train_00000.png",
                          data / "SegmentationClass" / "train_00000.png")
    assert added > 0
    val_ids = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    s3.put_object(Bucket=bucket, Key="voc/ImageSets/Segmentation/val.txt",
                  Body=("\n".join(val_ids[:-1]) + "\n").encode())
    # and a new image, scribbled in CVAT: its "CVAT for images 1.1" export converted and uploaded
    new_class = synth.CLASSES[1]
    export = tmp_path / "cvat" / "annotations.xml"
    export.parent.mkdir()
    export.write_text(cvat_xml([("extra_00000.jpg", (32, 32), [polyline(new_class, "2,2;29,2;29,29"),
                                                                polyline("background", "2,29;20,29")])]))
    assert cli.main(["convert-scribbles", "--format", "cvat", "--export", str(export), "--out",
                     str(tmp_path / "cvat" / "png"), "--classes", str(data / "classes.txt")]) == 0
    cvat_png = tmp_path / "cvat" / "png" / "extra_00000.png"
    added += int((np.array(Image.open(cvat_png)) != 255).sum())
    s3.upload_file(str(data / "JPEGImages" / "train_00001.jpg"), bucket, "voc/JPEGImages/extra_00000.jpg")
    s3.upload_file(str(cvat_png), bucket, "voc/pascal_2012_scribble/extra_00000.png")
    train_ids = (data / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    s3.put_object(Bucket=bucket, Key="voc/ImageSets/Segmentation/train.txt",
                  Body=("\n".join([*train_ids, "extra_00000"]) + "\n").encode())
    storage.upload_dir(run_a / "pseudo-label" / "pseudo_labels", f"s3://{bucket}/external-pseudo")
    for maps in ("pseudo_labels", "distance_scribble", "distance_boundary"):  # the new image's, borrowed
        s3.upload_file(str(run_a / "pseudo-label" / "pseudo_labels" / maps / "train_00001.png"), bucket,
                       f"external-pseudo/{maps}/extra_00000.png")
    args_c = {**args, "external_pseudo_uri": f"s3://{bucket}/external-pseudo"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the local run does on a busy machine (OpenMP threads spin)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    out = tmp_path / "c"
    monkeypatch.setenv(datastore.ENV, str(store))  # what the compiled pipeline sets for data prep
    prepared = dsl.Dataset(uri=str(out / "prepared"), metadata={})
    assert call(stages.data_prep, args_c, prepared=prepared, data_report=dsl.Markdown(uri=str(out / "report.md")),
                fingerprint=str(out / "fingerprint"), mlflow_run_id=str(out / "run_id"),
                pipeline_run_id="schedule-c") is True
    fingerprint = (out / "fingerprint").read_text()
    assert fingerprint not in (a["fingerprint"], "")
    run = {"mlflow_run_id": (out / "run_id").read_text(), "pipeline_run_id": "schedule-c"}
    # only what changed since the champion's data was read, and the report and MLflow say what it was
    changes = {"since": record["run"], "added": {"train": ["extra_00000"]}, "changed": {"train": ["train_00000"]},
               "removed": {"val": [val_ids[-1]]}}
    record_c = json.loads((out / "prepared" / datastore.DATASET).read_text())
    assert {k: record_c["changes"][k] for k in changes} == changes
    assert sum(record_c["changes"]["new_scribble_pixels"].values()) == added
    assert record_c["cost"]["downloaded"] == 6  # classes.txt, the two lists, the two new scribbles, the new image
    report_c = (out / "report.md").read_text()
    assert "- changed (train, 1): train_00000" in report_c and f"- removed (val, 1): {val_ids[-1]}" in report_c
    parent_c = _client().get_run(run["mlflow_run_id"])
    assert parent_c.data.metrics["data_changed"] == 1 and parent_c.data.metrics["data_removed"] == 1
    logged = json.loads(Path(_client().download_artifacts(run["mlflow_run_id"], "data_changes.json",
                                                          str(tmp_path))).read_text())
    assert logged == record_c["changes"]
    classifier = dsl.Model(uri=str(out / "classifier"), metadata={})
    call(stages.train_classifier, args_c, prepared=prepared, classifier=classifier,
         classifier_metrics=dsl.Metrics(uri=str(out / "m1")), **run)
    assert (out / "classifier" / "NOT_TRAINED").is_file() and not (out / "classifier" / "model.pt").exists()
    pseudo = dsl.Dataset(uri=str(out / "pseudo"), metadata={})
    call(stages.pseudo_label, args_c, prepared=prepared, classifier=classifier, pseudo_labels=pseudo,
         pseudo_metrics=dsl.Metrics(uri=str(out / "m2")), **run)
    model = dsl.Model(uri=str(out / "model"), metadata={})
    version = call(stages.train_segmenter, args_c, prepared=prepared, pseudo_labels=pseudo, model=model,
                   train_metrics=dsl.Metrics(uri=str(out / "m3")), **run)
    assert version != champion["version"]
    metrics = dsl.Metrics(uri=str(out / "m4"))
    promoted = call(stages.evaluate, args_c, prepared=prepared, model=model, metrics=metrics,
                    report=dsl.HTML(uri=str(out / "report.html")), evaluation=dsl.Artifact(uri=str(out / "eval")),
                    fingerprint=fingerprint, model_version=version, **run)


    reason = _client().get_model_version(registry.MODEL_NAME, version).tags[
        registry.TAG_REASON]
    # the champion was measured again on the new split, so the two mIoUs were compared
    assert f"champion version {champion['version']} (" in reason and "not comparable" not in reason
    assert promoted == ("does not beat" not in reason) == (metrics.metadata["promoted"] == 1.0)
    now = registry.champion_info()
    assert now["version"] == (version if promoted else champion["version"])
    # the step's HTML report says so, against the champion before and after; MLflow holds it too
    page = (out / "report.html").read_text()
    assert html.escape(reason) in page and f"<td>champion before</td><td>{champion['version']}</td>" in page
    assert f"<td>champion after</td><td>{now['version']}</td>" in page
    evaluate_run = mlflow_children(run["mlflow_run_id"])["evaluate"]
    assert f"<code>{evaluate_run}</code>" in page  # a SQLite store has no UI to link to: the ids as text
    assert Path(_client().download_artifacts(evaluate_run, "report.html", str(tmp_path))).read_text() == page
    assert now["fingerprint"] == (fingerprint if promoted else a["fingerprint"])
    assert set(mlflow_children(run["mlflow_run_id"])) == STAGES - {"train_classifier"}

    # what to scribble next: the model ranks the bucket's images by its uncertainty
    assert cli.main(["suggest", "--model", str(out / "model"), "--images", f"s3://{bucket}/voc/JPEGImages",
                     "--out", str(tmp_path / "next.csv"), "--n", "3", "--device", "cpu"]) == 0
    ranked = (tmp_path / "next.csv").read_text().splitlines()
    assert len(ranked) == 4 and all(".jpg" in line for line in ranked[1:])
