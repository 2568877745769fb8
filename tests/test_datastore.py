"""The data store (datastore.py, prepare.prepare_to_store): a scheduled run costs what changed.

Unchanged data is decided from one listing with nothing downloaded; changed data downloads only
the new or changed files, and the record lists what changed; each file is kept once; every run's
exact files check out again; an object that changes while it is read never makes a mixed manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_data import tiny_dataset, write_label

from cdsp_core import cli, data, datastore, outputs, prepare, storage
from cdsp_core.errors import CdspError


def _prepare(data_uri: str, store: str, run: str, base: dict | None = None) -> dict:
    """One data prep into the store, as the pipeline step does: its record, as written."""
    update = prepare.prepare_to_store(data_uri, store, base)
    return {**datastore.write_record(store, run, update.record), "store": store, "_manifest": update.manifest}


def _files(root: Path) -> dict[str, str]:
    """{relative path: SHA-256} of the image, scribble and ground-truth files under a dataset root."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in (data.IMAGE_DIR, data.DEFAULT_SCRIBBLE_DIR, "SegmentationClass") for p in (root / d).rglob("*")
            if p.is_file()}


def _n_objects(store: Path) -> int:
    return sum(1 for p in (store / "objects").rglob("*") if p.is_file())


def _more_scribbles(root: Path, image_id: str, all_rows: bool = False) -> dict[int, int]:
    """Label the unlabelled pixels of a scribble with their true class, in every other row (or all);
    the new pixels per class."""
    path = root / data.DEFAULT_SCRIBBLE_DIR / f"{image_id}.png"
    scribble, gt = data.read_label(path), data.read_label(root / "SegmentationClass" / f"{image_id}.png")
    new = (scribble == 255) & (gt != 255)
    if not all_rows:
        new[::2, :] = False
    scribble[new] = gt[new]
    write_label(path, scribble)
    classes, counts = np.unique(gt[new], return_counts=True)
    return {int(c): int(n) for c, n in zip(classes, counts)}


@pytest.fixture()
def root(tmp_path):
    return tiny_dataset(tmp_path / "data", n_train=4, n_val=2, size=40)


def test_unchanged_data_is_decided_from_the_listing_alone(root, tmp_path):
    store = str(tmp_path / "store")
    a = _prepare(str(root), store, "run-a")
    assert a["cost"]["listed"] == len(storage.list_files(str(root)))
    assert a["cost"]["downloaded"] == a["cost"]["listed"] - 2  # not synth.json, cdsp-output.json
    assert a["changes"]["since"] is None and a["changes"]["added"] == {
        "train": [f"train_{i:05d}" for i in range(4)], "val": ["val_00000", "val_00001"]}
    n = _n_objects(Path(store))
    assert a["cost"]["stored"] == n > 0

    b = _prepare(str(root), store, "run-b", base=a)
    assert b["_manifest"] is None  # no manifest made: the champion's stands
    assert b["cost"]["downloaded"] == 0 and b["cost"]["stored"] == 0 and b["cost"]["listed"] == a["cost"]["listed"]
    assert (b["fingerprint"], b["manifest"]) == (a["fingerprint"], a["manifest"])
    assert b["changes"] == {"since": "run-a", "added": {}, "changed": {}, "removed": {}, "new_scribble_pixels": {}}
    assert _n_objects(Path(store)) == n
    assert datastore.read_record(store, "run-b")["manifest"] == a["manifest"]


def test_only_new_or_changed_files_are_read_and_the_record_lists_them(root, tmp_path):
    store = str(tmp_path / "store")
    a = _prepare(str(root), store, "run-a")
    n_before = _n_objects(Path(store))
    before_files = _files(root)
    # an annotator adds strokes to one image, a new image arrives, a val image is dropped
    new_pixels = _more_scribbles(root, "train_00001")
    for d, ext in ((data.IMAGE_DIR, ".jpg"), (data.DEFAULT_SCRIBBLE_DIR, ".png"), ("SegmentationClass", ".png")):
        shutil.copy(root / d / f"train_00002{ext}", root / d / f"extra_00000{ext}")
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text((lists / "train.txt").read_text() + "extra_00000\n")
    (lists / "val.txt").write_text("val_00000\n")

    b = _prepare(str(root), store, "run-b", base=a)
    ch = b["changes"]
    assert ch["since"] == "run-a"
    assert ch["added"] == {"train": ["extra_00000"]} and ch["changed"] == {"train": ["train_00001"]}
    assert ch["removed"] == {"val": ["val_00001"]}
    classes = b["classes"]
    expected = {classes[c]: n for c, n in new_pixels.items()}  # the new strokes, and all of the new image's
    extra = next(im for im in b["_manifest"]["images"] if im["id"] == "extra_00000")
    for c, n in extra["scribble_pixels"].items():
        expected[classes[int(c)]] = expected.get(classes[int(c)], 0) + n
    assert ch["new_scribble_pixels"] == {c: n for c, n in expected.items() if n}
    # read: the three small files that say what the dataset is, the changed scribble, the new image's three
    assert b["cost"]["downloaded"] == 3 + 1 + 3
    # kept: the changed scribble only (the new image's files are byte copies of train_00002's)
    assert b["cost"]["stored"] == _n_objects(Path(store)) - n_before == 1
    # what unchanged images keep from run-a is what a full check finds now
    full = prepare.prepare(str(root), str(tmp_path / "full"))
    assert b["fingerprint"] == full["fingerprint"] != a["fingerprint"]
    ours = {im["id"]: im for im in b["_manifest"]["images"]}
    for im in full["images"]:
        assert {k: ours[im["id"]][k] for k in im} == im

    # every run's exact files stay retrievable: run-a's from before the change, run-b's from now
    old = datastore.checkout({**datastore.read_record(store, "run-a"), "store": store}, tmp_path / "a")
    assert _files(old) == before_files
    new = datastore.checkout({**datastore.read_record(store, "run-b"), "store": store}, tmp_path / "b")
    assert _files(new) == {k: v for k, v in _files(root).items() if "val_00001" not in k}
    index = data.load_index(new)
    assert [it.id for it in index.val] == ["val_00000"] and len(index.train) == 5
    assert json.loads((new / data.MANIFEST).read_text())["fingerprint"] == b["fingerprint"]


def test_a_corrupted_store_object_is_refused_at_checkout(root, tmp_path):
    store = tmp_path / "store"
    a = _prepare(str(root), str(store), "run-a")
    victim = next((store / "objects").rglob("*"))
    while victim.is_dir():
        victim = next(victim.iterdir())
    victim.write_bytes(b"not the bytes")
    with pytest.raises(CdspError, match=f"{victim.name}.*do not match their SHA-256"):
        datastore.checkout(a, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # never half a dataset


def test_a_local_file_changed_while_read_relists_and_never_mixes(root, tmp_path, monkeypatch):
    store = str(tmp_path / "store")
    scribble = root / data.DEFAULT_SCRIBBLE_DIR / "train_00000.png"
    real = storage.download_version
    changed = []

    def annotator_saves_meanwhile(uri, dest, **kw):
        if uri.endswith(f"{data.DEFAULT_SCRIBBLE_DIR}/train_00000.png") and not changed:
            changed.append(_more_scribbles(root, "train_00000"))
            st = scribble.stat()
            os.utime(scribble, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        return real(uri, dest, **kw)

    monkeypatch.setattr(storage, "download_version", annotator_saves_meanwhile)
    a = _prepare(str(root), store, "run-a")
    assert changed
    entry = a["_manifest"]["files"][f"{data.DEFAULT_SCRIBBLE_DIR}/train_00000.png"]
    assert entry[0] == hashlib.sha256(scribble.read_bytes()).hexdigest()  # the bytes after the change
    assert a["fingerprint"] == prepare.prepare(str(root), str(tmp_path / "full"))["fingerprint"]


def test_cli_prepare_into_a_store_and_checkout(root, tmp_path, capsys):
    store, out = tmp_path / "store", tmp_path / "prepared"
    assert cli.main(["prepare", "--data", str(root), "--out", str(out), "--store", str(store)]) == 0
    assert "nothing downloaded" not in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [outputs.MARKER, datastore.DATASET, data.MANIFEST]  # no data
    record = json.loads((out / datastore.DATASET).read_text())
    assert cli.main(["prepare", "--data", str(root), "--out", str(out), "--store", str(store)]) == 0
    assert "nothing downloaded" in capsys.readouterr().out
    datastore.write_record(str(store), "run-x", {k: v for k, v in record.items() if k != "store"})
    assert cli.main(["checkout", "--store", str(store), "--run", "run-x", "--out", str(tmp_path / "co")]) == 0
    assert _files(tmp_path / "co") == _files(root)
    assert cli.main(["checkout", "--store", str(store), "--run", "nope", "--out", str(tmp_path / "co2")]) == 2
    assert "no record of pipeline run 'nope'" in capsys.readouterr().err and not (tmp_path / "co2").exists()


def test_s3_unchanged_listing_and_an_object_replaced_between_listing_and_download(s3, root, tmp_path, monkeypatch):
    bucket = s3.new_bucket("datastore")
    data_uri, store = f"s3://{bucket}/voc", f"s3://{bucket}/kfp/datastore"
    storage.upload_dir(root, data_uri)
    a = _prepare(data_uri, store, "run-a")
    assert a["cost"]["downloaded"] == a["cost"]["listed"] - 2 and a["cost"]["stored"] > 0  # not synth.json, its marker
    gets = []
    real = storage.download_version
    monkeypatch.setattr(storage, "download_version", lambda uri, dest, **kw: gets.append(uri) or real(uri, dest, **kw))
    b = _prepare(data_uri, store, "run-b", base=a)
    assert gets == [] and b["_manifest"] is None and b["fingerprint"] == a["fingerprint"]

    # an annotator uploads new strokes, and more once the run has listed the data: the GET's
    # If-Match ETag fails, the data is listed again, and the manifest has the last upload's bytes
    key = f"voc/{data.DEFAULT_SCRIBBLE_DIR}/train_00003.png"
    client = s3.client()
    _more_scribbles(root, "train_00003")
    client.put_object(Bucket=bucket, Key=key, Body=(root / key.removeprefix("voc/")).read_bytes())
    assert _more_scribbles(root, "train_00003", all_rows=True)

    def upload_meanwhile(uri, dest, **kw):
        if uri.endswith(key) and not any(u.endswith(key) for u in gets):
            client.put_object(Bucket=bucket, Key=key, Body=(root / key.removeprefix("voc/")).read_bytes())
        gets.append(uri)
        return real(uri, dest, **kw)

    monkeypatch.setattr(storage, "download_version", upload_meanwhile)
    c = _prepare(data_uri, store, "run-c", base=a)
    assert sum(u.endswith(key) for u in gets) == 2  # refused once (HTTP 412), read again after the new listing
    assert c["changes"]["changed"] == {"train": ["train_00003"]}
    assert c["fingerprint"] == prepare.prepare(str(root), str(tmp_path / "full"))["fingerprint"]

    # an object that changes every time it is read: a clear failure, nothing recorded
    key = f"voc/{data.DEFAULT_SCRIBBLE_DIR}/train_00002.png"

    def always_changing(uri, dest, **kw):
        if uri.endswith(key):
            client.put_object(Bucket=bucket, Key=key, Body=os.urandom(64))
        return real(uri, dest, **kw)

    _more_scribbles(root, "train_00002")
    storage.upload_dir(root, data_uri)
    monkeypatch.setattr(storage, "download_version", always_changing)
    with pytest.raises(CdspError, match=f"{key}: changed or removed since the prefix was listed.*3 times"):
        prepare.prepare_to_store(data_uri, store, c)
    assert datastore.read_record(store, "run-d") is None
