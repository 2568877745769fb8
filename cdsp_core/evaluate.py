"""Evaluation and prediction: `ConfusionMatrix`, `evaluate`, `predict`, colour overlays.

mIoU is computed the standard way (and torchvision's): one confusion matrix accumulated over
every full-resolution validation image, 255 in the ground truth ignored. A class that appears
in neither the ground truth nor the predictions has no IoU; it is left out of the mean and
of `per_class_iou`.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from cdsp_core import config, data, modelfolder, outputs, report
from cdsp_core.config import EvalConfig, SegTrainConfig
from cdsp_core.errors import CdspError
from cdsp_core.fsutil import atomic_path, atomic_write_text
from cdsp_core.progress import progress
from cdsp_core.transforms import to_normalized_tensor

log = logging.getLogger("cdsp.evaluate")

# ---------------------------------------------------------------------------- confusion matrix


class ConfusionMatrix:
    """Rows: ground-truth class, columns: predicted class (torchvision's references/segmentation)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        """Count the pixels of `target` against `pred`; pixels where either is outside 0..n−1 (255) are skipped.

        (A prediction is 255 only in a pseudo-label's ignored pixels, which have no class to score.)
        """
        n = self.num_classes
        target = torch.as_tensor(target).flatten().to(self.mat.device, torch.int64)
        pred = torch.as_tensor(pred).flatten().to(self.mat.device, torch.int64)
        k = (target >= 0) & (target < n) & (pred >= 0) & (pred < n)
        self.mat += torch.bincount(n * target[k] + pred[k], minlength=n * n).reshape(n, n)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixel accuracy, per-class accuracy, per-class IoU); NaN where a class has no pixels."""
        h = self.mat.double()
        diag = torch.diag(h)
        acc_global = diag.sum() / h.sum()
        acc = diag / h.sum(1)
        iu = diag / (h.sum(1) + h.sum(0) - diag)
        return acc_global, acc, iu

    def reduce_from_all_processes(self) -> None:
        """Sum the matrices of every DDP process (no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.all_reduce(self.mat)

    def miou(self) -> float:
        return float(torch.nanmean(self.compute()[2]))

    def summary(self, class_names: Sequence[str]) -> dict:
        """`miou`, `pixel_acc`, `per_class_iou` {name: iou} (present classes), `confusion_matrix`,
        `class_names` (its rows and columns: every class, absent ones too), `predicted_classes` (the
        names predicted on at least one pixel) and `warnings`."""
        acc_global, _, iu = self.compute()
        predicted = [name for name, n in zip(class_names, self.mat.sum(0).tolist()) if n]
        never = [name for name, gt, pred in zip(class_names, self.mat.sum(1).tolist(), self.mat.sum(0).tolist())
                 if gt and not pred]
        warnings = []
        if len(predicted) == 1:
            warnings.append(f"{SINGLE_CLASS}: {predicted[0]} on every pixel")
        elif never:
            warnings.append(f"never predicted, though in the ground truth: {', '.join(never)}")
        return {
            "miou": float(torch.nanmean(iu)) if not torch.isnan(iu).all() else 0.0,
            "pixel_acc": float(acc_global) if self.mat.sum() else 0.0,
            "per_class_iou": {name: float(v) for name, v in zip(class_names, iu.tolist()) if not np.isnan(v)},
            "confusion_matrix": self.mat.tolist(),
            "class_names": list(class_names),
            "predicted_classes": predicted,
            "warnings": warnings,
        }


SINGLE_CLASS = "the model predicts a single class"


def promotion_veto(metrics: dict) -> str:
    """Why an evaluated model must not become champion whatever its mIoU ("" if no reason)."""
    return next((w for w in metrics.get("warnings", []) if w.startswith(SINGLE_CLASS)), "")


# ---------------------------------------------------------------------------- model folders


def resolve_model(uri: str) -> str:
    """The local folder of a model given as a path or an `s3://` URI (downloaded to a temp folder).

    This is the one place where a model reference becomes a folder; other schemes plug in
    here, like MLflow's `models:/name@alias` (registry.resolve_model).
    """
    if uri.startswith("models:/"):
        from cdsp_core import registry  # lazily: MLflow is only needed for registry URIs

        return registry.resolve_model(uri)
    if uri.startswith("s3://"):
        from cdsp_core import storage  # lazily: boto3 is only needed for URIs

        local = tempfile.mkdtemp(prefix="cdsp-model-")
        atexit.register(shutil.rmtree, local, True)
        storage.download_dir(uri, local)
        return local
    if "://" in uri:
        raise CdspError(f"{uri}: unsupported model URI (give a model folder, an s3:// URI or models:/<name>@<alias>)")
    if not Path(uri).is_dir():
        raise CdspError(f"{uri}: model folder not found")
    return uri


def load_model(model_uri: str, device: torch.device | str = "cpu", kind: str | None = None) -> tuple[nn.Module, dict]:
    """(network in eval mode on `device`, its config.json) of a trained model folder or URI."""
    return modelfolder.load(resolve_model(model_uri), device, kind)


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA where present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CdspError(f"device {name!r} asked for, but no CUDA device is available (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise CdspError(f"unknown device {name!r} (use auto, cpu or cuda)") from e


# ---------------------------------------------------------------------------- inference


def probabilities(model: nn.Module, x: torch.Tensor, tile: int) -> torch.Tensor:
    """Class probabilities B×C×H×W of a normalised image batch B×3×H×W: the whole images, or the mean over
    overlapping tile×tile windows when they are larger (0: always whole)."""
    h, w = x.shape[-2:]
    if not tile or max(h, w) <= tile:
        return model(x)["out"].float().softmax(1)
    stride = max(1, tile * 2 // 3)
    ys = sorted({*range(0, max(h - tile, 0) + 1, stride), max(h - tile, 0)})
    xs = sorted({*range(0, max(w - tile, 0) + 1, stride), max(w - tile, 0)})
    probs = count = None
    for y in ys:
        for x0 in xs:
            p = model(x[..., y:y + tile, x0:x0 + tile])["out"].float().softmax(1)
            if probs is None:
                probs = x.new_zeros((x.shape[0], p.shape[1], h, w), dtype=torch.float32)
                count = x.new_zeros((1, 1, h, w), dtype=torch.float32)
            probs[..., y:y + tile, x0:x0 + tile] += p
            count[..., y:y + tile, x0:x0 + tile] += 1
    return probs / count


@torch.inference_mode()
def segment(model: nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
            tile: int = 0) -> torch.Tensor:
    """Predicted class map H×W (int64, on the model's device) of one normalised image 3×H×W, or the
    maps B×H×W of a batch B×3×H×W of images of one size.

    Multi-scale (+ flip) inference averages the softmax over the scales (and flips) at full size.
    """
    x = (images[None] if images.dim() == 3 else images).contiguous(memory_format=torch.channels_last)
    h, w = x.shape[-2:]
    total = None
    for s in scales:
        size = (max(1, int(h * s)), max(1, int(w * s)))  # a tiny image at a small scale keeps a pixel
        xs = x if s == 1.0 else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            p = probabilities(model, xs.flip(-1) if flipped else xs, tile)
            p = p.flip(-1) if flipped else p
            if p.shape[-2:] != (h, w):
                p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
            total = p if total is None else total + p
    labels = total.argmax(1)
    return labels[0] if images.dim() == 3 else labels


# Images of one size are segmented together: one forward pass for a batch costs a fraction of one per
# image on a CPU (a third for 96-px images); VOC's images of mixed sizes mostly go one by one.
PREDICT_BATCH = 16


def predictions(model: nn.Module, items: Sequence[data.Item], device: torch.device, *,
                scales: Sequence[float] = (1.0,), flip: bool = False, tile: int = 0,
                show: bool = True, desc: str = "evaluate") -> Iterator[tuple[data.Item, np.ndarray, np.ndarray,
                                                                            np.ndarray]]:
    """(item, image H×W×3, ground truth H×W, prediction H×W uint8) for each item with ground truth, in order."""
    pending: list[tuple[data.Item, np.ndarray, np.ndarray]] = []

    def flush() -> Iterator[tuple[data.Item, np.ndarray, np.ndarray, np.ndarray]]:
        x = torch.stack([to_normalized_tensor(Image.fromarray(image)) for _, image, _ in pending]).to(device)
        preds = segment(model, x, scales, flip, tile).to("cpu", torch.uint8).numpy()
        batch = [(*p, pred) for p, pred in zip(pending, preds)]
        pending.clear()
        yield from batch

    for item in progress(items, desc, total=len(items), enabled=show):
        image = data.read_image(item.image)
        gt = label_of(item.gt, image, item.image)
        if pending and (len(pending) == PREDICT_BATCH or pending[0][1].shape != image.shape):
            yield from flush()
        pending.append((item, image, gt))
    if pending:
        yield from flush()


def label_of(path: Path, image: np.ndarray, image_path: Path) -> np.ndarray:
    """The label map (ground truth, scribbles) at `path` of an image; an error when their sizes differ."""
    label = data.read_label(path)
    if label.shape != image.shape[:2]:
        raise CdspError(f"{path}: size {label.shape[1]}x{label.shape[0]} differs from its image {image_path} "
                        f"({image.shape[1]}x{image.shape[0]})")
    return label


def confusion_on(model: nn.Module, items: Sequence[data.Item], n_classes: int, device: torch.device, *,
                 show: bool = True, **kw) -> ConfusionMatrix:
    """The confusion matrix of `model` on `items` (used for the per-epoch val mIoU too)."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(n_classes)
    for _, _, gt, pred in predictions(model, items, device, show=show, **kw):
        cm.update(torch.from_numpy(gt), torch.from_numpy(pred))
    model.train(was_training)
    return cm


# ---------------------------------------------------------------------------- pictures

MIN_PANEL = 256  # px: a panel's longer side at least this (small images are upscaled, nearest-neighbour)
PANEL_GAP = 6  # px of white between panels
FONT_SIZE = 16
TITLE_H = FONT_SIZE + 10  # px: the strip above each panel that names it


def colorize(label: np.ndarray) -> Image.Image:
    """A label map in the VOC palette (255 = the palette's light grey)."""
    im = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="P")
    im.putpalette(data.voc_palette())
    return im


def overlay(image: np.ndarray, class_names: Sequence[str], *, scribbles: np.ndarray | None = None,
            gt: np.ndarray | None = None, pred: np.ndarray | None = None, alpha: float = 0.6) -> Image.Image:
    """image | scribbles | ground truth | prediction (those given) side by side, each panel titled, over a
    legend of the classes' colours.

    Ground truth and prediction are blended over the image in grey; scribbles are painted opaque over
    a faded grey image, since they are a few pixels wide. A panel's longer side is at least MIN_PANEL px:
    smaller images are upscaled by a whole factor, nearest-neighbour, so each pixel stays a block.
    """
    base = Image.fromarray(image).convert("RGB")
    grey = base.convert("L").convert("RGB")  # under the labels: the image's own colours would shift theirs
    panels = [("image", base)]
    if scribbles is not None:
        faded = Image.blend(grey, Image.new("RGB", base.size, "white"), 0.5)
        faded.paste(colorize(scribbles).convert("RGB"), mask=Image.fromarray(
            np.where(np.asarray(scribbles) != data.IGNORE, 255, 0).astype(np.uint8)))
        panels.append(("scribbles", faded))
    panels += [(title, Image.blend(grey, colorize(lab).convert("RGB"), alpha))
               for title, lab in (("ground truth", gt), ("prediction", pred)) if lab is not None]
    k = max(1, -(-MIN_PANEL // max(base.size)))
    pw, ph = base.width * k, base.height * k
    font = ImageFont.load_default(size=FONT_SIZE)  # Pillow's embedded font: the images need no system fonts
    width = len(panels) * pw + (len(panels) - 1) * PANEL_GAP
    entries = list(zip(class_names, data.class_colours(len(class_names))))
    if gt is not None and (np.asarray(gt) == data.IGNORE).any():
        entries.append(("ignored (255)", data.class_colours(256)[data.IGNORE]))
    legend = _legend(entries, width, font)
    out = Image.new("RGB", (width, TITLE_H + ph + legend.height), "white")
    draw = ImageDraw.Draw(out)
    for i, (title, panel) in enumerate(panels):
        x = i * (pw + PANEL_GAP)
        draw.text((x + 4, 4), title, fill="black", font=font)
        out.paste(panel.resize((pw, ph), Image.Resampling.NEAREST), (x, TITLE_H))
    out.paste(legend, (0, TITLE_H + ph))
    return out


def _legend(entries: Sequence[tuple[str, tuple[int, int, int]]], width: int, font) -> Image.Image:
    """Swatch + name for each entry, in columns as many as fit `width`."""
    sw, pad = FONT_SIZE, 8
    col = max(int(font.getlength(name)) for name, _ in entries) + sw + 3 * pad
    per_row = max(1, (width - pad) // col)
    row_h = FONT_SIZE + 8
    rows = -(-len(entries) // per_row)
    im = Image.new("RGB", (width, rows * row_h + 2 * pad), "white")
    draw = ImageDraw.Draw(im)
    for i, (name, colour) in enumerate(entries):
        x, y = pad + (i % per_row) * col, pad + (i // per_row) * row_h
        draw.rectangle((x, y, x + sw - 1, y + sw - 1), fill=colour, outline="black")
        draw.text((x + sw + pad // 2, y - 1), name, fill="black", font=font)
    return im


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_report(path: Path, metrics: dict, title: str) -> None:
    lines = [f"# {title}", "", f"- mIoU: **{metrics['miou']:.4f}**", f"- pixel accuracy: {metrics['pixel_acc']:.4f}",
             f"- images: {metrics['n_images']}", *(f"- **warning: {w}**" for w in metrics.get("warnings", [])), ""]
    atomic_write_text(path, "\n".join(lines) + "\n" + report.iou_table({"IoU": metrics["per_class_iou"]}))


# ---------------------------------------------------------------------------- stages


def parse_scales(text: str, flag: str) -> list[float]:
    """The scales of a setting, which its config accepted already (config.parse_scales says which)."""
    try:
        return config.parse_scales(text)
    except ValueError as e:
        raise CdspError(f"{flag}: {e}") from e


def evaluate(data_dir: str, model_dir: str, out_dir: str, cfg: EvalConfig, *, split: str = "val",
             device: str = "auto") -> dict:
    """Full-resolution mIoU of a segmenter on a split with ground truth → `out_dir` (see docs/design.md)."""
    index = data.load_index(data_dir)
    items = [it for it in index.splits.get(split, []) if it.gt is not None]
    if not items:
        raise CdspError(f"{data_dir}: no {split} images with ground truth to evaluate on")
    dev = resolve_device(device)
    model, info = load_model(model_dir, dev, kind="segmenter")
    if info["class_names"] != index.classes:
        raise CdspError(f"{model_dir}: the model's classes {info['class_names']} differ from the dataset's "
                        f"{index.classes} ({data_dir})")
    scales = parse_scales(cfg.eval_scales, "--eval-scales") if cfg.multi_scale else [1.0]
    cm = ConfusionMatrix(len(index.classes))
    with outputs.output_dir(out_dir, "evaluation", inputs=[data_dir, model_dir]) as tmp:
        for k, (item, image, gt, pred) in enumerate(predictions(model, items, dev, scales=scales,
                                                                flip=cfg.multi_scale, tile=cfg.eval_tile)):
            cm.update(torch.from_numpy(gt), torch.from_numpy(pred))
            if k < cfg.n_overlays:
                scribbles = label_of(item.scribble, image, item.image) if item.scribble else None  # VOC val: none
                _save_png(overlay(image, index.classes, scribbles=scribbles, gt=gt, pred=pred),
                          tmp / "overlays" / f"{item.id}.png")
        metrics = {**cm.summary(index.classes), "n_images": len(items), "split": split,
                   "multi_scale": cfg.multi_scale, "scales": scales, "model": str(model_dir)}
        write_report(tmp / "report.md", metrics, f"Evaluation on {split} ({Path(data_dir).name})")
        atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    log.info("%s: mIoU %.4f, pixel accuracy %.4f on %d images", split, metrics["miou"], metrics["pixel_acc"],
             len(items))
    for warning in metrics["warnings"]:
        log.warning("%s: %s (%s)", split, warning, model_dir)
    return metrics


def image_files(images: str) -> tuple[Path, list[Path]]:
    """(folder, image files) of a local folder, or of a storage URI (downloaded to a temp folder)."""
    folder = Path(images)
    if "://" in images:
        from cdsp_core import storage  # lazily: boto3 is only needed for URIs

        folder = Path(tempfile.mkdtemp(prefix="cdsp-images-"))
        atexit.register(shutil.rmtree, folder, True)
        storage.download_dir(images, str(folder))
    if not folder.is_dir():
        raise CdspError(f"{images}: image folder not found")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in data.IMAGE_EXTS)
    if not files:
        raise CdspError(f"{images}: no images ({', '.join(data.IMAGE_EXTS[:3])}) found")
    return folder, files


def read_input_image(path: Path, folder: Path, images: str) -> np.ndarray:
    """One image of `image_files(images)`; an error names the object the user gave (an s3:// URI),
    not its copy in our download folder."""
    try:
        return data.read_image(path)
    except CdspError as e:
        if "://" not in images:
            raise
        raise CdspError(str(e).replace(str(folder), images.rstrip("/"))) from e


def predict(model_dir: str, images: str, out_dir: str, *, device: str = "auto",
            cfg: EvalConfig | None = None) -> list[str]:
    """Label PNGs (`labels/<name>.png`, mode P, VOC palette) and overlays for a folder or URI of images."""
    cfg = cfg or EvalConfig()
    folder, files = image_files(images)
    dev = resolve_device(device)
    model, info = load_model(model_dir, dev, kind="segmenter")
    scales = parse_scales(cfg.eval_scales, "--eval-scales") if cfg.multi_scale else [1.0]
    names = []
    with outputs.output_dir(out_dir, "predictions", inputs=[model_dir, images]) as tmp:
        for path in progress(files, "predict"):
            image = read_input_image(path, folder, images)
            x = to_normalized_tensor(Image.fromarray(image)).to(dev)
            pred = segment(model, x, scales, cfg.multi_scale, cfg.eval_tile).to("cpu", torch.uint8).numpy()
            name = path.stem + ".png"
            if name in names:
                raise CdspError(f"{path}: another image is also called {path.stem}; names must be unique")
            _save_png(colorize(pred), tmp / "labels" / name)
            _save_png(overlay(image, info["class_names"], pred=pred), tmp / "overlays" / name)
            names.append(name)
        atomic_write_text(tmp / "predictions.json", json.dumps(
            {"model": str(model_dir), "images": images, "class_names": info["class_names"], "labels": names},
            indent=2) + "\n")
    return [str(Path(out_dir) / "labels" / n) for n in names]


# ---------------------------------------------------------------------------- CLI


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="full-resolution mIoU of a segmenter on the val split",
                              description="Writes metrics.json, report.md and colour overlays to --out.")
    p.add_argument("--data", required=True, help="dataset root (VOC layout, or a `cdsp prepare` output)")
    p.add_argument("--model", required=True, help="model folder (from cdsp train-seg) or URI")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    config.add_field_argument(p, SegTrainConfig, "device")
    config.add_arguments(p, EvalConfig)
    p.set_defaults(func=_run_evaluate)

    p = subparsers.add_parser("predict", help="label PNGs and colour overlays for new images",
                              description="Segments every image of a folder (or storage URI), any size.")
    p.add_argument("--model", required=True, help="model folder (from cdsp train-seg) or URI")
    p.add_argument("--images", required=True, help="folder or URI of images")
    p.add_argument("--out", required=True, help="output folder (labels/ and overlays/)")
    config.add_field_argument(p, SegTrainConfig, "device")
    config.add_arguments(p, EvalConfig)
    p.set_defaults(func=_run_predict)


def _run_evaluate(args: argparse.Namespace) -> int:
    metrics = evaluate(args.data, args.model, args.out, config.from_namespace(EvalConfig, args),
                       split=args.split, device=args.device)
    print(f"mIoU {metrics['miou']:.4f}  pixel accuracy {metrics['pixel_acc']:.4f}  -> {args.out}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    written = predict(args.model, args.images, args.out, device=args.device,
                      cfg=config.from_namespace(EvalConfig, args))
    print(f"{len(written)} label maps -> {args.out}")
    return 0
