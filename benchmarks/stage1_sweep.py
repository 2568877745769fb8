"""Stage-1 quality: pseudo-label mIoU on the training images against ground truth, per option.

    .venv/bin/python benchmarks/stage1_sweep.py --data DIR --work DIR [--preset cpu] \
        [--variant "cls_scribble_ce=1,cls_epochs=20"] ... [--thresholds 0.1,0.2,0.3] [--margins 0,0.1]

Each `--variant` is a set of classifier settings (ClassifierConfig fields, over the preset);
its classifier is trained once into WORK/<variant>/ (reused when its model.pt exists). Its
multi-scale + flip CAMs of every training image are computed once, and then every
combination of background threshold τ (`cam_threshold`), margin (`cam_margin`) and the
random-walk refinement (`cam_random_walk`) is scored against the ground truth: mIoU over the
labelled pixels and the labelled fraction (a margin marks pixels 255). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from PIL import Image

from cdsp_core import cam, config, data, evaluate, modelfolder, train
from cdsp_core.config import ClassifierConfig, PseudoLabelConfig
from cdsp_core.transforms import to_normalized_tensor


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--work", required=True, help="folder for the classifiers (reused between calls)")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--variant", action="append", default=[], help="classifier overrides (repeatable)")
    p.add_argument("--classifier", action="append", default=[], help="score this trained classifier folder too")
    p.add_argument("--thresholds", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    p.add_argument("--margins", default="0,0.1")
    p.add_argument("--random-walk", default="no,yes", help="no, yes or no,yes")
    p.add_argument("--cam-scales", default=None, help="CAM inference scales (default: the preset's)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N training images (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    index = data.load_index(args.data)
    n = len(index.classes)
    pl_cfg = config.build(PseudoLabelConfig, args.preset, {"cam_scales": args.cam_scales})
    scales = evaluate.parse_scales(pl_cfg.cam_scales, "--cam-scales")
    thresholds = [float(t) for t in args.thresholds.split(",")]
    margins = [float(m) for m in args.margins.split(",")]
    walks = [w == "yes" for w in args.random_walk.split(",")]

    scored = args.limit or len(index.train)
    print(f"data: {args.data} ({len(index.train)} training images, {scored} scored), preset {args.preset}, "
          f"CAM scales {scales}\n")
    print("| classifier | train s | random walk | τ | margin | pseudo mIoU | labelled |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    jobs = [(text, Path(args.work) / (text.replace(",", "_").replace("=", "-") or "preset")) for text in args.variant]
    jobs += [(folder, Path(folder)) for folder in args.classifier]
    for text, model_dir in jobs or [("", Path(args.work) / "preset")]:
        seconds = "cached"
        if not (model_dir / modelfolder.WEIGHTS).exists():
            cfg = config.build(ClassifierConfig, args.preset, config.parse_overrides(ClassifierConfig, text))
            started = time.perf_counter()
            train.train_classifier(args.data, str(model_dir), cfg, device="cpu", seed=args.seed)
            seconds = f"{time.perf_counter() - started:.0f}"
        classifier, _ = evaluate.load_model(str(model_dir), "cpu", kind="classifier")

        # Every (random walk, τ, margin) against the ground truth, from one CAM pass per image.
        matrices = {(w, t, m): evaluate.ConfusionMatrix(n) for w in walks for t in thresholds for m in margins}
        labelled = dict.fromkeys(matrices, 0)
        total = 0
        for item in index.train[:args.limit or None]:
            image, scribble, gt = data.read_image(item.image), data.read_label(item.scribble), data.read_label(item.gt)
            labels = data.image_labels(scribble, n)
            cams = cam.compute_cams(classifier, to_normalized_tensor(Image.fromarray(image)), labels, scales)
            total += gt.size
            for w in walks:
                for t in thresholds:
                    scores = cam.refine_with_scribbles(cams, labels, image, scribble, t) if w else \
                        torch.cat([cams.new_full((1, *cams.shape[-2:]), t), cams])
                    for m in margins:
                        pseudo = cam.scores_to_pseudo_label(scores, labels, m)
                        matrices[w, t, m].update(torch.from_numpy(gt), torch.from_numpy(pseudo))
                        labelled[w, t, m] += int((pseudo != data.IGNORE).sum())
        for (w, t, m), cm in matrices.items():
            print(f"| {text or 'preset'} | {seconds} | {'yes' if w else 'no'} | {t:g} | {m:g} | "
                  f"{cm.miou():.3f} | {labelled[w, t, m] / total:.2f} |", flush=True)
    print(f"\nmachine: {os.cpu_count()} cores, torch threads {args.threads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
