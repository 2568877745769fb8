"""Training: augmentation, the CDSP loss switches, checkpoints, resume, NaN stop, SIGTERM, bad input.

Tiny real runs: synthetic 32 px images, ResNet-18 DeepLab-v2, one thread, two steps an epoch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_data import data_with_gt_pseudo

from cdsp_core import cli, config, data, evaluate, losses, models, synth, train, transforms
from cdsp_core.config import SegTrainConfig
from cdsp_core.errors import CdspError

REPO = Path(__file__).resolve().parents[1]
TINY = dict(segmenter="deeplabv2", backbone="resnet18", crop_size=32, scale_min=0.8, scale_max=1.2, epochs=2,
            batch_size=2, lr=0.01, warmup_epochs=1, workers=0, amp=False, device="cpu", seed=0)
TERMS = ("loss_seg", "loss_pseudo", "loss_lorm", "loss_ds", "loss_dc")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4 train / 2 val images of 32 px, with ground truth as external pseudo-labels (fast, and real files)."""
    root = tmp_path_factory.mktemp("train")
    data_with_gt_pseudo(root, n_train=4, n_val=2, size=32, seed=3)
    return root


def seg_cfg(**kw) -> SegTrainConfig:
    return SegTrainConfig(**{**TINY, **kw})


def train_seg(tiny, out, **kw):
    on_metrics = kw.pop("on_metrics", None)
    resume = kw.pop("resume", False)
    return train.train_segmenter(str(tiny / "data"), str(tiny / "pseudo"), str(out), seg_cfg(**kw), resume=resume,
                                 on_metrics=on_metrics)


def history(out) -> list[dict]:
    return json.loads((Path(out) / "history.json").read_text())


# ---------------------------------------------------------------------------- pieces


def test_warmup_then_cosine_per_iteration():
    f = [train.warmup_cosine(i, warmup=4, total=12) for i in range(12)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == 1.0 and f[8] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(f[4:], f[5:])) and f[11] > 0


def test_augmentation_moves_labels_and_weights_with_the_image():
    # The image's red channel encodes the label (40·class) in blocks big enough to survive bilinear
    # resampling; after scale, rotation, flip and crop, label and weight maps must still line up.
    label = np.kron(np.array([[0, 1, 2], [3, 4, 5], [1, 3, 0]], np.uint8), np.ones((16, 16), np.uint8))
    rgb = np.zeros((48, 48, 3), np.uint8)
    rgb[..., 0] = label * 40
    weight = (label * 50).astype(np.uint8)
    t = transforms.Compose([transforms.RandomScale(0.7, 1.6), transforms.RandomRotation(10),
                            transforms.RandomHorizontalFlip(), transforms.RandomCrop(56), transforms.ToTensor()])
    mean, std = torch.tensor(transforms.IMAGENET_MEAN), torch.tensor(transforms.IMAGENET_STD)
    for seed in range(8):
        transforms.random.seed(seed)
        image, labels, weights = t(Image.fromarray(rgb), {"y": Image.fromarray(label)}, {"w": Image.fromarray(weight)})
        y, w = labels["y"], weights["w"]
        assert image.shape == (3, 56, 56) and y.shape == w.shape == (56, 56)
        assert y.dtype == torch.int64 and w.dtype == torch.float32
        red = (image[0] * std[0] + mean[0]) * 255
        valid = y != 255
        assert torch.equal(w[valid], (y[valid] * 50).float() / 255)  # nearest-neighbour: exact values
        assert (w[~valid] == 0).all()  # padding: 255 for labels, 0 for weights ...
        padded = ~valid & (red - transforms.MEAN_PIXEL[0]).abs().lt(1)
        assert padded.sum() >= 0.9 * (~valid).sum()  # ... and the mean colour for the image
        agree = ((red[valid] - 40 * y[valid]).abs() < 20).float().mean()
        assert agree > 0.9, (seed, agree)  # away from block edges, the image says the same class


def tiny_batch(with_lorm: bool):
    torch.manual_seed(0)
    seg = models.build_segmenter("deeplabv2", "resnet18", 6)
    net = train.CDSPNet(seg, models.LoRM(seg.backbone.out_channels) if with_lorm else None)
    label = torch.randint(0, 6, (2, 32, 32))
    batch = {"image": torch.randn(2, 3, 32, 32), "seg_target": torch.where(torch.rand(2, 32, 32) < 0.1, label, 255),
             "pseudo": label, "distance_scribble": torch.rand(2, 32, 32), "distance_boundary": torch.rand(2, 32, 32)}
    return net, batch


@pytest.mark.parametrize("off", TERMS)
def test_each_loss_term_switches_off_and_is_not_computed(off, monkeypatch):
    weights = {"l_seg": 1.0, "l_pseudo": 0.5, "l_lorm": 2.0, "l_ds": 1.0, "l_dc": 0.25}
    name = {"loss_seg": "l_seg", "loss_pseudo": "l_pseudo", "loss_lorm": "l_lorm", "loss_ds": "l_ds",
            "loss_dc": "l_dc"}
    cfg = seg_cfg(**{**weights, name[off]: 0.0})
    net, batch = tiny_batch(with_lorm=cfg.l_lorm > 0)

    def refuse(*a, **k):
        raise AssertionError(f"{off} was computed at weight 0")

    fn = {"loss_seg": "partial_ce", "loss_pseudo": "pseudo_ce", "loss_lorm": "lorm_loss"}.get(off)
    if fn:
        monkeypatch.setattr(losses, fn, refuse)
    else:  # both DEL terms share one function: count its calls instead
        calls = []
        real = losses.distance_entropy_loss
        monkeypatch.setattr(losses, "distance_entropy_loss", lambda *a: calls.append(1) or real(*a))
    total, terms = train.cdsp_loss(cfg)(net, batch)
    assert off not in terms and set(terms) == set(TERMS) - {off}
    if not fn:
        assert len(calls) == 1
    expected = sum(weights[name[k]] * v for k, v in terms.items())
    assert torch.isfinite(total) and total.item() == pytest.approx(expected.item())
    total.backward()


# ---------------------------------------------------------------------------- checkpoints and resume


def test_sigterm_checkpoints_at_once_and_resume_continues_the_same_run(tiny, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="cdsp.train")
    seen = []
    summary = train_seg(tiny, tmp_path / "straight", l_dc=0.0, on_metrics=lambda m, step: seen.append((m, step)))
    # the terms in use, and only those, are logged each epoch, at step = the epoch (1..n), with the
    # optimizer steps done so far
    assert [step for _, step in seen] == [1, 2] and [m["step"] for m, _ in seen] == [2, 4]  # 4 images, batches of 2
    metrics = seen[0][0]
    assert set(metrics) == {"loss", "loss_seg", "loss_pseudo", "loss_lorm", "loss_ds", "lr", "images_per_sec",
                            "epoch", "step", "val_miou"}
    assert metrics["loss"] == pytest.approx(sum(metrics[k] for k in TERMS if k in metrics))
    assert 0 <= metrics["val_miou"] <= 1 and metrics["images_per_sec"] > 0
    assert history(tmp_path / "straight") == [m for m, _ in seen] and summary["epoch"] == 2
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert saved["class_names"] == synth.CLASSES and saved["lorm"] is True and saved["l_dc"] == 0.0
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    assert not any(k.startswith("lorm") for k in straight) and "aspp.0.weight" in straight  # LoRM is training only

    # SIGTERM (pod pre-emption) in the middle of epoch 2, during step 3: a checkpoint at once, exit 143
    real, calls = losses.partial_ce, []

    def sigterm_at_step_3(logits, target):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal through the real handler
        return real(logits, target)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(losses, "partial_ce", sigterm_at_step_3)
    with pytest.raises(SystemExit) as exit_:
        train_seg(tiny, tmp_path / "preempted", l_dc=0.0)
    monkeypatch.undo()
    assert exit_.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only ours while training
    assert "SIGTERM: checkpoint written to" in caplog.text
    ckpt = torch.load(tmp_path / "preempted" / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["step"]) == (1, 1, 3)
    assert not (tmp_path / "preempted" / "model.pt").exists()
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "history"} <= set(ckpt)

    epochs = []
    train_seg(tiny, tmp_path / "preempted", l_dc=0.0, resume=True, on_metrics=lambda m, s: epochs.append(m["epoch"]))
    assert "resumed from epoch 1, batch 1 (" in caplog.text and epochs == [2]
    resumed = history(tmp_path / "preempted")
    assert [h["epoch"] for h in resumed] == [1, 2]
    assert {k: v for k, v in resumed[0].items() if k != "images_per_sec"} == {
        k: v for k, v in seen[0][0].items() if k != "images_per_sec"}
    # the resumed run ends with the very weights of the uninterrupted one: same batches, same
    # augmentation draws (RNG states restored, done batches not even loaded), same optimiser state
    weights = torch.load(tmp_path / "preempted" / "model.pt", weights_only=True)
    assert all(torch.equal(straight[k], weights[k]) for k in straight)


def test_checkpoints_of_another_model_or_corrupt_ones_are_clear_errors(tiny, tmp_path):
    out = tmp_path / "m"
    train_seg(tiny, out, epochs=1, l_pseudo=0.0, l_lorm=0.0, l_ds=0.0, l_dc=0.0)
    ckpt = out / "checkpoint.pt"

    with pytest.raises(CdspError, match=rf"{ckpt}: checkpoint is for another model \(backbone: checkpoint 'resnet18', "
                                        r"this run 'resnet34'"):
        train_seg(tiny, out, epochs=2, backbone="resnet34", l_pseudo=0.0, l_lorm=0.0, l_ds=0.0, l_dc=0.0, resume=True)

    other = tmp_path / "seven"  # the same images with a seventh class
    shutil.copytree(tiny / "data", other)
    (other / "classes.txt").write_text("\n".join([*synth.CLASSES, "ring"]) + "\n")
    with pytest.raises(CdspError, match="checkpoint is for another model.*class_names"):
        train.train_segmenter(str(other), None, str(out), seg_cfg(epochs=2, l_pseudo=0.0, l_lorm=0.0, l_ds=0.0,
                                                                  l_dc=0.0), resume=True)

    blob = ckpt.read_bytes()
    ckpt.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CdspError, match=rf"{ckpt}: corrupt or unreadable checkpoint"):
        train_seg(tiny, out, epochs=2, l_pseudo=0.0, l_lorm=0.0, l_ds=0.0, l_dc=0.0, resume=True)
    torch.save({"weights": torch.zeros(1)}, ckpt)
    with pytest.raises(CdspError, match="not a cdsp training checkpoint"):
        train_seg(tiny, out, epochs=2, l_pseudo=0.0, l_lorm=0.0, l_ds=0.0, l_dc=0.0, resume=True)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    real, calls = losses.partial_ce, []

    def nan_on_third_call(logits, target):
        calls.append(1)
        loss = real(logits, target)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(losses, "partial_ce", nan_on_third_call)
    good = {}
    out = tmp_path / "m"
    with pytest.raises(CdspError, match=r"loss is nan at step 3 \(epoch 2, batch 1\).*last good checkpoint") as e:
        train_seg(tiny, out, on_metrics=lambda m, s: good.setdefault("ckpt", (out / "checkpoint.pt").read_bytes()))
    assert str(out) in str(e.value)
    assert (out / "checkpoint.pt").read_bytes() == good["ckpt"]  # epoch 1's, untouched
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (out / "model.pt").exists()


# ---------------------------------------------------------------------------- bad input


def test_missing_or_misfitting_maps_are_named(tiny, tmp_path):
    pseudo = tmp_path / "pseudo"
    shutil.copytree(tiny / "pseudo", pseudo)
    index = data.load_index(tiny / "data")
    victim = pseudo / "distance_boundary" / f"{index.train[1].id}.png"
    Image.fromarray(np.zeros((31, 32), np.uint8)).save(victim)
    cfg = seg_cfg(epochs=1)
    with pytest.raises(CdspError, match=rf"{victim}: size 32x31 differs from its image"):
        train.train_segmenter(str(tiny / "data"), str(pseudo), str(tmp_path / "m"), cfg)
    victim.unlink()
    with pytest.raises(CdspError, match=rf"{victim}: missing distance boundary map"):
        train.train_segmenter(str(tiny / "data"), str(pseudo), str(tmp_path / "m"), cfg)
    with pytest.raises(CdspError, match="give a pseudo-label folder"):
        train.train_segmenter(str(tiny / "data"), None, str(tmp_path / "m"), cfg)
    with pytest.raises(CdspError, match="every loss weight is 0"):
        train.train_segmenter(str(tiny / "data"), None, str(tmp_path / "m"),
                              seg_cfg(l_seg=0.0, l_pseudo=0.0, l_lorm=0.0, l_ds=0.0, l_dc=0.0))


def test_never_trains_into_a_folder_of_other_files(tiny, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    args = ["train-seg", "--data", str(tiny / "data"), "--pseudo", str(tiny / "pseudo"), "--out", str(tmp_path),
            *train.to_flags(seg_cfg(epochs=1))]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a model folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_flags_round_trip_through_the_cli_parser():
    cfg = seg_cfg(l_lorm=0.0, amp=False, seg_target="gt")
    ns = cli.build_parser().parse_args(["train-seg", "--data", "d", "--out", "o", *train.to_flags(cfg)])
    assert config.from_namespace(SegTrainConfig, ns) == cfg


def test_adamw_narrow_and_at_output_stride_16_trains_and_the_model_reloads_so(tiny, tmp_path):
    out = tmp_path / "m"
    train_seg(tiny, out, epochs=1, optimizer="adamw", lr=1e-3, output_stride=16, width=16, lorm_scope="foreground",
              lorm_distance="cosine", l_ds=0.0, l_dc=0.0, aspp_rates="1,2,3,4", stem_stride=2)
    assert 0 < history(out)[0]["loss_lorm"] <= 2  # 1 − cos lies in [0, 2]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "exp_avg" in next(iter(ckpt["optimizer"]["state"].values()))  # AdamW's state, not SGD's
    model, info = evaluate.load_model(str(out), "cpu", kind="segmenter")
    assert info["output_stride"] == 16 and info["width"] == 16
    assert model.backbone.output_stride == 16 and model.backbone.out_channels == 128
    assert info["aspp_rates"] == "1,2,3,4" and [c.dilation[0] for c in model.aspp] == [1, 2, 3, 4]
    assert info["stem_stride"] == 2 and isinstance(model.backbone.maxpool, torch.nn.Identity)
    with pytest.raises(CdspError, match="--optimizer must be sgd or adamw, got 'lion'"):
        train_seg(tiny, tmp_path / "x", epochs=1, optimizer="lion", l_lorm=0.0, l_ds=0.0, l_dc=0.0)
    assert not (tmp_path / "x").exists()  # refused before any output
    with pytest.raises(CdspError, match="--lorm-scope must be all or foreground, got 'background'"):
        train_seg(tiny, tmp_path / "x", epochs=1, lorm_scope="background")
    with pytest.raises(CdspError, match="--lorm-distance must be squared or cosine, got 'l1'"):
        train_seg(tiny, tmp_path / "x", epochs=1, lorm_distance="l1")
    with pytest.raises(CdspError, match="lorm_distance cosine needs lorm_scope foreground"):
        train_seg(tiny, tmp_path / "x", epochs=1, lorm_distance="cosine", lorm_scope="all")
    assert not (tmp_path / "x").exists()
    # with LoRM off, its settings do not matter
    train_seg(tiny, tmp_path / "y", epochs=1, l_lorm=0.0, l_ds=0.0, l_dc=0.0, lorm_distance="cosine", lorm_scope="all")
    assert "loss_lorm" not in history(tmp_path / "y")[0]


def test_backbone_learning_rate_factor_and_frozen_batchnorm(tiny, tmp_path):
    out = tmp_path / "m"
    torch.manual_seed(TINY["seed"])  # the initial weights of the run
    before = models.build_segmenter("deeplabv2", "resnet18", len(synth.CLASSES)).state_dict()
    train_seg(tiny, out, epochs=1, backbone_lr=0.0, freeze_bn=True, weight_decay=0.0, l_lorm=0.0)
    after = torch.load(out / "model.pt", weights_only=True)
    backbone = [k for k in before if k.startswith("backbone.")]
    # lr factor 0 and frozen statistics: the backbone is ImageNet's (here: the seed's) still, the head learnt
    assert all(torch.equal(before[k], after[k]) for k in backbone if not k.endswith("num_batches_tracked"))
    assert not torch.equal(before["aspp.0.weight"], after["aspp.0.weight"])
    groups = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [0.0, 0.01]
    train_seg(tiny, tmp_path / "half", epochs=1, backbone_lr=0.5, l_lorm=0.0)
    groups = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [0.005, 0.01]
    # trained BatchNorm moves its statistics
    moved = torch.load(tmp_path / "half" / "model.pt", weights_only=True)
    assert not torch.equal(moved["backbone.bn1.running_mean"], before["backbone.bn1.running_mean"])
    with pytest.raises(CdspError, match=r"--backbone-lr must be a number from 0 to 10, got -1.0"):
        train_seg(tiny, tmp_path / "x", epochs=1, backbone_lr=-1.0, l_lorm=0.0)


def test_cpu_pretrained_preset_fine_tunes_a_mobilenet_v2_from_torchvision_weights(tiny, tmp_path):
    from test_mobilenet import fake_torchvision_weights

    weights = tmp_path / "mobilenet_v2.pth"
    torch.save(fake_torchvision_weights(), weights)
    seg = config.build(SegTrainConfig, "cpu-pretrained")
    cls = config.build(config.ClassifierConfig, "cpu-pretrained")
    assert (seg.backbone, cls.cls_backbone, seg.output_stride, cls.cls_output_stride) == \
        ("mobilenet_v2", "mobilenet_v2", 16, 16)
    args = ["train-seg", "--data", str(tiny / "data"), "--pseudo", str(tiny / "pseudo"), "--out", str(tmp_path / "m"),
            "--preset", "cpu-pretrained", "--pretrained", str(weights), "--epochs", "1", "--batch-size", "2",
            "--crop-size", "33", "--workers", "0", "--device", "cpu"]
    assert cli.main(args) == 0
    model, info = evaluate.load_model(str(tmp_path / "m"), "cpu", kind="segmenter")
    assert info["backbone"] == "mobilenet_v2" and isinstance(model.backbone, models.MobileNetV2)
    assert len(history(tmp_path / "m")) == 1
