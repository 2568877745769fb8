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
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cdsp_core import config, data, datastore, outputs, storage
from cdsp_core.data import IGNORE, Item
from cdsp_core.errors import CdspError
from cdsp_core.fsutil import sha256_file
from cdsp_core.progress import progress

log = logging.getLogger(__name__)

SCHEMA = "cdsp-manifest-v1"
# Largest file of an s3:// dataset that is downloaded at all (checked from the listing, before any
# download). Pillow's pixel limit (about 89 Mpx) is checked only once a file is here; this keeps a
# huge object from filling the disk first. 256 MiB holds an uncompressed RGB image at that limit.
MAX_OBJECT_BYTES = 256 * 1024 * 1024


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


def check_item(item: Item, split: str, n_classes: int, *, prev: dict | None = None,
               reuse: frozenset[str] = frozenset(), hashes: dict[str, str] | None = None) -> dict:
    """Validate one image with its scribble and ground truth; its manifest entry.

    `reuse` names the files ("image", "scribble", "gt") unchanged since `prev`, the entry an
    earlier manifest gave this image: what was found then stands and they are not read.
    `hashes`: SHA-256 already known, by file (computed while downloading).
    """
    hashes = hashes or {}
    if "image" in reuse:
        size = (prev["height"], prev["width"])
    else:
        size = data.read_image(item.image).shape[:2]
    entry: dict = {"id": item.id, "split": split, "labels": [], "scribble_fraction": 0.0, "scribble_pixels": {},
                   "width": int(size[1]), "height": int(size[0]),
                   "sha256": {"image": hashes.get("image") or sha256_file(item.image)}}
    if item.scribble is not None:
        if "scribble" in reuse:
            entry.update({k: prev[k] for k in ("labels", "scribble_fraction", "scribble_pixels")})
        else:
            scribble = _check_label(item.scribble, "scribble", item.image, size, n_classes)
            entry["labels"] = data.image_labels(scribble, n_classes)
            entry["scribble_fraction"] = round(float(np.mean(scribble != IGNORE)), 6)
            counts = np.bincount(scribble.ravel(), minlength=256)[:n_classes]
            entry["scribble_pixels"] = {str(c): int(n) for c, n in enumerate(counts) if n}
        entry["sha256"]["scribble"] = hashes.get("scribble") or sha256_file(item.scribble)
    if item.gt is not None:
        if "gt" not in reuse:
            _check_label(item.gt, "ground truth", item.image, size, n_classes)
        entry["sha256"]["gt"] = hashes.get("gt") or sha256_file(item.gt)
    return entry


def _check_all(index: data.DatasetIndex, how: dict[tuple[str, str], dict] | None = None) -> list[dict]:
    """Check every item (a few threads: decoding and hashing release the GIL); `how`: check_item's
    keyword arguments by (split, id)."""
    jobs = [(item, split) for split, items in index.splits.items() for item in items]
    n_classes = len(index.classes)
    how = how or {}

    def check(job: tuple[Item, str]) -> dict | CdspError:
        try:
            return check_item(job[0], job[1], n_classes, **how.get((job[1], job[0].id), {}))
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


def check_folders(root: str, scribble_dir: str | None, split_dir: str | None, named_by: str = "") -> None:
    """Refuse a scribble or split folder (given as flags, or `named_by` a manifest) that is not a relative
    name inside the dataset `root`: nothing is read from outside the dataset, nor written outside --out."""
    for name, what, flag in ((scribble_dir, "scribble folder", "--scribble-dir"),
                             (split_dir, "split-list folder", "--split-dir")):
        if name:
            outputs.confined(root, name, f"{what} {f'named by {named_by}' if named_by else f'({flag})'}")


def _copy_dataset(index: data.DatasetIndex, manifest: dict, out: Path, move: bool) -> None:
    """Write `out` as a dataset root: the validated files, the lists, classes.txt, the manifest."""
    files = {p for items in index.splits.values() for i in items for p in (i.image, i.scribble, i.gt) if p}
    with outputs.output_dir(out, "dataset", inputs=[index.root]) as tmp:
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
    check_folders(source, index.scribble_dir, index.split_dir, str(root / data.MANIFEST))
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
        with outputs.output_dir(out, "manifest", inputs=[root]) as tmp:
            (tmp / data.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def prepare(data_uri: str, out_dir: str, scribble_dir: str = data.DEFAULT_SCRIBBLE_DIR,
            split_dir: str | None = None, copy: bool = False, max_object_bytes: int = MAX_OBJECT_BYTES) -> dict:
    """Validate the dataset at `data_uri` (a folder or s3://bucket/prefix) and write
    `out_dir/manifest.json`; with `copy` (always for S3) also the dataset itself. Returns the manifest.

    Nothing is written unless every check passes; `out_dir` is written as the output policy says
    (outputs.py). An S3 object over `max_object_bytes` is refused from the listing, before anything
    is downloaded.
    """
    out = Path(out_dir)
    check_folders(data_uri, scribble_dir, split_dir)
    outputs.check_target(out, "dataset" if copy or data_uri.startswith("s3://") else "manifest", inputs=[data_uri])
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


# --- into the data store: what changed since a record ------------------------------------------

# How many times prepare_to_store lists the data when objects change while it reads them.
LIST_ATTEMPTS = 3


@dataclasses.dataclass
class Update:
    """What `prepare_to_store` found: the record of the data (datastore.py) with its "changes" and
    "cost", and its new manifest (None when nothing changed: the record is the base's)."""

    record: dict
    manifest: dict | None


def prepare_to_store(data_uri: str, store: str, base: dict | None = None, *,
                     scribble_dir: str = data.DEFAULT_SCRIBBLE_DIR, split_dir: str | None = None,
                     max_object_bytes: int = MAX_OBJECT_BYTES) -> Update:
    """Validate the dataset at `data_uri` (s3://bucket/prefix or a folder) as far as it changed since
    `base` (a datastore record, e.g. the champion's), and keep its files in the data store `store`.

    The data is listed once (keys, sizes, ETags). If that listing equals `base`'s, nothing is
    downloaded and `base`'s manifest stands. Otherwise the small files that say what the dataset
    is (class list, split lists) are read, and only the files that are new or changed since
    `base` are downloaded, validated and added to the store; an unchanged file keeps what `base`
    found (a changed class count re-checks every label map). Each file is fetched in the very
    version the listing gave (`storage.download_version`): if one changes meanwhile, the data is
    listed again, up to LIST_ATTEMPTS times, so no manifest mixes two states of the data. Any
    object over `max_object_bytes` is refused from the listing, before any download; the store
    gets nothing unless every check passed, and the manifest after the files.
    """
    root_uri = data_uri.rstrip("/")
    if not storage.is_remote(data_uri):
        root_uri = str(Path(data_uri.removeprefix("file://")).resolve())
    check_folders(root_uri, scribble_dir, split_dir)
    if f"{store.rstrip('/')}/".startswith(f"{root_uri}/"):
        raise CdspError(f"{store}: the data store cannot be inside the data it keeps ({root_uri})")
    for attempt in range(1, LIST_ATTEMPTS + 1):
        try:
            return _update(root_uri, store, base, scribble_dir, split_dir, max_object_bytes)
        except storage.ObjectChanged as e:
            if attempt == LIST_ATTEMPTS:
                raise CdspError(f"{e}; the data changed each of the {LIST_ATTEMPTS} times it was listed and "
                                "read: run again once the upload has finished") from e
            log.warning("%s: listing the data again (attempt %d of %d)", e, attempt + 1, LIST_ATTEMPTS)
    raise AssertionError("unreachable")


def _update(root_uri: str, store: str, base: dict | None, scribble_dir: str, split_dir: str | None,
            max_object_bytes: int) -> Update:
    listing = storage.list_versions(root_uri)
    if not listing:
        raise CdspError(f"{root_uri}: no files under this {'prefix' if storage.is_remote(root_uri) else 'folder'}")
    for rel, (size, _) in listing.items():
        if size > max_object_bytes:
            raise CdspError(f"{root_uri}/{rel}: {size} bytes, over the limit of {max_object_bytes} bytes; refusing "
                            f"to download it (a larger limit: --max-object-bytes)")
    digest = datastore.listing_digest(listing, scribble_dir, split_dir)
    cost = {"listed": len(listing), "downloaded": 0, "downloaded_bytes": 0, "stored": 0, "stored_bytes": 0,
            "manifest_bytes": 0}
    if base is not None and base.get("listing") == digest:
        log.info("%s: the listing of %d files is the one of run %s: nothing changed, nothing downloaded",
                 root_uri, len(listing), base.get("run"))
        record = {k: v for k, v in base.items() if k not in ("run", "changes", "cost", "store")}
        return Update({**record, "changes": changes(None, None, base), "cost": cost}, None)
    old = datastore.read_manifest(store, base["manifest"]) if base is not None else None
    with tempfile.TemporaryDirectory(prefix="cdsp-prepare-") as tmp:
        try:
            return _update_in(Path(tmp), root_uri, store, base, old, listing, digest, cost, scribble_dir, split_dir)
        except storage.ObjectChanged:
            raise
        except CdspError as e:  # name the object the user knows, not our download folder
            raise CdspError(str(e).replace(str(tmp), root_uri)) from e


def _update_in(tmp: Path, root_uri: str, store: str, base: dict | None, old: dict | None,
               listing: dict[str, tuple[int, str]], digest: str, cost: dict, scribble_dir: str,
               split_dir: str | None) -> Update:
    hashes: dict[str, str] = {}  # relative path -> SHA-256 of each file downloaded

    def fetch(rels: list[str]) -> None:
        def one(rel: str) -> None:
            size, version = listing[rel]
            hashes[rel] = storage.download_version(f"{root_uri}/{rel}", tmp / rel, size=size, version=version)

        storage.parallel(one, [r for r in rels if r not in hashes])

    # The small files that say what the dataset is: a manifest naming its folders, the class list, the lists.
    fetch([data.MANIFEST] if data.MANIFEST in listing else [])
    if not split_dir and data.MANIFEST in listing:
        split_dir = json.loads((tmp / data.MANIFEST).read_text(encoding="utf-8")).get("split_dir") or None
        check_folders(root_uri, None, split_dir, f"{root_uri}/{data.MANIFEST}")
    lists = [split_dir] if split_dir else list(data.SPLIT_DIRS)
    fetch([f for f in (*data.CLASS_FILES, *(f"{d}/{s}.txt" for d in lists for s in data.SPLITS)) if f in listing])
    index = data.load_index(tmp, scribble_dir=scribble_dir or data.DEFAULT_SCRIBBLE_DIR, split_dir=split_dir,
                            listing=listing)
    n_classes = len(index.classes)

    # What each image keeps from `old`: the files whose listing (size, version) is unchanged.
    old_files = (old or {}).get("files") or {}
    old_entries = {im["id"]: im for im in (old or {}).get("images", [])}  # in train and val alike: the same files
    same_classes = old is not None and len(old["classes"]) == n_classes
    how: dict[tuple[str, str], dict] = {}
    paths: dict[tuple[str, str], dict[str, str]] = {}
    for split, items in index.splits.items():
        for item in items:
            files = {role: p.relative_to(tmp).as_posix() for role, p in
                     (("image", item.image), ("scribble", item.scribble), ("gt", item.gt)) if p is not None}
            known = {role: old_files[rel][0] for role, rel in files.items()
                     if rel in old_files and list(old_files[rel][1:]) == list(listing[rel])}
            prev = old_entries.get(item.id)
            reuse = set()
            if prev is not None and known.get("image") == prev["sha256"]["image"]:
                reuse.add("image")  # its size stands, so do its label maps if they and the classes are unchanged
                reuse |= {r for r in ("scribble", "gt") if same_classes and r in known
                          and known[r] == prev["sha256"].get(r) and (r != "scribble" or "scribble_pixels" in prev)}
            paths[(split, item.id)] = files
            how[(split, item.id)] = {"prev": prev, "reuse": frozenset(reuse), "hashes": known}
    small = set(hashes)
    fetch(sorted({rel for (key, files) in paths.items() for role, rel in files.items()
                  if role not in how[key]["reuse"]}))
    for key, files in paths.items():
        how[key]["hashes"] = {**how[key]["hashes"], **{r: hashes[rel] for r, rel in files.items() if rel in hashes}}
    images = _check_all(index, how)

    data_files = {}  # relative path -> [sha256, size, version] of every file of the dataset
    for im in images:
        for role, rel in paths[(im["split"], im["id"])].items():
            data_files[rel] = [im["sha256"][role], *listing[rel]]
    manifest = {
        "schema": SCHEMA, "source": root_uri, "classes": index.classes, "scribble_dir": index.scribble_dir,
        "split_dir": index.split_dir, "copied": False, "fingerprint": fingerprint(images),
        "n_train": len(index.train), "n_val": len(index.val), "images": images,
        "warnings": [w.replace(str(tmp), root_uri) for w in _warnings(index, images)], "listing": digest,
        "files": data_files,
    }
    for w in manifest["warnings"]:
        log.warning("%s", w)
    downloaded = {rel: sha for rel, sha in hashes.items() if rel not in small}
    cost["downloaded"] = len(hashes)
    cost["downloaded_bytes"] = sum(listing[rel][0] for rel in hashes)
    cost["stored"], cost["stored_bytes"] = datastore.put_objects(store, {sha: tmp / rel
                                                                        for rel, sha in downloaded.items()})
    key, cost["manifest_bytes"] = datastore.write_manifest(store, manifest)
    record = {"schema": datastore.RECORD_SCHEMA, "source": root_uri, "fingerprint": manifest["fingerprint"],
              "listing": digest, "manifest": key, "n_train": manifest["n_train"], "n_val": manifest["n_val"],
              "classes": index.classes, "warnings": manifest["warnings"][:20],
              "changes": changes(old, manifest, base), "cost": cost}
    log.info("%s: %d files listed, %d downloaded (%d bytes), %d new in the store %s", root_uri, len(listing),
             cost["downloaded"], cost["downloaded_bytes"], cost["stored"], store)
    return Update(record, manifest)


def changes(old: dict | None, new: dict | None, base: dict | None) -> dict:
    """What changed from manifest `old` to `new` (None, None: nothing): the image ids added, changed
    (image, scribble or ground truth) and removed, by split, and the new scribble pixels of the
    train split per class name (now minus before, over the images added or changed)."""
    since = None if base is None else base.get("run")
    out = {"since": since, "added": {}, "changed": {}, "removed": {}, "new_scribble_pixels": {}}
    if new is None:
        return out
    before = {(im["split"], im["id"]): im for im in (old or {}).get("images", [])}
    after = {(im["split"], im["id"]): im for im in new["images"]}
    kinds = {"added": after.keys() - before.keys(), "removed": before.keys() - after.keys(),
             "changed": {k for k in after.keys() & before.keys() if after[k]["sha256"] != before[k]["sha256"]}}
    for kind, keys in kinds.items():
        for split, image_id in sorted(keys):
            out[kind].setdefault(split, []).append(image_id)
    pixels: dict[str, int] = {}
    for key in kinds["added"] | kinds["changed"]:
        if key[0] != "train":
            continue
        for c, n in after[key].get("scribble_pixels", {}).items():
            pixels[c] = pixels.get(c, 0) + n
        for c, n in before.get(key, {}).get("scribble_pixels", {}).items():
            pixels[c] = pixels.get(c, 0) - n
    out["new_scribble_pixels"] = {new["classes"][int(c)]: n for c, n in sorted(pixels.items(), key=lambda x: int(x[0]))
                                  if n and int(c) < len(new["classes"])}
    return out


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
    p.add_argument("--store", default=None,
                   help="keep the files in this data store (s3://... or a folder; each file once, by content) "
                        "and write only the manifest and OUT/dataset.json; run again with the same OUT, only what "
                        "changed since is downloaded")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.store:
        return _run_into_store(args)
    m = prepare(args.data, args.out, args.scribble_dir, args.split_dir, args.copy, args.max_object_bytes)
    print(f"prepared {m['n_train']} train and {m['n_val']} val images, {len(m['classes'])} classes, "
          f"{len(m['warnings'])} warnings; fingerprint {m['fingerprint'][:16]}; "
          f"manifest {Path(args.out) / data.MANIFEST}")
    return 0


def _run_into_store(args: argparse.Namespace) -> int:
    out, store = Path(args.out), args.store.rstrip("/")
    outputs.check_target(out, "dataset-record", inputs=[args.data, store])  # before anything goes to the store
    base = datastore.dataset_file(out)  # what the last `cdsp prepare --store` into OUT found
    if base is not None and base.get("store") != store:
        base = None
    update = prepare_to_store(args.data, store, base, scribble_dir=args.scribble_dir, split_dir=args.split_dir,
                              max_object_bytes=args.max_object_bytes)
    r, c = update.record, update.record["cost"]
    if update.manifest is None:
        print(f"unchanged since the last prepare into {out}: {c['listed']} files listed, nothing downloaded; "
              f"fingerprint {r['fingerprint'][:16]}")
        return 0
    with outputs.output_dir(out, "dataset-record", inputs=[args.data, store]) as tmp:
        (tmp / datastore.DATASET).write_text(json.dumps({**r, "store": store}, indent=1) + "\n", encoding="utf-8")
        (tmp / data.MANIFEST).write_text(json.dumps(update.manifest, indent=1) + "\n", encoding="utf-8")
    ch = r["changes"]
    print(f"prepared {r['n_train']} train and {r['n_val']} val images: {c['listed']} files listed, "
          f"{c['downloaded']} downloaded, {c['stored']} new in {store}; "
          + ", ".join(f"{kind} {sum(map(len, ch[kind].values()))}" for kind in ("added", "changed", "removed"))
          + f"; fingerprint {r['fingerprint'][:16]}; manifest {out / data.MANIFEST}")
    return 0
