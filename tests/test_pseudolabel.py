"""`pseudo_label`: CAM and external pseudo-labels, both distance maps, stage-1 quality, atomic output."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cdsp_core import cli, data, distance, evaluate, synth
from cdsp_core.config import PseudoLabelConfig
from cdsp_core.errors import CdspError
from cdsp_core.pseudolabel import pseudo_label

SAMPLE_ID = "2007_000032"  # the image with a BMP pseudo-label and both reference distance maps


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudo")
    synth.make_dataset(root / "data", n_train=3, n_val=1, size=40, seed=2)
    return root


def read_png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


def test_external_pseudo_labels_give_the_reference_maps_on_the_real_sample(sample_dir, tmp_path):
    # BMP's pseudo-label for 2007_000032; the other image brings its ground truth as its pseudo-label
    external = tmp_path / "bmp"
    external.mkdir()
    shutil.copy(sample_dir / "bmp_pseudolabel" / f"{SAMPLE_ID}.png", external)
    shutil.copy(sample_dir / "SegmentationClassAug" / "2007_000033.png", external)
    out = tmp_path / "pseudo"
    summary = pseudo_label(str(sample_dir), str(out), PseudoLabelConfig(), external_pseudo=str(external))

    assert np.array_equal(read_png(out / "pseudo_labels" / f"{SAMPLE_ID}.png"),
                          data.read_label(sample_dir / "bmp_pseudolabel" / f"{SAMPLE_ID}.png"))
    # written as mode L, equal on every pixel to the authors' maps (RGB files with equal channels)
    for ours, reference in (("distance_scribble", "distance_map"), ("distance_boundary", "distance_pseudo")):
        with Image.open(out / ours / f"{SAMPLE_ID}.png") as im:
            assert im.mode == "L"
        assert np.array_equal(distance.read_distance_map(out / ours / f"{SAMPLE_ID}.png"),
                              distance.read_distance_map(sample_dir / reference / f"{SAMPLE_ID}.png"))
    assert sorted(p.name for p in (out / "distance_boundary").iterdir()) == ["2007_000032.png", "2007_000033.png"]

    # stage-1 quality against the real ground truth: BMP's label on one image, a perfect one on the other
    cm = evaluate.ConfusionMatrix(21)
    for i in ("2007_000032", "2007_000033"):
        cm.update(torch.from_numpy(data.read_label(sample_dir / "SegmentationClassAug" / f"{i}.png")),
                  torch.from_numpy(data.read_label(out / "pseudo_labels" / f"{i}.png")))
    assert summary["source"] == "external" and summary["n_images"] == 2
    assert summary["pseudo_miou"] == pytest.approx(cm.miou())
    assert 0.5 < summary["pseudo_miou"] < 1.0
    assert json.loads((out / "summary.json").read_text()) == summary
    assert json.loads((out / "config.json").read_text())["external_pseudo"] == str(external)


def test_cam_pseudo_labels_only_use_the_image_level_classes(tiny, tmp_path):
    from test_evaluate import make_model_dir

    classifier = make_model_dir(tmp_path / "cls", synth.CLASSES, kind="classifier")
    out = tmp_path / "pseudo"
    cfg = PseudoLabelConfig(cam_scales="1.0,1.5", cam_threshold=0.2, lambda_s=2.0)
    summary = pseudo_label(str(tiny / "data"), str(out), cfg, classifier_dir=str(classifier), device="cpu")
    index = data.load_index(tiny / "data")
    assert summary["source"] == "cam" and summary["n_images"] == len(index.train)
    assert 0.0 <= summary["pseudo_miou"] <= 1.0 and summary["labelled_fraction"] == 1.0
    for item in index.train:
        scribble = data.read_label(item.scribble)
        pseudo = data.read_label(out / "pseudo_labels" / f"{item.id}.png")
        assert pseudo.shape == scribble.shape
        # classes absent from the scribble get no CAM, so never appear in the pseudo-label
        assert set(np.unique(pseudo)) <= {0, *data.image_labels(scribble, len(synth.CLASSES))}
        assert np.array_equal(distance.read_distance_map(out / "distance_scribble" / f"{item.id}.png"),
                              distance.scribble_distance_map(scribble, 2.0))
        assert np.array_equal(distance.read_distance_map(out / "distance_boundary" / f"{item.id}.png"),
                              distance.boundary_distance_map(pseudo, cfg.lambda_c))


def test_ground_truth_as_pseudo_labels_scores_one(tiny, tmp_path):
    summary = pseudo_label(str(tiny / "data"), str(tmp_path / "p"), PseudoLabelConfig(),
                           external_pseudo=str(tiny / "data" / "SegmentationClass"))
    assert summary["pseudo_miou"] == 1.0 and summary["pseudo_pixel_acc"] == 1.0


def test_bad_external_pseudo_labels_are_clear_errors_and_keep_the_old_output(tiny, tmp_path):
    out = tmp_path / "p"
    pseudo_label(str(tiny / "data"), str(out), PseudoLabelConfig(),
                 external_pseudo=str(tiny / "data" / "SegmentationClass"))
    before = (out / "summary.json").read_text()
    index = data.load_index(tiny / "data")

    bad = tmp_path / "bad"
    shutil.copytree(tiny / "data" / "SegmentationClass", bad)
    victim = bad / f"{index.train[-1].id}.png"
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(victim)
    with pytest.raises(CdspError, match=rf"{victim}: size 30x20 differs from its image"):
        pseudo_label(str(tiny / "data"), str(out), PseudoLabelConfig(), external_pseudo=str(bad))

    Image.fromarray(np.full((40, 40), 9, np.uint8)).save(victim)  # class 9 of a 6-class dataset
    with pytest.raises(CdspError, match=rf"{victim}: class values \[9\] outside 0..4"):
        pseudo_label(str(tiny / "data"), str(out), PseudoLabelConfig(), external_pseudo=str(bad))

    victim.unlink()
    with pytest.raises(CdspError, match=rf"{victim}: missing pseudo-label"):
        pseudo_label(str(tiny / "data"), str(out), PseudoLabelConfig(), external_pseudo=str(bad))

    assert (out / "summary.json").read_text() == before  # the earlier output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "p"]  # no temporary folders left


def test_needs_exactly_one_source(tiny, tmp_path, capsys):
    with pytest.raises(CdspError, match="either a classifier"):
        pseudo_label(str(tiny / "data"), str(tmp_path / "p"), PseudoLabelConfig())
    rc = cli.main(["pseudo-label", "--data", str(tiny / "data"), "--out", str(tmp_path / "p"),
                   "--classifier", str(tmp_path / "nope")])
    assert rc == 2 and "nope: model folder not found" in capsys.readouterr().err
