"""Bench rows, seed by seed, on a chosen stage 1: which half of a degraded scribble set costs
`cdsp` its points (the segmenter's own scribbles or stage 1), and paired seeds for ablations.

Trains bench rows (`--runs`, clean-scribble rows that use pseudo-labels) with the scribbles of one
variant and the stage 1 (pseudo-labels and distance maps) of another, from a finished `cdsp bench`
folder, or with any pseudo-label folder (`--pseudo`, e.g. benchmarks/cam_like_pseudo.py's), and
prints val mIoU per seed and each row's paired difference from the first row. A (row, seed) whose
result.json in `--out` records the same epochs is read, not trained again. docs/benchmarks.md quotes it:

    python benchmarks/stage1_swap.py --bench build/bench/results40 --data build/bench/data \
        --scribbles drop0.5 --stage1 clean --epochs 40 --seeds 0,1,2 --jobs 2
    python benchmarks/stage1_swap.py --bench build/bench/results --data build/bench/data \
        --runs scribble+pseudo,scribble+pseudo+lorm --scribbles drop0.5 --stage1 drop0.5 --epochs 15
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import re
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cdsp_core import bench, config
from cdsp_core.config import EvalConfig, SegTrainConfig
from cdsp_core.datasets import PSEUDO_DIR
from cdsp_core.fsutil import atomic_write_text


def one(args: tuple) -> tuple[str, int, float]:
    run, seed, ns = args
    stage1 = ns.pseudo or str(Path(ns.bench) / "stage1" / ns.stage1 / "pseudo")
    variant = "." + re.sub(r"[^\w.,=+-]", "_", ns.set) if ns.set else ""  # a path in --set stays one folder
    folder = Path(ns.out) / run / f"{ns.scribbles}-scribbles.{ns.pseudo_label}-stage1{variant}" / f"seed{seed}"
    done = folder / bench.RESULT
    record = json.loads(done.read_text()) if done.exists() else {}
    if record.get("epochs") == ns.epochs:
        return run, seed, record["miou"]
    overrides = {**ns.overrides, "epochs": ns.epochs}
    seg_cfg = config.build(SegTrainConfig, "cpu", overrides)
    eval_cfg = config.build(EvalConfig, "cpu", {"n_overlays": 0})
    outcome = bench.train_and_evaluate(bench.RUNS_BY_NAME[run], seed, Path(ns.bench) / "data" / ns.scribbles,
                                       Path(ns.data), {"pseudo": stage1}, folder, seg_cfg, eval_cfg, False, None)
    atomic_write_text(done, json.dumps({"miou": outcome["miou"], "epochs": ns.epochs, "stage1": stage1}))
    return run, seed, outcome["miou"]


def table(runs: list[str], seeds: list[int], miou: dict) -> str:
    """Markdown: val mIoU % per seed, mean ± sd, and each row's paired difference from the first row."""
    lines = ["| run | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean ± sd | median | Δ first row (mean, median, seeds up) |",
             "| --- |" + " ---: |" * (len(seeds) + 3)]
    for run in runs:
        values = [100 * miou[run, s] for s in seeds]
        diffs = [v - 100 * miou[runs[0], s] for v, s in zip(values, seeds)]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        delta = "" if run == runs[0] else (f"{statistics.mean(diffs):+.1f}, {statistics.median(diffs):+.1f}, "
                                          f"{sum(d > 0 for d in diffs)}/{len(diffs)}")
        lines.append(f"| {run} | " + " | ".join(f"{v:.1f}" for v in values)
                     + f" | {statistics.mean(values):.1f} ± {spread:.1f} | {statistics.median(values):.1f} | {delta} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True, help="a finished cdsp bench folder (its data/ and stage1/)")
    p.add_argument("--data", required=True, help="the bench's dataset root (val split with ground truth)")
    variants = [bench.CLEAN, *bench.VARIANTS]
    p.add_argument("--scribbles", required=True, choices=variants, help="the segmenter's scribbles")
    p.add_argument("--stage1", default=bench.CLEAN, choices=variants,
                   help="whose stage 1 (pseudo-labels, distance maps)")
    p.add_argument("--pseudo", default="",
                   help="a pseudo-label folder (pseudo_labels/, distance_*/) instead of --stage1's")
    rows = [r.name for r in bench.RUNS if r.scribbles == bench.CLEAN and "pseudo" in r.terms]
    p.add_argument("--runs", default="cdsp", help=f"comma-separated bench rows to train, of {', '.join(rows)}")
    p.add_argument("--set", default="", help="segmenter settings over the cpu preset's, e.g. width=32,lr=0.001")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="build/bench/stage1_swap")
    ns = p.parse_args()
    runs = [r.strip() for r in ns.runs.split(",") if r.strip()]
    if not runs or set(runs) - set(rows):
        p.error(f"--runs {ns.runs!r}: choose from {', '.join(rows)}")
    if ns.pseudo and not (Path(ns.pseudo) / PSEUDO_DIR).is_dir():
        p.error(f"--pseudo {ns.pseudo}: no {PSEUDO_DIR}/ folder there")
    ns.pseudo_label = Path(ns.pseudo).name if ns.pseudo else ns.stage1
    try:
        ns.overrides = config.parse_overrides(SegTrainConfig, ns.set)  # parsed once, for every job
    except ValueError as e:
        p.error(f"--set: {e}")
    seeds = [int(s) for s in ns.seeds.split(",")]
    threads = max(1, (os.cpu_count() or 1) // ns.jobs)  # each job its share of the cores, as in cdsp bench
    with ProcessPoolExecutor(ns.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=bench._worker_init,
                             initargs=(threads, logging.INFO)) as pool:
        miou = {(run, seed): m for run, seed, m in pool.map(one, [(r, s, ns) for s in seeds for r in runs])}
    print(json.dumps({"runs": runs, "scribbles": ns.scribbles, "stage1": ns.pseudo or ns.stage1, "epochs": ns.epochs,
                      "miou": {r: {str(s): round(miou[r, s], 4) for s in seeds} for r in runs}}))
    print(table(runs, seeds, miou))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
