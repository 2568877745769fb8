"""What each component runs: thin, typed calls into cdsp_core.

The component functions of `components/stages.py` (generated) import this module inside their
body, so it is a plain module: the images install it beside cdsp_core (images/Dockerfile.*).
Each step takes kfp's artifact objects, the plain inputs and its stage's typed config, and
returns what the component returns. kfp's executor has already sent INFO logging to stdout.

Tracking: data prep opens the MLflow parent run of the pipeline run (found again on a retry,
by the KFP run id; named after the KFP run) and every stage records a nested run with its
settings as params; training metrics go to MLflow (per epoch) and, when PUSHGATEWAY_URL is set,
to Prometheus, through one `on_metrics` callback. The headline results (`tracking.headline`:
pseudo-label and val mIoU, pixel accuracy, per-class IoU) go on the parent run too.

The modules that import torch (train, pseudolabel, evaluate) are imported in the steps that
use them: data prep needs no torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

from cdsp_core import checkpoints, config, datastore, modelfolder, prepare, registry, telemetry, tracking
from cdsp_core.credentials import redact
from cdsp_core.errors import CdspError
from cdsp_core.fsutil import atomic_write_text
from cdsp_core.telemetry import MetricsCallback

log = logging.getLogger("cdsp.pipeline")

EXPERIMENT_NOTE = """\
The CDSP pipeline (scribble-supervised segmentation): one run per pipeline run, named after the KFP run,
with a nested run per stage (`<run> / data_prep`, `/ train_classifier`, `/ pseudo_label`, `/ train_segmenter`,
`/ evaluate`) holding that stage's settings as params.

- On the pipeline run itself: `miou`, `pixel_acc` and `iou_<class>` on the val split, `pseudo_miou` (the
  pseudo-labels against ground truth), `promoted` (1 when the model became the champion), the data counts;
  every setting as a param. mIoU, pixel accuracy and IoU are fractions in [0, 1] (0.62 = 62 %).
- Training curves (step = epoch 1..n: `loss`, each `loss_<term>`, `lr`, `images_per_sec`, `val_miou`) are on
  `<run> / train_segmenter` (and `/ train_classifier`); the evaluation's plots and overlays on `<run> / evaluate`.
- To compare models: select runs, then Compare (differing params are highlighted), or the Chart view.
- The models: registered model `cdsp-segmenter`; alias `champion` is the best mIoU on the same val split.
"""


def data_prep_step(prepared: Dataset, data_report: Markdown, fingerprint: str, mlflow_run_id: str, *,
                   pipeline_run_id: str, data_uri: str, scribble_dir: str, split_dir: str, force_train: bool,
                   cls_gpus: str, gpus: str, pipeline_run_name: str = "") -> bool:
    """Prepare the data; True when the training steps should run. `fingerprint` and `mlflow_run_id`
    are the files kfp reads those two outputs from.

    The data is compared with the record of the run that trained the champion (in the data store,
    datastore.py): one listing decides "nothing changed"; otherwise only new or changed files are
    downloaded, validated and stored. `prepared` holds the run's record (dataset.json), not the files:
    the later steps check the dataset out of the store.
    """
    if not data_uri:
        raise CdspError("data_uri is empty: give the dataset root (a local path or s3://bucket/prefix)")
    gpu_count("cls_gpus", cls_gpus), gpu_count("gpus", gpus)  # checked here, before any GPU step is scheduled
    pipeline_run_id = pipeline_run_id or f"local-{uuid.uuid4().hex[:12]}"  # the key of this run's record
    prom = telemetry.metrics_callback("data_prep", pipeline_run_id)
    store = os.environ.get(datastore.ENV, "").rstrip("/")
    if not store:
        store = f"{prepared.path}/store"
        log.warning("%s is not set: this run keeps its dataset in its own artifact (%s), not shared with other runs",
                    datastore.ENV, store)
    champion = registry.champion_info()
    base = datastore.read_record(store, champion["pipeline_run_id"]) if champion and champion["pipeline_run_id"] \
        else None
    if base is not None and base["fingerprint"] != champion["fingerprint"]:
        log.warning("the store's record of run %s is not the data champion version %s was trained on; not used",
                    base.get("run"), champion["version"])
        base = None
    update = prepare.prepare_to_store(data_uri, store, base, scribble_dir=scribble_dir, split_dir=split_dir or None)
    record = datastore.write_record(store, pipeline_run_id, update.record)
    fp, changes, cost = record["fingerprint"], record["changes"], record["cost"]
    new_data = champion is None or champion.get("fingerprint") != fp
    if not new_data and not force_train:
        decision = (f"skip training: champion version {champion['version']} was trained on this very data "
                    f"(fingerprint {fp[:16]})")
    elif not new_data:
        decision = "train: forced (force_train), although the champion was trained on this data"
    else:
        decision = "train: " + ("no champion yet" if champion is None else
                                f"the data differs from champion version {champion['version']}'s")
    log.info("data fingerprint %s; %s", fp, decision)

    counts = {"n_train": record["n_train"], "n_val": record["n_val"],
              **{f"data_{kind}": sum(map(len, changes[kind].values())) for kind in ("added", "changed", "removed")},
              **{f"new_scribble_pixels_{tracking.snake(c)}": n for c, n in changes["new_scribble_pixels"].items()},
              **{f"data_{k}": v for k, v in cost.items()}}
    tracking.describe_experiment(tracking.DEFAULT_EXPERIMENT, EXPERIMENT_NOTE)
    run_id = tracking.start_pipeline_run(pipeline_run_id, fingerprint=fp, run_name=pipeline_run_name,
                                         data_uri=data_uri, decision=decision, data_since=changes["since"] or "")
    tracking.log_dict(changes, "data_changes.json", run_id=run_id)  # on the parent run: what this run brought
    tracking.log_final_metrics(counts, run_id=run_id)
    with tracking.stage_run(run_id, "data_prep", {"data_uri": data_uri, "scribble_dir": scribble_dir,
                                                  "split_dir": split_dir, "force_train": force_train}):
        tracking.log_dict(record, "data_record.json")
        if update.manifest is not None:
            tracking.log_dict(update.manifest, "manifest.json")
        tracking.log_final_metrics(counts)
    prom.close()

    atomic_write_text(f"{prepared.path}/{datastore.DATASET}", json.dumps({**record, "store": store}, indent=1) + "\n")
    prepared.metadata.update({"fingerprint": fp, "new_scribbles": new_data, "store": redact(store),
                              "manifest": record["manifest"], **counts})
    atomic_write_text(data_report.path, data_report_text(data_uri, record, decision))
    atomic_write_text(fingerprint, fp)
    atomic_write_text(mlflow_run_id, run_id)
    return new_data or force_train


def data_report_text(data_uri: str, record: dict, decision: str) -> str:
    """The data report (Markdown): the decision, what changed since the champion's data, what it cost."""
    ch, cost = record["changes"], record["cost"]
    lines = ["# Data prep", "", f"- data: `{redact(data_uri)}`", f"- fingerprint: `{record['fingerprint']}`",
             f"- decision: **{decision}**", f"- n_train: {record['n_train']}", f"- n_val: {record['n_val']}",
             f"- cost: {cost['listed']} files listed, {cost['downloaded']} downloaded ({cost['downloaded_bytes']} "
             f"bytes), {cost['stored']} new in the data store ({cost['stored_bytes']} bytes)", "",
             f"## Since the champion's data ({'run ' + ch['since'] if ch['since'] else 'no champion record'})", ""]
    for kind in ("added", "changed", "removed"):
        for split, ids in ch[kind].items():
            shown = ", ".join(ids[:50]) + (f" and {len(ids) - 50} more" if len(ids) > 50 else "")
            lines.append(f"- {kind} ({split}, {len(ids)}): {shown}")
    if not any(ch[kind] for kind in ("added", "changed", "removed")):
        lines.append("- nothing added, changed or removed")
    if ch["new_scribble_pixels"]:
        lines.append("- new scribble pixels (train): " + ", ".join(f"{c} {n:+d}" for c, n in
                                                                   ch["new_scribble_pixels"].items()))
    lines += [f"- warning: {w}" for w in record.get("warnings", [])[:20]]
    return "\n".join(lines) + "\n"


def train_classifier_step(prepared: Dataset, classifier: Model, classifier_metrics: Metrics, *, mlflow_run_id: str,
                          pipeline_run_id: str, external_pseudo_uri: str, cls_gpus: str, device: str, seed: int,
                          cfg: config.ClassifierConfig) -> None:
    if external_pseudo_uri:
        # Pseudo-labels come from elsewhere, so there is no classifier to train. The artifact still
        # exists (a note) so that the DAG is one chain on every runner: kfp's local runner cannot
        # pick an artifact from either branch of a condition (dsl.OneOf).
        log.info("external pseudo-labels %s: no classifier to train", external_pseudo_uri)
        atomic_write_text(f"{classifier.path}/NOT_TRAINED", f"external pseudo-labels: {external_pseudo_uri}\n")
        classifier.metadata["trained"] = False
        return
    from cdsp_core import train

    params = {**config.to_dict(cfg), "device": device, "seed": seed, "cls_gpus": gpu_count("cls_gpus", cls_gpus)}
    with datastore.checked_out(prepared.path) as data_dir:
        # A retried pod resumes from the checkpoint mirrored under this pipeline run (cdsp_core/checkpoints.py).
        mirror = checkpoints.for_stage(pipeline_run_id, "train_classifier", params, data_dir=data_dir)
        resume = mirror.restore(classifier.path)
        with stage_run(mlflow_run_id, pipeline_run_id, "train_classifier", params) as on_metrics:
            summary = train.train_classifier(data_dir, classifier.path, cfg, device=device, seed=seed, resume=resume,
                                             on_metrics=on_metrics, on_checkpoint=mirror.upload)
            tracking.log_final_metrics(train.summary_only(summary))
    mirror.clear()
    kfp_metrics(classifier_metrics, summary)
    classifier.metadata.update({"trained": True, "backbone": cfg.cls_backbone})


def pseudo_label_step(prepared: Dataset, classifier: Model, pseudo_labels: Dataset, pseudo_metrics: Metrics, *,
                      mlflow_run_id: str, pipeline_run_id: str, external_pseudo_uri: str, cls_gpus: str, device: str,
                      cfg: config.PseudoLabelConfig) -> None:
    from cdsp_core import pseudolabel

    params = {**config.to_dict(cfg), "external_pseudo_uri": external_pseudo_uri, "device": device,
              "cls_gpus": gpu_count("cls_gpus", cls_gpus)}
    with stage_run(mlflow_run_id, pipeline_run_id, "pseudo_label", params), \
            datastore.checked_out(prepared.path) as data_dir:
        summary = pseudolabel.pseudo_label(data_dir, pseudo_labels.path, cfg, device=device,
                                           classifier_dir=None if external_pseudo_uri else classifier.path,
                                           external_pseudo=external_pseudo_uri or None)
        tracking.log_final_metrics(summary)
        tracking.log_final_metrics(tracking.headline(summary), run_id=mlflow_run_id)  # pseudo_miou
    kfp_metrics(pseudo_metrics, summary)


def train_segmenter_step(prepared: Dataset, pseudo_labels: Dataset, model: Model, train_metrics: Metrics, *,
                         mlflow_run_id: str, pipeline_run_id: str, gpus: str, cfg: config.SegTrainConfig) -> str:
    """Train, then register the model in MLflow; the registered version."""
    from cdsp_core import train

    n_gpus = gpu_count("gpus", gpus)
    params = {**config.to_dict(cfg), "gpus": n_gpus}
    with datastore.checked_out(prepared.path) as data_dir:
        # A retried pod resumes from the checkpoint mirrored under this pipeline run (cdsp_core/checkpoints.py).
        mirror = checkpoints.for_stage(pipeline_run_id, "train_segmenter", params, data_dir=data_dir)
        resume = mirror.restore(model.path)
        with stage_run(mlflow_run_id, pipeline_run_id, "train_segmenter", params) as on_metrics:
            summary = fit_segmenter(data_dir, pseudo_labels.path, model.path, cfg, n_gpus=n_gpus, resume=resume,
                                    mirror=mirror, on_metrics=on_metrics)
            version = registry.log_segmenter(model.path)
            tracking.log_final_metrics(train.summary_only(summary))
    mirror.clear()  # only now: a retry after training but before registration resumes at the last epoch
    kfp_metrics(train_metrics, summary)
    model.metadata.update({"segmenter": cfg.segmenter, "backbone": cfg.backbone, "mlflow_model_version": version})
    return version


def fit_segmenter(data_dir: str, pseudo_dir: str, model_dir: str, cfg: config.SegTrainConfig, *, n_gpus: int,
                  resume: bool, mirror: checkpoints.CheckpointMirror, on_metrics: MetricsCallback) -> dict:
    """Segmentation training in this process, or under torchrun with one process per GPU; its summary."""
    from cdsp_core import train

    if n_gpus <= 1:
        return train.train_segmenter(data_dir, pseudo_dir, model_dir, cfg, resume=resume, on_metrics=on_metrics,
                                     on_checkpoint=mirror.upload)
    # DDP: the training processes write the checkpoints, a watcher thread here mirrors them;
    # their per-epoch history is recorded afterwards.
    with mirror.watching(model_dir):
        summary = train.launch_ddp(data_dir, pseudo_dir, model_dir, cfg, nproc=n_gpus, resume=resume)
    history = json.loads((Path(model_dir) / modelfolder.HISTORY).read_text(encoding="utf-8"))
    for i, epoch in enumerate(history):
        on_metrics(epoch, int(epoch.get("epoch", i)))
    return summary


def evaluate_step(prepared: Dataset, model: Model, metrics: Metrics, report: HTML, evaluation: Artifact, *,
                  mlflow_run_id: str, pipeline_run_id: str, fingerprint: str, model_version: str, cls_gpus: str,
                  device: str, cfg: config.EvalConfig) -> bool:
    """Evaluate on val and promote the model to champion if it beats the champion; True when promoted."""
    from cdsp_core import evaluate
    from cdsp_core import report as pages  # `report` is the HTML artifact here

    params = {**config.to_dict(cfg), "device": device, "cls_gpus": gpu_count("cls_gpus", cls_gpus)}
    with stage_run(mlflow_run_id, pipeline_run_id, "evaluate", params), \
            datastore.checked_out(prepared.path) as data_dir:
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text(encoding="utf-8"))
        val_split = registry.val_split_id(manifest)
        result = evaluate.evaluate(data_dir, model.path, evaluation.path, cfg, split="val", device=device)
        tracking.log_evaluation(evaluation.path)
        champion = registry.champion_info()
        champion_miou = None
        if champion and champion["val_split"] != val_split and champion["version"] != model_version:
            champion_miou = champion_miou_on(data_dir, champion["uri"], cfg, device)
        decision = registry.promote_if_better(model_version, result["miou"], val_split=val_split,
                                              fingerprint=fingerprint, champion_miou=champion_miou,
                                              champion_version=champion["version"] if champion else None,
                                              veto=evaluate.promotion_veto(result))
        tracking.log_final_metrics({"promoted": float(decision["promoted"])})  # the rest went with log_evaluation
        results = {**tracking.headline(result), "promoted": float(decision["promoted"])}
        tracking.log_final_metrics(results, run_id=mlflow_run_id)
        run_id = tracking.active_run_id()
        with tracking.recording(f"(reading) the experiment of run {run_id}"):
            experiment_id = tracking.mlflow_client().get_run(run_id).info.experiment_id
        page = pages.evaluation_html(evaluation.path, decision, model_name=registry.MODEL_NAME,
                                     tracking_uri=tracking.tracking_uri(), experiment_id=experiment_id,
                                     run_id=run_id, parent_run_id=mlflow_run_id)
        html_copy = Path(evaluation.path) / "report.html"  # in MLflow too, which shows HTML artifacts
        atomic_write_text(html_copy, page)
        tracking.log_artifacts(html_copy)
    kfp_metrics(metrics, results)  # the same names as in MLflow
    atomic_write_text(report.path, page)
    return bool(decision["promoted"])


def champion_miou_on(data_dir: str, champion_uri: str, cfg: config.EvalConfig, device: str) -> float | None:
    """The champion's mIoU on this val split (it was measured on another); None when not comparable."""
    from cdsp_core import evaluate

    try:
        with tempfile.TemporaryDirectory(prefix="cdsp-champion-") as tmp:
            champion_dir = registry.resolve_model(champion_uri, Path(tmp) / "model")
            return evaluate.evaluate(data_dir, champion_dir, f"{tmp}/eval", cfg, split="val", device=device)["miou"]
    except CdspError as e:  # e.g. another class list: not comparable, so the champion stays
        log.warning("cannot evaluate the champion on this val split: %s", e)
        return None


def gpu_count(name: str, value: str) -> int:
    """A GPU count parameter (a string, the form KFP's driver makes a limit of) as a number."""
    if not re.fullmatch(r"[0-9]+", str(value)):
        raise CdspError(f"{name}={value!r}: not a GPU count; give a whole number, e.g. {name}=1 (0: no GPU)")
    return int(value)


@contextlib.contextmanager
def stage_run(mlflow_run_id: str, pipeline_run_id: str, stage: str, params: dict) -> Iterator[MetricsCallback]:
    """The stage's MLflow run with Prometheus telemetry; yields the `on_metrics` callback for both."""
    prom = telemetry.metrics_callback(stage, pipeline_run_id or "local")
    ok = False
    try:
        with tracking.stage_run(mlflow_run_id, stage, params):
            yield telemetry.chain(tracking.log_metrics, prom)
        ok = True
    finally:
        prom.close(success=ok)


def kfp_metrics(metrics: Metrics, summary: dict) -> None:
    """The numeric entries of a stage summary as KFP metrics (shown in the run's UI)."""
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, float(value))

