"""synth.py: the synthetic dataset looks like a segmentation problem, is deterministic, loads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from tiny_data import leftovers

from cdsp_core import cli, data, synth


@pytest.fixture(scope="module")
def samples():
    """40 (image, gt, scribble) triples of 96 px, the default size."""
    return [synth.make_sample(96, np.random.default_rng([7, 0, i])) for i in range(40)]


def test_make_sample_is_deterministic_per_seed():
    a = synth.make_sample(64, np.random.default_rng([1, 0, 3]))
    b = synth.make_sample(64, np.random.default_rng([1, 0, 3]))
    c = synth.make_sample(64, np.random.default_rng([2, 0, 3]))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_shapes_and_types(samples):
    for image, gt, scribble in samples:
        assert image.shape == (96, 96, 3) and gt.shape == scribble.shape == (96, 96)
        assert image.dtype == gt.dtype == scribble.dtype == np.uint8
        assert set(np.unique(gt)) <= set(range(len(synth.CLASSES)))


def test_one_to_three_objects_every_class_occurs(samples):
    seen = set()
    for _, gt, _ in samples:
        present = set(np.unique(gt).tolist()) - {0}
        assert 1 <= len(present) <= 3
        seen |= present
    assert seen == set(range(1, len(synth.CLASSES)))


def test_objects_touch_or_occlude_in_some_images(samples):
    touching = 0
    for _, gt, _ in samples:
        fg = gt > 0
        right = fg[:, :-1] & fg[:, 1:] & (gt[:, :-1] != gt[:, 1:])
        down = fg[:-1] & fg[1:] & (gt[:-1] != gt[1:])
        touching += bool(right.any() or down.any())
    assert touching >= 3


def test_scribbles_are_correct_human_like_strokes(samples):
    fractions = []
    for _, gt, scribble in samples:
        labelled = scribble != 255
        # never a wrong label, and the image-level labels equal the classes present
        assert (scribble[labelled] == gt[labelled]).all()
        assert data.image_labels(scribble, len(synth.CLASSES)) == sorted(set(np.unique(gt).tolist()) - {0})
        assert (scribble == 0).any(), "every image has background strokes"
        fractions.append(labelled.mean())
        # width-3 lines: eroding twice with a 3x3 square leaves (almost) nothing
        twice = ndimage.binary_erosion(labelled, np.ones((3, 3)), iterations=2)
        assert twice.sum() <= 0.03 * labelled.sum()
        # but they are strokes, not dots: each class's pixels form few, long components
        for c in np.unique(scribble[labelled]):
            comp, n = ndimage.label(scribble == c, np.ones((3, 3)))
            assert np.bincount(comp.ravel())[1:].max() >= 12
    assert 0.03 <= np.mean(fractions) <= 0.08
    assert min(fractions) > 0.01 and max(fractions) < 0.12


def test_colour_does_not_give_the_class_away(samples):
    """A nearest-mean-colour pixel classifier must do little better than chance (1 in 5)."""
    fit, test = samples[:25], samples[25:]
    means = np.stack([np.concatenate([im[gt == c] for im, gt, _ in fit]).mean(axis=0)
                      for c in range(1, len(synth.CLASSES))])
    pixels = np.concatenate([im[gt > 0] for im, gt, _ in test]).astype(float)
    truth = np.concatenate([gt[gt > 0] for _, gt, _ in test])
    guess = np.argmin(((pixels[:, None] - means[None]) ** 2).sum(axis=2), axis=1) + 1
    assert (guess == truth).mean() < 0.35


def test_backgrounds_are_cluttered_not_flat(samples):
    for image, gt, _ in samples:
        bg = image[gt == 0].astype(float)
        assert bg.std(axis=0).mean() > 8


def test_make_dataset_layout_and_determinism(tmp_path):
    a = synth.make_dataset(tmp_path / "a", n_train=4, n_val=2, size=48, seed=3)
    b = synth.make_dataset(tmp_path / "b", n_train=2, n_val=2, size=48, seed=3)
    c = synth.make_dataset(tmp_path / "c", n_train=2, n_val=1, size=48, seed=4)
    assert data.read_classes(a) == synth.CLASSES
    index = data.load_index(a)
    assert [i.id for i in index.train] == [f"train_{k:05d}" for k in range(4)]
    assert len(index.val) == 2
    for item in index.train + index.val:
        with Image.open(item.image) as im:
            assert im.format == "JPEG" and im.size == (48, 48)
        with Image.open(item.scribble) as im:
            assert im.mode == "L"
        with Image.open(item.gt) as im:
            assert im.mode == "P"
        scribble, gt = data.read_label(item.scribble), data.read_label(item.gt)
        assert ((scribble == 255) | (scribble == gt)).all()
    # image i of a split depends only on (seed, split, i): same bytes with fewer images, others with another seed
    for rel in ("JPEGImages/train_00001.jpg", "pascal_2012_scribble/val_00001.png",
                "SegmentationClass/train_00000.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "JPEGImages/train_00000.jpg").read_bytes() != (c / "JPEGImages/train_00000.jpg").read_bytes()
    assert leftovers(tmp_path) == []


def test_cli_synth_replaces_its_own_output_but_nothing_else(tmp_path, capsys):
    out = tmp_path / "syn"
    assert cli.main(["synth", "--out", str(out), "--n-train", "2", "--n-val", "1", "--size", "32"]) == 0
    assert cli.main(["synth", "--out", str(out), "--n-train", "1", "--n-val", "1", "--size", "32"]) == 0
    assert len(data.load_index(out).train) == 1
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    assert cli.main(["synth", "--out", str(foreign), "--n-train", "1", "--size", "32"]) == 2
    assert "photos: output folder is not empty" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
    assert cli.main(["synth", "--out", str(tmp_path / "x"), "--size", "8"]) == 2
    assert not (tmp_path / "x").exists()
    assert leftovers(tmp_path) == []
