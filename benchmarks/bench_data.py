"""Time the data layer: `synth`, `prepare` and `degrade-scribbles` on the default synthetic dataset.

    .venv/bin/python benchmarks/bench_data.py [--n-train 400] [--n-val 100] [--size 96] [--repeat 3]

Goals (one process, default sizes): synth at least 50 images/s (hundreds of 96-px images in a
few seconds), prepare at least 200 images/s, degrade (drop and shrink) at least 200 scribbles/s.
Prints a markdown table; the best of `repeat` runs is kept (the least disturbed by other load).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cdsp_core import prepare, scribbles, synth


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = args.n_train + args.n_val
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "data", Path(tmp) / "out"
        t_synth = best_of(lambda: synth.make_dataset(root, args.n_train, args.n_val, args.size), args.repeat)
        t_prep = best_of(lambda: prepare.prepare(str(root), str(out)), args.repeat)
        rows = [("synth", n, t_synth, 50), ("prepare", n, t_prep, 200)]
        for mode, ratio in (("drop", 0.5), ("shrink", 0.5)):
            dest = Path(tmp) / mode
            t = best_of(lambda m=mode, r=ratio, d=dest: scribbles.degrade_dir(
                root / "pascal_2012_scribble", d, m, r, seed=0), args.repeat)
            rows.append((f"degrade {mode}({ratio})", n, t, 200))
            shutil.rmtree(dest)
    print(f"{n} images of {args.size}x{args.size} px; best of {args.repeat} runs. "
          f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}\n")
    print("| step | images | seconds | images/s | goal (images/s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    ok = True
    for name, count, t, goal in rows:
        print(f"| {name} | {count} | {t:.2f} | {count / t:.0f} | {goal} |")
        ok &= count / t >= goal
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
