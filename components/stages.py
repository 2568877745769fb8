"""The five components: data prep, classifier, pseudo-labels, segmentation training, evaluation.

Each is a lightweight KFP component whose base image is ours (it holds kfp and cdsp_core, so
nothing is installed at run time) and whose inputs are derived from the typed config; its
body calls the matching step function of `components/steps.py`.
"""

from __future__ import annotations

from cdsp_core import config
from components import steps
from components.codegen import Param, config_params, make_component

# Plain inputs that are not settings: they come from KFP or from upstream steps.
PIPELINE_RUN_ID: Param = ("pipeline_run_id", "str", "", "the KFP run id (labels MLflow runs and Prometheus metrics)")
MLFLOW_RUN_ID: Param = ("mlflow_run_id", "str", "", "MLflow parent run of this pipeline run (from data prep)")
FINGERPRINT: Param = ("fingerprint", "str", "", "data fingerprint of the prepared dataset (from data prep)")
MODEL_VERSION: Param = ("model_version", "str", "", "registered MLflow model version of the segmenter")
RUN = [MLFLOW_RUN_ID, PIPELINE_RUN_ID]

# The stage settings each component takes, by config class (and single fields of others).
PREP_FIELDS = ("data_uri", "scribble_dir", "split_dir", "force_train", "cls_gpus", "gpus")
SHARED_TRAIN_FIELDS = ("device", "seed")


def pick(cls: type, names: tuple[str, ...]) -> list[Param]:
    params = {p[0]: p for p in config_params(cls)}
    return [params[n] for n in names]


def stage_params() -> dict[str, list[Param]]:
    """The config-derived inputs of each component, by component name.

    A step takes the GPU count it runs with (`gpus`, `cls_gpus`) as an input even where it only
    records it: kfp 2.17 passes a pipeline parameter into a condition's sub-DAG only when some
    component there takes it, and the accelerator limit needs it there. Data prep takes both to
    check them before any GPU step is scheduled.
    """
    return {
        "data_prep": pick(config.PipelineConfig, PREP_FIELDS),
        "train_classifier": [*pick(config.PipelineConfig, ("external_pseudo_uri", "cls_gpus")),
                             *pick(config.SegTrainConfig, SHARED_TRAIN_FIELDS),
                             *config_params(config.ClassifierConfig)],
        "pseudo_label": [*pick(config.PipelineConfig, ("external_pseudo_uri", "cls_gpus")),
                         *pick(config.SegTrainConfig, ("device",)),
                         *config_params(config.PseudoLabelConfig)],
        "train_segmenter": [*pick(config.PipelineConfig, ("gpus",)), *config_params(config.SegTrainConfig)],
        "evaluate": [*pick(config.PipelineConfig, ("cls_gpus",)), *pick(config.SegTrainConfig, ("device",)),
                     *config_params(config.EvalConfig)],
    }


def build(cpu_image: str, gpu_image: str) -> dict:
    """The five components, by name, with their base images."""
    params = stage_params()
    return {
        "data_prep": make_component(
            "data_prep",
            "Validate the dataset at data_uri, copy it into the Dataset artifact and decide whether to train.\n\n"
            "Returns True when the data holds scribbles the champion model was not trained on (or force_train).",
            artifacts=[("prepared", "Output[Dataset]"), ("data_report", "Output[Markdown]"),
                       ("fingerprint", "OutputPath(str)"), ("mlflow_run_id", "OutputPath(str)")],
            params=[PIPELINE_RUN_ID, *params["data_prep"]], returns="bool",
            step=steps.data_prep_step, helpers=steps.HELPERS, image=cpu_image),
        "train_classifier": make_component(
            "train_classifier",
            "Stage 1: train the multi-label classifier whose CAMs give the pseudo-labels.",
            artifacts=[("prepared", "Input[Dataset]"), ("classifier", "Output[Model]"),
                       ("classifier_metrics", "Output[Metrics]")],
            params=[*RUN, *params["train_classifier"]], returns=None,
            step=steps.train_classifier_step, helpers=steps.HELPERS, image=gpu_image),
        "pseudo_label": make_component(
            "pseudo_label",
            "CAM pseudo-labels (or external ones) and both distance maps.",
            artifacts=[("prepared", "Input[Dataset]"), ("classifier", "Input[Model]"),
                       ("pseudo_labels", "Output[Dataset]"), ("pseudo_metrics", "Output[Metrics]")],
            params=[*RUN, *params["pseudo_label"]], returns=None,
            step=steps.pseudo_label_step, helpers=steps.HELPERS, image=gpu_image),
        "train_segmenter": make_component(
            "train_segmenter",
            "Stage 2: CDSP segmentation training (DDP through torchrun when gpus > 1).\n\n"
            "Returns the version of the model registered in MLflow.",
            artifacts=[("prepared", "Input[Dataset]"), ("pseudo_labels", "Input[Dataset]"),
                       ("model", "Output[Model]"), ("train_metrics", "Output[Metrics]")],
            params=[*RUN, *params["train_segmenter"]], returns="str",
            step=steps.train_segmenter_step, helpers=steps.HELPERS, image=gpu_image),
        "evaluate": make_component(
            "evaluate",
            "Evaluate on the val split; promote the model to champion if its mIoU beats the champion's.\n\n"
            "Returns True when the model was promoted.",
            artifacts=[("prepared", "Input[Dataset]"), ("model", "Input[Model]"), ("metrics", "Output[Metrics]"),
                       ("report", "Output[HTML]"), ("evaluation", "Output[Artifact]")],
            params=[*RUN, FINGERPRINT, MODEL_VERSION, *params["evaluate"]], returns="bool",
            step=steps.evaluate_step, helpers=steps.HELPERS, image=gpu_image),
    }
