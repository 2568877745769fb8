"""CAM-like pseudo-labels made from ground truth, to measure the loss terms on pseudo-labels of the
paper's kind (smooth blobs that spill over object edges and lose thin parts, about 70 % mIoU)
where our own stage 1 gives random-walk labels that follow the strokes and colour edges (89 %).

Each foreground class's mask is blurred (Gaussian, `--sigma` px) and a pixel takes the argmax of
[τ, blurred masks of its image's classes], the way stage 1 turns CAMs into labels (`--tau` is the
background score). The boundary distance map is recomputed from the new labels with the preset's
λ_c; the scribble distance map is copied from `--like` (it depends on the scribbles only).
`--below K` adds a context error: each class also takes the background up to K px under its mask
(with `--sigma 0` the labels are otherwise the ground truth).

    python benchmarks/cam_like_pseudo.py --data build/bench/data \
        --like build/bench/results/stage1/clean/pseudo --sigma 6 --tau 0.15 --out build/exp/cam_like
    python benchmarks/stage1_swap.py --bench build/bench/results --data build/bench/data \
        --pseudo build/exp/cam_like --scribbles clean --runs scribble+pseudo,scribble+pseudo+lorm --epochs 15
    python benchmarks/cam_like_pseudo.py ... --sigma 0 --below 12 --out build/exp/below12   # context errors only
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage

from cdsp_core import config, data, distance, evaluate
from cdsp_core.config import PseudoLabelConfig
from cdsp_core.datasets import DISTANCE_BOUNDARY_DIR, DISTANCE_SCRIBBLE_DIR, PSEUDO_DIR


def cam_like(ground_truth: np.ndarray, n_classes: int, sigma: float, tau: float, below: int = 0) -> np.ndarray:
    """argmax over [τ, Gaussian-blurred one-hot masks of the classes present]; 255 counts as background.

    `below` > 0 also gives each class the background pixels up to that many px under its mask: a
    context error of the same place for every object, like a CAM's spill onto the water under a boat."""
    scores = [np.full(ground_truth.shape, tau)]
    for c in range(1, n_classes):
        scores.append(ndimage.gaussian_filter((ground_truth == c).astype(np.float64), sigma))
    label = np.argmax(np.stack(scores), 0).astype(np.uint8)
    if below > 0:
        band = np.zeros_like(label)
        for shift in range(below, 0, -1):  # the nearest object above a pixel wins
            moved = np.zeros_like(label)
            moved[shift:] = label[:-shift]
            band = np.where(moved > 0, moved, band)
        label = np.where(label == 0, band, label)
    return label


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset root with ground truth for the training images")
    p.add_argument("--like", required=True, help="a stage-1 pseudo-label folder: its images and scribble maps")
    p.add_argument("--sigma", type=float, default=6.0, help="Gaussian blur of each class mask, px")
    p.add_argument("--tau", type=float, default=0.15, help="background score")
    p.add_argument("--below", type=int, default=0,
                   help="also label as each class the background up to this many px below it (a context error)")
    p.add_argument("--out", required=True)
    ns = p.parse_args()
    index = data.load_index(ns.data)
    n = len(index.classes)
    lambda_c = config.build(PseudoLabelConfig, "cpu", {}).lambda_c
    like, out = Path(ns.like), Path(ns.out)
    if out.exists():
        p.error(f"--out {out} exists; give a new folder")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(like / DISTANCE_SCRIBBLE_DIR, tmp / DISTANCE_SCRIBBLE_DIR)
    (tmp / PSEUDO_DIR).mkdir()
    (tmp / DISTANCE_BOUNDARY_DIR).mkdir()
    cm = evaluate.ConfusionMatrix(n)
    for item in index.train:
        truth = data.read_label(item.gt)
        label = cam_like(truth, n, ns.sigma, ns.tau, ns.below)
        cm.update(truth, label)
        data.write_label(tmp / PSEUDO_DIR / f"{item.id}.png", label)
        distance.write_distance_map(tmp / DISTANCE_BOUNDARY_DIR / f"{item.id}.png",
                                    distance.boundary_distance_map(label, lambda_c))
    miou = float(cm.compute()[2].nanmean())
    (tmp / "summary.json").write_text(json.dumps({"source": "cam_like_pseudo.py", "sigma": ns.sigma, "tau": ns.tau,
                                                  "below": ns.below, "pseudo_miou": miou,
                                                  "n_images": len(index.train)}, indent=2))
    tmp.rename(out)
    print(f"{len(index.train)} pseudo-labels in {out}: mIoU {100 * miou:.1f} % against the ground truth")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
