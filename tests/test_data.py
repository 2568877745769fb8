"""data.py: class lists, label and image readers, split lists, the VOC index, the real sample."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from tiny_data import bomb_png, tiny_dataset, write_jpeg, write_label

from cdsp_core import data, synth
from cdsp_core.errors import CdspError

# ---------------------------------------------------------------------------------------
# Class lists


def test_voc_classes():
    assert len(data.VOC_CLASSES) == 21
    assert data.VOC_CLASSES[0] == "background"
    assert data.VOC_CLASSES.index("aeroplane") == 1 and data.VOC_CLASSES.index("person") == 15


def test_classes_default_to_voc(tmp_path):
    assert data.read_classes(tmp_path) == data.VOC_CLASSES


def test_classes_from_cvat_labelmap_without_final_newline(tmp_path):
    (tmp_path / "labelmap.txt").write_text(
        "# label:color_rgb:parts:actions\nbackground:0,0,0::\ncat:64,0,0::\ndog:64,128,0:tail:", encoding="utf-8")
    (tmp_path / "classes.txt").write_text("background\nignored\n", encoding="utf-8")  # labelmap wins
    assert data.read_classes(tmp_path) == ["background", "cat", "dog"]


def test_classes_txt(tmp_path):
    (tmp_path / "classes.txt").write_text("background\r\nleaf\r\n\r\nstem", encoding="utf-8")
    assert data.read_classes(tmp_path) == ["background", "leaf", "stem"]


@pytest.mark.parametrize("text, problem", [("background\ncat\ncat\n", "duplicate"),
                                           ("background\n", "needs 2"),
                                           ("background:0,0,0::\n:1,2,3::\n", "empty class name")])
def test_bad_class_lists_name_the_file(tmp_path, text, problem):
    name = "labelmap.txt" if ":" in text else "classes.txt"
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(CdspError, match=problem) as err:
        data.read_classes(tmp_path)
    assert name in str(err.value)


# ---------------------------------------------------------------------------------------
# Label maps and images


def test_read_label_mode_l_and_mode_p_give_the_same_indices(tmp_path):
    label = np.array([[0, 1, 15], [20, 255, 3]], np.uint8)
    write_label(tmp_path / "l.png", label, "L")
    write_label(tmp_path / "p.png", label, "P")
    with Image.open(tmp_path / "p.png") as im:
        assert im.mode == "P"
        assert tuple(im.getpalette()[3:6]) == (128, 0, 0)  # VOC colour of class 1
    for name in ("l.png", "p.png"):
        out = data.read_label(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (2, 3)
        np.testing.assert_array_equal(out, label)


def test_read_label_grey_rgb_is_accepted_colour_rgb_is_refused(tmp_path):
    label = np.array([[0, 2], [255, 1]], np.uint8)
    Image.fromarray(np.repeat(label[..., None], 3, axis=2)).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(data.read_label(tmp_path / "grey.png"), label)
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (128, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(CdspError, match="colour.png.*mode L") as err:
        data.read_label(tmp_path / "colour.png")
    assert "class index" in str(err.value)


def test_read_label_refuses_16_bit(tmp_path):
    Image.fromarray(np.array([[0, 300]], np.uint16)).save(tmp_path / "wide.png")
    with pytest.raises(CdspError, match="wide.png.*mode"):
        data.read_label(tmp_path / "wide.png")


def test_read_image_converts_to_rgb(tmp_path):
    yy, xx = np.mgrid[:12, :16]
    rgb = np.stack([xx * 15, yy * 20, 255 - xx * 15], axis=2).astype(np.uint8)  # smooth: JPEG keeps it close
    write_jpeg(tmp_path / "a.jpg", rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    a = data.read_image(tmp_path / "a.jpg")
    assert a.shape == (12, 16, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - rgb).mean() < 8  # JPEG, so close rather than equal
    g = data.read_image(tmp_path / "grey.png")
    assert g.shape == (12, 16, 3) and (g[..., 0] == rgb[..., 0]).all()
    assert data.image_size(tmp_path / "a.jpg") == (16, 12)


def test_read_image_truncated_garbage_missing(tmp_path):
    write_jpeg(tmp_path / "whole.jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3)))
    raw = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(CdspError, match=r"cut\.jpg: unreadable or truncated image"):
        data.read_image(tmp_path / "cut.jpg")
    with pytest.raises(CdspError, match=r"junk\.jpg: unreadable"):
        data.read_image(tmp_path / "junk.jpg")
    with pytest.raises(CdspError, match=r"nothere\.jpg: image not found"):
        data.read_image(tmp_path / "nothere.jpg")


def test_decompression_bomb_is_reported_not_a_crash(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.jpg")
    assert bomb.stat().st_size < 1000
    for read in (data.read_image, data.read_label, data.image_size):
        with pytest.raises(CdspError, match="bomb.jpg: .*decompression-bomb limit"):
            read(bomb)
    # between Pillow's limit and twice it Pillow only warns; that is refused as well
    mild = bomb_png(tmp_path / "mild.png", width=10000, height=10000)
    with pytest.raises(CdspError, match="mild.png: image of 10000x10000 pixels is too large"):
        with pytest.warns(Image.DecompressionBombWarning):
            data.read_image(mild)


def test_image_labels():
    scribble = np.full((4, 4), 255, np.uint8)
    assert data.image_labels(scribble, 21) == []
    scribble[0, :2] = 0
    assert data.image_labels(scribble, 21) == []  # background is not an image-level label
    scribble[1, 1], scribble[2, 2], scribble[3, 3] = 15, 1, 15
    assert data.image_labels(scribble, 21) == [1, 15]
    assert data.image_labels(scribble, 10) == [1]  # indices outside the list are not labels


# ---------------------------------------------------------------------------------------
# Split lists and the index


def test_split_lists_plain_crlf_no_final_newline_and_sbd_pairs(tmp_path):
    (tmp_path / "a.txt").write_text("2007_000032\r\n\r\n2007_000033", encoding="utf-8")
    assert data.read_split(tmp_path / "a.txt") == ["2007_000032", "2007_000033"]
    (tmp_path / "b.txt").write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
                                    "/JPEGImages/2008_1.jpg /SegmentationClassAug/2008_1.png", encoding="utf-8")
    assert data.read_split(tmp_path / "b.txt") == ["2007_000032", "2008_1"]
    (tmp_path / "c.txt").write_text("x\ny\nx\n", encoding="utf-8")
    with pytest.raises(CdspError, match=r"c\.txt: ids listed more than once: \['x'\]"):
        data.read_split(tmp_path / "c.txt")


def test_load_index_of_the_synthetic_layout(tmp_path):
    root = tiny_dataset(tmp_path / "d", n_train=3, n_val=2)
    index = data.load_index(root)
    assert index.classes == synth.CLASSES
    assert index.split_dir == "ImageSets/Segmentation" and index.scribble_dir == "pascal_2012_scribble"
    assert [i.id for i in index.train] == ["train_00000", "train_00001", "train_00002"]
    assert [i.id for i in index.val] == ["val_00000", "val_00001"]
    item = index.train[0]
    assert item.image == root / "JPEGImages" / "train_00000.jpg"
    assert item.scribble == root / "pascal_2012_scribble" / "train_00000.png"
    assert item.gt == root / "SegmentationClass" / "train_00000.png"
    with Image.open(item.gt) as im:
        assert im.mode == "P"  # the synthetic ground truth exercises the palette reader


def test_load_index_prefers_segmentation_aug_and_the_aug_ground_truth(tmp_path):
    root = tiny_dataset(tmp_path / "d", n_train=2, n_val=1)
    aug = root / "ImageSets" / "SegmentationAug"
    aug.mkdir()
    (aug / "train.txt").write_text("train_00001", encoding="utf-8")  # no final newline
    write_label(root / "SegmentationClassAug" / "train_00001.png", np.zeros((40, 40)))
    index = data.load_index(root)
    assert index.split_dir == "ImageSets/SegmentationAug"
    assert [i.id for i in index.train] == ["train_00001"] and index.val == []
    assert index.train[0].gt == root / "SegmentationClassAug" / "train_00001.png"
    assert any("no val list" in w for w in index.warnings)
    assert data.load_index(root, split_dir="ImageSets/Segmentation").train[0].id == "train_00000"


def test_load_index_honours_the_manifest_and_explicit_arguments(tmp_path):
    root = tiny_dataset(tmp_path / "d", n_train=2, n_val=1)
    (root / "pascal_2012_scribble").rename(root / "my_scribbles")
    (root / "ImageSets" / "Segmentation").rename(root / "lists")
    with pytest.raises(CdspError, match="pascal_2012_scribble: scribble folder not found"):
        data.load_index(root)
    (root / "manifest.json").write_text(json.dumps({"scribble_dir": "my_scribbles", "split_dir": "lists"}))
    index = data.load_index(root)
    assert index.scribble_dir == "my_scribbles" and index.split_dir == "lists"
    assert index.train[0].scribble == root / "my_scribbles" / "train_00000.png"
    (root / "other").mkdir()  # explicit arguments win over the manifest
    with pytest.raises(CdspError, match=r"other/train_00000\.png is missing \(and 1 more missing files\)"):
        data.load_index(root, scribble_dir="other")


def test_val_images_may_lack_scribbles_but_not_both_scribble_and_ground_truth(tmp_path):
    root = tiny_dataset(tmp_path / "d", n_train=2, n_val=2)
    (root / "pascal_2012_scribble" / "val_00000.png").unlink()  # like VOC val: ground truth only
    index = data.load_index(root)
    assert index.val[0].scribble is None and index.val[0].gt is not None
    (root / "SegmentationClass" / "val_00000.png").unlink()
    with pytest.raises(CdspError, match=r"val\.txt names val_00000, which has neither a scribble"):
        data.load_index(root)


@pytest.mark.parametrize("remove, message", [
    ("JPEGImages/train_00001.jpg", r"train\.txt names train_00001, but .*JPEGImages/train_00001\.jpg is missing"),
    ("pascal_2012_scribble/train_00001.png", r"train\.txt names train_00001, but its scribble .*train_00001\.png"),
    ("ImageSets/Segmentation/train.txt", r"train\.txt: training list not found"),
])
def test_load_index_missing_files(tmp_path, remove, message):
    root = tiny_dataset(tmp_path / "d", n_train=2, n_val=1)
    (root / remove).unlink()
    with pytest.raises(CdspError, match=message):
        data.load_index(root)


def test_load_index_empty_split_and_no_lists(tmp_path):
    root = tiny_dataset(tmp_path / "d", n_train=2, n_val=1)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(CdspError, match=r"val\.txt: the val split is empty"):
        data.load_index(root)
    shutil.rmtree(root / "ImageSets")
    with pytest.raises(CdspError, match="no split lists found"):
        data.load_index(root)


# ---------------------------------------------------------------------------------------
# The real ScribbleSup sample


def test_real_sample_reads_correctly(sample_dir):
    index = data.load_index(sample_dir)
    assert index.classes == data.VOC_CLASSES
    assert index.split_dir == "ImageSets/SegmentationAug"
    assert [i.id for i in index.train] == ["2007_000032", "2007_000033"]
    labels = {}
    for item in index.train:
        image = data.read_image(item.image)
        scribble = data.read_label(item.scribble)
        gt = data.read_label(item.gt)
        assert item.gt.parent.name == "SegmentationClassAug"
        assert image.shape[:2] == scribble.shape == gt.shape
        labels[item.id] = data.image_labels(scribble, len(index.classes))
        # the scribbles agree with the ground truth wherever both label a pixel
        both = (scribble != 255) & (gt != 255)
        assert (scribble[both] == gt[both]).mean() > 0.97
    assert labels == {"2007_000032": [1, 15], "2007_000033": [1]}
    assert data.read_image(index.train[0].image).shape == (281, 500, 3)
