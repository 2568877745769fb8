"""The generated component functions and pipeline parameters: current, plain, and where a traceback says.

`components/stages.py` and `pipelines/parameters.py` are written by `make components` from
cdsp_core/config.py (components/generate.py) and checked in.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from kfp import dsl

from cdsp_core import config
from cdsp_core.errors import CdspError
from components import generate, stages
from pipelines import parameters

REPO = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).parent / "ruff"


def test_the_generated_files_are_what_make_components_writes_from_the_config():
    for path, text in generate.rendered().items():
        assert path.read_text(encoding="utf-8") == text, f"{path.relative_to(REPO)} is out of date: run make components"
    assert generate.main(["--check"]) == 0


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_new_config_field_reaches_its_component_and_the_pipeline_after_make_components(monkeypatch, tmp_path,
                                                                                           capsys):
    # a field added to SegTrainConfig, as main will add `aspp_rates`
    extended = dataclasses.make_dataclass(
        "SegTrainConfig", [("aspp_rates", str, config.opt("6,12,18,24", "dilation rates of the ASPP branches"))],
        bases=(config.SegTrainConfig,))
    monkeypatch.setattr(config, "ALL_CONFIGS", tuple(extended if c is config.SegTrainConfig else c
                                                     for c in config.ALL_CONFIGS))
    monkeypatch.setattr(generate, "COMPONENTS", tuple(dataclasses.replace(c, config=extended)
                                                      if c.config is config.SegTrainConfig else c
                                                      for c in generate.COMPONENTS))
    # the checked-in files no longer match (so the test above fails) ...
    assert generate.stale() == [generate.STAGES, generate.PARAMETERS]
    assert generate.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "components/stages.py: out of date with cdsp_core/config.py; run `make components`" in err

    # ... until `make components` writes them again (here into a copy of the layout)
    (tmp_path / "components").mkdir()
    (tmp_path / "pipelines").mkdir()
    monkeypatch.setattr(generate, "REPO", tmp_path)
    monkeypatch.setattr(generate, "STAGES", tmp_path / "components" / "stages.py")
    monkeypatch.setattr(generate, "PARAMETERS", tmp_path / "pipelines" / "parameters.py")
    assert generate.main([]) == 0 and generate.stale() == []
    component = load(generate.STAGES, "stages_with_aspp").train_segmenter
    assert inspect.signature(component).parameters["aspp_rates"].default == "6,12,18,24"
    assert "        aspp_rates=aspp_rates,\n" in inspect.getsource(component)  # into the stage's config
    assert "aspp_rates: dilation rates of the ASPP branches" in component.__doc__  # kfp's input description
    received = {}
    cdsp = load(generate.PARAMETERS, "parameters_with_aspp").pipeline_function(lambda **p: received.update(p))
    assert inspect.signature(cdsp).parameters["aspp_rates"].default == "6,12,18,24"
    cdsp()
    assert received["aspp_rates"] == "6,12,18,24" and list(received) == [p.name for p in generate.pipeline_params()]
    # and the files are still plain, ruff-clean Python
    proc = subprocess.run([str(RUFF), "check", "--no-cache", "--config", str(REPO / "pyproject.toml"),
                           str(generate.STAGES), str(generate.PARAMETERS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_component_is_a_typed_function_in_a_real_file_and_kfp_ships_that_source():
    for c in generate.COMPONENTS:
        function = getattr(stages, c.name)
        assert inspect.getsourcefile(function) == str(REPO / "components" / "stages.py")
        sig = inspect.signature(function)
        for p in c.params():
            assert sig.parameters[p.name].annotation is {"str": str, "int": int, "float": float, "bool": bool}[p.type]
            assert sig.parameters[p.name].default == p.default, (c.name, p.name)
        component = dsl.component(function, base_image="cdsp-cuda:test", install_kfp_package=False)
        assert inspect.getsource(function) in component.component_spec.implementation.container.command[-1]
    assert inspect.signature(stages.train_segmenter).parameters["model"].annotation == dsl.Output[dsl.Model]
    cdsp = parameters.pipeline_function(lambda **p: None)
    assert inspect.getsourcefile(cdsp) == str(REPO / "pipelines" / "parameters.py")
    assert list(inspect.signature(cdsp).parameters) == [p.name for p in generate.pipeline_params()]


def test_a_failing_step_has_a_traceback_of_real_files_and_lines(tmp_path):
    with pytest.raises(CdspError, match="gpus='two': not a GPU count") as e:
        stages.data_prep(prepared=dsl.Dataset(uri=str(tmp_path / "prepared")),
                         data_report=dsl.Markdown(uri=str(tmp_path / "report")), fingerprint=str(tmp_path / "fp"),
                         mlflow_run_id=str(tmp_path / "run"), data_uri="s3://data/voc", gpus="two")
    frames = traceback.extract_tb(e.tb)
    where = [(Path(f.filename).relative_to(REPO).as_posix(), f.name) for f in frames
             if Path(f.filename).is_relative_to(REPO)]
    assert where == [("tests/test_components.py", "test_a_failing_step_has_a_traceback_of_real_files_and_lines"),
                     ("components/stages.py", "data_prep"), ("components/steps.py", "data_prep_step"),
                     ("components/steps.py", "gpu_count")]
    assert all(f.line for f in frames)  # each frame's line is read from its file
