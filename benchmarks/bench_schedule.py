"""What a scheduled data prep costs on a loopback S3 (moto's server): today's full copy against the data store.

    .venv/bin/python benchmarks/bench_schedule.py [--sizes 1000,10000] [--full-max N] [--today-max N]
        [--size 32] [--changed 0.01] [--json FILE]

For each dataset size (images; 80 % train, 20 % val, each with its image, scribble and ground
truth, so about 3 objects per image) on a fresh bucket:
- listing: one listing of the prefix (`storage.list_versions`: keys, sizes, ETags);
- today: `prepare(..., copy=True)`, what the data-prep step did before the data store: download,
  decode and hash every object and copy the dataset into the run's artifact, on every run;
- first run: `prepare_to_store` with no champion record: every object downloaded and stored once;
- unchanged: `prepare_to_store` against the first run's record (the no-change scheduled run);
- changed: the same after an annotator added strokes to a share (--changed) of the training scribbles.
Storage: the store's bytes after the first run, and what each later run adds (its record, and
for the changed run its manifest and the changed objects), against today's copy per run.
Prints a markdown table (docs/benchmarks.md); `--json` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' moto server (tests/services.py)

from services import s3_server  # noqa: E402

from cdsp_core import data, datastore, prepare, storage, synth  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def prefix_bytes(s3, bucket: str, prefix: str) -> tuple[int, int]:
    """(objects, bytes) under a prefix."""
    n = size = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            n, size = n + 1, size + obj["Size"]
    return n, size


def add_strokes(root: Path, ids: list[str]) -> None:
    """Label the unlabelled pixels of every other row of these scribbles with their true class."""
    for i in ids:
        path = root / data.DEFAULT_SCRIBBLE_DIR / f"{i}.png"
        scribble, gt = data.read_label(path), data.read_label(root / "SegmentationClass" / f"{i}.png")
        new = (scribble == 255) & (gt != 255)
        new[::2, :] = False
        scribble[new] = gt[new]
        Image.fromarray(scribble.astype(np.uint8)).save(path)


def upload_replicated(s3, bucket: str, root: Path, n_images: int) -> None:
    """Upload a dataset of `n_images` made of `root`'s files: image k of a split has the bytes of
    image k mod n of `root`'s split under its own id (a valid dataset; its files repeat)."""
    puts = []
    dirs = ((data.IMAGE_DIR, ".jpg"), (data.DEFAULT_SCRIBBLE_DIR, ".png"), ("SegmentationClass", ".png"))
    for split in ("train", "val"):
        ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        n = int(n_images * 0.8) if split == "train" else n_images - int(n_images * 0.8)
        names = [f"{split}_{k:05d}" for k in range(n)]
        for k, name in enumerate(names):
            src = ids[k % len(ids)]
            for d, ext in dirs:
                puts.append((f"voc/{d}/{name}{ext}", root / d / f"{src}{ext}"))
        puts.append((f"voc/ImageSets/Segmentation/{split}.txt", "".join(f"{i}\n" for i in names).encode()))
    puts.append(("voc/classes.txt", root / "classes.txt"))
    storage.parallel(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1] if isinstance(kv[1], bytes)
                                              else kv[1].read_bytes()), puts)


def bench_size(server, n_images: int, size: int, changed: float, tmp: Path, full: bool, today: bool) -> dict:
    """The figures for one dataset size; `full`: also today's full copy, the first run and a changed run,
    else (for sizes too slow for that on a loaded machine) the listing and the unchanged run only,
    against a record made from the listing (what the first run would have written), and with
    `today` today's full copy as well."""
    s3 = server.client()
    bucket = server.new_bucket(f"bench{n_images}")
    n_train = int(n_images * 0.8)
    data_uri, store = f"s3://{bucket}/voc", f"s3://{bucket}/kfp/datastore"
    if full:
        root = synth.make_dataset(tmp / f"data{n_images}", n_train=n_train, n_val=n_images - n_train, size=size)
        storage.upload_dir(root, data_uri)
    else:
        root = synth.make_dataset(tmp / f"base{n_images}", n_train=80, n_val=20, size=size)
        upload_replicated(s3, bucket, root, n_images)
    n_objects, data_bytes = prefix_bytes(s3, bucket, "voc/")
    r = {"images": n_images, "objects": n_objects, "data_bytes": data_bytes, "full": full}

    r["listing_s"], listing = timed(lambda: storage.list_versions(data_uri))
    if not full:
        digest = datastore.listing_digest(listing, data.DEFAULT_SCRIBBLE_DIR, None)
        a = {"schema": datastore.RECORD_SCHEMA, "run": "run-a", "listing": digest, "fingerprint": "-"}
        r["unchanged_s"], same = timed(lambda: prepare.prepare_to_store(data_uri, store, a))
        assert same.manifest is None and same.record["cost"]["downloaded"] == 0
        if today:
            r["today_s"], _ = timed(lambda: prepare.prepare(data_uri, str(tmp / f"today{n_images}"), copy=True))
        return r
    r["today_s"], _ = timed(lambda: prepare.prepare(data_uri, str(tmp / f"today{n_images}"), copy=True))
    r["today_copy_bytes"] = sum(p.stat().st_size for p in (tmp / f"today{n_images}").rglob("*") if p.is_file())

    r["first_s"], first = timed(lambda: prepare.prepare_to_store(data_uri, store))
    a = datastore.write_record(store, "run-a", first.record)
    r["store_objects"], r["store_bytes"] = prefix_bytes(s3, bucket, "kfp/datastore/")
    r["manifest_bytes"] = first.record["cost"]["manifest_bytes"]

    r["unchanged_s"], same = timed(lambda: prepare.prepare_to_store(data_uri, store, a))
    assert same.manifest is None and same.record["cost"]["downloaded"] == 0
    datastore.write_record(store, "run-b", same.record)
    after_b = prefix_bytes(s3, bucket, "kfp/datastore/")
    r["unchanged_adds_bytes"] = after_b[1] - r["store_bytes"]
    r["unchanged_downloaded"] = same.record["cost"]["downloaded"]

    ids = [f"train_{i:05d}" for i in range(max(1, int(n_train * changed)))]
    add_strokes(root, ids)
    for i in ids:
        rel = f"{data.DEFAULT_SCRIBBLE_DIR}/{i}.png"
        s3.put_object(Bucket=bucket, Key=f"voc/{rel}", Body=(root / rel).read_bytes())
    r["changed_images"] = len(ids)
    r["changed_s"], upd = timed(lambda: prepare.prepare_to_store(data_uri, store, a))
    assert upd.record["changes"]["changed"] == {"train": ids}
    datastore.write_record(store, "run-c", upd.record)
    r["changed_downloaded"] = upd.record["cost"]["downloaded"]
    r["changed_adds_bytes"] = prefix_bytes(s3, bucket, "kfp/datastore/")[1] - after_b[1]
    return r


def year_of_weekly_runs(r: dict, changed_weeks: int = 52) -> dict:
    """Storage after 52 weekly runs: today (a full copy each run) and the store (the data once, then each
    week's record, and for a week with new scribbles its manifest and the changed objects)."""
    return {"today_bytes": 52 * r["today_copy_bytes"],
            "store_all_changed_bytes": r["store_bytes"] + changed_weeks * r["changed_adds_bytes"],
            "store_none_changed_bytes": r["store_bytes"] + 52 * r["unchanged_adds_bytes"]}


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="dataset sizes in images, comma-separated")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--changed", type=float, default=0.01, help="share of training scribbles changed")
    parser.add_argument("--full-max", type=int, default=10000,
                        help="sizes above this: the listing and the unchanged run only")
    parser.add_argument("--today-max", type=int, default=0,
                        help="sizes above --full-max up to this: also today's full copy")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cdsp-bench-") as tmp, s3_server(Path(tmp) / "moto") as server:
        for k, v in server.env().items():
            os.environ[k] = v
        for n in (int(s) for s in args.sizes.split(",")):
            r = bench_size(server, n, args.size, args.changed, Path(tmp), full=n <= args.full_max,
                           today=n <= args.today_max)
            if r["full"]:
                r["year"] = year_of_weekly_runs(r)
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    print(f"Loopback S3 (moto_server on 127.0.0.1), {args.size}x{args.size}-px synthetic images; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}\n")
    print("| images | objects | data | listing | today (full copy) | first run (store) | unchanged | "
          f"changed ({args.changed:.0%} scribbles) | today / unchanged |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if not r["full"]:
            today = f"{r['today_s']:.1f} s" if "today_s" in r else "-"
            ratio = f"{r['today_s'] / r['unchanged_s']:.0f}x" if "today_s" in r else "-"
            print(f"| {r['images']} | {r['objects']} | {mb(r['data_bytes'])} | {r['listing_s']:.2f} s | {today} | - | "
                  f"{r['unchanged_s']:.2f} s | - | {ratio} |")
            continue
        print(f"| {r['images']} | {r['objects']} | {mb(r['data_bytes'])} | {r['listing_s']:.2f} s | "
              f"{r['today_s']:.1f} s | {r['first_s']:.1f} s | {r['unchanged_s']:.2f} s | "
              f"{r['changed_s']:.1f} s ({r['changed_downloaded']} downloaded) | "
              f"{r['today_s'] / r['unchanged_s']:.0f}x |")
    print("\n| images | store after first run | manifest | unchanged run adds | changed run adds | "
          "today: a year of weekly runs | store: a year, nothing changed | store: a year, changes every week |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in (r for r in rows if r["full"]):
        y = r["year"]
        print(f"| {r['images']} | {mb(r['store_bytes'])} | {mb(r['manifest_bytes'])} | "
              f"{mb(r['unchanged_adds_bytes'])} | {mb(r['changed_adds_bytes'])} | {mb(y['today_bytes'])} | "
              f"{mb(y['store_none_changed_bytes'])} | {mb(y['store_all_changed_bytes'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
