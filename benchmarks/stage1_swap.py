"""Which half of a degraded scribble set costs `cdsp` its points: the segmenter's own scribbles
(its scribble CE) or stage 1 (pseudo-labels and distance maps made from them)?

Trains the bench's `cdsp` row (or another clean-scribble row, `--run`) with the scribbles of one
variant and the stage 1 of another, from a finished `cdsp bench` folder (its training views and
stage-1 outputs), and prints val mIoU per seed. docs/benchmarks.md quotes it:

    python benchmarks/stage1_swap.py --bench build/bench/results50 --data build/bench/data \
        --scribbles drop0.5 --stage1 clean --epochs 50 --seeds 0,1,2 --jobs 2
    python benchmarks/stage1_swap.py --bench build/bench/results --data build/bench/data \
        --run scribble+pseudo+lorm --scribbles drop0.5 --stage1 drop0.5 --epochs 15
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cdsp_core import bench, config
from cdsp_core.config import EvalConfig, SegTrainConfig


def one(args: tuple) -> tuple[int, float]:
    seed, ns = args
    seg_cfg = config.build(SegTrainConfig, "cpu", {"epochs": ns.epochs})
    eval_cfg = config.build(EvalConfig, "cpu", {"n_overlays": 0})
    root = Path(ns.bench)
    stage1 = {"pseudo": str(root / "stage1" / ns.stage1 / "pseudo")}
    folder = Path(ns.out) / ns.run / f"{ns.scribbles}-scribbles.{ns.stage1}-stage1" / f"seed{seed}"
    outcome = bench.train_and_evaluate(bench.RUNS_BY_NAME[ns.run], seed, root / "data" / ns.scribbles,
                                       Path(ns.data), stage1, folder, seg_cfg, eval_cfg, False, None)
    return seed, outcome["miou"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True, help="a finished cdsp bench folder (its data/ and stage1/)")
    p.add_argument("--data", required=True, help="the bench's dataset root (val split with ground truth)")
    variants = [bench.CLEAN, *bench.VARIANTS]
    p.add_argument("--scribbles", required=True, choices=variants, help="the segmenter's scribbles")
    p.add_argument("--stage1", required=True, choices=variants, help="whose stage 1 (pseudo-labels, distance maps)")
    rows = [r.name for r in bench.RUNS if r.scribbles == bench.CLEAN and "pseudo" in r.terms]
    p.add_argument("--run", default="cdsp", choices=rows, help="the bench row to train (its loss terms and settings)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="build/bench/stage1_swap")
    ns = p.parse_args()
    seeds = [int(s) for s in ns.seeds.split(",")]
    threads = max(1, (os.cpu_count() or 1) // ns.jobs)  # each job its share of the cores, as in cdsp bench
    with ProcessPoolExecutor(ns.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=bench._worker_init,
                             initargs=(threads, logging.INFO)) as pool:
        results = dict(pool.map(one, [(s, ns) for s in seeds]))
    print(json.dumps({"run": ns.run, "scribbles": ns.scribbles, "stage1": ns.stage1, "epochs": ns.epochs,
                      "miou": {str(s): round(m, 4) for s, m in sorted(results.items())}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
