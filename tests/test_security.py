"""Security: no secret in anything the pipeline leaves behind, checkpoints that cannot run code,
images that run as non-root from pinned bases, and inputs from S3 checked before decoding.

The secrets test sets recognisable fake credentials (S3, MLflow, Pushgateway), compiles the
pipeline, runs its five steps against real servers on 127.0.0.1 (moto's S3 server, which accepts
any key; `mlflow server`; Debian's Pushgateway) in this process, as kfp's executor calls them (the
local runner would pay each step's imports again, cf. tests/test_schedule.py), runs a `cdsp -v`
command on the same credentials, and then greps everything: the compiled YAML,
every file the steps wrote, every log line and print, the MLflow params, tags and artifacts of
every run and model version (read back from the server), and what the Pushgateway holds.
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import re
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from kfp import dsl
from mlflow import MlflowClient
from tiny_data import bomb_png, leftovers

from cdsp_core import cli, models, prepare, registry, storage, synth, tracking
from components import stages
from pipelines import cdsp_pipeline, local_run

REPO = Path(__file__).resolve().parents[1]

# Recognisable fakes: if any of these turns up in an output, the test fails.
AWS_KEY_ID = "AKIAFAKECDSP7QX3ZT9W"
AWS_SECRET = "fake/CdspS3Secret+9f8e7d6c5b4a"
MLFLOW_PASSWORD = "fake-cdsp-mlflow-pw-3c2d1e"
MLFLOW_TOKEN = "fake-cdsp-mlflow-token-8b7a"
URI_PASSWORD = "fake-cdsp-uri-pw-77aa"
PUSH_PASSWORD = "fake-cdsp-push-pw-1234"
SECRETS = (AWS_KEY_ID, AWS_SECRET, MLFLOW_PASSWORD, MLFLOW_TOKEN, URI_PASSWORD, PUSH_PASSWORD)

# Tiny settings: one epoch of each stage on 32 px images (cf. tests/test_schedule.py).
TINY = {"cls_backbone": "resnet18", "cls_epochs": 1, "cls_batch_size": 4, "cls_crop_size": 32, "cls_workers": 0,
        "cls_amp": False, "cam_scales": "1.0", "backbone": "resnet18", "epochs": 1, "batch_size": 4, "crop_size": 32,
        "warmup_epochs": 0, "workers": 0, "amp": False, "n_overlays": 1, "device": "cpu"}


def leaks(text: str | bytes) -> list[str]:
    """The fake secrets found in `text` (also URL-quoted, as in a URI)."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    quoted = {s: urllib.parse.quote(s, safe="") for s in SECRETS}
    return [s for s in SECRETS if s in text or quoted[s] in text]


def call(component, arguments: dict, **given):
    """One component function in this process, as kfp's executor calls it: `given` artifacts and
    upstream outputs, every other input from the pipeline arguments."""
    names = inspect.signature(component).parameters
    return component(**given, **{n: arguments[n] for n in names if n not in given and n in arguments})


def run_all_steps(args: dict, out: Path) -> None:
    """data prep -> classifier -> pseudo-labels -> segmenter -> evaluation, wired as the DAG wires them."""
    prepared = dsl.Dataset(uri=str(out / "prepared"), metadata={})
    assert call(stages.data_prep, args, prepared=prepared, data_report=dsl.Markdown(uri=str(out / "data_report")),
                fingerprint=str(out / "fingerprint"), mlflow_run_id=str(out / "mlflow_run_id"),
                pipeline_run_id="security-run") is True
    run = {"mlflow_run_id": (out / "mlflow_run_id").read_text(), "pipeline_run_id": "security-run"}
    classifier = dsl.Model(uri=str(out / "classifier"), metadata={})
    call(stages.train_classifier, args, prepared=prepared, classifier=classifier,
         classifier_metrics=dsl.Metrics(uri=str(out / "classifier_metrics")), **run)
    pseudo = dsl.Dataset(uri=str(out / "pseudo_labels"), metadata={})
    call(stages.pseudo_label, args, prepared=prepared, classifier=classifier, pseudo_labels=pseudo,
         pseudo_metrics=dsl.Metrics(uri=str(out / "pseudo_metrics")), **run)
    model = dsl.Model(uri=str(out / "model"), metadata={})
    version = call(stages.train_segmenter, args, prepared=prepared, pseudo_labels=pseudo, model=model,
                   train_metrics=dsl.Metrics(uri=str(out / "train_metrics")), **run)
    call(stages.evaluate, args, prepared=prepared, model=model, metrics=dsl.Metrics(uri=str(out / "metrics")),
         report=dsl.HTML(uri=str(out / "report")), evaluation=dsl.Artifact(uri=str(out / "evaluation")),
         fingerprint=(out / "fingerprint").read_text(), model_version=version, **run)


def mlflow_records(client: MlflowClient, download_to: Path) -> dict[str, str]:
    """Everything MLflow holds about the runs and models: where -> text (artifacts downloaded)."""
    import mlflow

    found: dict[str, str] = {}
    for exp in client.search_experiments():
        found[f"experiment {exp.name}"] = repr((exp.name, exp.tags, exp.artifact_location))
        for r in client.search_runs([exp.experiment_id]):
            found[f"run {r.info.run_name} params"] = repr(r.data.params)
            found[f"run {r.info.run_name} tags"] = repr(r.data.tags)
            found[f"run {r.info.run_name} info"] = repr(r.info)
            local = Path(mlflow.artifacts.download_artifacts(run_id=r.info.run_id,
                                                             dst_path=str(download_to / r.info.run_id)))
            for f in (p for p in local.rglob("*") if p.is_file()):
                found[f"artifact {f}"] = f.read_bytes().decode("latin-1")
        for lm in client.search_logged_models([exp.experiment_id]):  # MLflow 3 keeps logged models apart from runs
            found[f"logged model {lm.model_id}"] = repr((lm.name, lm.params, lm.tags, lm.artifact_location))
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=lm.artifact_location,
                                                             dst_path=str(download_to / lm.model_id)))
            for f in (p for p in local.rglob("*") if p.is_file()):
                found[f"artifact {f}"] = f.read_bytes().decode("latin-1")
    for rm in client.search_registered_models():
        found[f"model {rm.name}"] = repr((rm.name, rm.tags, rm.description, rm.aliases))
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            found[f"model {rm.name} v{mv.version}"] = repr((mv.tags, mv.description, mv.source, mv.run_link))
    return found


@pytest.mark.timeout(600)
def test_no_secret_in_the_compiled_pipeline_outputs_logs_or_mlflow(tmp_path, monkeypatch, caplog, capfd,
                                                                   mlflow_service, s3_service, pushgateway_service):
    model_name = f"cdsp-segmenter-security-{uuid.uuid4().hex[:6]}"
    monkeypatch.setattr(registry, "MODEL_NAME", model_name)
    mlflow, s3, gateway = mlflow_service, s3_service, pushgateway_service
    env = {"AWS_ENDPOINT_URL_S3": s3.url, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
           "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "MLFLOW_TRACKING_USERNAME": "cdsp-ci",
           "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD, "MLFLOW_TRACKING_TOKEN": MLFLOW_TOKEN,
           "MLFLOW_TRACKING_URI": mlflow.url.replace("http://", f"http://cdsp-ci:{URI_PASSWORD}@"),
           "PUSHGATEWAY_URL": gateway.url.replace("http://", f"http://pusher:{PUSH_PASSWORD}@"),
           "CDSP_PIPELINE_ROOT": "s3://artifacts/kfp", "CDSP_CACHE_DIR": str(tmp_path / "cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    caplog.set_level(logging.INFO)  # what kfp's executor logs in a pod

    # the credentials are in use: data on S3, MLflow and the Pushgateway behind (ignored) auth
    data = synth.make_dataset(tmp_path / "data", n_train=4, n_val=2, size=32, seed=11)
    bucket = s3.new_bucket("scribbles")
    storage.upload_dir(data, f"s3://{bucket}/voc")

    compiled = cdsp_pipeline.compile_pipeline(str(tmp_path / "pipeline.yaml"),
                                              cdsp_pipeline.cluster_settings())
    args = local_run.pipeline_arguments("cpu", {**TINY, "data_uri": f"s3://{bucket}/voc", "force_train": True})
    out = tmp_path / "out"
    run_all_steps(args, out)

    # a cdsp command with -v (debug logging) on the same credentials: S3 data, an MLflow model URI (by
    # version: a one-epoch model may predict a single class, and such a model is never made champion)
    caplog.set_level(logging.DEBUG)
    assert cli.main(["-v", "predict", "--model", f"models:/{model_name}/1", "--images",
                     f"s3://{bucket}/voc/JPEGImages", "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0

    outputs = {"compiled pipeline": Path(compiled).read_text()}
    for folder in (out, tmp_path / "pred", tmp_path / "cache"):
        for f in folder.rglob("*"):
            if f.is_file():
                outputs[str(f)] = f.read_bytes().decode("latin-1")
    captured = capfd.readouterr()
    outputs["stdout"], outputs["stderr"] = captured.out, captured.err
    outputs["log records"] = "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in caplog.records)
    client = MlflowClient(mlflow.url, registry_uri=mlflow.url)
    records = mlflow_records(client, tmp_path / "downloaded")
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=10) as r:
        outputs["pushgateway"] = r.read().decode()

    # it all ran and was recorded ...
    assert len(outputs) > 20 and len(caplog.records) > 50
    assert any(line.startswith("cdsp_training_loss") and 'pipeline_run="security-run"' in line
               for line in outputs["pushgateway"].splitlines())  # the gateway is the session's
    stages_run = {r.data.tags.get(tracking.TAG_STAGE) for e in client.search_experiments()
                  for r in client.search_runs([e.experiment_id])}
    assert {"data_prep", "train_classifier", "pseudo_label", "train_segmenter", "evaluate"} <= stages_run
    assert any(k.startswith("artifact") and k.endswith("MLmodel") for k in records)
    assert any(f"s3://{bucket}/voc" in text for where, text in records.items() if where.endswith("params"))
    # ... and no secret anywhere
    found = {where: leaks(text) for where, text in {**outputs, **records}.items()}
    assert {where: s for where, s in found.items() if s} == {}
    # (the environment still holds them, so the test itself did not lose them on the way)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == AWS_SECRET


# ---------------------------------------------------------------------------- checkpoints cannot run code


# train-seg on scribbles alone, tiny
SCRIBBLES_ONLY = ["--l-pseudo", "0", "--l-lorm", "0", "--l-ds", "0", "--l-dc", "0", "--batch-size", "2", "--workers",
                  "0", "--crop-size", "32", "--no-amp", "--device", "cpu"]


def write_config(model_dir: Path, kind: str, **arch) -> None:
    (model_dir / "config.json").write_text(json.dumps({"kind": kind, "class_names": synth.CLASSES, **arch}))


class RunsCode:
    """What a malicious pickle holds: unpickling it would run `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_is_refused_everywhere_weights_are_loaded(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    root = synth.make_dataset(tmp_path / "data", n_train=2, n_val=1, size=32, seed=2)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_config(model_dir, "segmenter", segmenter="deeplabv2", backbone="resnet18")
    evil = {"model": RunsCode(marker), "optimizer": {}, "epoch": 1, "arch": {}}
    for name in ("model.pt", "checkpoint.pt"):
        torch.save(evil, model_dir / name)  # torch.save pickles anything; only loading is guarded
    torch.save({"conv1.weight": RunsCode(marker)}, tmp_path / "resnet18.pth")

    runs = [
        ("evaluate", ["--data", root, "--model", model_dir, "--out", tmp_path / "eval", "--device", "cpu"],
         model_dir / "model.pt"),
        ("predict", ["--model", model_dir, "--images", root / "JPEGImages", "--out", tmp_path / "pred",
                     "--device", "cpu"], model_dir / "model.pt"),
        ("train-seg", ["--data", root, "--out", model_dir, "--resume", "--backbone", "resnet18",
                       *SCRIBBLES_ONLY],
         model_dir / "checkpoint.pt"),
        ("train-seg", ["--data", root, "--out", tmp_path / "fresh", "--backbone", "resnet18", "--pretrained",
                       tmp_path / "resnet18.pth", *SCRIBBLES_ONLY], tmp_path / "resnet18.pth"),
        ("pseudo-label", ["--data", root, "--classifier", model_dir, "--out", tmp_path / "pseudo"],
         model_dir / "model.pt"),
    ]
    for command, args, culprit in runs:
        if command == "pseudo-label":  # the classifier folder must say it holds a classifier
            write_config(model_dir, "classifier", cls_backbone="resnet18", cls_output_stride=8)
        capsys.readouterr()
        rc = cli.main([command, *map(str, args)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err, (command, err)
        assert f"{culprit}: " in err and "refused by the safe loader" in err, (command, err)
        assert "GLOBAL posix.system" in err or "GLOBAL os.system" in err, (command, err)
        assert not marker.exists(), f"cdsp {command} ran the pickle's code"
    assert not (tmp_path / "eval").exists() and not (tmp_path / "pred").exists()
    assert not (tmp_path / "pseudo").exists() and leftovers(tmp_path) == []
    torch.load(tmp_path / "resnet18.pth", weights_only=False)  # the file really does run code when trusted
    assert marker.exists()


def test_every_torch_load_in_the_code_is_weights_only():
    """Read from the source (every call, whatever its layout): torch.load always with
    weights_only=True, and no other unpickling of what a file or a server hands us."""
    loads, unsafe = [], []
    for path in [*REPO.glob("cdsp_core/*.py"), *REPO.glob("components/*.py"), *REPO.glob("pipelines/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name = ast.unparse(node.func)
            if name == "torch.load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                loads.append((f"{path.name}:{node.lineno}", safe))
            elif name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads") or (
                    name.startswith("mlflow.") and name.endswith(".load_model")):
                unsafe.append(f"{path.name}:{node.lineno} {name}")
    assert len(loads) >= 3 and all(safe for _, safe in loads), loads
    assert unsafe == []


# ---------------------------------------------------------------------------- images


def test_images_keep_secrets_and_build_context_out():
    """Besides tests/test_images.py (pinned base, non-root user, pinned dependencies): no credential
    is baked into an image, and the build context holds only what the image needs."""
    for kind in ("cpu", "cuda"):
        dockerfile = (REPO / "images" / f"Dockerfile.{kind}").read_text()
        for line in dockerfile.splitlines():
            if line.strip().upper().startswith(("ENV ", "ARG ", "LABEL ")):
                assert not re.search(r"secret|passw|token|access_key|credential", line, re.I), line
        ignore = (REPO / "images" / f"Dockerfile.{kind}.dockerignore").read_text().split()
        assert ignore[ignore.index("*") if "*" in ignore else -1] == "*"  # deny everything first, then allow
        allowed = [p for p in ignore if p.startswith("!")]
        assert not any(re.search(r"mlflow|\.env|\.aws|mlruns|build|tests", p) for p in allowed), allowed


# ---------------------------------------------------------------------------- decompression bombs from S3


def dataset_on_s3(s3, root, name: str) -> str:
    """Upload `root` to s3://<new bucket>/voc on the moto server `s3` (conftest's fixture); the bucket."""
    bucket = s3.new_bucket(name)
    storage.upload_dir(root, f"s3://{bucket}/voc")
    return bucket


def test_a_decompression_bomb_served_from_s3_is_refused_before_decoding(tmp_path, s3, capsys):
    root = synth.make_dataset(tmp_path / "data", n_train=2, n_val=1, size=32, seed=4)
    model_dir = tmp_path / "model"  # a real (untrained) segmenter to predict with
    model_dir.mkdir()
    write_config(model_dir, "segmenter", segmenter="deeplabv2", backbone="resnet18")
    torch.save(models.build_segmenter("deeplabv2", "resnet18", len(synth.CLASSES)).state_dict(), model_dir / "model.pt")
    bomb = bomb_png(tmp_path / "bomb.png", width=30000, height=30000)  # 900 Mpx in 100 bytes
    assert bomb.stat().st_size < 1000
    bomb.replace(root / "JPEGImages" / "train_00001.jpg")
    bucket = dataset_on_s3(s3, root, "bomb")
    for args in (["prepare", "--data", f"s3://{bucket}/voc", "--out", tmp_path / "prepared"],
                 ["predict", "--model", model_dir, "--images", f"s3://{bucket}/voc/JPEGImages",
                  "--out", tmp_path / "pred", "--device", "cpu"]):
        capsys.readouterr()
        rc = cli.main([str(a) for a in args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err, err
        assert "train_00001.jpg: image is too large (Pillow's decompression-bomb limit" in err, err
        # the object the user knows, not its copy in a temporary download folder
        assert f"error: s3://{bucket}/voc/JPEGImages/train_00001.jpg: image is too large" in err, err
        assert "cdsp-images-" not in err and ".download." not in err, err
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "pred").exists()
    assert leftovers(tmp_path) == []


def test_prepare_refuses_an_s3_object_over_the_byte_limit_before_downloading_anything(tmp_path, s3, capsys):
    root = synth.make_dataset(tmp_path / "data", n_train=2, n_val=1, size=32, seed=4)
    big = root / "JPEGImages" / "train_00001.jpg"
    big.write_bytes(big.read_bytes() + b"\0" * (1024 * 1024))  # a JPEG followed by 1 MiB of padding
    size = big.stat().st_size
    bucket = dataset_on_s3(s3, root, "huge")
    requests_before = len((s3.folder / "moto_server.log").read_text().splitlines())
    capsys.readouterr()
    rc = cli.main(["prepare", "--data", f"s3://{bucket}/voc", "--out", str(tmp_path / "prepared"),
                   "--max-object-bytes", str(512 * 1024)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert err.endswith(f"s3://{bucket}/voc/JPEGImages/train_00001.jpg: {size} bytes, over the limit of "
                        f"524288 bytes; refusing to download it (a larger limit: --max-object-bytes)"), err
    assert not (tmp_path / "prepared").exists() and leftovers(tmp_path) == []
    requests = (s3.folder / "moto_server.log").read_text().splitlines()[requests_before:]
    assert any("list-type=2" in r for r in requests), requests  # it listed the prefix ...
    assert not any(f"GET /{bucket}/voc/" in r for r in requests), requests  # ... and downloaded nothing

    # under the default limit (256 MiB) the same data is prepared
    manifest = prepare.prepare(f"s3://{bucket}/voc", str(tmp_path / "prepared"))
    assert manifest["n_train"] == 2 and prepare.MAX_OBJECT_BYTES == 256 * 1024 * 1024
    assert (tmp_path / "prepared" / "JPEGImages" / "train_00001.jpg").stat().st_size == size
