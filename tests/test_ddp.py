"""DDP: two CPU processes (gloo, env:// as torchrun sets it) train a step and agree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cdsp_core import evaluate, models, synth, train
from cdsp_core.config import EvalConfig, PseudoLabelConfig, SegTrainConfig
from cdsp_core.pseudolabel import pseudo_label

CFG = SegTrainConfig(segmenter="deeplabv2", backbone="resnet18", crop_size=32, scale_min=0.8, scale_max=1.2,
                     epochs=1, batch_size=2, lr=0.01, warmup_epochs=0, workers=0, amp=False, device="cpu", seed=0)


def _rank(rank: int, world: int, port: int, root: str, results: str) -> None:
    """One training process, with the environment torchrun would give it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    real_fit = train.fit

    def fit_and_keep(net, *args, **kw):  # the real loop; afterwards this rank's replica is saved
        summary = real_fit(net, *args, **kw)
        torch.save({"params": {n: p.detach().clone() for n, p in net.named_parameters()}, "summary": summary,
                    "backend": dist.get_backend(), "world": dist.get_world_size()}, f"{results}/rank{rank}.pt")
        return summary

    train.fit = fit_and_keep
    try:
        train.train_segmenter(f"{root}/data", f"{root}/pseudo", f"{root}/model", CFG)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_cpu_processes_train_in_step(tmp_path):
    from services import free_port

    synth.make_dataset(tmp_path / "data", n_train=4, n_val=3, size=32, seed=4)
    pseudo_label(str(tmp_path / "data"), str(tmp_path / "pseudo"), PseudoLabelConfig(),
                 external_pseudo=str(tmp_path / "data" / "SegmentationClass"))
    results = tmp_path / "ranks"
    results.mkdir()
    mp.start_processes(_rank, args=(2, free_port(), str(tmp_path), str(results)), nprocs=2, join=True,
                       start_method="fork")

    r0, r1 = (torch.load(results / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["backend"] == r1["backend"] == "gloo" and r0["world"] == 2
    # gradients were averaged: after the step both replicas hold the same weights ...
    assert r0["params"].keys() == r1["params"].keys()
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    # ... which moved away from the common initial weights
    torch.manual_seed(CFG.seed)
    init = dict(models.build_segmenter("deeplabv2", "resnet18", len(synth.CLASSES)).named_parameters())
    assert not torch.equal(init["aspp.0.weight"], r0["params"]["segmenter.aspp.0.weight"])

    # one step over 4 images: 2 per process
    hist = json.loads((tmp_path / "model" / "history.json").read_text())
    assert len(hist) == 1 and r0["summary"]["epoch"] == 1
    # val mIoU: each rank scored its share and the confusion matrices were summed, so both ranks
    # report the mIoU of the whole val split, which a single-process evaluation confirms
    assert r0["summary"]["val_miou"] == r1["summary"]["val_miou"] == hist[0]["val_miou"]
    full = evaluate.evaluate(str(tmp_path / "data"), str(tmp_path / "model"), str(tmp_path / "eval"),
                             EvalConfig(n_overlays=0), device="cpu")
    assert full["miou"] == pytest.approx(hist[0]["val_miou"], abs=1e-9)
    saved = torch.load(Path(tmp_path / "model" / "model.pt"), weights_only=True)
    assert torch.equal(saved["aspp.0.weight"], r0["params"]["segmenter.aspp.0.weight"])
