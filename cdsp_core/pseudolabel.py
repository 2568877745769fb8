"""`cdsp pseudo-label`: CAM pseudo-labels and both distance maps for every training image.

For each training image (its classes known from its scribble): multi-scale + flip CAMs of the
stage-1 classifier → pseudo-label (argmax over [τ, CAMs], optional random-walk refinement and
margin) → scribble distance map (from the scribble) and boundary distance map (from the
pseudo-label). With `external_pseudo` the classifier is skipped and the pseudo-labels come from
a folder of PNGs made by another method (BMP, AFA, SEAM, ...).

Output folder (docs/design.md): `pseudo_labels/`, `distance_scribble/`, `distance_boundary/`
(`<id>.png`, mode L), `summary.json` (incl. pseudo-label mIoU against ground truth where it
exists: the stage-1 quality that decides whether CDSP helps) and `config.json`. The folder is
built under a temporary name and swapped in whole.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cdsp_core import cam, config, data, distance, evaluate, outputs
from cdsp_core.config import PseudoLabelConfig, SegTrainConfig
from cdsp_core.datasets import DISTANCE_BOUNDARY_DIR, DISTANCE_SCRIBBLE_DIR, PSEUDO_DIR, check_classes
from cdsp_core.errors import CdspError
from cdsp_core.fsutil import atomic_write_text
from cdsp_core.progress import progress
from cdsp_core.transforms import to_normalized_tensor

log = logging.getLogger("cdsp.pseudolabel")

SUMMARY = "summary.json"


def _external_folder(uri: str) -> Path:
    """A local folder of external pseudo-label PNGs (a URI is downloaded to a temp folder first).

    A folder written by `cdsp pseudo-label` is accepted too (its `pseudo_labels/` is used).
    """
    folder = Path(uri)
    if uri.startswith("s3://"):
        from cdsp_core import storage  # lazily: boto3 is only needed for URIs

        folder = Path(tempfile.mkdtemp(prefix="cdsp-pseudo-"))
        atexit.register(shutil.rmtree, folder, True)
        storage.download_dir(uri, folder)
    if not folder.is_dir():
        raise CdspError(f"{uri}: external pseudo-label folder not found")
    return folder / PSEUDO_DIR if (folder / PSEUDO_DIR).is_dir() else folder


def _read_external(folder: Path, item: data.Item, shape: tuple[int, int], n_classes: int) -> np.ndarray:
    path = folder / f"{item.id}.png"
    if not path.is_file():
        raise CdspError(f"{path}: missing pseudo-label for training image {item.id}")
    label = data.read_label(path)
    if label.shape != shape:
        raise CdspError(f"{path}: size {label.shape[1]}x{label.shape[0]} differs from its image {item.image} "
                        f"({shape[1]}x{shape[0]})")
    check_classes(path, label, n_classes)
    return label


def cam_pseudo_label(classifier, image: np.ndarray, scribble: np.ndarray, n_classes: int, cfg: PseudoLabelConfig,
                     scales: list[float], device: torch.device) -> np.ndarray:
    """The pseudo-label of one training image from the classifier's CAMs (see the module docstring)."""
    labels = data.image_labels(scribble, n_classes)
    x = to_normalized_tensor(Image.fromarray(image)).to(device)
    cams = cam.compute_cams(classifier, x, labels, scales).cpu()
    if cfg.cam_random_walk:
        # a writable copy: torch warns about (and does not support) tensors over read-only arrays
        scores = cam.refine_with_scribbles(cams, labels, np.array(image), scribble, cfg.cam_threshold)
        return cam.scores_to_pseudo_label(scores, labels, cfg.cam_margin)
    return cam.cams_to_pseudo_label(cams, labels, cfg.cam_threshold, cfg.cam_margin)


def pseudo_label(data_dir: str, out_dir: str, cfg: PseudoLabelConfig, *, classifier_dir: str | None = None,
                 external_pseudo: str | None = None, device: str = "auto") -> dict:
    """Pseudo-labels and distance maps of the training split → `out_dir`; returns the summary."""
    if bool(classifier_dir) == bool(external_pseudo):
        raise CdspError("give either a classifier folder (--classifier) or external pseudo-labels "
                        "(--external-pseudo), not both or neither")
    index = data.load_index(data_dir)
    n = len(index.classes)
    dev = evaluate.resolve_device(device)
    if external_pseudo:
        external, classifier, scales = _external_folder(external_pseudo), None, []
    else:
        classifier, info = evaluate.load_model(classifier_dir, dev, kind="classifier")
        if info["class_names"] != index.classes:
            raise CdspError(f"{classifier_dir}: the classifier's classes {info['class_names']} differ from the "
                            f"dataset's {index.classes} ({data_dir})")
        scales = evaluate.parse_scales(cfg.cam_scales, "--cam-scales")

    cm = evaluate.ConfusionMatrix(n)
    labelled = total = 0
    started = time.perf_counter()
    with outputs.output_dir(out_dir, "pseudo-labels", inputs=[data_dir, classifier_dir, external_pseudo]) as tmp:
        for item in progress(index.train, "pseudo-labels"):
            scribble = data.read_label(item.scribble)
            if external_pseudo:
                pseudo = _read_external(external, item, scribble.shape, n)
            else:
                image = data.read_image(item.image)
                if image.shape[:2] != scribble.shape:
                    raise CdspError(f"{item.scribble}: size differs from its image {item.image}")
                pseudo = cam_pseudo_label(classifier, image, scribble, n, cfg, scales, dev)
            data.write_label(tmp / PSEUDO_DIR / f"{item.id}.png", pseudo)
            distance.write_distance_map(tmp / DISTANCE_SCRIBBLE_DIR / f"{item.id}.png", distance.scribble_distance_map(
                scribble, cfg.lambda_s, include_background=cfg.distance_include_background))
            distance.write_distance_map(tmp / DISTANCE_BOUNDARY_DIR / f"{item.id}.png",
                                        distance.boundary_distance_map(pseudo, cfg.lambda_c))
            labelled += int((pseudo != data.IGNORE).sum())
            total += pseudo.size
            if item.gt is not None:
                gt = data.read_label(item.gt)
                if gt.shape == pseudo.shape:
                    cm.update(torch.from_numpy(gt), torch.from_numpy(pseudo))

        quality = cm.summary(index.classes)
        summary = {"n_images": len(index.train), "source": "external" if external_pseudo else "cam",
                   "labelled_fraction": labelled / max(1, total), "seconds": time.perf_counter() - started}
        if cm.mat.sum():  # ground truth exists for (some of) the training images
            summary.update(pseudo_miou=quality["miou"], pseudo_pixel_acc=quality["pixel_acc"],
                           pseudo_per_class_iou=quality["per_class_iou"])
        atomic_write_text(tmp / SUMMARY, json.dumps(summary, indent=2) + "\n")
        atomic_write_text(tmp / "config.json", json.dumps(
            {**config.to_dict(cfg), "classifier": str(classifier_dir or ""), "external_pseudo": external_pseudo or "",
             "data": str(data_dir), "class_names": index.classes}, indent=2, sort_keys=True) + "\n")
    if "pseudo_miou" in summary:
        log.info("pseudo-labels of %d images: mIoU %.4f against ground truth", len(index.train), summary["pseudo_miou"])
    return summary


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pseudo-label", help="CAM pseudo-labels and both distance maps of the training images",
                              description="Writes pseudo_labels/, distance_scribble/, distance_boundary/, "
                                          "summary.json and config.json to --out.")
    p.add_argument("--data", required=True, help="dataset root (VOC layout, or a `cdsp prepare` output)")
    p.add_argument("--classifier", default=None, help="classifier folder (from cdsp train-classifier)")
    p.add_argument("--external-pseudo", default=None,
                   help="folder or URI of pseudo-label PNGs from another method (<id>.png, class indices); "
                        "replaces the classifier")
    p.add_argument("--out", required=True, help="output folder")
    config.add_field_argument(p, SegTrainConfig, "device")
    config.add_arguments(p, PseudoLabelConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    summary = pseudo_label(args.data, args.out, config.from_namespace(PseudoLabelConfig, args),
                           classifier_dir=args.classifier, external_pseudo=args.external_pseudo,
                           device=args.device)
    quality = f", mIoU {summary['pseudo_miou']:.4f} against ground truth" if "pseudo_miou" in summary else ""
    print(f"{summary['n_images']} pseudo-labels{quality} -> {args.out}")
    return 0
