"""`cdsp bench`: a tiny real bench (synthetic data, 1 epoch), its outputs, MLflow runs, resume and bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from tiny_data import tiny_dataset

from cdsp_core import bench, cli, config, train

# Tiny everything: 4 training images of 32 px, batches of 2, one epoch per stage.
TINY = ["--preset", "cpu", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "2", "--crop-size", "32",
        "--cls-epochs", "1", "--cls-warmup-epochs", "0", "--cls-batch-size", "2", "--cls-crop-size", "32",
        "--cls-workers", "0", "--workers", "0", "--cam-scales", "1.0", "--n-overlays", "0", "--device", "cpu"]
RUNS = "scribble-only,cdsp,scribble-only-drop0.5"


def test_runs_switch_exactly_their_loss_terms():
    cfg = config.build(config.SegTrainConfig, "cpu", {"l_pseudo": 0.5})
    weights = {r.name: train.loss_weights(bench.run_config(r, cfg, 7)) for r in bench.RUNS}
    assert weights["scribble-only"] == {"seg": 1.0, "pseudo": 0.0, "lorm": 0.0, "ds": 0.0, "dc": 0.0}
    assert weights["pseudo-only"] == {"seg": 0.0, "pseudo": 0.5, "lorm": 0.0, "ds": 0.0, "dc": 0.0}
    assert weights["scribble+pseudo+del"] == {"seg": 1.0, "pseudo": 0.5, "lorm": 0.0, "ds": 1.0, "dc": 1.0}
    cdsp = {"seg": 1.0, "pseudo": 0.5, "lorm": 1.0, "ds": 1.0, "dc": 1.0}
    assert weights["cdsp"] == weights["cdsp-shrink0.5"] == cdsp
    assert weights["cdsp-paper-lorm"] == cdsp
    full = bench.run_config(bench.RUNS_BY_NAME["full-supervision"], cfg, 7)
    assert full.seg_target == "gt" and full.seed == 7
    # the paper-LoRM row overrides the preset's LoRM settings, and only those
    ours = replace(cfg, lorm_scope="foreground", lorm_temperature=0.1, lorm_distance="cosine")
    paper = bench.run_config(bench.RUNS_BY_NAME["cdsp-paper-lorm"], ours, 7)
    assert (paper.lorm_scope, paper.lorm_temperature, paper.lorm_distance) == ("all", 1.0, "squared")
    cdsp_run = bench.run_config(bench.RUNS_BY_NAME["cdsp"], ours, 7)
    assert paper == replace(cdsp_run, lorm_scope="all", lorm_temperature=1.0, lorm_distance="squared")
    assert [r.name for r in bench.select_runs("all")] == [
        "scribble-only", "pseudo-only", "scribble+pseudo", "scribble+pseudo+lorm", "scribble+pseudo+del", "cdsp",
        "cdsp-paper-lorm", "full-supervision",
        "cdsp-drop0.5", "scribble-only-drop0.5", "cdsp-shrink0.5", "scribble-only-shrink0.5"]


@pytest.mark.slow
def test_tiny_bench_writes_results_logs_mlflow_and_resumes(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    data = tiny_dataset(tmp_path / "data", n_train=4, n_val=2, size=32)
    original = {p.name: p.read_bytes() for p in (data / "pascal_2012_scribble").iterdir()}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "bench"
    argv = ["bench", "--data", str(data), "--out", str(out), "--runs", RUNS, "--seeds", "2", *TINY]
    assert cli.main([*argv, "--jobs", "2"]) == 0  # two runs at a time, in worker processes
    printed = capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    rows = results["runs"]
    assert [r["name"] for r in rows] == RUNS.split(",")
    for r in rows:
        assert {"name", "losses", "scribbles", "miou", "per_class_iou", "seconds"} <= set(r)
        m = r["miou"]
        assert len(m["per_seed"]) == 2 and r["seeds"] == [0, 1]
        assert all(0.0 <= v <= 1.0 for v in (m["mean"], m["std"], m["min"], m["max"], *m["per_seed"]))
        assert m["min"] <= m["mean"] <= m["max"]
        assert m["mean"] == pytest.approx(sum(m["per_seed"]) / 2)
        assert r["per_class_iou"] and all(0.0 <= v <= 1.0 for v in r["per_class_iou"].values())
        assert r["seconds"] > 0
        for seed, miou in zip(r["seeds"], m["per_seed"]):  # the per-seed value is the evaluation's own
            metrics = json.loads((out / "runs" / r["name"] / f"seed{seed}" / "eval" / "metrics.json").read_text())
            assert metrics["miou"] == pytest.approx(miou, abs=5e-5)  # logged to 4 decimals
    by_name = {r["name"]: r for r in rows}
    assert set(by_name["scribble-only"]["losses"]) == {"seg"} and by_name["scribble-only"]["scribbles"] == "clean"
    assert set(by_name["cdsp"]["losses"]) == set(train.LOSS_TERMS)
    assert by_name["scribble-only-drop0.5"]["scribbles"] == "drop(0.5)"
    # Stage 1 ran for the clean scribbles only (the one run using pseudo-labels), with its quality measured.
    assert set(results["stage1"]) == {"clean"}
    assert 0.0 <= results["stage1"]["clean"]["pseudo_miou"] <= 1.0
    assert by_name["cdsp"]["pseudo_miou"] == results["stage1"]["clean"]["pseudo_miou"]
    assert [c["target"] for c in results["checks"]] == ["cdsp >= scribble-only + 0.03 mIoU"]
    # The training view of drop(0.5): degraded scribbles, the train split and the first val images
    # (the per-epoch val_miou curve: --curve-val-images, 20 by default); the originals untouched.
    view = out / "data" / "drop0.5"
    assert json.loads((view / "manifest.json").read_text()) == {"scribble_dir": "scribbles_drop0.5",
                                                                "split_dir": "bench_splits"}
    assert sorted(p.name for p in (view / "bench_splits").iterdir()) == ["train.txt", "val.txt"]
    all_val = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert (view / "bench_splits" / "val.txt").read_text().split() == all_val[:20]
    assert len(list((view / "scribbles_drop0.5").glob("*.png"))) == 6
    assert {p.name: p.read_bytes() for p in (data / "pascal_2012_scribble").iterdir()} == original

    md = (out / "results.md").read_text()
    assert "| run | scribbles | L_seg | L_pseudo | LoRM | L_ds | L_dc | mIoU |" in md
    assert "output stride 8 (no max-pool in the stem), adamw lr 0.003, 1 epochs" in md  # the cpu preset's recipe
    for r in rows:
        assert f"| {r['name']} | {r['scribbles']} |" in md
    assert f"{100 * by_name['cdsp']['miou']['mean']:.1f} ± {100 * by_name['cdsp']['miou']['std']:.1f}" in md

    # One MLflow run per (run, seed), in one experiment, with the evaluation's mIoU; plus the summary run.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("cdsp-bench")
    logged = client.search_runs([exp.experiment_id], "tags.`cdsp.stage` = 'pipeline'")
    per_run = {(x.data.tags["cdsp.bench_run"], x.data.tags["cdsp.seed"]): x for x in logged
               if x.data.tags.get("cdsp.bench_run") != "summary"}
    assert set(per_run) == {(n, s) for n in RUNS.split(",") for s in ("0", "1")}
    assert all(x.info.run_name == f"{n} · s{s}" for (n, s), x in per_run.items())
    # The compare page of those runs; the store is a database, not a server: the UI's address, and how to start it.
    line = next(x for x in printed.splitlines() if x.startswith("compare in MLflow"))
    assert line.startswith("compare in MLflow (6 runs): http://127.0.0.1:5000/#/compare-runs?runs=")
    assert all(x.info.run_id in line for x in per_run.values())
    assert f"(the runs are in {uri}, not on a server: start the UI with `mlflow server" in printed
    x = per_run["cdsp", "1"]
    assert x.data.metrics["miou"] == pytest.approx(by_name["cdsp"]["miou"]["per_seed"][1], abs=5e-5)
    assert x.data.params["l_lorm"] == "1.0" and per_run["scribble-only", "0"].data.params["l_lorm"] == "0.0"
    summary = [x for x in logged if x.data.tags.get("cdsp.bench_run") == "summary"]
    assert len(summary) == 1
    assert summary[0].data.metrics["miou_cdsp"] == pytest.approx(by_name["cdsp"]["miou"]["mean"], abs=5e-5)

    # A rerun with the same settings reuses every finished step: nothing is trained again; a run
    # whose result is missing (interrupted after training) resumes from its checkpoint.
    model = out / "runs" / "cdsp" / "seed0" / "model" / "model.pt"
    checkpoint = out / "runs" / "scribble-only" / "seed1" / "model" / "checkpoint.pt"
    (checkpoint.parent.parent / "result.json").unlink()
    stamps = model.stat().st_mtime_ns, checkpoint.stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert (model.stat().st_mtime_ns, checkpoint.stat().st_mtime_ns) == stamps
    again = json.loads((out / "results.json").read_text())["runs"]
    assert [r["miou"] for r in again] == [r["miou"] for r in rows]
    assert "cdsp " in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data", n_train=2, n_val=1, size=32)
    assert cli.main(["bench", "--data", str(data), "--out", str(tmp_path / "b"), "--runs", "cdsp,nonsense"]) == 2
    err = capsys.readouterr().err
    assert "nonsense" in err and "scribble-only" in err and len(err.strip().splitlines()) == 1

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert cli.main(["bench", "--data", str(data), "--out", str(mine), "--runs", "scribble-only", *TINY]) == 2
    assert "not a bench folder" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1

    assert cli.main(["bench", "--data", str(data), "--out", str(tmp_path / "c"), "--l-dc", "0", *TINY]) == 2
    assert "bench run scribble+pseudo+del needs L_dc" in capsys.readouterr().err  # the first row with L_dc

    for gt in (data / "SegmentationClass").glob("val_*.png"):
        gt.unlink()
    assert cli.main(["bench", "--data", str(data), "--out", str(tmp_path / "d"), *TINY]) == 2
    assert "no val images with ground truth" in capsys.readouterr().err


def test_the_cpu_pretrained_preset_checks_the_real_photo_targets():
    rows = {name: {"miou": {"mean": v}} for name, v in
            {"cdsp": 0.70, "scribble-only": 0.66, "full-supervision": 0.76}.items()}
    real = {c["target"]: (round(c["value"], 4), c["met"], c["unit"]) for c in bench.checks(rows, "cpu-pretrained")}
    assert real == {
        "full-supervision >= 0.72 mIoU (86% of the fully supervised ceiling 0.834)": (0.76, True, "miou"),
        "cdsp >= scribble-only + 0.03 mIoU": (0.04, True, "points"),
        "cdsp >= 90% of full-supervision": (0.9211, True, "share"),
        "moonshot: cdsp >= 0.75 mIoU (90% of the ceiling)": (0.70, False, "miou")}
    synthetic = [c["target"] for c in bench.checks(rows, "cpu")]
    assert synthetic == ["cdsp >= scribble-only + 0.03 mIoU", "cdsp >= 95% of full-supervision"]
