"""What each component runs: thin calls into cdsp_core.

kfp embeds these functions' source in the component (`additional_funcs`), so each is
self-contained: it imports what it uses inside its body, and calls only cdsp_core and the
helpers listed in HELPERS. The generated component function passes every input by keyword
(`step(**locals())`); stage settings arrive in `settings` and become the typed config again.
"""

from __future__ import annotations


def stage_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def data_prep_step(prepared, data_report, fingerprint, mlflow_run_id, data_uri, scribble_dir, split_dir,
                   force_train) -> bool:
    import json
    import logging

    from cdsp_core import prepare, tracking
    from cdsp_core.errors import CdspError
    from cdsp_core.fsutil import atomic_write_text

    stage_logging()
    log = logging.getLogger("cdsp.pipeline")
    if not data_uri:
        raise CdspError("data_uri is empty: give the dataset root (a local path or s3://bucket/prefix)")
    manifest = prepare.prepare(data_uri, prepared.path, scribble_dir=scribble_dir, split_dir=split_dir or None,
                               copy=True)
    fp = manifest["fingerprint"]
    champion = tracking.champion_info()
    new_scribbles = champion is None or champion.get("fingerprint") != fp
    should_train = new_scribbles or force_train
    if should_train:
        why = "forced (force_train)" if not new_scribbles else (
            "no champion yet" if champion is None else f"new data since the champion (run {champion['run_id']})")
        decision = f"train: {why}"
    else:
        decision = (f"skip training: the champion (run {champion['run_id']}) was trained on this very data "
                    f"(fingerprint {fp})")
    log.info("data fingerprint %s; %s", fp, decision)

    run_id = tracking.start_pipeline_run(data_uri=data_uri, fingerprint=fp, decision=decision)
    with tracking.stage_run(run_id, "data_prep", {"data_uri": data_uri, "scribble_dir": scribble_dir,
                                                  "split_dir": split_dir, "force_train": force_train}):
        tracking.log_dict(manifest, "manifest.json")

    counts = {k: v for k, v in manifest.items() if isinstance(v, int)}
    prepared.metadata.update({"fingerprint": fp, **counts})
    lines = ["# Data prep", "", f"- data: `{data_uri}`", f"- fingerprint: `{fp}`", f"- decision: **{decision}**"]
    lines += [f"- {k}: {v}" for k, v in counts.items()]
    atomic_write_text(data_report.path, "\n".join(lines) + "\n\n```json\n" + json.dumps(manifest, indent=2)[:4000]
                      + "\n```\n")
    atomic_write_text(fingerprint, fp)
    atomic_write_text(mlflow_run_id, run_id)
    return should_train


def train_classifier_step(prepared, classifier, classifier_metrics, mlflow_run_id, external_pseudo_uri, device, seed,
                          **settings) -> None:
    import logging

    from cdsp_core import config, tracking, train
    from cdsp_core.fsutil import atomic_write_text

    stage_logging()
    cfg = config.build(config.ClassifierConfig, None, settings)
    if external_pseudo_uri:
        # Pseudo-labels come from elsewhere, so there is no classifier to train. The artifact
        # still exists (empty) so that the DAG stays one chain on every runner.
        logging.getLogger("cdsp.pipeline").info("external pseudo-labels given (%s): no classifier", external_pseudo_uri)
        atomic_write_text(f"{classifier.path}/SKIPPED", f"external pseudo-labels: {external_pseudo_uri}\n")
        classifier.metadata["skipped"] = True
        return
    with tracking.stage_run(mlflow_run_id, "train_classifier", config.to_dict(cfg)):
        summary = train.train_classifier(prepared.path, classifier.path, cfg, device=device, seed=seed,
                                         on_metrics=metrics_callback("train_classifier"))
    log_summary(classifier_metrics, summary)
    classifier.metadata.update({"backbone": cfg.cls_backbone})


def pseudo_label_step(prepared, classifier, pseudo_labels, pseudo_metrics, mlflow_run_id, external_pseudo_uri, device,
                      **settings) -> None:
    from cdsp_core import config, pseudolabel, tracking

    stage_logging()
    cfg = config.build(config.PseudoLabelConfig, None, settings)
    params = {**config.to_dict(cfg), "external_pseudo_uri": external_pseudo_uri}
    with tracking.stage_run(mlflow_run_id, "pseudo_label", params):
        summary = pseudolabel.pseudo_label(
            prepared.path, pseudo_labels.path, cfg, device=device,
            classifier_dir=None if external_pseudo_uri else classifier.path,
            external_pseudo=external_pseudo_uri or None)
    log_summary(pseudo_metrics, summary)


def train_segmenter_step(prepared, pseudo_labels, model, train_metrics, mlflow_run_id, gpus, **settings) -> None:
    from cdsp_core import config, tracking, train

    stage_logging()
    cfg = config.build(config.SegTrainConfig, None, settings)
    with tracking.stage_run(mlflow_run_id, "train_segmenter", {**config.to_dict(cfg), "gpus": gpus}):
        if gpus > 1:
            summary = train.launch_ddp(prepared.path, pseudo_labels.path, model.path, cfg, nproc=gpus)
        else:
            summary = train.train_segmenter(prepared.path, pseudo_labels.path, model.path, cfg,
                                            on_metrics=metrics_callback("train_segmenter"))
    log_summary(train_metrics, summary)
    model.metadata.update({"segmenter": cfg.segmenter, "backbone": cfg.backbone})


def evaluate_step(prepared, model, metrics, report, evaluation, mlflow_run_id, fingerprint, device,
                  **settings) -> bool:
    import shutil

    from cdsp_core import config, evaluate, tracking

    stage_logging()
    cfg = config.build(config.EvalConfig, None, settings)
    with tracking.stage_run(mlflow_run_id, "evaluate", config.to_dict(cfg)):
        result = evaluate.evaluate(prepared.path, model.path, evaluation.path, cfg, split="val", device=device)
        promoted = tracking.promote_if_better(model.path, result, fingerprint=fingerprint, run_id=mlflow_run_id)
    metrics.log_metric("miou", float(result["miou"]))
    metrics.log_metric("pixel_acc", float(result["pixel_acc"]))
    for name, iou in result["per_class_iou"].items():
        metrics.log_metric(f"iou_{name}", float(iou))
    metrics.log_metric("promoted", float(promoted))
    shutil.copyfile(f"{evaluation.path}/report.md", report.path)
    return promoted


def metrics_callback(stage):
    """MLflow metrics of the active stage run, and Prometheus gauges when PUSHGATEWAY_URL is set."""
    from cdsp_core import telemetry, tracking

    push = telemetry.metrics_callback(stage)

    def on_metrics(values, step):
        tracking.log_metrics(values, step)
        push(values, step)

    return on_metrics


def log_summary(metrics, summary) -> None:
    """The numeric entries of a stage summary as KFP metrics."""
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, float(value))


HELPERS = [stage_logging, metrics_callback, log_summary]
