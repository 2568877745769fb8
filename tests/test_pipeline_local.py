"""The local run entry point (`make demo`): arguments, synthetic data, and how it fails.

The whole DAG on data in S3, both branches of the data-fingerprint condition and the
retraining on new scribbles run in tests/test_schedule.py.
"""

from __future__ import annotations

import inspect
import re

from cdsp_core import config
from pipelines import local_run, parameters


def test_pipeline_arguments_are_every_parameter_preset_under_explicit_values():
    args = local_run.pipeline_arguments("cpu", {"epochs": 3, "l_lorm": 0.0, "backbone": None, "data_uri": "/d"})
    cdsp = inspect.signature(parameters.pipeline_function(lambda **p: None)).parameters  # the pipeline's
    assert list(args) == list(cdsp)
    assert args["epochs"] == 3 and args["l_lorm"] == 0.0 and args["data_uri"] == "/d"  # explicit values win
    assert args["backbone"] == config.PRESETS["cpu"]["backbone"]  # None is "unset": the preset's value
    assert args["label_smoothing"] == config.SegTrainConfig().label_smoothing  # neither: the default
    paper = local_run.pipeline_arguments("paper", {})
    assert paper == {name: p.default for name, p in cdsp.items()}


def test_synthetic_data_is_made_once_per_size(tmp_path):
    root = local_run.ensure_synthetic_data(tmp_path / "data", n_train=2, n_val=1, size=32)
    image = root / "JPEGImages" / "train_00000.jpg"
    stamp = image.stat().st_mtime_ns
    assert local_run.ensure_synthetic_data(tmp_path / "data", n_train=2, n_val=1, size=32) == root
    assert image.stat().st_mtime_ns == stamp
    assert (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split() == ["val_00000"]
    local_run.ensure_synthetic_data(tmp_path / "data", n_train=3, n_val=1, size=32)  # other numbers: made again
    assert len((root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()) == 3


def test_missing_dataset_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert local_run.main(["--out", str(tmp_path / "out"), "--data-uri", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "nowhere") in err and "no such dataset folder" in err
    assert not (tmp_path / "out" / "runs").exists()  # nothing started


def test_a_failing_step_ends_the_run_with_exit_2_naming_the_step(tmp_path, monkeypatch, capsys, s3):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = local_run.main(["--out", str(tmp_path / "out"), "--data-uri", "s3://no-such-bucket/voc"])
    out = capsys.readouterr()
    assert code == 2
    last = out.err.strip().splitlines()[-1]
    assert last == "local_run: error: step data-prep failed: s3://no-such-bucket/voc: no such bucket"
    log = re.sub(r"\x1b\[[0-9;]*m", "", out.out)  # kfp colours task names
    assert log.count("Executing task 'data-prep'") == 1  # failed once: not retried locally
    run = next((tmp_path / "out" / "runs").iterdir())
    assert [p.name for p in run.iterdir()] in ([], ["data-prep"])
    assert not (run / "data-prep" / "prepared" / "manifest.json").exists()  # no half-written dataset
