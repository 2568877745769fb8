"""What each component runs: thin calls into cdsp_core.

kfp embeds these functions' source in the component (`additional_funcs`), so each is
self-contained: it imports what it uses inside its body, and calls only cdsp_core and the
helpers listed in HELPERS. The generated component function passes every input by keyword
(`step(**locals())`); stage settings arrive in `settings` and become the typed config again.
kfp's executor has already sent INFO logging to stdout.

Tracking: data prep opens the MLflow parent run of the pipeline run (found again on a retry,
by the KFP run id) and every stage records a nested run; training metrics go to MLflow and,
when PUSHGATEWAY_URL is set, to Prometheus, through one `on_metrics` callback.
"""

from __future__ import annotations


def data_prep_step(prepared, data_report, fingerprint, mlflow_run_id, pipeline_run_id, data_uri, scribble_dir,
                   split_dir, force_train, cls_gpus, gpus) -> bool:
    import logging

    from cdsp_core import prepare, telemetry, tracking
    from cdsp_core.errors import CdspError
    from cdsp_core.fsutil import atomic_write_text

    if not data_uri:
        raise CdspError("data_uri is empty: give the dataset root (a local path or s3://bucket/prefix)")
    gpu_count("cls_gpus", cls_gpus), gpu_count("gpus", gpus)  # checked here, before any GPU step is scheduled
    prom = telemetry.metrics_callback("data_prep", pipeline_run_id or "local")
    manifest = prepare.prepare(data_uri, prepared.path, scribble_dir=scribble_dir, split_dir=split_dir or None,
                               copy=True)
    fp = manifest["fingerprint"]
    champion = tracking.champion_info()
    new_data = champion is None or champion.get("fingerprint") != fp
    if not new_data and not force_train:
        decision = (f"skip training: champion version {champion['version']} was trained on this very data "
                    f"(fingerprint {fp[:16]})")
    elif not new_data:
        decision = "train: forced (force_train), although the champion was trained on this data"
    else:
        decision = "train: " + ("no champion yet" if champion is None else
                                f"the data differs from champion version {champion['version']}'s")
    logging.getLogger("cdsp.pipeline").info("data fingerprint %s; %s", fp, decision)

    run_id = tracking.start_pipeline_run(pipeline_run_id, fingerprint=fp, data_uri=data_uri, decision=decision)
    with tracking.stage_run(run_id, "data_prep", {"data_uri": data_uri, "scribble_dir": scribble_dir,
                                                  "split_dir": split_dir, "force_train": force_train}):
        tracking.log_dict(manifest, "manifest.json")
        counts = {k: v for k, v in manifest.items() if isinstance(v, int) and not isinstance(v, bool)}
        tracking.log_final_metrics(counts)
    prom.close()

    prepared.metadata.update({"fingerprint": fp, "new_scribbles": new_data, **counts})
    lines = ["# Data prep", "", f"- data: `{tracking.redact(data_uri)}`", f"- fingerprint: `{fp}`",
             f"- decision: **{decision}**", *(f"- {k}: {v}" for k, v in counts.items()),
             *(f"- warning: {w}" for w in manifest.get("warnings", [])[:20])]
    atomic_write_text(data_report.path, "\n".join(lines) + "\n")
    atomic_write_text(fingerprint, fp)
    atomic_write_text(mlflow_run_id, run_id)
    return new_data or force_train


def train_classifier_step(prepared, classifier, classifier_metrics, mlflow_run_id, pipeline_run_id,
                          external_pseudo_uri, cls_gpus, device, seed, **settings) -> None:
    import logging

    from cdsp_core import config
    from cdsp_core.fsutil import atomic_write_text

    if external_pseudo_uri:
        # Pseudo-labels come from elsewhere, so there is no classifier to train. The artifact still
        # exists (a note) so that the DAG is one chain on every runner: kfp's local runner cannot
        # pick an artifact from either branch of a condition (dsl.OneOf).
        logging.getLogger("cdsp.pipeline").info("external pseudo-labels %s: no classifier to train",
                                                external_pseudo_uri)
        atomic_write_text(f"{classifier.path}/NOT_TRAINED", f"external pseudo-labels: {external_pseudo_uri}\n")
        classifier.metadata["trained"] = False
        return
    from cdsp_core import checkpoints, train

    cfg = config.build(config.ClassifierConfig, None, settings)
    params = {**config.to_dict(cfg), "device": device, "seed": seed, "cls_gpus": gpu_count("cls_gpus", cls_gpus)}
    # A retried pod resumes from the checkpoint mirrored under this pipeline run (cdsp_core/checkpoints.py).
    mirror = checkpoints.for_stage(pipeline_run_id, "train_classifier", params, data_dir=prepared.path)
    resume = mirror.restore(classifier.path)
    summary = run_stage(mlflow_run_id, pipeline_run_id, "train_classifier", params,
                        lambda on_metrics: train.train_classifier(prepared.path, classifier.path, cfg, device=device,
                                                                  seed=seed, resume=resume, on_metrics=on_metrics,
                                                                  on_checkpoint=mirror.upload))
    mirror.clear()
    kfp_metrics(classifier_metrics, summary)
    classifier.metadata.update({"trained": True, "backbone": cfg.cls_backbone})


def pseudo_label_step(prepared, classifier, pseudo_labels, pseudo_metrics, mlflow_run_id, pipeline_run_id,
                      external_pseudo_uri, cls_gpus, device, **settings) -> None:
    from cdsp_core import config, pseudolabel

    cfg = config.build(config.PseudoLabelConfig, None, settings)
    summary = run_stage(mlflow_run_id, pipeline_run_id, "pseudo_label",
                        {**config.to_dict(cfg), "external_pseudo_uri": external_pseudo_uri, "device": device,
                         "cls_gpus": gpu_count("cls_gpus", cls_gpus)},
                        lambda on_metrics: pseudolabel.pseudo_label(
                            prepared.path, pseudo_labels.path, cfg, device=device,
                            classifier_dir=None if external_pseudo_uri else classifier.path,
                            external_pseudo=external_pseudo_uri or None))
    kfp_metrics(pseudo_metrics, summary)


def train_segmenter_step(prepared, pseudo_labels, model, train_metrics, mlflow_run_id, pipeline_run_id, gpus,
                         **settings) -> str:
    import json
    from pathlib import Path

    from cdsp_core import checkpoints, config, tracking, train

    cfg = config.build(config.SegTrainConfig, None, settings)
    gpus = gpu_count("gpus", gpus)
    params = {**config.to_dict(cfg), "gpus": gpus}
    # A retried pod resumes from the checkpoint mirrored under this pipeline run (cdsp_core/checkpoints.py).
    mirror = checkpoints.for_stage(pipeline_run_id, "train_segmenter", params, data_dir=prepared.path)
    resume = mirror.restore(model.path)

    def fit(on_metrics):
        if gpus <= 1:
            return train.train_segmenter(prepared.path, pseudo_labels.path, model.path, cfg, resume=resume,
                                         on_metrics=on_metrics, on_checkpoint=mirror.upload)
        # DDP: one process per GPU under torchrun (checkpoints mirrored by a watcher thread here);
        # their per-epoch history is recorded afterwards.
        with mirror.watching(model.path):
            summary = train.launch_ddp(prepared.path, pseudo_labels.path, model.path, cfg, nproc=gpus, resume=resume)
        history = json.loads((Path(model.path) / "history.json").read_text(encoding="utf-8"))
        for i, epoch in enumerate(history):
            on_metrics(epoch, int(epoch.get("epoch", i)))
        return summary

    versions = []

    def fit_and_register(on_metrics):
        summary = fit(on_metrics)
        versions.append(tracking.log_segmenter(model.path))
        return summary

    summary = run_stage(mlflow_run_id, pipeline_run_id, "train_segmenter", params, fit_and_register)
    mirror.clear()  # only now: a retry after training but before registration resumes at the last epoch
    kfp_metrics(train_metrics, summary)
    model.metadata.update({"segmenter": cfg.segmenter, "backbone": cfg.backbone, "mlflow_model_version": versions[0]})
    return versions[0]


def evaluate_step(prepared, model, metrics, report, evaluation, mlflow_run_id, pipeline_run_id, fingerprint,
                  model_version, cls_gpus, device, **settings) -> bool:
    import json
    import logging
    import tempfile
    from pathlib import Path

    from cdsp_core import config, evaluate, tracking
    from cdsp_core.errors import CdspError

    cfg = config.build(config.EvalConfig, None, settings)
    manifest = json.loads((Path(prepared.path) / "manifest.json").read_text(encoding="utf-8"))
    val_split = tracking.val_split_id(manifest)
    outcome = {}

    def evaluate_and_decide(on_metrics):
        result = evaluate.evaluate(prepared.path, model.path, evaluation.path, cfg, split="val", device=device)
        tracking.log_evaluation(evaluation.path)
        champion = tracking.champion_info()
        champion_miou = None
        if champion and champion["val_split"] != val_split and champion["version"] != model_version:
            # The champion was measured on another val split: measure it again on this one.
            try:
                with tempfile.TemporaryDirectory(prefix="cdsp-champion-") as tmp:
                    champion_dir = tracking.resolve_model(champion["uri"], Path(tmp) / "model")
                    champion_miou = evaluate.evaluate(prepared.path, champion_dir, f"{tmp}/eval", cfg, split="val",
                                                      device=device)["miou"]
            except CdspError as e:  # e.g. another class list: not comparable, so the champion stays
                logging.getLogger("cdsp.pipeline").warning("cannot evaluate the champion on this val split: %s", e)
        outcome.update(result=result, decision=tracking.promote_if_better(
            model_version, result["miou"], val_split=val_split, fingerprint=fingerprint,
            champion_miou=champion_miou))
        return {"promoted": float(outcome["decision"]["promoted"])}  # the rest went with log_evaluation

    params = {**config.to_dict(cfg), "device": device, "cls_gpus": gpu_count("cls_gpus", cls_gpus)}
    run_stage(mlflow_run_id, pipeline_run_id, "evaluate", params, evaluate_and_decide)
    result, decision = outcome["result"], outcome["decision"]
    kfp_metrics(metrics, {**{k: result[k] for k in ("miou", "pixel_acc")},
                          **{f"iou_{name}": iou for name, iou in result["per_class_iou"].items()},
                          "promoted": float(decision["promoted"])})
    html_report(report.path, result, decision, Path(evaluation.path) / "overlays")
    return bool(decision["promoted"])


def gpu_count(name, value) -> int:
    """A GPU count parameter (a string, the form KFP's driver makes a limit of) as a number."""
    import re

    from cdsp_core.errors import CdspError

    if not re.fullmatch(r"[0-9]+", str(value)):
        raise CdspError(f"{name}={value!r}: not a GPU count; give a whole number, e.g. {name}=1 (0: no GPU)")
    return int(value)


def run_stage(mlflow_run_id, pipeline_run_id, stage, params, work):
    """`work(on_metrics)` inside the stage's MLflow run, with Prometheus telemetry; its summary.

    The summary's numbers are recorded as the run's final metrics.
    """
    from cdsp_core import telemetry, tracking

    prom = telemetry.metrics_callback(stage, pipeline_run_id or "local")
    ok = False
    try:
        with tracking.stage_run(mlflow_run_id, stage, params):
            summary = work(telemetry.chain(tracking.log_metrics, prom))
            tracking.log_final_metrics(summary)
        ok = True
    finally:
        prom.close(success=ok)
    return summary


def kfp_metrics(metrics, summary) -> None:
    """The numeric entries of a stage summary as KFP metrics (shown in the run's UI)."""
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, float(value))


def html_report(path, result, decision, overlays) -> None:
    """The evaluation as one self-contained HTML page: numbers, per-class table, decision, overlays."""
    import base64
    import html
    from pathlib import Path

    from cdsp_core.fsutil import atomic_write_text

    rows = "".join(f"<tr><td>{html.escape(str(name))}</td><td>{iou:.4f}</td></tr>"
                   for name, iou in result["per_class_iou"].items())
    images = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(p.stem)}: image | ground truth | prediction</figcaption></figure>"
        for p in sorted(Path(overlays).glob("*.png")))
    verdict = "promoted to champion" if decision["promoted"] else "not promoted"
    atomic_write_text(path, (
        "<!doctype html><html><head><meta charset='utf-8'><title>CDSP evaluation</title></head><body>"
        f"<h1>Evaluation on val</h1><p>mIoU <b>{result['miou']:.4f}</b>, pixel accuracy {result['pixel_acc']:.4f}"
        f" on {result.get('n_images', '?')} images</p>"
        f"<p>Model version {html.escape(str(decision['version']))}: <b>{verdict}</b>: "
        f"{html.escape(decision['reason'])}</p>"
        f"<table border='1' cellpadding='4'><tr><th>class</th><th>IoU</th></tr>{rows}</table>{images}"
        "</body></html>\n"))


HELPERS = [gpu_count, run_stage, kfp_metrics, html_report]
