"""prepare.py: the manifest, the fingerprint, --copy, and every bad-input case."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tiny_data import REPO, bomb_png, leftovers, tiny_dataset, write_label

from cdsp_core import cli, data, fsutil, prepare, storage
from cdsp_core.errors import CdspError


@pytest.fixture()
def root(tmp_path):
    return tiny_dataset(tmp_path / "data", n_train=3, n_val=2, size=40)


def test_manifest_schema(root, tmp_path):
    m = prepare.prepare(str(root), str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    assert m["schema"] == "cdsp-manifest-v1" and m["copied"] is False and m["source"] == str(root.resolve())
    assert m["classes"] == data.read_classes(root)
    assert m["scribble_dir"] == "pascal_2012_scribble" and m["split_dir"] == "ImageSets/Segmentation"
    assert (m["n_train"], m["n_val"]) == (3, 2) and m["warnings"] == []
    assert len(m["fingerprint"]) == 64
    assert [(im["split"], im["id"]) for im in m["images"]] == [
        ("train", "train_00000"), ("train", "train_00001"), ("train", "train_00002"),
        ("val", "val_00000"), ("val", "val_00001")]
    for im in m["images"]:
        scribble = data.read_label(root / "pascal_2012_scribble" / f"{im['id']}.png")
        assert im["labels"] == data.image_labels(scribble, 6) and im["labels"]
        assert im["scribble_fraction"] == pytest.approx((scribble != 255).mean(), abs=1e-6)
        assert (im["width"], im["height"]) == (40, 40)
        assert im["sha256"]["image"] == fsutil.sha256_file(root / "JPEGImages" / f"{im['id']}.jpg")
        assert set(im["sha256"]) == {"image", "scribble", "gt"}


def fp(root, out):
    return prepare.prepare(str(root), str(out))["fingerprint"]


def test_fingerprint_changes_when_an_image_or_scribble_changes_and_only_then(root, tmp_path):
    base = fp(root, tmp_path / "o")
    assert fp(root, tmp_path / "o") == base
    # not: a moved copy of the folder, touched files, edited ground truth, renamed classes, --copy
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(root, moved)
    assert fp(moved, tmp_path / "o") == base
    os.utime(moved / "JPEGImages" / "train_00000.jpg", (1, 1))
    gt = data.read_label(moved / "SegmentationClass" / "train_00000.png")
    gt[0, 0] = 5 - gt[0, 0] % 5
    write_label(moved / "SegmentationClass" / "train_00000.png", gt, "P")
    (moved / "classes.txt").write_text("background\na\nb\nc\nd\ne\n", encoding="utf-8")
    assert fp(moved, tmp_path / "o") == base
    copied = prepare.prepare(str(moved), str(tmp_path / "copy"), copy=True)
    assert copied["fingerprint"] == base and fp(tmp_path / "copy", tmp_path / "o") == base
    # yes: an edited scribble, an edited image, an image more or fewer, an image moved to another split
    scribble = data.read_label(moved / "pascal_2012_scribble" / "train_00001.png")
    ys, xs = np.nonzero(scribble != 255)
    scribble[ys[0], xs[0]] = 255
    write_label(moved / "pascal_2012_scribble" / "train_00001.png", scribble)
    edited_scribble = fp(moved, tmp_path / "o")
    image = data.read_image(moved / "JPEGImages" / "val_00000.jpg")
    Image.fromarray(255 - image).save(moved / "JPEGImages" / "val_00000.jpg", quality=95)
    edited_image = fp(moved, tmp_path / "o")
    lists = moved / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("train_00000\ntrain_00001\n", encoding="utf-8")
    fewer = fp(moved, tmp_path / "o")
    (lists / "val.txt").write_text("val_00000\nval_00001\ntrain_00002\n", encoding="utf-8")
    moved_split = fp(moved, tmp_path / "o")
    assert len({base, edited_scribble, edited_image, fewer, moved_split}) == 5


def test_a_training_image_without_labelled_pixels_is_a_warning(root, tmp_path):
    write_label(root / "pascal_2012_scribble" / "train_00001.png", np.full((40, 40), 255))
    (root / "pascal_2012_scribble" / "val_00001.png").unlink()  # val may rely on ground truth only
    m = prepare.prepare(str(root), str(tmp_path / "out"))
    assert m["warnings"] == ["train image train_00001: its scribble has no labelled pixel"]
    entry = next(im for im in m["images"] if im["id"] == "train_00001")
    assert entry["labels"] == [] and entry["scribble_fraction"] == 0.0
    val = next(im for im in m["images"] if im["id"] == "val_00001")
    assert set(val["sha256"]) == {"image", "gt"} and val["labels"] == []


def test_copy_makes_a_dataset_root_that_later_stages_read(root, tmp_path):
    (root / "pascal_2012_scribble").rename(root / "scr")
    (root / "ImageSets" / "Segmentation").rename(root / "lists")
    (root / "classes.txt").unlink()
    (root / "labelmap.txt").write_text("background:0,0,0::\ndisc:1,1,1::\nbox:2,2,2::\ntriangle:3,3,3::\n"
                                       "star:4,4,4::\ncross:5,5,5::", encoding="utf-8")
    (root / "JPEGImages" / "stray.jpg").write_bytes(b"not listed, not copied")
    out = tmp_path / "prepared"
    assert cli.main(["prepare", "--data", str(root), "--out", str(out), "--scribble-dir", "scr",
                     "--split-dir", "lists", "--copy"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["copied"] is True and m["scribble_dir"] == "scr" and m["split_dir"] == "lists"
    assert not (out / "JPEGImages" / "stray.jpg").exists()
    index = data.load_index(out)  # the manifest names the folders
    assert index.classes == ["background", "disc", "box", "triangle", "star", "cross"]
    assert [i.id for i in index.train] == ["train_00000", "train_00001", "train_00002"]
    assert index.train[0].scribble == out / "scr" / "train_00000.png"
    assert (index.val[0].gt.read_bytes() == (root / "SegmentationClass" / "val_00000.png").read_bytes())
    # re-preparing replaces the earlier copy; copying into the dataset itself is refused
    assert prepare.prepare(str(root), str(out), "scr", "lists", copy=True)["fingerprint"] == m["fingerprint"]
    with pytest.raises(CdspError, match="the output folder is the input"):
        prepare.prepare(str(root), str(root), "scr", "lists", copy=True)
    with pytest.raises(CdspError, match="the output folder lies inside the input"):
        prepare.prepare(str(root), str(root / "JPEGImages"), "scr", "lists", copy=True)
    assert leftovers(tmp_path) == [] and leftovers(root) == []


def test_the_manifest_never_goes_into_the_dataset_itself(root):
    # A manifest in the dataset root would make it look like cdsp's output, which a later
    # `prepare --copy --out` there would replace whole: the dataset's other files gone.
    before = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    with pytest.raises(CdspError, match=rf"^{root}: the output folder is the input {root}; choose an --out"):
        prepare.prepare(str(root), str(root))
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == before


# ---------------------------------------------------------------------------------------
# Bad input: a CdspError naming the file and the problem, exit code 2, nothing written


def _missing_image(root):
    with open(root / "ImageSets/Segmentation/train.txt", "a") as fh:
        fh.write("ghost")
    return r"train\.txt names ghost, but .*JPEGImages/ghost\.jpg is missing"


def _missing_scribble(root):
    (root / "pascal_2012_scribble/train_00001.png").unlink()
    return r"train\.txt names train_00001, but its scribble .*pascal_2012_scribble/train_00001\.png is missing"


def _wrong_size(root):
    write_label(root / "pascal_2012_scribble/train_00002.png", np.full((30, 40), 255))
    return r"train_00002\.png: scribble is 40x30 but its image .*train_00002\.jpg is 40x40"


def _class_out_of_range(root):
    scribble = data.read_label(root / "pascal_2012_scribble/val_00001.png")
    scribble[3, 3] = 6  # 5 classes: 0..4
    write_label(root / "pascal_2012_scribble/val_00001.png", scribble)
    return r"val_00001\.png: scribble holds class index 6, outside the class list \(0\.\.4; 255 = unlabelled\)"


def _gt_out_of_range(root):
    gt = data.read_label(root / "SegmentationClass/train_00000.png")
    gt[0, 0] = 21
    write_label(root / "SegmentationClass/train_00000.png", gt, "P")
    return r"SegmentationClass/train_00000\.png: ground truth holds class index 21"


def _unreadable_image(root):
    (root / "JPEGImages/train_00001.jpg").write_bytes(b"\x00" * 100)
    return r"train_00001\.jpg: unreadable or truncated image"


def _truncated_image(root):
    path = root / "JPEGImages/val_00000.jpg"
    path.write_bytes(path.read_bytes()[:400])
    return r"val_00000\.jpg: unreadable or truncated image"


def _empty_split(root):
    (root / "ImageSets/Segmentation/val.txt").write_text("", encoding="utf-8")
    return r"val\.txt: the val split is empty"


def _bomb(root):
    bomb_png(root / "JPEGImages/train_00000.jpg")
    return r"train_00000\.jpg: image is too large \(Pillow's decompression-bomb limit"


def _bad_classes(root):
    (root / "classes.txt").write_text("background\ndisc\ndisc\n", encoding="utf-8")
    return r"classes\.txt: duplicate class names \['disc'\]"


BAD = [_missing_image, _missing_scribble, _wrong_size, _class_out_of_range, _gt_out_of_range,
       _unreadable_image, _truncated_image, _empty_split, _bomb, _bad_classes]


@pytest.mark.parametrize("break_it", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_input(root, tmp_path, capsys, break_it):
    message = break_it(root)
    with pytest.raises(CdspError, match=message):
        prepare.prepare(str(root), str(tmp_path / "out"))
    for extra in ([], ["--copy"]):
        capsys.readouterr()
        assert cli.main(["prepare", "--data", str(root), "--out", str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("cdsp prepare: error: ") and str(root) in err
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == [] and leftovers(root) == []


def test_several_problems_are_all_logged_the_first_is_the_reason(root, tmp_path, caplog):
    _unreadable_image(root)
    _wrong_size(root)
    with pytest.raises(CdspError, match=r"train_00001\.jpg: .* \(and 1 more problems, logged above\)"):
        prepare.prepare(str(root), str(tmp_path / "out"))
    assert "train_00002.png: scribble is 40x30" in caplog.text


def test_a_failed_prepare_keeps_the_previous_manifest(root, tmp_path):
    good = prepare.prepare(str(root), str(tmp_path / "out"))
    _wrong_size(root)
    with pytest.raises(CdspError):
        prepare.prepare(str(root), str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == good
    assert leftovers(tmp_path / "out") == []


@pytest.mark.slow
def test_cli_in_a_subprocess(root, tmp_path):
    """The installed entry point, as a user runs it: one line of reason and exit code 2."""
    _missing_scribble(root)
    cmd = [sys.executable, "-m", "cdsp_core", "prepare", "--data", str(root), "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]  # one line
    assert bad.stderr.startswith("cdsp prepare: error: ") and "train_00001.png is missing" in bad.stderr
    assert not (tmp_path / "out").exists()


def test_cli_help(capsys):
    for command in ("synth", "convert-scribbles", "degrade-scribbles", "prepare"):
        with pytest.raises(SystemExit) as done:
            cli.main([command, "--help"])
        assert done.value.code == 0
        assert "--out" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# The real sample


def test_prepare_the_real_sample(sample_dir, tmp_path):
    before = sorted(p.relative_to(sample_dir) for p in sample_dir.rglob("*"))
    m = prepare.prepare(str(sample_dir), str(tmp_path / "out"), copy=True)
    labels = {(im["split"], im["id"]): im["labels"] for im in m["images"]}
    assert labels == {("train", "2007_000032"): [1, 15], ("train", "2007_000033"): [1],
                      ("val", "2007_000032"): [1, 15], ("val", "2007_000033"): [1]}
    assert m["split_dir"] == "ImageSets/SegmentationAug" and m["classes"] == data.VOC_CLASSES
    assert m["warnings"] == ["2 images are in both train and val (e.g. 2007_000032)"]
    assert all(0.02 < im["scribble_fraction"] < 0.05 for im in m["images"])
    assert prepare.prepare(str(tmp_path / "out"), str(tmp_path / "again"))["fingerprint"] == m["fingerprint"]
    assert sorted(p.relative_to(sample_dir) for p in sample_dir.rglob("*")) == before  # read only


# ---------------------------------------------------------------------------------------
# S3 data (moto's S3 server on 127.0.0.1)


def test_prepare_from_s3(root, tmp_path, s3):
    local = prepare.prepare(str(root), str(tmp_path / "local"))
    bucket = s3.new_bucket("scribbles")
    storage.upload_dir(str(root), f"s3://{bucket}/voc")
    out = tmp_path / "work" / "prepared"
    m = prepare.prepare(f"s3://{bucket}/voc", str(out))  # S3 data is always copied
    assert m["copied"] is True and m["source"] == f"s3://{bucket}/voc"
    assert m["fingerprint"] == local["fingerprint"]
    index = data.load_index(out)
    assert len(index.train) == 3 and index.train[0].image.is_file()
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["prepared"]  # download folder gone
    # bad data on S3: the error names the object, nothing is left behind
    write_label(root / "pascal_2012_scribble" / "train_00002.png", np.full((30, 40), 255))
    storage.upload_dir(str(root), f"s3://{bucket}/voc")
    with pytest.raises(CdspError, match=rf"s3://{bucket}/voc/pascal_2012_scribble/train_00002\.png: scribble"):
        prepare.prepare(f"s3://{bucket}/voc", str(tmp_path / "work" / "second"))
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["prepared"]
