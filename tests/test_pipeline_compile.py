"""The compiled Kubeflow pipeline: parameters from the typed config, five tasks, GPU, retries, no secrets."""

from __future__ import annotations

import inspect
import math
import os
import re
import subprocess
import sys

import pytest
import yaml
from kfp import components

from cdsp_core import config
from cdsp_core.errors import CdspError
from pipelines import cdsp_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KFP_TYPES = {"str": "STRING", "int": "NUMBER_INTEGER", "float": "NUMBER_DOUBLE", "bool": "BOOLEAN"}
TASKS = {"data-prep", "train-classifier", "pseudo-label", "train-segmenter", "evaluate"}
# Fake credentials: if any of them reaches the compiled YAML, the test fails.
FAKE_SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAFAKECDSPKEY123456", "AWS_SECRET_ACCESS_KEY": "fake-cdsp-s3-secret-9f8e7d",
                "MLFLOW_TRACKING_USERNAME": "fake-cdsp-user-5a4b", "MLFLOW_TRACKING_PASSWORD": "fake-cdsp-pw-3c2d1e",
                "MLFLOW_TRACKING_URI": "http://fake-cdsp-user-5a4b:fake-cdsp-pw-3c2d1e@mlflow.invalid"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The pipeline compiled by its CLI, with fake credentials in the environment."""
    path = tmp_path_factory.mktemp("compiled") / "cdsp_pipeline.yaml"
    env = {**os.environ, **FAKE_SECRETS, "CDSP_PIPELINE_ROOT": "s3://test-bucket/kfp-root", "CDSP_RETRIES": "3"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cdsp_pipeline", "--out", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = path.read_text()
    spec, platform = yaml.safe_load_all(text)  # the pipeline spec, then the Kubernetes platform spec
    return path, text, {**spec, **platform}


def all_fields():
    return [f for cls in (config.PipelineConfig, *config.ALL_CONFIGS) for f in config.fields_of(cls)]


def same_default(got, want) -> bool:
    if isinstance(want, bool) or isinstance(want, str):
        return got == want
    return math.isclose(float(got), float(want), rel_tol=1e-12)


def test_pipeline_parameters_equal_the_config_fields(compiled):
    _, _, ir = compiled
    params = ir["root"]["inputDefinitions"]["parameters"]
    fields = all_fields()
    assert sorted(params) == sorted(f.name for f in fields)
    for f in fields:
        assert params[f.name]["parameterType"] == KFP_TYPES[f.type], f.name
        assert same_default(params[f.name]["defaultValue"], f.default), (f.name, params[f.name], f.default)
        assert params[f.name].get("description"), f.name  # the help text reaches the KFP UI


def test_components_take_their_stage_settings(compiled):
    _, _, ir = compiled
    comps = ir["components"]
    expect = {"comp-train-classifier": config.ClassifierConfig, "comp-pseudo-label": config.PseudoLabelConfig,
              "comp-train-segmenter": config.SegTrainConfig, "comp-evaluate": config.EvalConfig}
    for name, cls in expect.items():
        inputs = comps[name]["inputDefinitions"]["parameters"]
        for f in config.fields_of(cls):
            assert inputs[f.name]["parameterType"] == KFP_TYPES[f.type], (name, f.name)
            assert same_default(inputs[f.name]["defaultValue"], f.default), (name, f.name)
    # and the embedded source really has that signature: run it as kfp's executor would
    command = ir["deploymentSpec"]["executors"]["exec-train-segmenter"]["container"]["command"]
    namespace: dict = {}
    exec(compile(command[-1], "ephemeral_component.py", "exec"), namespace)
    sig = inspect.signature(namespace["train_segmenter"])
    for f in config.fields_of(config.SegTrainConfig):
        assert sig.parameters[f.name].default == f.default, f.name


def test_yaml_loads_back_with_five_tasks_gpu_retries_and_caching(compiled):
    path, _, ir = compiled
    component = components.load_component_from_file(str(path))
    assert component.name == cdsp_pipeline.PIPELINE_NAME
    assert set(component.component_spec.inputs) == {f.name for f in all_fields()}

    executors = ir["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{t}" for t in TASKS}
    # the four training stages sit under the data-fingerprint condition
    root_tasks = ir["root"]["dag"]["tasks"]
    assert set(root_tasks) == {"data-prep", "condition-1"}
    condition = root_tasks["condition-1"]["triggerPolicy"]["condition"]
    assert "pipelinechannel--data-prep-Output" in condition and "== true" in condition
    inner = ir["components"]["comp-condition-1"]["dag"]["tasks"]
    assert set(inner) == TASKS - {"data-prep"}

    seg = executors["exec-train-segmenter"]["container"]["resources"]
    assert seg["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "pipelinechannel--gpus" in seg["accelerator"]["resourceCount"]  # the `gpus` pipeline parameter
    assert seg["resourceCpuRequest"] and seg["resourceMemoryLimit"]
    assert "pipelinechannel--cls_gpus" in executors["exec-train-classifier"]["container"]["resources"][
        "accelerator"]["resourceCount"]

    tasks = {**inner, "data-prep": root_tasks["data-prep"]}
    for name, task in tasks.items():
        assert task["retryPolicy"]["maxRetryCount"] == 3, name  # CDSP_RETRIES at compile time
    cached = {name for name, task in tasks.items() if task.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"train-classifier", "pseudo-label", "train-segmenter"}
    assert ir["defaultPipelineRoot"] == "s3://test-bucket/kfp-root"


def test_kubernetes_settings_secrets_and_shared_memory(compiled):
    _, _, ir = compiled
    k8s = ir["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == {f"exec-{t}" for t in TASKS}
    for name, spec in k8s.items():
        envs = {(s["secretName"], m["envVar"]) for s in spec["secretAsEnv"] for m in s["keyToEnv"]}
        assert ("cdsp-s3", "AWS_SECRET_ACCESS_KEY") in envs and ("cdsp-mlflow", "MLFLOW_TRACKING_URI") in envs, name
    shm = k8s["exec-train-segmenter"]["emptyDirMounts"][0]
    assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"


def test_no_secret_in_the_compiled_yaml(compiled):
    _, text, ir = compiled
    for name, value in FAKE_SECRETS.items():
        assert value not in text, name
    # credentials are never pipeline parameters either
    params = " ".join(ir["root"]["inputDefinitions"]["parameters"]).lower()
    assert not any(word in params for word in ("secret", "password", "access_key", "token"))


def test_cluster_settings_come_from_the_environment():
    cluster = cdsp_pipeline.cluster_settings({"CDSP_IMAGE": "reg.example/cdsp-cpu:9", "CDSP_RETRIES": "5"})
    assert cluster.image == "reg.example/cdsp-cpu:9" and cluster.retries == 5
    assert cluster.cuda_image == config.ClusterConfig().cuda_image


def test_training_steps_know_where_to_mirror_their_checkpoints(compiled, tmp_path):
    _, _, ir = compiled
    executors = ir["deploymentSpec"]["executors"]

    def env(task: str) -> dict:
        return {e["name"]: e["value"] for e in executors[f"exec-{task}"]["container"].get("env", [])}

    # default: <pipeline_root>/checkpoints (the fixture compiles with CDSP_PIPELINE_ROOT=s3://test-bucket/kfp-root)
    for task in ("train-classifier", "train-segmenter"):
        assert env(task)["CDSP_CHECKPOINT_ROOT"] == "s3://test-bucket/kfp-root/checkpoints", task
    for task in ("data-prep", "pseudo-label", "evaluate"):
        assert "CDSP_CHECKPOINT_ROOT" not in env(task), task
    # CDSP_CHECKPOINT_ROOT at compile time picks another place
    path = tmp_path / "p.yaml"
    proc = subprocess.run([sys.executable, "-m", "pipelines.cdsp_pipeline", "--out", str(path)], cwd=REPO,
                          env={**os.environ, "CDSP_CHECKPOINT_ROOT": "s3://ckpt-bucket/cdsp"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    spec = next(yaml.safe_load_all(path.read_text()))
    seg_env = spec["deploymentSpec"]["executors"]["exec-train-segmenter"]["container"]["env"]
    assert {"name": "CDSP_CHECKPOINT_ROOT", "value": "s3://ckpt-bucket/cdsp"} in seg_env


def test_data_prep_knows_the_data_store_and_only_it(compiled):
    _, _, ir = compiled
    executors = ir["deploymentSpec"]["executors"]
    envs = {name.removeprefix("exec-"): {e["name"]: e["value"] for e in ex["container"].get("env", [])}
            for name, ex in executors.items()}
    # default: <pipeline_root>/datastore; the later steps read the store from data prep's record
    assert envs["data-prep"]["CDSP_DATA_STORE"] == "s3://test-bucket/kfp-root/datastore"
    assert [task for task, env in envs.items() if "CDSP_DATA_STORE" in env] == ["data-prep"]
    assert cdsp_pipeline.cluster_settings({"CDSP_DATA_STORE": "s3://data/store"}).data_store == "s3://data/store"


# ---------------------------------------------------------------------------- GPUs as KFP's driver applies them

# KFP's driver makes `resources.accelerator.resourceCount` ("{{$.inputs.parameters['<name>']}}")
# a pod limit only when that parameter holds a *string* value: resolvePodSpecInputRuntimeParameter
# (kubeflow/pipelines, backend/src/v2/driver/resolve.go) returns val.GetStringValue(), which is ""
# for a number, and initPodSpecPatch (driver.go) then sets no limit, silently. The API server keeps
# a run argument in its parameter's declared type (it refuses any other), a DAG's STRING input
# turns other values into text, and the task's `pipelinechannel--*` inputs are passed on as they
# are. `driver_gpu_limit` follows that chain through the compiled YAML.
PLACEHOLDER = re.compile(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}")
GPU_STEPS = {"train-classifier": "cls_gpus", "pseudo-label": "cls_gpus", "train-segmenter": "gpus",
             "evaluate": "cls_gpus"}


def driver_gpu_limit(ir: dict, task: str, arguments: dict) -> str | None:
    """The accelerator limit KFP's driver puts on `task`'s pod for these run arguments (None: no limit)."""
    executor = ir["deploymentSpec"]["executors"][f"exec-{task}"]["container"]
    count = executor.get("resources", {}).get("accelerator", {}).get("resourceCount")
    if count is None:
        return None
    name = PLACEHOLDER.fullmatch(count)[1]
    dags = {"root": ir["root"], **{k: v for k, v in ir["components"].items() if "dag" in v}}
    # from the task up to the root: the input of each enclosing DAG that feeds the parameter
    inputs, component = [], f"comp-{task}"
    while component != "root":
        dag, tasks = next((d, spec["dag"]["tasks"]) for d, spec in dags.items()
                          if any(t["componentRef"]["name"] == component for t in spec["dag"]["tasks"].values()))
        binding = next(t for t in tasks.values() if t["componentRef"]["name"] == component)["inputs"]["parameters"]
        name = binding[name]["componentInputParameter"]
        inputs.append((dag, name, dags[dag]["inputDefinitions"]["parameters"][name]))
        component = dag
    _, root_name, root_spec = inputs.pop()
    value = arguments.get(root_name, root_spec.get("defaultValue"))
    value = value if root_spec["parameterType"] == "STRING" else float(value)  # the kind the API server accepts
    for _, _, spec in reversed(inputs):  # down the enclosing DAGs: a STRING input turns a value into text
        if spec["parameterType"] == "STRING" and not isinstance(value, str):
            value = f"{value:g}"
    return (value if isinstance(value, str) else "") or None  # GetStringValue(); "" sets no limit


def test_every_gpu_step_requests_its_gpus_in_the_form_the_driver_applies(compiled, tmp_path):
    _, _, ir = compiled
    executors = ir["deploymentSpec"]["executors"]
    for task, param in GPU_STEPS.items():
        accelerator = executors[f"exec-{task}"]["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu", task
        assert PLACEHOLDER.fullmatch(accelerator["resourceCount"]), task
        assert ir["root"]["inputDefinitions"]["parameters"][param]["parameterType"] == "STRING", param
        assert driver_gpu_limit(ir, task, {}) == "1", task  # the defaults
    assert "accelerator" not in executors["exec-data-prep"]["container"]["resources"]
    assert driver_gpu_limit(ir, "train-segmenter", {"gpus": "2"}) == "2"
    assert {t: driver_gpu_limit(ir, t, {"gpus": "2", "cls_gpus": "0"}) for t in GPU_STEPS} == {
        "train-classifier": "0", "pseudo-label": "0", "train-segmenter": "2", "evaluate": "0"}

    # what the pipeline did before: an integer parameter as the limit compiles the same way, and
    # the driver sets no limit for it
    from kfp import compiler, dsl

    def step(gpus: int) -> int:
        return gpus

    def numbers(gpus: int = 2):
        component(gpus=gpus).set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)

    # real types for kfp (this module's `from __future__ import annotations` leaves it strings)
    step.__annotations__, numbers.__annotations__ = {"gpus": int, "return": int}, {"gpus": int}
    component = dsl.component(step, base_image="python:3.11")
    numbers = dsl.pipeline(numbers)

    compiler.Compiler().compile(numbers, str(tmp_path / "numbers.yaml"))
    old = yaml.safe_load(open(tmp_path / "numbers.yaml"))
    assert PLACEHOLDER.fullmatch(old["deploymentSpec"]["executors"]["exec-step"]["container"]["resources"]
                                 ["accelerator"]["resourceCount"])
    assert driver_gpu_limit(old, "step", {}) is None


def test_a_gpu_count_that_is_not_a_whole_number_stops_data_prep_before_any_gpu_step():
    from components import steps

    assert steps.gpu_count("gpus", "2") == 2 and steps.gpu_count("cls_gpus", "0") == 0
    for value in ("two", "1.5", "", " 2", "-1"):  # what the driver would refuse, or make no limit of
        with pytest.raises(CdspError, match=f"^gpus={re.escape(repr(value))}: not a GPU count; give a whole number"):
            steps.data_prep_step(prepared=None, data_report=None, fingerprint=None, mlflow_run_id=None,
                                 pipeline_run_id="run-1", data_uri="s3://data/voc", scribble_dir="s", split_dir="",
                                 force_train=False, cls_gpus="1", gpus=value)


# ---------------------------------------------------------------------------- memory and /dev/shm


def test_every_pod_has_memory_request_equal_limit_and_its_shm_inside_the_limit(compiled):
    _, _, ir = compiled
    executors = ir["deploymentSpec"]["executors"]
    k8s = ir["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # the defaults (the fixture sets no resource variable): shm is 25% of the limit, where workers use it
    want = {"data-prep": ("4", "16Gi", None), "train-classifier": ("4", "16Gi", "4Gi"),
            "pseudo-label": ("4", "16Gi", None), "train-segmenter": ("8", "48Gi", "12Gi"),
            "evaluate": ("4", "16Gi", None)}
    assert set(want) == TASKS
    for task, (cpu, memory, shm) in want.items():
        res = executors[f"exec-{task}"]["container"]["resources"]
        assert (res["resourceCpuRequest"], res["resourceMemoryRequest"], res["resourceMemoryLimit"]) == \
            (cpu, memory, memory), task
        mounts = k8s[f"exec-{task}"].get("emptyDirMounts", [])
        assert [m["sizeLimit"] for m in mounts] == ([shm] if shm else []), task
        if shm:
            assert mounts[0]["mountPath"] == "/dev/shm" and mounts[0]["medium"] == "Memory"
            limit = cdsp_pipeline.memory_bytes("memory", res["resourceMemoryLimit"])
            assert cdsp_pipeline.memory_bytes("shm", shm) == limit * config.ClusterConfig().shm_percent // 100


def test_resources_follow_the_cluster_settings_and_bad_ones_are_named():
    cluster = cdsp_pipeline.cluster_settings({"CDSP_SEG_MEMORY": "60Gi", "CDSP_SHM_PERCENT": "10",
                                              "CDSP_STEP_MEMORY": "1500M"})
    res = cdsp_pipeline.step_resources(cluster)
    assert (res["train-segmenter"].memory, res["train-segmenter"].shm) == ("60Gi", "6Gi")
    assert (res["train-classifier"].memory, res["train-classifier"].shm) == ("1500M", "143Mi")  # whole MiB, down
    assert res["pseudo-label"].shm == res["evaluate"].shm == res["data-prep"].shm == ""
    for env, message in [({"CDSP_SHM_PERCENT": "100"}, "CDSP_SHM_PERCENT=100: a share of the memory limit, 1 to 99"),
                         ({"CDSP_SEG_MEMORY": "48GB"}, "CDSP_SEG_MEMORY='48GB': not a memory quantity"),
                         ({"CDSP_RETRIES": "two"}, "CDSP_RETRIES='two': not a whole number")]:
        with pytest.raises(CdspError) as err:
            cdsp_pipeline.step_resources(cdsp_pipeline.cluster_settings(env))
        assert str(err.value).startswith(message), (env, str(err.value))
    proc = subprocess.run([sys.executable, "-m", "pipelines.cdsp_pipeline", "--out", "/nonexistent/p.yaml"], cwd=REPO,
                          env={**os.environ, "CDSP_STEP_MEMORY": "lots"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["pipelines.cdsp_pipeline: error: CDSP_STEP_MEMORY='lots': not a memory "
                                        "quantity (e.g. 16Gi, 48Gi, 512Mi)"]


def test_the_readme_states_the_resources_each_step_gets():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert cdsp_pipeline.resource_table(config.ClusterConfig()) in readme
