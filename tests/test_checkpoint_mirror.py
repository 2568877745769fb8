"""A retried pipeline step resumes from the checkpoint its pre-empted pod mirrored (cdsp_core/checkpoints.py).

The segmentation step runs as kfp's executor would call it (`components.stages.train_segmenter`
with kfp's own artifact objects), in a real subprocess, against a real S3 server (moto) and the
session's real `mlflow server`: SIGTERM mid-training -> exit 143 with the checkpoint under
`s3://…/<pipeline run id>/train_segmenter/checkpoint.pt`; the retry, in a fresh, empty output
folder with the same pipeline run id, resumes from it and ends with the weights of an
uninterrupted run, adding no second metric point to the stage's MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from test_faults import ONE_THREAD, TINY, finish, position, wait_for_new_checkpoint
from tiny_data import data_with_gt_pseudo

from cdsp_core import checkpoints, config, tracking, train
from cdsp_core.config import SegTrainConfig

REPO = Path(__file__).resolve().parents[1]
BUCKET = f"cdsp-kfp-{uuid.uuid4().hex[:8]}"  # this module's own bucket on the session's S3 server
CFG = {**TINY, "epochs": 4}

# What kfp's executor does in the pod: build the artifacts, call the component function
# (components/stages.py, the source kfp ships in the component).
DRIVER = """
import json, logging, sys
from kfp import dsl
from cdsp_core import registry
from components import stages

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
a = json.loads(sys.argv[1])
registry.MODEL_NAME = a["model_name"]
version = stages.train_segmenter(
    prepared=dsl.Dataset(name="prepared", uri=a["data"]), pseudo_labels=dsl.Dataset(name="pseudo", uri=a["pseudo"]),
    model=dsl.Model(name="model", uri=a["out"]), train_metrics=dsl.Metrics(name="train_metrics", uri=a["metrics"]),
    mlflow_run_id=a["mlflow_run_id"], pipeline_run_id=a["pipeline_run_id"], gpus="1", **a["settings"])
print("registered version", version)
"""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """4 train / 1 val images of 32 px; the ground truth stands in for pseudo-labels (fast, real files)."""
    root = tmp_path_factory.mktemp("mirror")
    data_with_gt_pseudo(root, n_train=4, n_val=1, size=32, seed=5)
    return root


@pytest.fixture(scope="module")
def s3(s3_service):
    s3_service.client().create_bucket(Bucket=BUCKET)
    return s3_service


def start_step(tiny: Path, out: Path, log: Path, env: dict, **args) -> subprocess.Popen:
    settings = config.to_dict(SegTrainConfig(**CFG))
    payload = json.dumps({"data": str(tiny / "data"), "pseudo": str(tiny / "pseudo"), "out": str(out),
                          "metrics": str(out.parent / "metrics.json"), "settings": settings, **args})
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-c", DRIVER, payload], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=REPO, env={**os.environ, **ONE_THREAD, **env})


def test_a_preempted_step_is_retried_in_an_empty_folder_and_resumes_from_s3(tiny, s3, tmp_path, mlflow_service):
    run_id = f"kfp-run-{uuid.uuid4().hex[:8]}"
    root = f"s3://{BUCKET}/kfp/checkpoints"
    key = f"kfp/checkpoints/{run_id}/train_segmenter/checkpoint.pt"
    env = {**s3.env(), "MLFLOW_TRACKING_URI": mlflow_service.url, checkpoints.ENV: root}
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_service.url
    try:
        parent = tracking.start_pipeline_run(run_id, experiment=f"mirror-{run_id}", fingerprint="fp")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    args = {"mlflow_run_id": parent, "pipeline_run_id": run_id, "model_name": f"cdsp-segmenter-{run_id}"}

    # 1. the pod is pre-empted once its first checkpoint is written: SIGTERM -> checkpoint, mirror, exit 143
    out1 = tmp_path / "pod1" / "model"
    first = start_step(tiny, out1, tmp_path / "1.log", env, **args)
    wait_for_new_checkpoint(first, out1 / "checkpoint.pt", tmp_path / "1.log")
    first.send_signal(signal.SIGTERM)
    assert finish(first) == 128 + signal.SIGTERM, (tmp_path / "1.log").read_text()
    log1 = (tmp_path / "1.log").read_text()
    assert "SIGTERM: checkpoint written to" in log1 and f"checkpoint mirrored to s3://{BUCKET}/{key}" in log1
    mirrored = tmp_path / "mirrored.pt"
    s3.client().download_file(BUCKET, key, str(mirrored))
    assert mirrored.read_bytes() == (out1 / "checkpoint.pt").read_bytes()  # the SIGTERM checkpoint, whole
    epoch, batch = position(mirrored)
    assert epoch >= 1 and epoch < CFG["epochs"]
    uploads = s3.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert uploads == []

    # 2. KFP retries the step in a new pod: a fresh, empty output folder, the same pipeline run id
    out2 = tmp_path / "pod2" / "model"
    second = start_step(tiny, out2, tmp_path / "2.log", env, **args)
    # meanwhile, for comparison, the same training without interruption
    straight = train.train_segmenter(str(tiny / "data"), str(tiny / "pseudo"), str(tmp_path / "straight"),
                                     SegTrainConfig(**CFG))
    assert finish(second) == 0, (tmp_path / "2.log").read_text()
    log2 = (tmp_path / "2.log").read_text()
    assert f"resuming from the checkpoint mirrored at s3://{BUCKET}/{key}" in log2
    assert f"resumed from epoch {epoch}{f', batch {batch}' if batch else ''} (" in log2
    assert [h["epoch"] for h in json.loads((out2 / "history.json").read_text())] == [1, 2, 3, 4]
    want = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    got = torch.load(out2 / "model.pt", weights_only=True)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.allclose(got[k].float(), want[k].float(), rtol=1e-4, atol=1e-5), k
    assert json.loads((out2 / "history.json").read_text())[-1]["loss"] == pytest.approx(straight["final_loss"],
                                                                                          rel=1e-4)

    # the stage finished: its mirror is gone
    left = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=f"kfp/checkpoints/{run_id}/").get("Contents", [])
    assert left == []

    # one MLflow stage run, each epoch's metric point recorded once over both attempts
    client = MlflowClient(mlflow_service.url, registry_uri=mlflow_service.url)
    stages = client.search_runs([client.get_run(parent).info.experiment_id],
                                f"tags.{tracking.TAG_STAGE} = 'train_segmenter'")
    assert len(stages) == 1 and stages[0].info.status == "FINISHED"
    loss = client.get_metric_history(stages[0].info.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4]  # step = epoch


# ---------------------------------------------------------------------------- the mirror's own cases


@pytest.fixture(scope="module")
def a_checkpoint(tiny, tmp_path_factory) -> Path:
    """A real training checkpoint (one tiny epoch)."""
    out = tmp_path_factory.mktemp("one-epoch") / "model"
    train.train_segmenter(str(tiny / "data"), str(tiny / "pseudo"), str(out), SegTrainConfig(**{**TINY, "epochs": 1}))
    return out / "checkpoint.pt"


def test_a_local_root_mirrors_restores_and_clears(a_checkpoint, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cdsp.checkpoints")
    root = tmp_path / "runs" / "checkpoints"
    settings = {"epochs": 1, "backbone": "resnet18"}
    mirror = checkpoints.for_stage("cdsp-local-1", "train_classifier", settings, root=str(root))
    assert mirror.restore(tmp_path / "pod1") is False  # nothing mirrored yet: from scratch
    mirror.upload(a_checkpoint)
    stored = root / "cdsp-local-1" / "train_classifier" / "checkpoint.pt"
    assert stored.read_bytes() == a_checkpoint.read_bytes()
    assert [p.name for p in stored.parent.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers

    again = checkpoints.for_stage("cdsp-local-1", "train_classifier", settings, root=str(root))
    assert again.restore(tmp_path / "pod2") is True
    assert (tmp_path / "pod2" / "checkpoint.pt").read_bytes() == a_checkpoint.read_bytes()
    assert f"resuming from the checkpoint mirrored at {stored}" in caplog.text
    # another run id, another key: nothing to resume
    assert checkpoints.for_stage("cdsp-local-2", "train_classifier", settings,
                                 root=str(root)).restore(tmp_path / "pod3") is False

    again.clear()
    assert not (root / "cdsp-local-1").exists()  # the finished stage leaves nothing behind


def test_a_checkpoint_of_other_settings_or_a_corrupt_one_is_not_resumed(a_checkpoint, s3, tmp_path, monkeypatch,
                                                                        caplog):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    caplog.set_level(logging.INFO, logger="cdsp.checkpoints")
    root = f"s3://{BUCKET}/other"
    key = "other/run-x/train_segmenter/checkpoint.pt"
    old = checkpoints.for_stage("run-x", "train_segmenter", {"backbone": "resnet18"}, root=root)
    assert old.restore(tmp_path / "a") is False
    old.upload(a_checkpoint)

    # the same key, other settings (a reused run id): a warning, training from epoch 0, the old one removed
    new = checkpoints.for_stage("run-x", "train_segmenter", {"backbone": "resnet34"}, root=root)
    assert new.restore(tmp_path / "b") is False
    assert f"s3://{BUCKET}/{key}: a checkpoint of other settings is stored under this pipeline run" in caplog.text
    assert not (tmp_path / "b" / "checkpoint.pt").exists()
    assert s3.client().list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount") == 0
    recorded = json.loads(s3.client().get_object(Bucket=BUCKET, Key=key.replace("checkpoint.pt", "settings.json"))
                          ["Body"].read())
    assert recorded["settings_sha256"] == new.digest

    # matching settings but a checkpoint that does not load: a warning naming it, from epoch 0
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=a_checkpoint.read_bytes()[:2000])
    caplog.clear()
    assert new.restore(tmp_path / "c") is False
    assert f"s3://{BUCKET}/{key}: mirrored checkpoint does not load" in caplog.text
    assert "corrupt or unreadable checkpoint" in caplog.text
    assert not (tmp_path / "c" / "checkpoint.pt").exists()
    assert s3.client().list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount") == 0


def test_without_a_root_or_run_id_nothing_is_mirrored(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(checkpoints.ENV, raising=False)
    caplog.set_level(logging.INFO, logger="cdsp.checkpoints")
    mirror = checkpoints.for_stage("run-1", "train_segmenter", {})
    assert not mirror.enabled and mirror.restore(tmp_path) is False
    assert f"{checkpoints.ENV} is not set" in caplog.text
    assert not checkpoints.for_stage("", "train_segmenter", {}, root=str(tmp_path)).enabled
    assert checkpoints.root_for("s3://b/kfp/") == "s3://b/kfp/checkpoints"
    assert checkpoints.root_for("s3://b/kfp", "s3://c/ckpt/") == "s3://c/ckpt"


# What the segmentation step does when gpus > 1 (components/steps.py): torchrun trains, a thread of
# this process mirrors the checkpoints, SIGTERM is passed on to torchrun. One process keeps it cheap.
DDP_DRIVER = """
import json, logging, sys
from cdsp_core import checkpoints, train
from cdsp_core.config import SegTrainConfig

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
a = json.loads(sys.argv[1])
mirror = checkpoints.for_stage(a["run"], "train_segmenter", a["settings"], root=a["root"])
resume = mirror.restore(a["out"])
with mirror.watching(a["out"], interval=0.2):
    train.launch_ddp(a["data"], a["pseudo"], a["out"], SegTrainConfig(**a["settings"]), nproc=1, resume=resume)
mirror.clear()
"""


def test_under_torchrun_the_step_process_mirrors_the_checkpoints_and_passes_sigterm_on(tiny, s3, tmp_path):
    run_id = f"kfp-ddp-{uuid.uuid4().hex[:8]}"
    key = f"ddp/{run_id}/train_segmenter/checkpoint.pt"

    def start(out: Path, log: Path) -> subprocess.Popen:
        payload = json.dumps({"run": run_id, "root": f"s3://{BUCKET}/ddp", "out": str(out), "data": str(tiny / "data"),
                              "pseudo": str(tiny / "pseudo"), "settings": config.to_dict(SegTrainConfig(**CFG))})
        with open(log, "wb") as fh:
            return subprocess.Popen([sys.executable, "-c", DDP_DRIVER, payload], stdout=fh, stderr=subprocess.STDOUT,
                                    cwd=REPO, env={**os.environ, **ONE_THREAD, **s3.env()})

    out1 = tmp_path / "pod1" / "model"
    first = start(out1, tmp_path / "1.log")
    wait_for_new_checkpoint(first, out1 / "checkpoint.pt", tmp_path / "1.log")
    first.send_signal(signal.SIGTERM)  # to the step process only; it passes it on
    assert finish(first) == 128 + signal.SIGTERM, (tmp_path / "1.log").read_text()
    log1 = (tmp_path / "1.log").read_text()
    assert "SIGTERM: checkpoint written to" in log1  # by the training process under torchrun
    mirrored = tmp_path / "mirrored.pt"
    s3.client().download_file(BUCKET, key, str(mirrored))
    assert mirrored.read_bytes() == (out1 / "checkpoint.pt").read_bytes()  # the SIGTERM checkpoint
    epoch, batch = position(mirrored)
    assert 1 <= epoch < CFG["epochs"]

    out2 = tmp_path / "pod2" / "model"
    second = start(out2, tmp_path / "2.log")
    assert finish(second) == 0, (tmp_path / "2.log").read_text()
    log2 = (tmp_path / "2.log").read_text()
    assert f"resumed from epoch {epoch}{f', batch {batch}' if batch else ''} (" in log2
    assert [h["epoch"] for h in json.loads((out2 / "history.json").read_text())] == [1, 2, 3, 4]
    assert s3.client().list_objects_v2(Bucket=BUCKET, Prefix=f"ddp/{run_id}/").get("KeyCount") == 0
