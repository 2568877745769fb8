"""cdsp suggest: uncertainty scores, the ranking against real per-image errors, and its outputs."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from cdsp_core import cli, data, evaluate, suggest, synth
from cdsp_core.transforms import to_normalized_tensor

N_TRAIN, N_NEW, SIZE, EPOCHS = 30, 70, 40, 60
N_POOL = N_TRAIN + N_NEW


def test_scores_of_hand_made_probabilities():
    uniform = torch.full((1, 4, 3, 5), 0.25)
    assert suggest.image_scores(uniform) == pytest.approx({"entropy": 1.0, "margin": 1.0})
    certain = torch.zeros((1, 4, 3, 5))
    certain[:, 2] = 1.0
    assert suggest.image_scores(certain) == pytest.approx({"entropy": 0.0, "margin": 0.0}, abs=1e-6)
    mixed = certain.clone()
    mixed[:, :, :, :2] = torch.tensor([0.48, 0.44, 0.04, 0.04]).view(1, 4, 1, 1)  # 6 of 15 pixels: margin 0.04
    scores = suggest.image_scores(mixed)
    assert scores["margin"] == pytest.approx(6 / 15)
    assert suggest.image_scores(mixed, low_margin=0.03)["margin"] == 0.0
    h = -(mixed[0, :, 0, 0] * mixed[0, :, 0, 0].log()).sum() / np.log(4)
    assert scores["entropy"] == pytest.approx(float(h) * 6 / 15, rel=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny segmenter trained on scribbles of 30 synthetic images; a pool of 70 other images and those 30.

    The pool holds the training images (as seen_<id>) because a model trained in seconds gets every
    unseen image about equally wrong: over 100 of those the ranking's Spearman with the per-image error
    was 0.21-0.45 over seeds 0-2, too close to chance's 99th percentile (0.23) to test on every CPU.
    Images it has fit give the ranking the spread of errors that a real pool has (0.48-0.60)."""
    root = tmp_path_factory.mktemp("suggest")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than two threads fighting on a busy 2-core machine
    try:
        synth.make_dataset(root / "data", n_train=N_TRAIN, n_val=0, size=SIZE, seed=0)
        synth.make_dataset(root / "pool", n_train=N_NEW, n_val=0, size=SIZE, seed=100)
        for folder in (data.IMAGE_DIR, synth.GT_DIR):
            for seen in (root / "data" / folder).iterdir():
                shutil.copy(seen, root / "pool" / folder / f"seen_{seen.name}")
        args = ["train-seg", "--data", root / "data", "--out", root / "seg", "--preset", "cpu", "--device", "cpu",
                "--epochs", EPOCHS, "--batch-size", 8, "--crop-size", SIZE,
                "--l-pseudo", 0, "--l-lorm", 0, "--l-ds", 0, "--l-dc", 0]  # scribbles only: no pseudo-labels
        assert cli.main([str(a) for a in args]) == 0
        yield root
    finally:
        torch.set_num_threads(threads)


def test_the_top_ranked_images_are_those_the_model_gets_wrong(trained):
    rows = suggest.rank_images(str(trained / "seg"), str(trained / "pool" / "JPEGImages"), device="cpu")
    assert len(rows) == N_POOL and [r["rank"] for r in rows] == list(range(1, N_POOL + 1))
    assert all(a["margin"] >= b["margin"] for a, b in zip(rows, rows[1:]))
    model, info = evaluate.load_model(str(trained / "seg"), "cpu")
    error = {}
    for r in rows:  # 1 - the image's own mIoU against its full ground truth
        image = data.read_image(trained / "pool" / "JPEGImages" / r["image"])
        gt = data.read_label(trained / "pool" / "SegmentationClass" / f"{r['id']}.png")
        cm = evaluate.ConfusionMatrix(len(info["class_names"]))
        cm.update(torch.from_numpy(gt), evaluate.segment(model, to_normalized_tensor(Image.fromarray(image))))
        error[r["id"]] = 1 - cm.miou()
    err = np.array([error[r["id"]] for r in rows])
    rho = {s: stats.spearmanr([r[s] for r in rows], err).statistic for s in suggest.SCORES}
    rng = np.random.default_rng(0)
    chance = np.quantile([stats.spearmanr(rng.permutation(N_POOL), err).statistic for _ in range(1000)], 0.99)
    print(f"Spearman of score and per-image error: margin {rho['margin']:.2f}, entropy {rho['entropy']:.2f}; "
          f"99% of random rankings below {chance:.2f}; error of the top 20 {err[:20].mean():.3f}, "
          f"bottom 20 {err[-20:].mean():.3f}, all {err.mean():.3f}")
    assert rho["margin"] > chance
    assert err[:20].mean() > err[-20:].mean()


def test_suggest_cli_writes_the_list_and_a_cvat_manifest(trained, tmp_path, capsys):
    images = tmp_path / "images"
    for k, name in enumerate(["train_00000", "train_00001", "train_00002", "train_00003", "train_00004"]):
        dest = images / ("batch2" if k >= 3 else "") / f"{name}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(trained / "pool" / "JPEGImages" / f"{name}.jpg", dest)
    model = str(trained / "seg")
    base = ["suggest", "--model", model, "--images", str(images), "--device", "cpu"]
    assert cli.main(base + ["--out", str(tmp_path / "next.csv"), "--n", "4"]) == 0
    with open(tmp_path / "next.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(suggest.COLUMNS) and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    margins = [float(r["margin"]) for r in rows]
    assert margins == sorted(margins, reverse=True)
    lines = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert lines[:2] == [{"version": "1.1"}, {"type": "images"}]
    assert [ln["name"] for ln in lines[2:]] == [r["image"].rsplit(".", 1)[0] for r in rows]
    assert all(ln["extension"] == ".jpg" and ln["width"] == ln["height"] == SIZE for ln in lines[2:])
    assert any(ln["name"].startswith("batch2/") for ln in lines[2:])  # 4 of 5: one of the 2 in batch2/ at least

    scribbles = tmp_path / "scribbles"
    scribbles.mkdir()
    (scribbles / "train_00001.png").write_bytes(b"")  # only its name counts
    assert cli.main(base + ["--out", str(tmp_path / "next.json"), "--score", "entropy", "--manifest",
                            str(tmp_path / "task" / "m.jsonl"), "--exclude-labelled", str(scribbles)]) == 0
    listed = json.loads((tmp_path / "next.json").read_text())
    assert listed["score"] == "entropy" and len(listed["suggested"]) == 4
    assert "train_00001" not in {r["id"] for r in listed["suggested"]}
    entropies = [r["entropy"] for r in listed["suggested"]]
    assert entropies == sorted(entropies, reverse=True)
    assert len((tmp_path / "task" / "m.jsonl").read_text().splitlines()) == 2 + 4

    capsys.readouterr()
    for extra, message in [(["--out", str(tmp_path / "next.txt")], "must end in .csv or .json"),
                           (["--out", str(tmp_path / "x.csv"), "--n", "0"], "--n 0: need at least one image"),
                           (["--out", str(tmp_path / "x.csv"), "--low-margin", "0"], "--low-margin 0.0 is not in"),
                           (["--out", str(tmp_path / "x.csv"), "--images", str(tmp_path / "none")],
                            "image folder not found")]:
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.csv").exists()
