"""Bad input through the `cdsp` command line: exit status 2, one line naming the file and the
problem, and no partial output (nothing written, or an earlier output left as it was).

Model files (truncated, not a checkpoint, another class count), pseudo-label and distance maps
that do not fit (size, image type), RGB scribbles, non-UTF-8 list files and S3 listings whose
keys point outside the target folder. The library-level checks behind them are tested beside
their modules (test_data, test_prepare, test_train, test_evaluate, test_pseudolabel,
test_storage); here each reaches a user through the CLI.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_data import data_with_gt_pseudo, leftovers

from cdsp_core import cli, data, models, storage, synth, train
from cdsp_core.config import SegTrainConfig
from cdsp_core.errors import CdspError

TINY = dict(segmenter="deeplabv2", backbone="resnet18", crop_size=32, scale_min=0.8, scale_max=1.2, epochs=1,
            batch_size=2, lr=0.01, warmup_epochs=1, workers=0, amp=False, device="cpu", seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A dataset (4 train / 1 val, 32 px), its pseudo-label folder and a trained segmenter folder."""
    root = tmp_path_factory.mktemp("bad")
    data_with_gt_pseudo(root, n_train=4, n_val=1, size=32, seed=7)
    torch.set_num_threads(1)
    train.train_segmenter(str(root / "data"), str(root / "pseudo"), str(root / "model"), SegTrainConfig(**TINY))
    return root


@pytest.fixture
def work(tiny, tmp_path) -> Path:
    """A private copy of the dataset and pseudo-labels, for a test to break."""
    for name in ("data", "pseudo"):
        shutil.copytree(tiny / name, tmp_path / name)
    return tmp_path


@pytest.fixture
def model(tiny, work) -> Path:
    """A private copy of the trained model folder: model.pt, config.json, history.json (no checkpoint)."""
    return Path(shutil.copytree(tiny / "model", work / "model", ignore=shutil.ignore_patterns("checkpoint.pt")))


@pytest.fixture
def model_with_checkpoint(tiny, model) -> Path:
    shutil.copyfile(tiny / "model" / "checkpoint.pt", model / "checkpoint.pt")
    return model


def cdsp(capsys, *args) -> tuple[int, str]:
    """Run `cdsp ARGS` in this process: (exit status, what it wrote to stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip()


def refused(rc: int, err: str, command: str, path: Path | str, problem: str) -> None:
    """Exit 2 and one line: `cdsp COMMAND: error: PATH...: ...PROBLEM...`."""
    assert rc == 2, err
    assert "\n" not in err, err
    assert err.startswith(f"cdsp {command}: error: "), err
    assert str(path) in err and problem in err, err


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.exists() \
        else []


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seg_flags(**kw) -> list[str]:
    return train.to_flags(SegTrainConfig(**{**TINY, **kw}))


def first_train_id(root: Path) -> str:
    return data.load_index(root / "data").train[0].id


# ---------------------------------------------------------------------------- model files


def _truncated(path: Path) -> str:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return "corrupt or unreadable"


def _not_torch(path: Path) -> str:
    Image.new("RGB", (8, 8)).save(path, format="JPEG")  # a picture saved under the model's name
    return "corrupt or unreadable"


def _a_list(path: Path) -> str:
    torch.save([torch.zeros(3)], path)
    return "do not fit"


def _another_class_count(path: Path) -> str:
    torch.save(models.build_segmenter("deeplabv2", "resnet18", 9).state_dict(), path)  # 9 classes, config says 5
    return "do not fit"


def _a_classifier(path: Path) -> str:
    torch.save(models.build_classifier("resnet18", 6, 8).state_dict(), path)
    return "do not fit"


MODEL_FILES = [_truncated, _not_torch, _a_list, _another_class_count, _a_classifier]


@pytest.mark.parametrize("break_it", MODEL_FILES, ids=[f.__name__.strip("_") for f in MODEL_FILES])
def test_bad_model_files_are_refused_by_evaluate_and_predict(work, model, capsys, break_it):
    weights = work / "model" / "model.pt"
    problem = break_it(weights)
    rc, err = cdsp(capsys, "evaluate", "--data", work / "data", "--model", work / "model", "--out", work / "eval",
                   "--device", "cpu")
    refused(rc, err, "evaluate", weights, problem)
    rc, err = cdsp(capsys, "predict", "--model", work / "model", "--images", work / "data" / "JPEGImages",
                   "--out", work / "pred", "--device", "cpu")
    refused(rc, err, "predict", weights, problem)
    assert "weights_only=False" not in err  # torch's advice to load unsafely is not passed on
    assert not (work / "eval").exists() and not (work / "pred").exists() and leftovers(work) == []


def _truncated_checkpoint(root: Path) -> tuple[str, list[str]]:
    _truncated(root / "model" / "checkpoint.pt")
    return "corrupt or unreadable checkpoint", []


def _not_a_training_checkpoint(root: Path) -> tuple[str, list[str]]:
    torch.save(torch.load(root / "model" / "model.pt", weights_only=True), root / "model" / "checkpoint.pt")
    return "not a cdsp training checkpoint", []


def _checkpoint_of_another_class_count(root: Path) -> tuple[str, list[str]]:
    # the same images, with a seventh class in the list: the checkpoint's head has six
    (root / "data" / "classes.txt").write_text("\n".join([*synth.CLASSES, "ring"]) + "\n", encoding="utf-8")
    return "checkpoint is for another model (class_names", []


def _checkpoint_of_another_backbone(root: Path) -> tuple[str, list[str]]:
    return "checkpoint is for another model (backbone", ["--backbone", "resnet34"]


CHECKPOINTS = [_truncated_checkpoint, _not_a_training_checkpoint, _checkpoint_of_another_class_count,
               _checkpoint_of_another_backbone]


@pytest.mark.parametrize("break_it", CHECKPOINTS, ids=[f.__name__.strip("_") for f in CHECKPOINTS])
def test_bad_checkpoints_stop_resume_and_the_finished_model_is_kept(work, model_with_checkpoint, capsys, break_it):
    problem, extra = break_it(work)
    ckpt, weights = work / "model" / "checkpoint.pt", work / "model" / "model.pt"
    before = {p: sha(work / "model" / p) for p in files_in(work / "model")}
    rc, err = cdsp(capsys, "train-seg", "--data", work / "data", "--pseudo", work / "pseudo", "--out", work / "model",
                   "--resume", *seg_flags(epochs=2), *extra)
    refused(rc, err, "train-seg", ckpt, problem)
    assert weights.is_file()  # the finished model of the earlier run is not lost to a refused resume
    assert {p: sha(work / "model" / p) for p in files_in(work / "model")} == before
    assert leftovers(work / "model") == []


def test_a_model_of_another_class_list_is_refused_by_evaluate(work, model, capsys):
    (work / "data" / "classes.txt").write_text("\n".join([*synth.CLASSES, "ring"]) + "\n", encoding="utf-8")
    rc, err = cdsp(capsys, "evaluate", "--data", work / "data", "--model", work / "model", "--out", work / "eval",
                   "--device", "cpu")
    refused(rc, err, "evaluate", work / "model", "the model's classes")
    assert "differ from the dataset's" in err and not (work / "eval").exists()


# ---------------------------------------------------------------------------- pseudo-label and distance maps


def _grey16(path: Path) -> str:
    Image.fromarray(np.asarray(Image.open(path), np.uint16) * 256).save(path)  # a 16-bit PNG
    return "image mode I;16"


def _rgba(path: Path) -> str:
    Image.open(path).convert("RGBA").save(path)
    return "image mode RGBA"


def _colour(path: Path) -> str:
    m = np.asarray(Image.open(path))
    Image.fromarray(np.stack([m, m // 2, 255 - m], axis=2)).save(path)
    return "RGB with unequal channels"


def _float_tiff(path: Path) -> str:
    Image.fromarray(np.asarray(Image.open(path), np.float32) / 255).save(path, format="TIFF")  # weights as floats
    return "image mode F"


# In a loader worker: worker processes, which take seconds to stop after the error (slow).
@pytest.mark.parametrize("break_it, workers", [pytest.param(_grey16, 2, marks=pytest.mark.slow), (_rgba, 0),
                                               (_colour, 0), (_float_tiff, 0)],
                         ids=["16-bit, in a loader worker", "RGBA", "colour RGB", "float TIFF"])
def test_distance_maps_of_the_wrong_type(work, capsys, break_it, workers):
    victim = work / "pseudo" / "distance_scribble" / f"{first_train_id(work)}.png"
    problem = break_it(victim)
    out = work / "new-model"
    rc, err = cdsp(capsys, "train-seg", "--data", work / "data", "--pseudo", work / "pseudo", "--out", out,
                   *seg_flags(workers=workers))
    refused(rc, err, "train-seg", victim, problem)  # one line also when a data-loader worker met it
    assert files_in(out) == []


def test_pseudo_labels_whose_size_differs_from_the_image(work, capsys):
    victim = work / "pseudo" / "pseudo_labels" / f"{first_train_id(work)}.png"
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(victim)
    rc, err = cdsp(capsys, "train-seg", "--data", work / "data", "--pseudo", work / "pseudo", "--out",
                   work / "new-model", *seg_flags())
    refused(rc, err, "train-seg", victim, "size 32x20 differs from its image")
    assert files_in(work / "new-model") == []

    # the same PNGs brought as external pseudo-labels: refused, and the earlier output is kept as it was
    external = work / "external"
    shutil.copytree(work / "pseudo" / "pseudo_labels", external)
    before = {p: sha(work / "pseudo" / p) for p in files_in(work / "pseudo")}
    rc, err = cdsp(capsys, "pseudo-label", "--data", work / "data", "--external-pseudo", external,
                   "--out", work / "pseudo")
    refused(rc, err, "pseudo-label", external / victim.name, "size 32x20 differs from its image")
    assert {p: sha(work / "pseudo" / p) for p in files_in(work / "pseudo")} == before
    assert leftovers(work) == []


@pytest.mark.slow  # data-loader worker processes
def test_pseudo_labels_with_classes_outside_the_list(work, capsys):
    victim = work / "pseudo" / "pseudo_labels" / f"{first_train_id(work)}.png"
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(victim)  # class 9 of a 6-class dataset
    rc, err = cdsp(capsys, "train-seg", "--data", work / "data", "--pseudo", work / "pseudo", "--out",
                   work / "new-model", *seg_flags(workers=2))
    refused(rc, err, "train-seg", victim, "class values [9] outside 0..4")
    assert files_in(work / "new-model") == []


# ---------------------------------------------------------------------------- scribbles and list files


def colour_scribble(path: Path) -> None:
    """What a drawing tool exports: the classes as VOC colours in an RGB PNG, not as indices."""
    palette = np.array(data.voc_palette(), np.uint8).reshape(256, 3)
    Image.fromarray(palette[data.read_label(path)]).save(path)


def test_rgb_scribble_says_how_to_convert(work, capsys):
    victim = work / "data" / "pascal_2012_scribble" / f"{first_train_id(work)}.png"
    colour_scribble(victim)
    with Image.open(victim) as im:
        assert im.mode == "RGB"
    rc, err = cdsp(capsys, "prepare", "--data", work / "data", "--out", work / "prepared", "--copy")
    refused(rc, err, "prepare", victim, "label map is a colour (RGB) PNG")
    assert "save the indices as mode L" in err and "mode P (palette index = class)" in err
    assert not (work / "prepared").exists()
    # straight into training (no prepare): refused at the first batch, in one line, nothing written
    for command, flags in (("train-seg", ["--pseudo", work / "pseudo", *seg_flags()]),
                           ("train-classifier", ["--cls-backbone", "resnet18", "--cls-crop-size", "32",
                                                 "--cls-batch-size", "2", "--cls-epochs", "1", "--no-cls-amp",
                                                 "--cls-workers", "0", "--device", "cpu"])):
        rc, err = cdsp(capsys, command, "--data", work / "data", "--out", work / command, *flags)
        refused(rc, err, command, victim, "label map is a colour (RGB) PNG")
        assert files_in(work / command) == []


@pytest.mark.parametrize("name, content", [
    ("ImageSets/Segmentation/train.txt", "train_00000\ncaf\xe9_00001\n".encode("latin-1")),
    ("classes.txt", "background\ndisc\nbox\ntriangle\nst\xe4r\ncross\n".encode("latin-1")),
    ("labelmap.txt", "# label:color_rgb:parts:actions\nbackground:0,0,0::\ndisc:128,0,0::\n".encode("utf-16")),
], ids=["latin-1 train list", "latin-1 classes", "utf-16 labelmap"])
def test_non_utf8_list_files(work, capsys, name, content):
    victim = work / "data" / name
    victim.write_bytes(content)
    rc, err = cdsp(capsys, "prepare", "--data", work / "data", "--out", work / "prepared", "--copy")
    refused(rc, err, "prepare", victim, "cannot read: 'utf-8' codec can't decode")
    rc, err = cdsp(capsys, "train-seg", "--data", work / "data", "--pseudo", work / "pseudo", "--out",
                   work / "new-model", *seg_flags())
    refused(rc, err, "train-seg", victim, "cannot read: 'utf-8' codec can't decode")
    assert not (work / "prepared").exists() and not (work / "new-model").exists()
    assert victim.read_bytes() == content  # the user's file is left as it was


# ---------------------------------------------------------------------------- S3 keys


@pytest.mark.parametrize("bad_key, problem", [  # more '..', '.' and '//' keys: tests/test_storage.py
    ("/etc/cron.d/evil", "absolute key"),
    ("JPEGImages/../../../evil.jpg", "'..' path segment"),
])
def test_s3_keys_with_dotdot_or_absolute_paths_never_leave_the_folder(tiny, tmp_path, s3, monkeypatch, capsys,
                                                                      bad_key, problem):
    bucket = s3.new_bucket("bad")
    raw = s3.client()
    storage.upload_dir(tiny / "data", f"s3://{bucket}")  # a dataset at the bucket's root ...
    raw.put_object(Bucket=bucket, Key=bad_key, Body=b"not yours")  # ... and one key that points outside it
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)

    with pytest.raises(CdspError, match="unsafe object key") as e:
        storage.download_dir(f"s3://{bucket}", work / "copy")
    assert repr(bad_key) in str(e.value) and problem in str(e.value)
    rc, err = cdsp(capsys, "prepare", "--data", f"s3://{bucket}", "--out", work / "prepared")
    refused(rc, err, "prepare", f"s3://{bucket}/{bad_key}", problem)
    rc, err = cdsp(capsys, "predict", "--model", tiny / "model", "--images", f"s3://{bucket}/JPEGImages",
                   "--out", work / "pred", "--device", "cpu")
    if bad_key.startswith("JPEGImages/"):
        refused(rc, err, "predict", f"s3://{bucket}/{bad_key}", problem)
    else:
        assert rc == 0, err  # that prefix holds only good keys

    assert not (work / "copy").exists() and not (work / "prepared").exists()
    assert not list(tmp_path.rglob("evil*")) and not Path("/etc/cron.d/evil").exists()
    assert leftovers(work) == []
    assert json.loads((tiny / "pseudo" / "summary.json").read_text())["n_images"] == 4  # module data untouched
