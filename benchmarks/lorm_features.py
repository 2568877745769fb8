"""What LoRM does to the features: the segmenter's last backbone map on val images, per model folder.

Prints, for each trained segmenter, the mean norm ‖F_i‖ of the feature vectors on ground-truth
foreground and background positions, the mean cosine between feature vectors of one object
(same class, same image) and between positions of different labels (val ground truth resized to
the feature map by nearest neighbour). docs/benchmarks.md ("The distance") quotes it:

    python benchmarks/lorm_features.py --data build/bench/data \\
        build/bench/results/runs/scribble+pseudo/seed0/model build/bench/results/runs/cdsp/seed0/model
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cdsp_core import data, modelfolder
from cdsp_core.transforms import to_normalized_tensor


def feature_stats(model: torch.nn.Module, items: list[data.Item]) -> dict[str, float]:
    norms = {"fg": [], "bg": []}
    within, between = [], []
    with torch.no_grad():
        for item in items:
            image = Image.fromarray(data.read_image(item.image))
            features = model(to_normalized_tensor(image)[None])["features"][0]  # C×h×w
            gt = torch.from_numpy(data.read_label(item.gt).astype(np.int64))[None, None].float()
            label = F.interpolate(gt, size=features.shape[-2:], mode="nearest").flatten().long()
            norm = features.norm(dim=0).flatten()
            norms["fg"].append(norm[(label > 0) & (label < 255)])
            norms["bg"].append(norm[label == 0])
            unit = F.normalize(features.flatten(1), dim=0)[:, label != 255]
            label = label[label != 255]
            cos = unit.T @ unit
            for c in label.unique().tolist():
                at = label == c
                n = int(at.sum())
                if c and n > 1:  # an object's class: mean over distinct pairs of its positions
                    block = cos[at][:, at]
                    within.append(((block.sum() - block.diagonal().sum()) / (n * (n - 1))).item())
            differ = label[:, None] != label[None, :]
            if differ.any():
                between.append(cos[differ].mean().item())
    return {"norm_fg": torch.cat(norms["fg"]).mean().item(), "norm_bg": torch.cat(norms["bg"]).mean().item(),
            "cos_within": float(np.mean(within)), "cos_between": float(np.mean(between))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset root (its val split with ground truth)")
    p.add_argument("--images", type=int, default=50, help="first N val images")
    p.add_argument("models", nargs="+", help="segmenter model folders")
    ns = p.parse_args()
    torch.set_num_threads(1)
    items = [it for it in data.load_index(ns.data).val if it.gt is not None][:ns.images]
    print("| model | ‖F‖ fg | ‖F‖ bg | cos within an object | cos between labels |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for folder in ns.models:
        model, _ = modelfolder.load(folder, kind="segmenter")
        s = feature_stats(model.eval(), items)
        print(f"| {folder} | {s['norm_fg']:.3f} | {s['norm_bg']:.3f} | {s['cos_within']:.3f} "
              f"| {s['cos_between']:.3f} |")


if __name__ == "__main__":
    main()
