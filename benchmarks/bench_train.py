"""Training speed (images/s) of `train.train_segmenter` on this machine.

    .venv/bin/python benchmarks/bench_train.py [--only cpu-preset,r50-321] [--threads N] [--epochs 3]

- cpu-preset: the `cpu` preset (DeepLab-v2 / narrow ResNet-18, 64-px crops, every CDSP loss term on)
              on 64 synthetic 96-px images;
- r50-321:    DeepLab-v2 / ResNet-50 on 321×321 crops (the paper's segmenter at the crop size of
              many references), batch 4, every loss term on, 8 synthetic 321-px images; fp32 on
              the CPU (bf16 autocast is slower than fp32 on CPUs without bf16 units), AMP on CUDA.

The figure is the training loop's own images/s (data loading included, validation and
checkpoints not), as logged per epoch; the first epoch pays for one-time kernel set-up, so the
best later epoch is reported. Weights start from scratch (speed does not depend on them).
Prints a markdown table with the machine; run it when the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from cdsp_core import config, pseudolabel, synth, train
from cdsp_core.config import PseudoLabelConfig, SegTrainConfig

CASES = {
    "cpu-preset": dict(preset="cpu", n_train=64, size=96, overrides={}),
    "r50-321": dict(preset="paper", n_train=8, size=321,
                    overrides=dict(segmenter="deeplabv2", backbone="resnet50", crop_size=321, batch_size=4,
                                   warmup_epochs=0, workers=0)),
}


def run_case(name: str, tmp: Path, epochs: int) -> dict:
    case = CASES[name]
    data = synth.make_dataset(tmp / f"{name}-data", n_train=case["n_train"], n_val=1, size=case["size"], seed=0)
    # ground truth as external pseudo-labels: real maps of the right sizes, without a classifier
    pseudo_label(data, tmp / f"{name}-pseudo")
    cuda = torch.cuda.is_available()
    cfg = config.build(SegTrainConfig, case["preset"], {**case["overrides"], "epochs": epochs,
                                                        "device": "cuda" if cuda else "cpu", "amp": cuda})
    speeds: list[float] = []
    start = time.perf_counter()
    train.train_segmenter(str(data), str(tmp / f"{name}-pseudo"), str(tmp / f"{name}-model"), cfg,
                          on_metrics=lambda m, step: speeds.append(m["images_per_sec"]))
    width = f"width {cfg.width}, " if cfg.width != 64 else ""
    return {"case": name, "segmenter": f"{cfg.segmenter} / {cfg.backbone} ({width}stride {cfg.output_stride})",
            "crop": cfg.crop_size,
            "batch": cfg.batch_size, "amp": cfg.amp, "images": case["n_train"], "epochs": epochs,
            "images_per_sec": max(speeds[1:] or speeds), "first_epoch": speeds[0],
            "wall_s": time.perf_counter() - start}


def pseudo_label(data: Path, out: Path) -> None:
    pseudolabel.pseudo_label(str(data), str(out), PseudoLabelConfig(), external_pseudo=str(data / "SegmentationClass"))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(CASES), help=f"comma-separated cases of {', '.join(CASES)}")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per case (the first is not reported)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # per-epoch lines on stderr
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cdsp-bench-train-") as tmp:
        for name in args.only.split(","):
            rows.append(run_case(name, Path(tmp), args.epochs))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name()
    print(f"Machine: {device}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.1f}\n")
    print("| case | segmenter | crop | batch | AMP | images/s | first epoch | wall (s) |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['case']} | {r['segmenter']} | {r['crop']} | {r['batch']} | {'yes' if r['amp'] else 'no'} | "
              f"{r['images_per_sec']:.2f} | {r['first_epoch']:.2f} | {r['wall_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
