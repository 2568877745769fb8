"""A dataset view for choosing a recipe without touching the val split: part of the training photos held out.

    python benchmarks/carve_split.py --data ../shared/data/voc-real --out build/voc-tune --holdout 300 [--train 1000]

OUT holds symlinks to DATA's folders and class list (nothing is copied) and its own split lists:
val.txt = `--holdout` training ids drawn with `--seed`, train.txt = the other training ids (the first
`--train` of them in the same random order, when given). DATA's own val split is not used, unless
`--holdout 0`: then val.txt is DATA's (a training subset for the benchmark on the real val split).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from cdsp_core import data, outputs


def carve(root: Path, out: Path, holdout: int, train: int | None = None, seed: int = 0) -> tuple[int, int]:
    index = data.load_index(root)
    ids = [item.id for item in index.train]
    random.Random(seed).shuffle(ids)
    val, rest = (ids[:holdout], ids[holdout:]) if holdout else ([item.id for item in index.val], ids)
    rest = rest[:train] if train else rest
    out.mkdir(parents=True, exist_ok=True)
    for entry in root.resolve().iterdir():
        if entry.name not in ("ImageSets", data.MANIFEST, outputs.MARKER) and not (out / entry.name).exists():
            (out / entry.name).symlink_to(entry)
    splits = out / "ImageSets" / "Segmentation"
    splits.mkdir(parents=True, exist_ok=True)
    (splits / "train.txt").write_text("".join(f"{i}\n" for i in sorted(rest)))
    (splits / "val.txt").write_text("".join(f"{i}\n" for i in sorted(val)))
    return len(rest), len(val)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--holdout", type=int, default=400)
    p.add_argument("--train", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    n_train, n_val = carve(Path(a.data), Path(a.out), a.holdout, a.train, a.seed)
    print(f"{a.out}: {n_train} train, {n_val} held-out val ids")


if __name__ == "__main__":
    main()
