"""`cdsp prepare`: validate a dataset and write its manifest (and, with --copy, a clean copy).

Every listed image is decoded, every scribble and ground-truth map is read and checked
against its image's size and the class list, and every file is hashed. The manifest:

    {"schema": "cdsp-manifest-v1", "source": ..., "classes": [names], "scribble_dir": ...,
     "split_dir": ..., "copied": bool, "fingerprint": "<sha256>", "n_train": N, "n_val": N,
     "images": [{"id", "split", "labels": [classes >= 1 in its scribble], "scribble_fraction",
                 "width", "height", "sha256": {"image", "scribble"?, "gt"?}}],
     "warnings": [...]}

The fingerprint hashes the (split, id, image sha256, scribble sha256) of every image and
nothing else: it changes when an image or scribble is added, removed, edited or moved to
another split, and not when the folder moves, files are touched, ground truth or the
class names change, or the data is copied.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cdsp_core import config, data
from cdsp_core.data import IGNORE, Item
from cdsp_core.errors import CdspError
from cdsp_core.fsutil import atomic_write_text
from cdsp_core.progress import progress

log = logging.getLogger(__name__)

SCHEMA = "cdsp-manifest-v1"
# Largest file of an s3:// dataset that is downloaded at all (checked from the listing, before any
# download). Pillow's pixel limit (about 89 Mpx) is checked only once a file is here; this keeps a
# huge object from filling the disk first. 256 MiB holds an uncompressed RGB image at that limit.
MAX_OBJECT_BYTES = 256 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(images: list[dict]) -> str:
    """The data fingerprint: a hash of every image's split, id, image and scribble hashes."""
    keys = sorted((im["split"], im["id"], im["sha256"]["image"], im["sha256"].get("scribble", ""))
                  for im in images)
    return config.settings_digest(keys)


def _check_label(path: Path, what: str, image: Path, size: tuple[int, int], n_classes: int) -> np.ndarray:
    label = data.read_label(path)
    if label.shape != size:
        raise CdspError(f"{path}: {what} is {label.shape[1]}x{label.shape[0]} but its image {image} "
                        f"is {size[1]}x{size[0]}")
    bad = np.unique(label[(label >= n_classes) & (label != IGNORE)])
    if bad.size:
        raise CdspError(f"{path}: {what} holds class index {int(bad[0])}, outside the class list "
                        f"(0..{n_classes - 1}; 255 = unlabelled)")
    return label


def check_item(item: Item, split: str, n_classes: int) -> dict:
    """Validate one image with its scribble and ground truth; its manifest entry."""
    image = data.read_image(item.image)
    size = image.shape[:2]
    entry: dict = {"id": item.id, "split": split, "labels": [], "scribble_fraction": 0.0,
                   "width": int(size[1]), "height": int(size[0]), "sha256": {"image": sha256_file(item.image)}}
    if item.scribble is not None:
        scribble = _check_label(item.scribble, "scribble", item.image, size, n_classes)
        entry["labels"] = data.image_labels(scribble, n_classes)
        entry["scribble_fraction"] = round(float(np.mean(scribble != IGNORE)), 6)
        entry["sha256"]["scribble"] = sha256_file(item.scribble)
    if item.gt is not None:
        _check_label(item.gt, "ground truth", item.image, size, n_classes)
        entry["sha256"]["gt"] = sha256_file(item.gt)
    return entry


def _check_all(index: data.DatasetIndex) -> list[dict]:
    """Check every item (a few threads: decoding and hashing release the GIL)."""
    jobs = [(item, split) for split, items in index.splits.items() for item in items]
    n_classes = len(index.classes)

    def check(job: tuple[Item, str]) -> dict | CdspError:
        try:
            return check_item(job[0], job[1], n_classes)
        except CdspError as e:
            return e

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = list(progress(pool.map(check, jobs), "checking images", total=len(jobs)))
    errors = [r for r in results if isinstance(r, CdspError)]
    if len(errors) > 1:
        for e in errors:
            log.error("%s", e)
        raise CdspError(f"{errors[0]} (and {len(errors) - 1} more problems, logged above)")
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def _warnings(index: data.DatasetIndex, images: list[dict]) -> list[str]:
    out = list(index.warnings)
    for im in images:
        if im["split"] == "train" and im["scribble_fraction"] == 0.0:
            out.append(f"train image {im['id']}: its scribble has no labelled pixel")
    no_gt = [im["id"] for im in images if im["split"] == "val" and "gt" not in im["sha256"]]
    if no_gt:
        out.append(f"{len(no_gt)} val images have no ground truth and cannot be evaluated (e.g. {no_gt[0]})")
    both = sorted({i.id for i in index.train} & {i.id for i in index.val})
    if both:
        out.append(f"{len(both)} images are in both train and val (e.g. {both[0]})")
    return out


def _copy_dataset(index: data.DatasetIndex, manifest: dict, out: Path, move: bool) -> None:
    """Write `out` as a dataset root: the validated files, the lists, classes.txt, the manifest."""
    if out.resolve() == index.root.resolve() or out.resolve() in index.root.resolve().parents:
        raise CdspError(f"{out}: the copy cannot go into the dataset itself or a folder holding it "
                        f"({index.root}); choose another --out")
    files = {p for items in index.splits.values() for i in items for p in (i.image, i.scribble, i.gt) if p}
    with data.new_output_dir(out, data.MANIFEST) as tmp:
        for src in progress(sorted(files), "copying files"):
            dst = tmp / src.relative_to(index.root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if move:
                os.replace(src, dst)
            else:
                shutil.copyfile(src, dst)
        for split, items in index.splits.items():
            lists = tmp / index.split_dir
            lists.mkdir(parents=True, exist_ok=True)
            (lists / f"{split}.txt").write_text("".join(f"{i.id}\n" for i in items), encoding="utf-8")
        (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in index.classes), encoding="utf-8")
        (tmp / data.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def _prepare_local(root: Path, source: str, out: Path, scribble_dir: str, split_dir: str | None,
                   copy: bool, move: bool = False) -> dict:
    index = data.load_index(root, scribble_dir=scribble_dir or data.DEFAULT_SCRIBBLE_DIR,
                            split_dir=split_dir or None)
    images = _check_all(index)
    manifest = {
        "schema": SCHEMA,
        "source": source,
        "classes": index.classes,
        "scribble_dir": index.scribble_dir,
        "split_dir": index.split_dir,
        "copied": copy,
        "fingerprint": fingerprint(images),
        "n_train": len(index.train),
        "n_val": len(index.val),
        "images": images,
        "warnings": _warnings(index, images),
    }
    for w in manifest["warnings"]:
        log.warning("%s", w)
    if copy:
        _copy_dataset(index, manifest, out, move)
    else:
        atomic_write_text(out / data.MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def prepare(data_uri: str, out_dir: str, scribble_dir: str = data.DEFAULT_SCRIBBLE_DIR,
            split_dir: str | None = None, copy: bool = False, max_object_bytes: int = MAX_OBJECT_BYTES) -> dict:
    """Validate the dataset at `data_uri` (a folder or s3://bucket/prefix) and write
    `out_dir/manifest.json`; with `copy` (always for S3) also the dataset itself. Returns the manifest.

    Nothing is written unless every check passes. An S3 object over `max_object_bytes` is refused
    from the listing, before anything is downloaded.
    """
    out = Path(out_dir)
    if data_uri.startswith("s3://"):
        from cdsp_core import storage  # boto3 is only needed here

        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.download.", dir=out.parent) as tmp:
            try:
                storage.download_dir(data_uri, tmp, max_bytes=max_object_bytes)
            except CdspError as e:
                if "over the limit of" in str(e):
                    raise CdspError(f"{e} (a larger limit: --max-object-bytes)") from e
                raise
            try:
                return _prepare_local(Path(tmp), data_uri, out, scribble_dir, split_dir, copy=True, move=True)
            except CdspError as e:  # name the object the user knows, not our download folder
                raise CdspError(str(e).replace(str(tmp), data_uri.rstrip("/"))) from e
    root = Path(data_uri.removeprefix("file://"))
    return _prepare_local(root, str(root.resolve()), out, scribble_dir, split_dir, copy)


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prepare", help="validate a dataset; write its manifest and fingerprint",
                              description="Check every listed image, scribble and ground-truth map and "
                                          "write OUT/manifest.json (classes, per-image labels, sha256, "
                                          "the data fingerprint).")
    p.add_argument("--data", required=True, help="dataset root: a folder or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="output folder for manifest.json (and the copy)")
    p.add_argument("--scribble-dir", default=data.DEFAULT_SCRIBBLE_DIR,
                   help=f"scribble folder inside the root (default: {data.DEFAULT_SCRIBBLE_DIR})")
    p.add_argument("--split-dir", default=None,
                   help="split-list folder inside the root (default: ImageSets/SegmentationAug if it "
                        "holds lists, else ImageSets/Segmentation)")
    p.add_argument("--copy", action="store_true",
                   help="also copy the validated files into OUT in the VOC layout (implied for s3://)")
    p.add_argument("--max-object-bytes", type=int, default=MAX_OBJECT_BYTES,
                   help=f"s3:// data: refuse any object larger than this, before downloading anything "
                        f"(default: {MAX_OBJECT_BYTES})")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    m = prepare(args.data, args.out, args.scribble_dir, args.split_dir, args.copy, args.max_object_bytes)
    print(f"prepared {m['n_train']} train and {m['n_val']} val images, {len(m['classes'])} classes, "
          f"{len(m['warnings'])} warnings; fingerprint {m['fingerprint'][:16]}; "
          f"manifest {Path(args.out) / data.MANIFEST}")
    return 0
