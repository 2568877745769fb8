"""The CDSP Kubeflow pipeline: data prep -> classifier -> pseudo-labels -> segmenter -> evaluation.

Data prep always runs (it reads data that may have changed under the same URI). When the
data's fingerprint equals the one the champion model was trained on, nothing else runs (a
KFP condition); otherwise the four training stages run and the evaluation promotes the new
model to champion only if its val mIoU beats the champion's.

Every stage setting of `cdsp_core.config` is a pipeline parameter (the signature is derived
from the dataclasses, see `pipeline_params`). Cluster settings (images, pipeline root, secret
names, resources) are fixed at compile time from CDSP_<NAME> environment variables (see
`config.ClusterConfig`):

    python -m pipelines.cdsp_pipeline --out build/cdsp_pipeline.yaml
"""

from __future__ import annotations

import argparse
import inspect
import os

from kfp import compiler, dsl, kubernetes

from cdsp_core import config
from components import stages
from components.codegen import Param, config_params

PIPELINE_NAME = "cdsp"


def cluster_settings(env: dict[str, str] | None = None) -> config.ClusterConfig:
    """ClusterConfig with each field overridden by the env var CDSP_<NAME> when set."""
    env = os.environ if env is None else env
    values = {}
    for f in config.fields_of(config.ClusterConfig):
        raw = env.get(f"CDSP_{f.name.upper()}")
        if raw:
            values[f.name] = int(raw) if f.type in ("int", int) else raw
    return config.build(config.ClusterConfig, None, values)


def pipeline_params() -> list[Param]:
    """The pipeline's parameters: the run parameters, then every stage setting, in config order."""
    params = config_params(config.PipelineConfig, *config.ALL_CONFIGS)
    names = [p[0] for p in params]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"config fields named twice: {duplicates}")
    return params


def configure(task: dsl.PipelineTask, cluster: config.ClusterConfig, *, cpu: str, memory: str, cache: bool,
              gpus: dsl.PipelineChannel | None = None, shm: bool = False) -> dsl.PipelineTask:
    """Resources, retries, caching and credentials of one step."""
    task.set_retry(cluster.retries, backoff_duration="30s", backoff_factor=2.0, backoff_max_duration="3600s")
    task.set_caching_options(cache)
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    if gpus is not None:
        task.set_accelerator_type(cluster.accelerator).set_accelerator_limit(gpus)
    if shm:  # PyTorch data-loader workers share batches through /dev/shm, 64 MB by default in a pod
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=cluster.shm_size)
    # Credentials only ever come from Kubernetes secrets, by name: never parameters, never in the YAML.
    kubernetes.use_secret_as_env(task, cluster.s3_secret,
                                 {k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"})
    kubernetes.use_secret_as_env(task, cluster.mlflow_secret,
                                 {k: k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")},
                                 optional=True)
    kubernetes.use_config_map_as_env(task, cluster.settings_config_map,
                                     {k: k for k in ("AWS_ENDPOINT_URL_S3", "PUSHGATEWAY_URL")}, optional=True)
    return task


def mirror_checkpoints(task: dsl.PipelineTask, cluster: config.ClusterConfig) -> dsl.PipelineTask:
    """Tell a training step where to mirror its checkpoints, so that its retry resumes (cdsp_core/checkpoints.py)."""
    from cdsp_core import checkpoints

    return task.set_env_variable(checkpoints.ENV, checkpoints.root_for(cluster.pipeline_root, cluster.checkpoint_root))


def build_pipeline(cluster: config.ClusterConfig | None = None):
    """The pipeline (a kfp GraphComponent) for these cluster settings."""
    cluster = cluster or cluster_settings()
    components = stages.build(cluster.image, cluster.cuda_image)
    per_stage = stages.stage_params()
    params = pipeline_params()
    names = [p[0] for p in params]

    def cdsp(*args):
        p = dict(zip(names, args))

        def settings(stage: str) -> dict:
            return {name: p[name] for name, *_ in per_stage[stage]}

        step = dict(cpu=cluster.step_cpu, memory=cluster.step_memory)
        run = dict(pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        prep = components["data_prep"](**run, **settings("data_prep")).set_display_name("data prep")
        # Never cached: the data under data_uri may change while the URI stays the same.
        configure(prep, cluster, **step, cache=False)
        prepared = prep.outputs["prepared"]
        run["mlflow_run_id"] = prep.outputs["mlflow_run_id"]

        # The condition reads data_prep's single return value ("Output"): kfp's local runner
        # resolves that form of task output in a condition (a named NamedTuple field it cannot).
        with dsl.If(prep.outputs["Output"] == True, name="new-scribbles"):  # noqa: E712 (a KFP condition)
            classifier = components["train_classifier"](
                prepared=prepared, **run, **settings("train_classifier"))
            # Training and CAMs are seeded functions of their inputs: a cache hit (same input
            # artifacts and settings) is as good as running them again.
            configure(classifier.set_display_name("classifier"), cluster, **step, cache=True,
                      gpus=p["cls_gpus"], shm=True)
            mirror_checkpoints(classifier, cluster)
            pseudo = components["pseudo_label"](
                prepared=prepared, classifier=classifier.outputs["classifier"], **run,
                **settings("pseudo_label"))
            configure(pseudo.set_display_name("pseudo-labels"), cluster, **step, cache=True,
                      gpus=p["cls_gpus"], shm=True)
            segmenter = components["train_segmenter"](
                prepared=prepared, pseudo_labels=pseudo.outputs["pseudo_labels"], **run,
                **settings("train_segmenter"))
            configure(segmenter.set_display_name("segmentation training"), cluster, cpu=cluster.seg_cpu,
                      memory=cluster.seg_memory, cache=True, gpus=p["gpus"], shm=True)
            mirror_checkpoints(segmenter, cluster)
            evaluation = components["evaluate"](
                prepared=prepared, model=segmenter.outputs["model"], **run,
                fingerprint=prep.outputs["fingerprint"], model_version=segmenter.outputs["Output"],
                **settings("evaluate"))
            # Not cached: promotion compares with whichever model is champion now.
            configure(evaluation.set_display_name("evaluation"), cluster, **step, cache=False,
                      gpus=p["cls_gpus"], shm=True)

    cdsp.__signature__ = inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=ann_type(ann), default=default)
        for name, ann, default, _ in params])
    cdsp.__doc__ = pipeline_doc(params)
    return dsl.pipeline(cdsp, name=PIPELINE_NAME, pipeline_root=cluster.pipeline_root or None)


def ann_type(name: str) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[name]


def pipeline_doc(params: list[Param]) -> str:
    """The module docstring's first paragraph plus one `Args:` line per parameter (kfp shows them)."""
    head = (__doc__ or "").strip().split("\n\n")[0]
    return head + "\n\nArgs:\n" + "\n".join(f"    {name}: {help_text}" for name, _, _, help_text in params)


def compile_pipeline(path: str, cluster: config.ClusterConfig | None = None) -> str:
    from cdsp_core.fsutil import atomic_path

    with atomic_path(path) as tmp:
        compiler.Compiler().compile(build_pipeline(cluster), str(tmp.with_suffix(".yaml")))
        os.replace(tmp.with_suffix(".yaml"), tmp)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the CDSP pipeline to a KFP YAML file.",
                                     epilog="Cluster settings come from CDSP_<NAME> env vars: " + ", ".join(
                                         f"CDSP_{f.name.upper()}" for f in config.fields_of(config.ClusterConfig)))
    parser.add_argument("--out", default="build/cdsp_pipeline.yaml", help="output YAML file")
    args = parser.parse_args(argv)
    cluster = cluster_settings()
    compile_pipeline(args.out, cluster)
    print(f"compiled {args.out} (images {cluster.image}, {cluster.cuda_image}; pipeline root {cluster.pipeline_root})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
