"""tracking: runs, params, metrics and artifacts against a real `mlflow server` (SQLite backend) on
127.0.0.1, including the server going away mid-run (the model registry: tests/test_registry.py)."""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
import urllib.request
import uuid

import pytest
from mlflow import MlflowClient
from PIL import Image
from services import TcpRelay, free_port

from cdsp_core import config, credentials, registry, tracking
from cdsp_core.errors import CdspError


@pytest.fixture
def server(mlflow_service):
    """The session's `mlflow server`: each test keeps to its own experiments and model names."""
    return mlflow_service


def experiment() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def test_params_never_hold_secrets():
    params = {**config.to_dict(config.SegTrainConfig()), "aws_secret_access_key": "abc", "mlflow_token": "t",
              "pretrained": "s3://user:pa55@minio:9000/w/resnet.pth", "note": "AKIAABCDEFGHIJKLMNOP"}
    safe = tracking.safe_params(params)
    assert "aws_secret_access_key" not in safe and "mlflow_token" not in safe and "note" not in safe
    assert safe["pretrained"] == "s3://minio:9000/w/resnet.pth"
    assert safe["lr"] == "0.001" and safe["amp"] == "True" and safe["segmenter"] == "deeplabv2"
    assert credentials.redact("http://u:p@host:5000/x") == "http://host:5000/x"
    assert credentials.split_userinfo("http://u:p%40ss@host:5000/x") == ("http://host:5000/x", "u", "p@ss")
    assert credentials.split_userinfo("http://host:5000/x") == ("http://host:5000/x", None, None)


def test_runs_params_and_metrics_without_duplicates_on_retry(mlflow_env):
    client, exp = mlflow_env, experiment()
    cfg = config.to_dict(config.SegTrainConfig(epochs=3))
    parent = tracking.start_pipeline_run("kfp-run-1", experiment=exp, fingerprint="fp123", data_uri="s3://b/data")
    assert tracking.start_pipeline_run("kfp-run-1", experiment=exp, fingerprint="fp123") == parent  # retried step

    for attempt in range(2):  # the second attempt is a KFP retry of the same step
        with tracking.stage_run(parent, "train_segmenter", {**cfg, "secret_key": "x"}) as run_id:
            for epoch in range(1, 4):
                tracking.log_metrics({"loss": 1.0 / epoch, "loss_seg": 0.5 / epoch, "lr": 0.01, "epoch": epoch,
                                      "images_per_sec": 10.0 + attempt, "val_miou": 0.1 * epoch}, epoch * 10)
        if attempt == 0:
            first = run_id
    assert run_id == first

    exp_id = client.get_experiment_by_name(exp).experiment_id
    runs = client.search_runs([exp_id])
    assert len(runs) == 2  # one parent, one stage
    stage = client.get_run(run_id)
    assert stage.info.run_name == "kfp-run-1 / train_segmenter"  # no run_name given: the pipeline run id
    assert stage.data.tags[tracking.PARENT_TAG] == parent
    assert stage.data.tags[tracking.TAG_STAGE] == "train_segmenter"
    assert stage.data.tags[tracking.TAG_PIPELINE_RUN] == "kfp-run-1"
    assert stage.data.tags[tracking.TAG_FINGERPRINT] == "fp123"
    assert stage.data.tags[tracking.TAG_CODE_VERSION].startswith("0.1.0")
    assert stage.info.status == "FINISHED"
    assert {k: stage.data.params[k] for k in cfg} == {k: str(v) for k, v in cfg.items()}
    assert "secret_key" not in stage.data.params
    top = client.get_run(parent)
    assert top.data.params["lr"] == str(cfg["lr"]) and top.data.tags["cdsp.data_uri"] == "s3://b/data"
    assert top.info.status == "FINISHED" and top.data.tags[tracking.TAG_STAGE] == "pipeline"

    # the retry's points are not logged a second time: one point per (key, step), the first attempt's
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(10, 1.0), (20, 0.5), (30, 1 / 3)]
    speed = client.get_metric_history(run_id, "images_per_sec")
    assert sorted((m.step, m.value) for m in speed) == [(10, 10.0), (20, 10.0), (30, 10.0)]
    assert set(stage.data.metrics) >= {"loss", "loss_seg", "lr", "epoch", "images_per_sec", "val_miou"}


def test_runs_are_named_curves_go_on_the_parent_too_and_the_compare_page_opens_them(mlflow_env, server,
                                                                                      monkeypatch):
    """Names people read (found again by tags, not names), a stage's settings as its params, curves on
    the parent when asked, the experiment's description, and the compare page's address."""
    client, exp = mlflow_env, experiment()
    key = f"bench-{uuid.uuid4().hex[:6]}.cdsp.seed0.abc"
    parent = tracking.start_pipeline_run(key, experiment=exp, run_name="cdsp · s0", params={"l_lorm": 1.0})
    assert client.get_run(parent).info.run_name == "cdsp · s0"
    assert tracking.start_pipeline_run(key, experiment=exp, run_name="cdsp · s0") == parent  # a retry
    for _attempt in range(2):  # the second is a retry
        with tracking.stage_run(parent, "train_segmenter", {"lr": 0.1, "epochs": 3},
                                curves_on_parent=True) as run_id:
            for epoch in range(1, 4):
                tracking.log_metrics({"loss": 1.0 / epoch, "val_miou": 0.2 * epoch}, epoch)
    stage = client.get_run(run_id)
    assert stage.info.run_name == "cdsp · s0 / train_segmenter"
    assert stage.data.params["lr"] == "0.1" and stage.data.params["epochs"] == "3"
    for rid in (run_id, parent):  # one point per epoch on both, the retry added none
        assert sorted((m.step, m.value) for m in client.get_metric_history(rid, "val_miou")) == [
            (1, 0.2), (2, 0.4), (3, pytest.approx(0.6))]
    exp_id = client.get_experiment_by_name(exp).experiment_id
    assert len(client.search_runs([exp_id])) == 2

    assert tracking.headline({"miou": 0.5, "pixel_acc": 0.9, "per_class_iou": {"potted plant": 0.25},
                              "pseudo_miou": 0.4, "n_images": 3, "seconds": 7.0}) == {
        "miou": 0.5, "pixel_acc": 0.9, "iou_potted_plant": 0.25, "pseudo_miou": 0.4}
    assert tracking.describe_experiment(exp, "what these runs are") == exp_id
    assert client.get_experiment(exp_id).tags[tracking.NOTE_TAG] == "what these runs are"

    url, note = tracking.compare_url([parent, run_id], [exp_id])
    assert note == "" and url.startswith(f"{server.url}/#/compare-runs?runs=")
    # read back as the UI's compare page does: decode, split the query, JSON.parse each value
    query = urllib.parse.parse_qs(urllib.parse.unquote(url.split("#/compare-runs?", 1)[1]))
    assert json.loads(query["runs"][0]) == [parent, run_id] and json.loads(query["experiments"][0]) == [exp_id]
    with urllib.request.urlopen(url.split("#", 1)[0], timeout=10) as r:  # the server serves the UI there
        assert r.status == 200 and b"<html" in r.read(2000).lower()

    # A store that is not a server: the address of `make mlflow-ui` (or of `mlflow server` for
    # another store), and a note that says to start it first.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    url, note = tracking.compare_url([parent], [exp_id])
    assert url.startswith("http://127.0.0.1:5000/#/compare-runs?") and "make mlflow-ui" in note
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////data/other.db")
    monkeypatch.setenv("MLFLOW_UI_PORT", "5055")
    url, note = tracking.compare_url([parent], [exp_id])
    assert url.startswith("http://127.0.0.1:5055/#/") and "--backend-store-uri sqlite:////data/other.db" in note


def test_failed_stage_is_marked_failed(mlflow_env):
    parent = tracking.start_pipeline_run(f"kfp-{uuid.uuid4().hex[:6]}", experiment=experiment())
    with pytest.raises(ValueError, match="boom"):
        with tracking.stage_run(parent, "pseudo_label") as run_id:
            raise ValueError("boom")
    assert mlflow_env.get_run(run_id).info.status == "FAILED"
    assert mlflow_env.get_run(parent).info.status == "FAILED"


def test_evaluation_metrics_and_artifacts(mlflow_env, tmp_path):
    ev = tmp_path / "eval"
    (ev / "overlays").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(ev / "overlays" / "img1.png")
    metrics = {"miou": 0.625, "pixel_acc": 0.9, "per_class_iou": {"background": 0.8, "potted plant": 0.45},
               "confusion_matrix": [[90, 10], [20, 30]], "n_images": 2, "split": "val"}
    (ev / "metrics.json").write_text(json.dumps(metrics))
    (ev / "report.md").write_text("# report\n")
    parent = tracking.start_pipeline_run(f"kfp-{uuid.uuid4().hex[:6]}", experiment=experiment())
    with tracking.stage_run(parent, "evaluate") as run_id:
        flat = tracking.log_evaluation(ev)
        tracking.log_dict({"fingerprint": "abc"}, "manifest.json")
    run = mlflow_env.get_run(run_id)
    assert flat == {"miou": 0.625, "pixel_acc": 0.9, "iou_background": 0.8, "iou_potted_plant": 0.45,
                    "n_images": 2.0}
    assert {k: run.data.metrics[k] for k in flat} == flat
    names = {a.path for a in mlflow_env.list_artifacts(run_id)} | \
            {a.path for a in mlflow_env.list_artifacts(run_id, "overlays")}
    assert {"per_class_iou.csv", "per_class_iou.md", "confusion_matrix.png", "metrics.json", "report.md",
            "manifest.json", "overlays/img1.png"} <= names
    local = mlflow_env.download_artifacts(run_id, "confusion_matrix.png", str(tmp_path))
    assert Image.open(local).size[0] > 100
    table = open(mlflow_env.download_artifacts(run_id, "per_class_iou.csv", str(tmp_path))).read()
    assert "potted plant,0.4500" in table


def test_server_going_away_mid_run(mlflow_env, server, tmp_path, caplog, monkeypatch, request):
    """Metric logging never blocks while the server is away and catches up when it is back;
    final recording fails with a clear error (after the local outputs are written). The server
    is the session's, so it goes away as its endpoint does: a relay in front of it is cut."""
    client = mlflow_env
    relay = TcpRelay(server.port).start()
    request.addfinalizer(relay.cut)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", relay.url)
    parent = tracking.start_pipeline_run(f"kfp-{uuid.uuid4().hex[:6]}", experiment=experiment())
    with caplog.at_level(logging.INFO, "cdsp_core.tracking"):
        with tracking.stage_run(parent, "train_segmenter") as run_id:
            for step in range(1, 4):
                tracking.log_metrics({"loss": 1.0 / step}, step)
            logger = tracking._active[-1][1]
            deadline = time.monotonic() + 10
            while logger.pending and time.monotonic() < deadline:
                time.sleep(0.05)
            assert logger.delivered == 3
            relay.cut()
            try:
                started = time.monotonic()
                for step in range(4, 11):
                    tracking.log_metrics({"loss": 1.0 / step}, step)
                assert time.monotonic() - started < 0.5  # never waits on the server
                (tmp_path / "model.pt").write_bytes(b"weights")  # the stage's local output
                with pytest.raises(CdspError, match=rf"MLflow at {relay.url}: could not record the final metrics"):
                    tracking.log_final_metrics({"miou": 0.5})
                with pytest.raises(CdspError, match="could not record"):
                    registry.promote_if_better("1", 0.5, val_split="v")
                deadline = time.monotonic() + 10
                while logger.failures < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert logger.failures >= 2 and logger.pending == 7
            finally:
                relay.restore()  # same port, same server
    assert (tmp_path / "model.pt").read_bytes() == b"weights"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert steps == list(range(1, 11))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_metrics_that_cannot_be_sent_fail_the_stage_end(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    logger = tracking.MetricsLogger("0" * 32)
    logger({"loss": 1.0, "lr": 0.1}, 1)
    with pytest.raises(CdspError, match="2 metric points of run 0+ could not be sent within 2 s"):
        logger.close(timeout=2)


def test_embedded_sqlite_store(server, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tracking.project_dir() / 'mlflow.db'}"
    # The embedded mode, no server between: the server's own database (already set up) is
    # used directly here, which spares the test the schema migrations of a new one.
    db = server.folder / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    parent = tracking.start_pipeline_run("local-1", experiment=experiment())
    (tmp_path / "cfg.json").write_text("{}")
    with tracking.stage_run(parent, "prepare", {"data_uri": "/data"}) as run_id:
        tracking.log_metrics({"n_train": 5}, 0)
        tracking.log_artifacts(tmp_path / "cfg.json")
    client = MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    assert client.get_run(run_id).data.metrics["n_train"] == 5
    assert list((db.parent / "mlruns").rglob("cfg.json"))  # artifacts beside the database
