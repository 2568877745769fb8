"""ConfusionMatrix, evaluate, predict and model folders (tiny untrained models: the numbers are checked, not learnt)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cdsp_core import cli, data, evaluate, modelfolder, synth
from cdsp_core.config import EvalConfig
from cdsp_core.errors import CdspError
from cdsp_core.transforms import to_normalized_tensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model_dir(path, class_names, kind="segmenter", seed=0):
    """A model folder in the format train.py writes (config.json + model.pt), untrained weights."""
    info = {"kind": kind, "class_names": class_names, "segmenter": "deeplabv2", "backbone": "resnet18",
            "cls_backbone": "resnet18", "cls_output_stride": 8}
    torch.manual_seed(seed)
    model = modelfolder.build_model(info)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(info))
    torch.save(model.state_dict(), path / "model.pt")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    synth.make_dataset(root / "data", n_train=2, n_val=3, size=40, seed=1)
    make_model_dir(root / "model", synth.CLASSES)
    return root


def test_confusion_matrix_hand_computed():
    target = torch.tensor([[0, 0, 1, 255], [1, 1, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 2], [1, 1, 2, 0]])
    cm = evaluate.ConfusionMatrix(3)
    cm.update(target, pred)
    assert cm.mat.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    acc, _, iou = cm.compute()
    assert acc.item() == pytest.approx(5 / 7)
    assert iou.tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    s = cm.summary(["a", "b", "c"])
    assert s["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert s["per_class_iou"] == pytest.approx({"a": 1 / 3, "b": 3 / 4, "c": 1 / 2})


def test_classes_absent_everywhere_are_left_out_and_false_positives_count():
    cm = evaluate.ConfusionMatrix(4)
    cm.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 2]))  # class 3: nowhere; class 2: only predicted
    s = cm.summary(["bg", "a", "b", "c"])
    assert set(s["per_class_iou"]) == {"bg", "a", "b"}
    assert s["per_class_iou"]["b"] == 0.0
    assert s["miou"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_a_model_that_predicts_one_class_is_flagged_and_vetoed():
    cm = evaluate.ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 0, 0]))  # background everywhere
    s = cm.summary(["background", "a", "b"])
    assert s["predicted_classes"] == ["background"]
    assert s["warnings"] == [f"{evaluate.SINGLE_CLASS}: background on every pixel"]
    assert evaluate.promotion_veto(s) == s["warnings"][0]

    cm = evaluate.ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 0]))  # b never predicted: said, not vetoed
    s = cm.summary(["background", "a", "b"])
    assert s["warnings"] == ["never predicted, though in the ground truth: b"]
    assert evaluate.promotion_veto(s) == ""
    assert evaluate.promotion_veto({"miou": 0.5}) == ""  # metrics written before warnings existed


def test_ground_truth_against_itself_is_one(sample_dir):
    index = data.load_index(sample_dir)
    cm = evaluate.ConfusionMatrix(len(index.classes))
    for item in index.val:
        gt = torch.from_numpy(data.read_label(item.gt))
        assert (gt == 255).any()  # the real files hold void pixels, which must be ignored
        cm.update(gt, gt)
    s = cm.summary(index.classes)
    assert s["miou"] == 1.0 and s["pixel_acc"] == 1.0
    assert set(s["per_class_iou"]) == {"background", "aeroplane", "person"}


def test_evaluate_writes_metrics_report_and_overlays(tiny):
    out = tiny / "eval"
    cfg = EvalConfig(n_overlays=2)
    m = evaluate.evaluate(str(tiny / "data"), str(tiny / "model"), str(out), cfg, device="cpu")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["miou"] == m["miou"]
    assert 0.0 <= m["miou"] <= 1.0 and 0.0 <= m["pixel_acc"] <= 1.0
    assert set(m["per_class_iou"]) <= set(synth.CLASSES)
    assert all(0.0 <= v <= 1.0 for v in m["per_class_iou"].values())
    mat = np.array(m["confusion_matrix"])
    index = data.load_index(tiny / "data")
    labelled = sum(int((data.read_label(it.gt) != 255).sum()) for it in index.val)
    n = len(synth.CLASSES)
    assert mat.shape == (n, n) and mat.sum() == labelled  # every labelled val pixel, at full resolution
    assert m["pixel_acc"] == pytest.approx(np.trace(mat) / mat.sum())
    report = (out / "report.md").read_text()
    assert "| class | IoU |" in report and f"{m['miou']:.4f}" in report
    assert m["class_names"] == synth.CLASSES  # the matrix's rows, though some class may be absent from val
    overlays = sorted((out / "overlays").iterdir())
    assert len(overlays) == 2
    with Image.open(overlays[0]) as im:  # image | scribbles | ground truth | prediction, 40 px shown at 7x
        assert im.width == 4 * 280 + 3 * evaluate.PANEL_GAP and im.height > evaluate.TITLE_H + 280
        pixels = np.asarray(im.convert("RGB"))[evaluate.TITLE_H:evaluate.TITLE_H + 280]
        item, x = index.val[0], 280 + evaluate.PANEL_GAP
        assert np.array_equal(pixels[:, :280], np.kron(data.read_image(item.image), np.ones((7, 7, 1), np.uint8)))
        scribbles = np.kron(data.read_label(item.scribble), np.ones((7, 7), np.uint8))  # the val scribbles
        drawn = scribbles != 255
        assert drawn.any() and np.array_equal(pixels[:, x:x + 280][drawn],
                                              np.array(data.class_colours(255))[scribbles[drawn]])

    # multi-scale + flip inference runs at full size too and is recorded
    m2 = evaluate.evaluate(str(tiny / "data"), str(tiny / "model"), str(out), EvalConfig(
        multi_scale=True, eval_scales="0.75,1.0", n_overlays=0), device="cpu")
    assert m2["scales"] == [0.75, 1.0] and np.array(m2["confusion_matrix"]).sum() == labelled
    assert not (out / "overlays").exists()  # the folder was replaced whole


def test_overlay_panels_are_titled_upscaled_and_over_a_legend_of_every_class():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)  # our synthetic images' size
    gt = np.zeros((96, 96), np.uint8)
    gt[20:60, 20:60] = 1
    gt[60:62] = 255  # void
    scribbles = np.full((96, 96), 255, np.uint8)
    scribbles[30:33, 25:55] = 1
    pred = np.full((96, 96), 2, np.uint8)
    names = ["background", "disc", "box", "triangle", "star"]
    im = np.asarray(evaluate.overlay(image, names, scribbles=scribbles, gt=gt, pred=pred))
    side, gap, top = 288, evaluate.PANEL_GAP, evaluate.TITLE_H  # 3 x 96: the first whole factor to reach 256
    assert im.shape[1] == 4 * side + 3 * gap

    def panel(i: int) -> np.ndarray:
        return im[top:top + side, i * (side + gap):i * (side + gap) + side]

    assert np.array_equal(panel(0), np.kron(image, np.ones((3, 3, 1), np.uint8)))  # nearest-neighbour
    colours = np.array(data.class_colours(256))
    assert (panel(1)[90:99, 75:165] == colours[1]).all()  # a scribble, opaque, 3 px become 9
    grey = np.asarray(Image.fromarray(image).convert("L"), np.float64)[0, 0]
    assert panel(3)[0, 0] == pytest.approx(0.4 * grey + 0.6 * colours[2], abs=1)  # prediction blended over grey
    for i in range(4):  # a title above each panel: dark text on white
        strip = im[:top, i * (side + gap):i * (side + gap) + side]
        assert (strip < 100).any() and (strip == 255).mean() > 0.5
    legend = im[top + side:].reshape(-1, 3)
    present = {tuple(c) for c in np.unique(legend, axis=0)}
    assert {tuple(colours[c]) for c in [*range(len(names)), 255]} <= present  # every class, and void (in gt)

    # a VOC-sized image is shown as it is, not upscaled
    big = evaluate.overlay(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8), names, pred=pred[:1, :1].repeat(
        375, 0).repeat(500, 1))
    assert big.width == 2 * 500 + gap and big.height > top + 375


def test_evaluate_refuses_a_folder_it_did_not_write(tiny, tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(CdspError, match="not empty"):
        evaluate.evaluate(str(tiny / "data"), str(tiny / "model"), str(tmp_path), EvalConfig(), device="cpu")
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_tiled_prediction_covers_the_image_and_matches_whole_image_where_one_tile_fits(tiny):
    model, _ = evaluate.load_model(str(tiny / "model"))
    image = torch.randn(3, 50, 70)
    whole = evaluate.segment(model, image, tile=0)
    assert evaluate.segment(model, image, tile=70).equal(whole)
    tiled = evaluate.segment(model, image, tile=32)
    assert tiled.shape == (50, 70) and tiled.min() >= 0 and tiled.max() < 6


def test_a_batch_is_segmented_as_its_images_one_by_one(tiny):
    # predictions() batches images of one size; each map must be what the image alone gives
    # (up to float reordering in a batched convolution), in every inference mode.
    model, _ = evaluate.load_model(str(tiny / "model"))
    batch = torch.randn(5, 3, 40, 56)
    for kw in ({}, {"scales": (0.75, 1.0), "flip": True}, {"tile": 32}):
        together = evaluate.segment(model, batch, **kw)
        alone = torch.stack([evaluate.segment(model, image, **kw) for image in batch])
        assert together.shape == (5, 40, 56)
        assert (together == alone).float().mean() > 0.999, kw


def test_predictions_keep_the_order_of_images_of_mixed_sizes(tiny, tmp_path, monkeypatch):
    model, _ = evaluate.load_model(str(tiny / "model"))
    synth.make_dataset(tmp_path / "small", n_train=1, n_val=2, size=32, seed=2)
    big, small = (data.load_index(root).splits["val"] for root in (tiny / "data", tmp_path / "small"))
    items = [big[0], big[1], small[0], big[2], small[1]]  # 40, 40, 32, 40, 32 px
    monkeypatch.setattr(evaluate, "PREDICT_BATCH", 2)  # several batches from the few val images
    out = list(evaluate.predictions(model, items, torch.device("cpu"), show=False))
    assert [item.id for item, *_ in out] == [item.id for item in items]
    for item, image, gt, pred in out:
        alone = evaluate.segment(model, to_normalized_tensor(Image.fromarray(image))).numpy()
        assert pred.shape == gt.shape == image.shape[:2]
        assert (pred == alone).mean() > 0.999, item.id


def test_predict_images_of_any_size(tiny, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    sizes = {"small": (23, 37), "wide": (90, 30), "large": (70, 64)}
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{name}.jpg")
    out = tmp_path / "pred"
    written = evaluate.predict(str(tiny / "model"), str(images), str(out), device="cpu",
                               cfg=EvalConfig(eval_tile=48))  # "large" and "wide" go through tiles
    assert sorted(written) == sorted(str(out / "labels" / f"{n}.png") for n in sizes)
    for name, (w, h) in sizes.items():
        with Image.open(out / "labels" / f"{name}.png") as im:
            assert im.mode == "P" and im.size == (w, h)
            assert np.asarray(im).max() < 6
        k = -(-256 // max(w, h))  # upscaled by a whole factor until the longer side is at least 256 px
        with Image.open(out / "overlays" / f"{name}.png") as im:  # image | prediction, and the legend
            assert im.width == 2 * k * w + evaluate.PANEL_GAP and im.height > evaluate.TITLE_H + k * h


def test_predict_from_s3(tiny, tmp_path, s3):
    client = s3.client()
    bucket = s3.new_bucket("imgs")
    index = data.load_index(tiny / "data")
    for item in index.val:
        client.upload_file(str(item.image), bucket, f"batch/{item.image.name}")
    for f in (tiny / "model").iterdir():
        client.upload_file(str(f), bucket, f"models/m1/{f.name}")
    written = evaluate.predict(f"s3://{bucket}/models/m1", f"s3://{bucket}/batch", str(tmp_path / "pred"),
                               device="cpu")
    assert len(written) == len(index.val)
    # the same model from the local folder gives the same labels
    local = evaluate.predict(str(tiny / "model"), str(tiny / "data" / "JPEGImages"), str(tmp_path / "local"),
                             device="cpu")
    for path in written:
        twin = tmp_path / "local" / "labels" / (path.rsplit("/", 1)[1])
        assert str(twin) in local
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(twin)))


def test_bad_model_folders_are_clear_errors(tiny, tmp_path):
    with pytest.raises(CdspError, match="model folder not found"):
        evaluate.load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CdspError, match="config.json: missing"):
        evaluate.load_model(str(tmp_path / "empty"))

    corrupt = make_model_dir(tmp_path / "corrupt", synth.CLASSES)
    blob = (corrupt / "model.pt").read_bytes()
    (corrupt / "model.pt").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(CdspError, match=r"model\.pt: corrupt"):
        evaluate.load_model(str(corrupt))

    other = make_model_dir(tmp_path / "other", synth.CLASSES)  # weights for 5 classes, config says 6
    info = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**info, "class_names": [*synth.CLASSES, "extra"]}))
    with pytest.raises(CdspError, match="do not fit"):
        evaluate.load_model(str(other))

    classifier = make_model_dir(tmp_path / "cls", synth.CLASSES, kind="classifier")
    with pytest.raises(CdspError, match="holds a classifier"):
        evaluate.evaluate(str(tiny / "data"), str(classifier), str(tmp_path / "e"), EvalConfig(), device="cpu")


def test_cli_reports_bad_input_in_one_line(tiny, tmp_path, capsys):
    rc = cli.main(["evaluate", "--data", str(tiny / "data"), "--model", str(tmp_path / "missing"),
                   "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "missing: model folder not found" in err
    assert not (tmp_path / "e").exists()


def test_the_smallest_scale_on_a_tiny_image_still_predicts_every_pixel(tiny):
    """--eval-scales allows 0.1: a 5-px image is then predicted from a 1-px one, not refused by torch."""
    model, _ = evaluate.load_model(str(tiny / "model"))
    labels = evaluate.segment(model, torch.randn(3, 5, 7), scales=(0.1, 1.0), flip=True, tile=0)
    assert labels.shape == (5, 7)
