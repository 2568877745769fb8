"""Scribbles → classifier → CAM pseudo-labels → CDSP segmenter → evaluation, through the `cdsp` CLI.

A tiny run on the synthetic data (the `cpu` preset shrunk further): it must learn, i.e. lower
its losses and beat the mIoU of the same network untrained.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cdsp_core import cli, evaluate, modelfolder, synth
from cdsp_core.config import EvalConfig

# 6 epochs of 4 steps: at the cpu preset's lr 3e-3, 3 epochs of 2 steps do not get past the
# warm-up's overshoot (the CE of epoch 3 above epoch 1's), so a lower loss would be chance
N_TRAIN, N_VAL, SIZE, EPOCHS = 16, 6, 40, 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cdsp(*args: str) -> None:
    assert cli.main([str(a) for a in args]) == 0, args


@pytest.mark.slow
def test_scribbles_to_a_segmenter_that_learns(tmp_path):
    data, cls, pseudo, seg = (tmp_path / n for n in ("data", "cls", "pseudo", "seg"))
    synth.make_dataset(data, n_train=N_TRAIN, n_val=N_VAL, size=SIZE, seed=0)

    cdsp("train-classifier", "--data", data, "--out", cls, "--preset", "cpu", "--device", "cpu", "--cls-epochs", 3,
         "--cls-batch-size", 8, "--cls-crop-size", SIZE, "--cls-scribble-ce", 1.0)
    cdsp("pseudo-label", "--data", data, "--classifier", cls, "--out", pseudo, "--preset", "cpu", "--device", "cpu",
         "--cam-scales", "1.0", "--cam-random-walk", "--cam-threshold", 0.5)
    cdsp("train-seg", "--data", data, "--pseudo", pseudo, "--out", seg, "--preset", "cpu", "--device", "cpu",
         "--epochs", EPOCHS, "--batch-size", 4, "--crop-size", SIZE)
    cdsp("evaluate", "--data", data, "--model", seg, "--out", tmp_path / "eval", "--device", "cpu")

    cls_hist = json.loads((cls / "history.json").read_text())
    assert {"loss_cls", "loss_scribble_ce"} <= set(cls_hist[0])
    assert cls_hist[-1]["loss"] < cls_hist[0]["loss"]

    summary = json.loads((pseudo / "summary.json").read_text())
    assert summary["n_images"] == N_TRAIN and 0.3 < summary["pseudo_miou"] <= 1  # scribbles + random walk
    assert len(list((pseudo / "distance_boundary").iterdir())) == N_TRAIN

    hist = json.loads((seg / "history.json").read_text())
    assert [h["epoch"] for h in hist] == list(range(1, EPOCHS + 1))
    assert {"loss_seg", "loss_pseudo", "loss_lorm", "loss_ds", "loss_dc", "val_miou"} <= set(hist[0])
    assert hist[-1]["loss"] < hist[0]["loss"]

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["miou"] == pytest.approx(hist[-1]["val_miou"])  # the per-epoch val mIoU is the real one

    # the same network, untrained
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(seg / "config.json", untrained)
    info = modelfolder.read_config(untrained)
    torch.manual_seed(info["seed"])
    torch.save(modelfolder.build_model(info).state_dict(), untrained / "model.pt")
    before = evaluate.evaluate(str(data), str(untrained), str(tmp_path / "eval0"), EvalConfig(), device="cpu")
    print(f"classifier loss {cls_hist[0]['loss']:.3f} -> {cls_hist[-1]['loss']:.3f}; pseudo-label mIoU "
          f"{summary['pseudo_miou']:.3f}; segmenter loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f}; "
          f"val mIoU {metrics['miou']:.3f} (untrained {before['miou']:.3f}), pixel accuracy "
          f"{metrics['pixel_acc']:.3f} (untrained {before['pixel_acc']:.3f})")
    assert metrics["miou"] > before["miou"] + 0.03
    assert metrics["pixel_acc"] > before["pixel_acc"]
