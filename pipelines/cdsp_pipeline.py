"""The CDSP Kubeflow pipeline: data prep -> classifier -> pseudo-labels -> segmenter -> evaluation.

Data prep always runs (it reads data that may have changed under the same URI). When the
data's fingerprint equals the one the champion model was trained on, nothing else runs (a
KFP condition); otherwise the four training stages run and the evaluation promotes the new
model to champion only if its val mIoU beats the champion's.

Every stage setting of `cdsp_core.config` is a pipeline parameter: the pipeline function
`cdsp(...)` in pipelines/parameters.py and the component functions in components/stages.py
are generated from the dataclasses (`make components`); the DAG is wired here (`build_pipeline`).
Cluster settings (images, pipeline root, secret names, resources) are fixed at compile time
from CDSP_<NAME> environment variables (see `config.ClusterConfig`; what each step's pod gets:
`step_resources`):

    python -m pipelines.cdsp_pipeline --out build/cdsp_pipeline.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
from collections.abc import Callable

from kfp import compiler, dsl, kubernetes

from cdsp_core import config
from cdsp_core.errors import CdspError
from components import generate, stages
from pipelines import parameters

PIPELINE_NAME = "cdsp"
# The five steps (KFP task names) and their display names.
STEPS = {"data-prep": "data prep", "train-classifier": "classifier", "pseudo-label": "pseudo-labels",
         "train-segmenter": "segmentation training", "evaluate": "evaluation"}
MEMORY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
                "Ti": 2**40}


def cluster_settings(env: dict[str, str] | None = None) -> config.ClusterConfig:
    """ClusterConfig with each field overridden by the env var CDSP_<NAME> when set."""
    env = os.environ if env is None else env
    values = {}
    for f in config.fields_of(config.ClusterConfig):
        name = f"CDSP_{f.name.upper()}"
        raw = env.get(name)
        if raw and f.type in ("int", int):
            if not re.fullmatch(r"[0-9]+", raw):
                raise CdspError(f"{name}={raw!r}: not a whole number")
            values[f.name] = int(raw)
        elif raw:
            values[f.name] = raw
    return config.build(config.ClusterConfig, None, values)


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one step's pod gets."""

    cpu: str  # CPU request (no limit: a limit only throttles)
    memory: str  # memory request and limit: equal, so it never holds more than its node set aside for it
    shm: str = ""  # size of its memory-backed /dev/shm, which is part of `memory` ("": none, the 64 MB default)
    gpus: str = ""  # the pipeline parameter with its GPU count ("": no GPU)


def memory_bytes(setting: str, value: str) -> int:
    """A Kubernetes memory quantity (16Gi, 500M, ...) in bytes; a clear error naming the CDSP_ setting."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", value)
    if not m:
        raise CdspError(f"CDSP_{setting.upper()}={value!r}: not a memory quantity (e.g. 16Gi, 48Gi, 512Mi)")
    return int(float(m[1]) * MEMORY_UNITS[m[2] or ""])


def memory_text(n: int) -> str:
    return next(f"{n // MEMORY_UNITS[u]}{u}" for u in ("Ti", "Gi", "Mi", "Ki", "") if n % MEMORY_UNITS[u] == 0)


def step_resources(cluster: config.ClusterConfig) -> dict[str, Resources]:
    """Each step's pod, by task name: the one place its resources are derived from `cluster`.

    /dev/shm is a memory-backed emptyDir, so what is in it counts against the pod's memory
    limit: it is sized as `shm_percent` of that limit, so the step's processes keep the rest.
    Only the training steps get one: their data-loader workers pass batches through it (and
    NCCL, under DDP). Data prep, pseudo-labels and evaluation run in one process.
    """
    if not 0 < cluster.shm_percent < 100:
        raise CdspError(f"CDSP_SHM_PERCENT={cluster.shm_percent}: a share of the memory limit, 1 to 99")

    def shm(setting: str) -> str:
        share = memory_bytes(setting, getattr(cluster, setting)) * cluster.shm_percent // 100
        return memory_text(share // 2**20 * 2**20)  # whole MiB, rounded down

    step = dict(cpu=cluster.step_cpu, memory=cluster.step_memory)
    return {"data-prep": Resources(**step),
            "train-classifier": Resources(**step, shm=shm("step_memory"), gpus="cls_gpus"),
            "pseudo-label": Resources(**step, gpus="cls_gpus"),
            "train-segmenter": Resources(cluster.seg_cpu, cluster.seg_memory, shm=shm("seg_memory"), gpus="gpus"),
            "evaluate": Resources(**step, gpus="cls_gpus")}


def resource_table(cluster: config.ClusterConfig) -> str:
    """`step_resources` as the Markdown table of the README."""
    rows = ["| step | CPU request | memory request = limit | of which /dev/shm | GPUs (`nvidia.com/gpu` limit) |",
            "| --- | --- | --- | --- | --- |"]
    for task, res in step_resources(cluster).items():
        rows.append(f"| {STEPS[task]} | {res.cpu} | {res.memory} | {res.shm or '-'} | "
                    f"{f'`{res.gpus}`' if res.gpus else '-'} |")
    return "\n".join(rows) + "\n"


def configure(task: dsl.PipelineTask, cluster: config.ClusterConfig, res: Resources, *, cache: bool,
              gpus: dsl.PipelineChannel | None = None) -> dsl.PipelineTask:
    """Resources (`res`, GPUs from the parameter `gpus`), retries, caching and credentials of one step."""
    task.set_retry(cluster.retries, backoff_duration="30s", backoff_factor=2.0, backoff_max_duration="3600s")
    task.set_caching_options(cache)
    task.set_cpu_request(res.cpu).set_memory_request(res.memory).set_memory_limit(res.memory)
    if gpus is not None:
        # KFP's driver reads a parameterised accelerator count as a string: for a number parameter
        # it gets "" and sets no limit, silently (resolvePodSpecInputRuntimeParameter in
        # kubeflow/pipelines backend/src/v2/driver/resolve.go, used by driver.go's initPodSpecPatch).
        if gpus.channel_type != "String":
            raise TypeError(f"{gpus.name}: a GPU count parameter must be a string for KFP's driver")
        task.set_accelerator_type(cluster.accelerator).set_accelerator_limit(gpus)
    if res.shm:  # PyTorch data-loader workers share batches through /dev/shm, 64 MB by default in a pod
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=res.shm)
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


def keep_data_in_store(task: dsl.PipelineTask, cluster: config.ClusterConfig) -> dsl.PipelineTask:
    """Tell data prep where the data store is (cdsp_core/datastore.py); the later steps read it from its record."""
    from cdsp_core import datastore

    return task.set_env_variable(datastore.ENV, datastore.root_for(cluster.pipeline_root, cluster.data_store))


def build_pipeline(cluster: config.ClusterConfig | None = None):
    """The pipeline (a kfp GraphComponent) for these cluster settings."""
    out_of_date = [str(path.relative_to(generate.REPO)) for path in generate.stale()]
    if out_of_date:  # a setting was added or changed without `make components`
        raise CdspError(f"{', '.join(out_of_date)}: out of date with cdsp_core/config.py; run `make components`")
    cluster = cluster or cluster_settings()
    resources = step_resources(cluster)

    def wire(**p: dsl.PipelineChannel) -> None:
        """The DAG, given the pipeline parameters (the body of the generated `cdsp(...)`)."""

        def step(function: Callable, name: str, *, cache: bool, **inputs) -> dsl.PipelineTask:
            """A task of the component `function` with the settings it takes; its pod as `step_resources` says."""
            res = resources[name]
            # The steps that may use a GPU run in the CUDA image.
            component = dsl.component(function, base_image=cluster.cuda_image if res.gpus else cluster.image,
                                      install_kfp_package=False)  # the image holds kfp, cdsp_core and components
            settings = {n: p[n] for n in inspect.signature(function).parameters if n in p}
            task = component(**inputs, **settings)
            return configure(task.set_display_name(STEPS[name]), cluster, res, cache=cache,
                             gpus=p[res.gpus] if res.gpus else None)

        run = dict(pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        # Never cached: the data under data_uri may change while the URI stays the same.
        prep = step(stages.data_prep, "data-prep", cache=False, pipeline_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                    **run)
        keep_data_in_store(prep, cluster)
        prepared = prep.outputs["prepared"]
        run["mlflow_run_id"] = prep.outputs["mlflow_run_id"]

        # The condition reads data_prep's single return value ("Output"): kfp's local runner
        # resolves that form of task output in a condition (a named NamedTuple field it cannot).
        with dsl.If(prep.outputs["Output"] == True, name="new-scribbles"):  # noqa: E712 (a KFP condition)
            # Training and CAMs are seeded functions of their inputs: a cache hit (same input
            # artifacts and settings) is as good as running them again.
            classifier = step(stages.train_classifier, "train-classifier", cache=True, prepared=prepared, **run)
            mirror_checkpoints(classifier, cluster)
            pseudo = step(stages.pseudo_label, "pseudo-label", cache=True, prepared=prepared,
                          classifier=classifier.outputs["classifier"], **run)
            segmenter = step(stages.train_segmenter, "train-segmenter", cache=True, prepared=prepared,
                             pseudo_labels=pseudo.outputs["pseudo_labels"], **run)
            mirror_checkpoints(segmenter, cluster)
            # Not cached: promotion compares with whichever model is champion now.
            step(stages.evaluate, "evaluate", cache=False, prepared=prepared, model=segmenter.outputs["model"],
                 fingerprint=prep.outputs["fingerprint"], model_version=segmenter.outputs["Output"], **run)

    return dsl.pipeline(parameters.pipeline_function(wire), name=PIPELINE_NAME,
                        pipeline_root=cluster.pipeline_root or None)


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
    try:
        cluster = cluster_settings()
        compile_pipeline(args.out, cluster)
    except CdspError as e:
        print(f"pipelines.cdsp_pipeline: error: {e}", file=sys.stderr)
        return 2
    print(f"compiled {args.out} (images {cluster.image}, {cluster.cuda_image}; pipeline root {cluster.pipeline_root})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
