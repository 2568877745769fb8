"""Torch datasets over a dataset root (VOC layout) and a pseudo-label folder.

Every sample is a dict of tensors, so the default collate batches it. Files are checked
when a dataset is built (existence, sizes, class range), in the main process, so that a bad
file stops training with one clear line before the first step rather than a traceback from
a data-loader worker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cdsp_core import data
from cdsp_core.distance import read_distance_map
from cdsp_core.errors import CdspError

# Sub-folders of a pseudo-label folder (docs/design.md) and the sample keys they become.
PSEUDO_DIR = "pseudo_labels"
DISTANCE_SCRIBBLE_DIR = "distance_scribble"
DISTANCE_BOUNDARY_DIR = "distance_boundary"
PSEUDO_KEYS = {"pseudo": PSEUDO_DIR, "distance_scribble": DISTANCE_SCRIBBLE_DIR,
               "distance_boundary": DISTANCE_BOUNDARY_DIR}
WEIGHT_KEYS = ("distance_scribble", "distance_boundary")


def check_same_size(path: Path, size: tuple[int, int], image_path: Path, image_size: tuple[int, int]) -> None:
    if size != image_size:
        raise CdspError(f"{path}: size {size[0]}x{size[1]} differs from its image {image_path} "
                        f"({image_size[0]}x{image_size[1]})")


def check_classes(path: Path, label: np.ndarray, n_classes: int) -> None:
    """Every labelled pixel must name a class of the dataset (255 = unlabelled)."""
    bad = np.unique(label[(label != data.IGNORE) & (label >= n_classes)])
    if bad.size:
        raise CdspError(f"{path}: class values {bad.tolist()[:5]} outside 0..{n_classes - 1} "
                        f"(the dataset has {n_classes} classes; 255 = unlabelled)")


def _read_label(path: Path, n_classes: int) -> np.ndarray:
    label = data.read_label(path)
    check_classes(path, label, n_classes)
    return label


class ClassificationDataset(Dataset):
    """Training images, their image-level labels (multi-hot over classes 1..C−1) and scribbles.

    Sample: `image` 3×H×W, `labels` float (C−1,), `scribble` int64 H×W (for the optional
    scribble CE of the classifier).
    """

    def __init__(self, items: list[data.Item], n_classes: int, transform):
        self.items, self.n_classes, self.transform = items, n_classes, transform
        for item in items:
            if item.scribble is None:
                raise CdspError(f"{item.image}: training image without a scribble")
            check_same_size(item.scribble, data.image_size(item.scribble), item.image, data.image_size(item.image))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.items[i]
        scribble = _read_label(item.scribble, self.n_classes)
        labels = torch.zeros(self.n_classes - 1)
        labels[[c - 1 for c in data.image_labels(scribble, self.n_classes)]] = 1.0
        image = Image.fromarray(data.read_image(item.image))
        image, maps, _ = self.transform(image, {"scribble": Image.fromarray(scribble)}, {})
        return {"image": image, "labels": labels, "scribble": maps["scribble"]}


class SegmentationDataset(Dataset):
    """Training images with what the CDSP loss terms need.

    Sample: `image`; `seg_target` (int64, the L_seg target: the scribble, or the full
    ground truth when `target="gt"`, the fully supervised baseline); and for each of
    `needs` ⊆ {"pseudo", "distance_scribble", "distance_boundary"} that map from `pseudo_dir`
    (the pseudo-label as int64, distance maps as float weights M/255).
    """

    def __init__(self, items: list[data.Item], n_classes: int, transform, *, pseudo_dir: str | Path | None = None,
                 needs: tuple[str, ...] = (), target: str = "scribble"):
        if target not in ("scribble", "gt"):
            raise CdspError(f"unknown segmentation target {target!r} (choose scribble or gt)")
        if needs and not pseudo_dir:
            raise CdspError(f"the loss terms in use need {', '.join(needs)}: give a pseudo-label folder (--pseudo)")
        self.items, self.n_classes, self.transform, self.target = items, n_classes, transform, target
        self.paths: list[dict[str, Path]] = []
        for item in items:
            paths = {"image": item.image, "seg_target": item.scribble if target == "scribble" else item.gt}
            if paths["seg_target"] is None:
                what = "scribble" if target == "scribble" else "ground truth (needed for target=gt)"
                raise CdspError(f"{item.image}: training image without its {what}")
            for key in needs:
                paths[key] = Path(pseudo_dir) / PSEUDO_KEYS[key] / f"{item.id}.png"
                if not paths[key].is_file():
                    raise CdspError(f"{paths[key]}: missing {key.replace('_', ' ')} map for training image "
                                    f"{item.id} (run cdsp pseudo-label on this dataset)")
            image_size = data.image_size(item.image)
            for key, path in paths.items():
                if key != "image":
                    check_same_size(path, data.image_size(path), item.image, image_size)
            self.paths.append(paths)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        paths = self.paths[i]
        labels, weights = {}, {}
        for key, path in paths.items():
            if key in WEIGHT_KEYS:
                weights[key] = Image.fromarray(read_distance_map(path))
            elif key != "image":
                labels[key] = Image.fromarray(_read_label(path, self.n_classes))
        image = Image.fromarray(data.read_image(paths["image"]))
        image, labels, weights = self.transform(image, labels, weights)
        return {"image": image, **labels, **weights}
