"""The `cpu` preset against the plain yardstick, side by side: val mIoU and wall time per run.

    .venv/bin/python benchmarks/vs_yardstick.py --data build/bench/data [--seeds 3] [--threads 2]
        [--yardstick ../shared/tools/plain_baseline.py] [--out build/vs_yardstick] [--epochs N]

For each seed, in turn: the yardstick (`plain_baseline.py DATA --seed s`, its two runs:
scribbles only, full ground truth), then ours (`cdsp bench --preset cpu --runs
scribble-only,full-supervision --seeds 1 --seed s`, the same two runs). Both are separate
processes with the same thread count, one after the other on the same machine, so that load
drifts fall on both alike. A run's seconds are its training plus the val prediction, as each
program measures them (process start-up and data loading before the first run excluded).

Prints (and writes to OUT/results.md and results.json) the median and range over seeds of
each run's val mIoU and seconds, our time over the yardstick's per seed, and the yardstick's
full − scribble gap (how far the data separates the two supervisions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

RUNS = {"scribble": "scribble-only", "full": "full-supervision"}  # yardstick run -> our bench run


def yardstick(script: Path, data: Path, seed: int, out: Path, env: dict) -> dict:
    path = out / f"yardstick-seed{seed}.json"
    if not path.exists():
        subprocess.run([sys.executable, str(script), str(data), "--seed", str(seed), "--json", str(path)],
                       check=True, env=env)
    return json.loads(path.read_text())


def ours(data: Path, seed: int, out: Path, env: dict, extra: list[str]) -> dict:
    folder = out / f"cpu-seed{seed}"
    subprocess.run([sys.executable, "-m", "cdsp_core", "bench", "--data", str(data), "--out", str(folder),
                    "--preset", "cpu", "--runs", ",".join(RUNS.values()), "--seeds", "1", "--seed", str(seed),
                    "--jobs", "1", "--no-mlflow", *extra], check=True, env=env, stdout=subprocess.DEVNULL)
    runs = {r["name"]: r for r in json.loads((folder / "results.json").read_text())["runs"]}
    return {k: {"miou": runs[name]["miou"]["mean"], "seconds": runs[name]["seconds"]} for k, name in RUNS.items()}


def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="VOC-layout dataset with ground truth (e.g. from cdsp synth)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of both programs")
    ap.add_argument("--yardstick", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "tools" /
                                               "plain_baseline.py"))
    ap.add_argument("--out", default="build/vs_yardstick")
    ap.add_argument("--epochs", type=int, default=None, help="our epochs (default: the cpu preset's)")
    args = ap.parse_args()
    script, data, out = Path(args.yardstick), Path(args.data).resolve(), Path(args.out)
    if not script.is_file():
        print(f"vs_yardstick: error: {script}: the yardstick is not there (--yardstick)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    extra = ["--epochs", str(args.epochs)] if args.epochs else []
    rows: dict[str, list[dict]] = {"yardstick": [], "cpu preset": []}
    for seed in range(args.seeds):
        rows["yardstick"].append(yardstick(script, data, seed, out, env))
        rows["cpu preset"].append(ours(data, seed, out, env, extra))
        print(f"seed {seed}: " + "; ".join(f"{who} {k} {r[-1][k]['miou']:.3f} in {r[-1][k]['seconds']:.0f} s"
                                            for who, r in rows.items() for k in RUNS), flush=True)

    lines = [f"# The cpu preset against the yardstick on {data}", "",
             f"{args.seeds} seeds, {args.threads} threads, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}. Median (min–max) over seeds.", "",
             "| program | run | val mIoU | seconds | our seconds / the yardstick's |",
             "| --- | --- | ---: | ---: | ---: |"]
    for k in RUNS:
        ratio = [o[k]["seconds"] / y[k]["seconds"] for o, y in zip(rows["cpu preset"], rows["yardstick"])]
        for who, per_seed in rows.items():
            mious, secs = [r[k]["miou"] for r in per_seed], [r[k]["seconds"] for r in per_seed]
            lines.append(f"| {who} | {k} | {spread(mious, '{:.3f}')} | {spread(secs, '{:.0f}')} | "
                         f"{spread(ratio, '{:.2f}') if who == 'cpu preset' else ''} |")
    gaps = [y["full"]["miou"] - y["scribble"]["miou"] for y in rows["yardstick"]]
    sds = {f"{who} {k}": statistics.stdev([r[k]["miou"] for r in per_seed]) if args.seeds > 1 else 0.0
           for who, per_seed in rows.items() for k in RUNS}
    lines += ["", f"Yardstick full − scribble: {spread(gaps, '{:+.3f}')} mIoU.",
              "Standard deviation over seeds: " + ", ".join(f"{k} {v:.3f}" for k, v in sds.items()) + "."]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text, encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"seeds": args.seeds, "threads": args.threads, **rows},
                                                 indent=2) + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
