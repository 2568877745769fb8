"""The data store: every dataset file kept once, by its content, and what each pipeline run prepared.

Data prep (`prepare.prepare_to_store`) puts the files it validated here with a manifest that
says which object each file is; the training and evaluation steps check the dataset out of
here (`checked_out`), and the next scheduled run compares its listing of the data with the
record of the run that trained the champion. The store is an `s3://` URI or a folder: in the
pipeline `<pipeline_root>/datastore`, or CDSP_DATA_STORE (compiled into the data-prep step).

    objects/sha256/<2 hex>/<sha256>   the bytes of one file; written once, never changed
    manifests/<sha256>.json           a dataset manifest (prepare.py), named by the hash of its text
    runs/<pipeline run id>.json       that run's record (below)

A record is small: {"schema", "run", "source", "fingerprint", "listing" (digest of the data's
listing and the folder settings), "manifest" (key of the manifest), "n_train", "n_val",
"classes", "warnings", "changes" (since the record it was compared with), "cost"}. Objects
and manifests are only added, never replaced or deleted, so every model's training files stay
retrievable: the model version's pipeline run id (MLflow tag `cdsp.pipeline_run_id`) ->
runs/<id>.json -> its manifest -> the objects (`checkout`, `cdsp checkout`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cdsp_core import data, outputs, storage
from cdsp_core.errors import CdspError
from cdsp_core.fsutil import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

ENV = "CDSP_DATA_STORE"
RECORD_SCHEMA = "cdsp-data-record-v1"
DATASET = "dataset.json"  # the record plus its store: what the data-prep step's `prepared` artifact holds


def root_for(pipeline_root: str, data_store: str = "") -> str:
    """The store: `data_store` if set, else `<pipeline_root>/datastore` ('' if neither)."""
    if data_store:
        return data_store.rstrip("/")
    return f"{pipeline_root.rstrip('/')}/datastore" if pipeline_root else ""


def _join(store: str, key: str) -> str:
    return f"{store.rstrip('/')}/{key}"


def object_key(sha256: str) -> str:
    return f"objects/sha256/{sha256[:2]}/{sha256}"


def listing_digest(listing: dict[str, tuple[int, str]], scribble_dir: str, split_dir: str | None) -> str:
    """The digest of a listing (every key with its size and version) and of the folder settings
    that say how it is read: equal digests, equal data."""
    text = json.dumps({"files": sorted([k, *v] for k, v in listing.items()), "scribble_dir": scribble_dir,
                       "split_dir": split_dir or ""}, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- writing ---------------------------------------------------------------------------------

def put_objects(store: str, files: dict[str, Path]) -> tuple[int, int]:
    """Add {sha256: local file} to the store, each unless already there; (objects added, their bytes)."""
    added: list[int] = []

    def put(item: tuple[str, Path]) -> None:
        sha, path = item
        uri = _join(store, object_key(sha))
        if not storage.is_file(uri):
            storage.upload_file(path, uri)
            added.append(path.stat().st_size)

    storage.parallel(put, sorted(files.items()))
    return len(added), sum(added)


def write_manifest(store: str, manifest: dict) -> tuple[str, int]:
    """Add a manifest to the store; (its key, its size in bytes). The same manifest twice is one object."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")
    key = f"manifests/{hashlib.sha256(text).hexdigest()}.json"
    if not storage.is_file(_join(store, key)):
        storage.write_bytes(_join(store, key), text)
    return key, len(text)


def write_record(store: str, run: str, record: dict) -> dict:
    """Keep `record` as what pipeline run `run` prepared (a retry replaces it); the record as written."""
    record = {**record, "run": run}
    storage.write_bytes(_join(store, f"runs/{storage.check_key(run, 'pipeline run id')}.json"),
                        json.dumps(record, indent=1).encode("utf-8"))
    return record


# --- reading ---------------------------------------------------------------------------------

def _read_json(uri: str) -> dict:
    try:
        value = json.loads(storage.read_bytes(uri, max_bytes=1 << 30))
    except ValueError as e:
        raise CdspError(f"{uri}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CdspError(f"{uri}: not a JSON object")
    return value


def read_record(store: str, run: str) -> dict | None:
    """The record of pipeline run `run`, or None when the store has none (e.g. a run before the store)."""
    uri = _join(store, f"runs/{storage.check_key(run, 'pipeline run id')}.json")
    if not storage.is_file(uri):
        return None
    record = _read_json(uri)
    if record.get("schema") != RECORD_SCHEMA:
        raise CdspError(f"{uri}: not a data record ({RECORD_SCHEMA})")
    return record


def read_manifest(store: str, key: str) -> dict:
    return _read_json(_join(store, storage.check_key(str(key), f"{store}: a record's manifest key")))


def checkout(dataset: dict, dest: str | os.PathLike) -> Path:
    """Make `dest` the dataset root that `dataset` (a record with its "store") names, in the VOC layout:
    each file from its object (its SHA-256 checked), the split lists, classes.txt and manifest.json.
    `dest` appears whole or not at all, as the output policy says (outputs.py; the store is an input).
    Every path the manifest names is confined to `dest`."""
    store = dataset["store"]
    manifest = read_manifest(store, dataset["manifest"])
    files = manifest.get("files") or {}
    where = _join(store, dataset["manifest"])
    _check_names(manifest, files, dest, where)
    with outputs.output_dir(dest, "dataset", inputs=[store]) as tmp:
        def fetch(item: tuple[str, list]) -> None:
            rel, (sha, _size, _version) = item
            target = tmp / rel  # checked by _check_names
            storage.download_file(_join(store, object_key(sha)), target)
            if sha256_file(target) != sha:  # the store was tampered with or corrupted: never train on it
                raise CdspError(f"{_join(store, object_key(sha))}: its bytes do not match their SHA-256 "
                                f"(the file {rel} of {dataset['manifest']})")

        storage.parallel(fetch, sorted(files.items()))
        write_layout(tmp, manifest)
    log.info("checked out %d files of %s (fingerprint %s) into %s", len(files), dataset["source"],
             manifest["fingerprint"][:16], dest)
    return Path(dest)


def _check_names(manifest: dict, files: dict, dest: str | os.PathLike, where: str) -> None:
    """Refuse, before anything is fetched, a stored manifest whose file paths, split folder or image ids
    would put files outside `dest` (or a line break into a split list)."""
    for rel in files:
        storage.check_key(rel, where)
    outputs.confined(dest, str(manifest.get("split_dir") or ""), f"split-list folder named by {where}")
    for im in manifest.get("images", []):
        name = im.get("id") if isinstance(im, dict) else None
        if not isinstance(name, str) or outputs.unsafe(name) or "/" in name or any(c.isspace() for c in name):
            raise CdspError(f"{where}: image id {name!r} is not a plain file name; nothing was written")


def write_layout(root: Path, manifest: dict) -> None:
    """The split lists, classes.txt and manifest.json of a dataset root whose files are in place."""
    lists = root / manifest["split_dir"]
    lists.mkdir(parents=True, exist_ok=True)
    for split in data.SPLITS:
        ids = [im["id"] for im in manifest["images"] if im["split"] == split]
        if ids:
            (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in manifest["classes"]), encoding="utf-8")
    atomic_write_text(root / data.MANIFEST, json.dumps({**manifest, "copied": True}, indent=1) + "\n")


@contextlib.contextmanager
def checked_out(prepared: str | os.PathLike) -> Iterator[str]:
    """The dataset root of a data-prep `prepared` folder, for a step's lifetime.

    A folder holding `dataset.json` is checked out of the store into a temporary folder, removed
    afterwards; any other folder (a `cdsp prepare --copy` output, a dataset root) is used as it is.
    """
    pointer = Path(prepared) / DATASET
    if not pointer.is_file():
        yield str(prepared)
        return
    dataset = json.loads(pointer.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="cdsp-data-") as tmp:
        yield str(checkout(dataset, Path(tmp) / "data"))


def dataset_file(prepared: str | os.PathLike) -> dict | None:
    """The record a `prepared` folder holds (None for a plain dataset root)."""
    pointer = Path(prepared) / DATASET
    return json.loads(pointer.read_text(encoding="utf-8")) if pointer.is_file() else None


# --- `cdsp checkout` -------------------------------------------------------------------------

def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("checkout", help="the exact files a pipeline run prepared (and its model trained on)",
                              description="Write the dataset that a pipeline run's data prep kept in the data "
                                          "store into OUT, in the VOC layout (every file checked by its SHA-256).")
    p.add_argument("--store", required=True, help="the data store: s3://... or a folder (e.g. s3://cdsp-artifacts/"
                                                  "kfp/datastore)")
    p.add_argument("--run", required=True, help="the pipeline run id (a model version's cdsp.pipeline_run_id tag)")
    p.add_argument("--out", required=True, help="output folder (a dataset root)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    record = read_record(args.store, args.run)
    if record is None:
        raise CdspError(f"{args.store}: no record of pipeline run {args.run!r} (runs/{args.run}.json)")
    checkout({**record, "store": args.store}, Path(args.out))
    print(f"checked out {record['n_train']} train and {record['n_val']} val images of {record['source']} "
          f"(fingerprint {record['fingerprint'][:16]}) into {args.out}")
    return 0
