"""How much of the pseudo-labels' errors a trained segmenter copies, on the training images.

LoRM is there to correct "foreground representations that the noisy pseudo-label would mislead"
(the method page): where a pseudo-label is wrong, a segmenter trained with LoRM should predict
the true class more often than one trained without it. For each segmenter model folder this
prints, over the training images' pixels where both the pseudo-label and the ground truth are
known, the share the segmenter labels correctly where the pseudo-label is wrong ("corrected"),
the share where it repeats the pseudo-label's wrong class ("copied"), and its accuracy where
the pseudo-label is right ("kept"); also for foreground pseudo-labels alone, the positions
LoRM's loss acts on. docs/benchmarks.md ("On pretrained features, and what there is for LoRM to
correct") quotes it:

    python benchmarks/pseudo_noise.py --data build/bench/data --pseudo build/bench/results/stage1/clean/pseudo \\
        build/bench/results/runs/scribble+pseudo/seed0/model build/bench/results/runs/scribble+pseudo+lorm/seed0/model
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cdsp_core import data, evaluate, modelfolder
from cdsp_core.datasets import PSEUDO_DIR


def noise_stats(model: torch.nn.Module, items: list[data.Item], pseudo_dir: Path) -> dict[str, float]:
    counts = dict.fromkeys(("wrong", "corrected", "copied", "right", "kept", "wrong_fg", "corrected_fg"), 0)
    with torch.no_grad():
        for item, image, gt, pred in evaluate.predictions(model, items, torch.device("cpu"), show=False):
            pseudo = evaluate.label_of(pseudo_dir / f"{item.id}.png", image, item.image)  # size checked
            known = (gt != data.IGNORE) & (pseudo != data.IGNORE)
            wrong, right = known & (pseudo != gt), known & (pseudo == gt)
            wrong_fg = wrong & (pseudo > 0)
            counts["wrong"] += int(wrong.sum())
            counts["corrected"] += int((wrong & (pred == gt)).sum())
            counts["copied"] += int((wrong & (pred == pseudo)).sum())
            counts["right"] += int(right.sum())
            counts["kept"] += int((right & (pred == gt)).sum())
            counts["wrong_fg"] += int(wrong_fg.sum())
            counts["corrected_fg"] += int((wrong_fg & (pred == gt)).sum())
    return {"wrong_share": counts["wrong"] / (counts["wrong"] + counts["right"]),
            "corrected": counts["corrected"] / counts["wrong"], "copied": counts["copied"] / counts["wrong"],
            "kept": counts["kept"] / counts["right"],
            "corrected_fg": counts["corrected_fg"] / max(counts["wrong_fg"], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset root (training images with ground truth)")
    p.add_argument("--pseudo", required=True, help="the pseudo-label folder the segmenters were trained on")
    p.add_argument("--json", help="also write the figures per model folder to this file")
    p.add_argument("models", nargs="+", help="segmenter model folders")
    ns = p.parse_args()
    torch.set_num_threads(1)
    items = [it for it in data.load_index(ns.data).train if it.gt is not None]
    pseudo_dir = Path(ns.pseudo) / PSEUDO_DIR if (Path(ns.pseudo) / PSEUDO_DIR).is_dir() else Path(ns.pseudo)
    print(f"{len(items)} training images")
    print("| model | pseudo-label wrong | corrected | copied | kept | corrected (fg pseudo-label) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    out = {}
    for folder in ns.models:
        model, _ = modelfolder.load(folder, kind="segmenter")
        s = out[folder] = noise_stats(model.eval(), items, pseudo_dir)
        print(f"| {folder} | {s['wrong_share']:.1%} | {s['corrected']:.1%} | {s['copied']:.1%} | {s['kept']:.1%} "
              f"| {s['corrected_fg']:.1%} |", flush=True)
    if ns.json:
        Path(ns.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
