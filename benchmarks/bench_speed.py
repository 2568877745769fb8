"""Speed of the stages besides training: CAM pseudo-labelling, evaluation, and the demo pipeline by stage.

    .venv/bin/python benchmarks/bench_speed.py [--only cam,eval,demo] [--n 64] [--threads N] [-- DEMO_ARGS]

- cam:  `pseudolabel.pseudo_label` (multi-scale + flip CAMs, pseudo-label, both distance maps,
        PNG output) with the `cpu` preset's classifier and CAM scales, on synthetic 96-px images;
- eval: `evaluate.evaluate` (single scale, full resolution) with the `cpu` preset's segmenter on
        synthetic 96-px val images;
- demo: `python -m pipelines.local_run` (what `make demo` runs: the whole Kubeflow pipeline
        through kfp's local runner, `cpu` preset, synthetic data) in a temporary folder; the wall
        time of each task from kfp's own log lines ("Executing task" ... "finished"). Arguments
        after `--` go to local_run (e.g. `-- --epochs 2`).

Training images/s are `benchmarks/bench_train.py`'s. Weights here are freshly initialised
(speed does not depend on them); model folders are written in the format of docs/design.md.
Prints markdown tables with the machine; run it when the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import torch

from cdsp_core import config, evaluate, modelfolder, pseudolabel, synth
from cdsp_core.config import EvalConfig, PseudoLabelConfig, SegTrainConfig

PRESET = "cpu"
REPO = Path(__file__).resolve().parents[1]
TASK_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - \w+ - (Executing task|Task) '([^']+)'"
                       r"(?: finished with status (\w+))?")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def fake_model(folder: Path, kind: str) -> Path:
    """A model folder (untrained weights) of the `cpu` preset as `cdsp train-classifier/train-seg` write it."""
    cls = config.ClassifierConfig if kind == "classifier" else SegTrainConfig
    info = {**config.to_dict(config.build(cls, PRESET)), "kind": kind, "class_names": synth.CLASSES}
    folder.mkdir(parents=True)
    torch.save(modelfolder.build_model(info).state_dict(), folder / modelfolder.WEIGHTS)
    (folder / modelfolder.CONFIG).write_text(json.dumps(info))
    return folder


def bench_cam(tmp: Path, n: int) -> tuple[str, int, float, str]:
    data = synth.make_dataset(tmp / "cam-data", n_train=n, n_val=1, size=96)
    classifier = fake_model(tmp / "cam-classifier", "classifier")
    cfg = config.build(PseudoLabelConfig, PRESET)
    start = time.perf_counter()
    pseudolabel.pseudo_label(str(data), str(tmp / "cam-out"), cfg, classifier_dir=str(classifier), device="cpu")
    setting = (f"96 px, classifier {config.PRESETS[PRESET]['cls_backbone']} (stride "
               f"{config.PRESETS[PRESET]['cls_output_stride']}), scales {cfg.cam_scales} + flips, "
               f"random walk {'on' if cfg.cam_random_walk else 'off'}")
    return "CAM pseudo-labels + distance maps", n, time.perf_counter() - start, setting


def bench_eval(tmp: Path, n: int) -> tuple[str, int, float, str]:
    data = synth.make_dataset(tmp / "eval-data", n_train=1, n_val=n, size=96)
    cfg = config.build(SegTrainConfig, PRESET)
    fake_model(tmp / "eval-model", "segmenter")
    start = time.perf_counter()
    evaluate.evaluate(str(data), str(tmp / "eval-model"), str(tmp / "eval-out"), EvalConfig(n_overlays=0),
                      device="cpu")
    return "evaluation (single scale)", n, time.perf_counter() - start, \
        f"96 px, segmenter {cfg.segmenter}/{cfg.backbone}"


def task_times(log: str) -> list[tuple[str, float, str]]:
    """(task, seconds, status) from kfp's local-runner log, in the order the tasks started."""
    started: dict[str, datetime] = {}
    out = []
    for line in ANSI.sub("", log).splitlines():
        m = TASK_LINE.match(line.strip())
        if not m:
            continue
        stamp, kind, task, status = m.groups()
        t = datetime.strptime(stamp, "%H:%M:%S.%f")
        if kind == "Executing task":
            started[task] = t
        elif task in started:
            seconds = (t - started.pop(task)) % timedelta(days=1)  # a run across midnight
            out.append((task, seconds.total_seconds(), status or ""))
    return out


def bench_demo(tmp: Path, extra: list[str]) -> tuple[list[tuple[str, float, str]], float, int]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'demo-mlflow.db'}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipelines.local_run", "--out", str(tmp / "demo"), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
    return task_times(proc.stdout + proc.stderr), wall, proc.returncode


def main() -> int:
    argv = sys.argv[1:]
    demo_args = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="cam,eval,demo")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--n", type=int, default=64, help="images for cam and eval")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = args.only.split(",")
    rows, demo = [], None
    with tempfile.TemporaryDirectory(prefix="cdsp-bench-speed-") as tmp:
        tmp = Path(tmp)
        if "cam" in only:
            rows.append(bench_cam(tmp, args.n))
        if "eval" in only:
            rows.append(bench_eval(tmp, args.n))
        if "demo" in only:
            demo = bench_demo(tmp, demo_args)
    print(f"Machine: CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    if rows:
        print("| stage | images | seconds | images/s | setting |")
        print("| --- | ---: | ---: | ---: | --- |")
        for name, n, seconds, setting in rows:
            print(f"| {name} | {n} | {seconds:.1f} | {n / seconds:.2f} | {setting} |")
    if demo:
        tasks, wall, rc = demo
        print(f"\nDemo pipeline (`python -m pipelines.local_run {' '.join(demo_args)}`), exit status {rc}, "
              f"{wall:.0f} s in all (incl. synthetic data and start-up):\n")
        print("| task | seconds | status |")
        print("| --- | ---: | --- |")
        for task, seconds, status in tasks:
            print(f"| {task} | {seconds:.0f} | {status} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
