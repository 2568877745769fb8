"""The output policy (cdsp_core/outputs.py) as families, over the commands that write an output folder:

(a) a failing run keeps a previous finished output byte-identical, and leaves nothing beside it;
(b) an --out holding foreign files or another kind's output is refused, and left as it was;
(c) an --out that is an input, lies inside one or holds one is refused, nothing written;
(d) a path that escapes its root (a scribble or split folder, a stored manifest's names) is refused,
    nothing written anywhere.

Every case is one real CLI call (cdsp_core.cli.main) on a tiny dataset; a refusal is one line on
stderr and exit 2. Then: the rule for links (dataset views made of them keep working), old outputs
without a marker, and training's staging folder with --resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_data import REPO, data_with_gt_pseudo

from cdsp_core import cli, data, datastore, outputs, prepare, train
from cdsp_core.config import ClassifierConfig, SegTrainConfig
from cdsp_core.errors import CdspError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLS = ClassifierConfig(cls_backbone="resnet18", cls_width=16, cls_output_stride=8, cls_epochs=1, cls_batch_size=2,
                       cls_crop_size=32, cls_warmup_epochs=0, cls_amp=False, cls_workers=0)
SEG = SegTrainConfig(segmenter="deeplabv2", backbone="resnet18", width=16, crop_size=32, scale_min=0.8,
                     scale_max=1.2, epochs=1, batch_size=2, warmup_epochs=0, workers=0, amp=False, device="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """4 train / 2 val images of 32 px with pseudo-labels, a data store holding them as run "run-1",
    and a finished classifier and segmenter (each command's inputs)."""
    root = tmp_path_factory.mktemp("outputs")
    data_with_gt_pseudo(root, n_train=4, n_val=2, size=32, seed=3)
    update = prepare.prepare_to_store(str(root / "data"), str(root / "store"))
    datastore.write_record(str(root / "store"), "run-1", update.record)
    assert cli.main(["train-classifier", "--data", str(root / "data"), "--out", str(root / "classifier"),
                     "--device", "cpu", *train.to_flags(CLS)]) == 0
    assert cli.main(["train-seg", "--data", str(root / "data"), "--pseudo", str(root / "pseudo"),
                     "--out", str(root / "segmenter"), *train.to_flags(SEG)]) == 0
    return root


@pytest.fixture()
def w(tiny, tmp_path) -> SimpleNamespace:
    """This test's own copy of the inputs, under tmp_path (the models are read only)."""
    for name in ("data", "pseudo", "store"):
        shutil.copytree(tiny / name, tmp_path / name)
    return SimpleNamespace(root=tmp_path, data=tmp_path / "data", pseudo=tmp_path / "pseudo", store=tmp_path / "store",
                           classifier=tiny / "classifier", segmenter=tiny / "segmenter")


# command -> (its arguments with --out OUT, its input that --out must keep clear of)
COMMANDS = {
    "prepare": (lambda w, out: ["prepare", "--data", w.data, "--out", out], lambda w: w.data),
    "prepare --copy": (lambda w, out: ["prepare", "--data", w.data, "--out", out, "--copy"], lambda w: w.data),
    "prepare --store": (lambda w, out: ["prepare", "--data", w.data, "--out", out, "--store", w.store],
                        lambda w: w.data),
    "checkout": (lambda w, out: ["checkout", "--store", w.store, "--run", "run-1", "--out", out], lambda w: w.store),
    "train-classifier": (lambda w, out: ["train-classifier", "--data", w.data, "--out", out, "--device", "cpu",
                                         *train.to_flags(CLS)], lambda w: w.data),
    "pseudo-label": (lambda w, out: ["pseudo-label", "--data", w.data, "--external-pseudo",
                                     w.data / "SegmentationClass", "--out", out, "--device", "cpu"], lambda w: w.data),
    "train-seg": (lambda w, out: ["train-seg", "--data", w.data, "--pseudo", w.pseudo, "--out", out,
                                  *train.to_flags(SEG)], lambda w: w.pseudo),
    "evaluate": (lambda w, out: ["evaluate", "--data", w.data, "--model", w.segmenter, "--out", out,
                                 "--device", "cpu", "--n-overlays", "1"], lambda w: w.data),
    "predict": (lambda w, out: ["predict", "--model", w.segmenter, "--images", w.data / data.IMAGE_DIR,
                                "--out", out, "--device", "cpu", "--n-overlays", "1"],
                (lambda w: w.data / data.IMAGE_DIR)),
}
ON_POLICY = list(COMMANDS)  # the commands on the output policy (outputs.py): all


def cdsp(capsys, *args) -> tuple[int, str]:
    """Run `cdsp ARGS` in this process: (exit status, what it wrote to stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip()


def refused(rc: int, err: str, path: Path | str, problem: str) -> None:
    assert rc == 2, err
    assert "\n" not in err and err.startswith("cdsp "), err
    assert str(path) in err and problem in err, err


def tree(folder: Path) -> dict[str, str]:
    """Everything under `folder`, hidden names and links included: relative path -> what it is."""
    found = {}
    for here, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(here) / name
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                found[rel] = f"-> {os.readlink(p)}"
            elif p.is_file():
                found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
    return found


def garble(w: SimpleNamespace) -> None:
    """Every image cut in half (its header whole: training gets as far as its first batch), every
    ground-truth map and stored object unreadable: whatever a command reads, it fails on."""
    for p in (w.data / data.IMAGE_DIR).iterdir():
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    for folder in (w.data / "SegmentationClass", w.store / "objects"):
        for p in folder.rglob("*"):
            if p.is_file():
                p.write_bytes(b"not what it was")


# ---------------------------------------------------------------------------- (a) a failing run


@pytest.mark.parametrize("command", COMMANDS)
def test_a_failing_run_keeps_the_previous_output_byte_identical(command, w, capsys):
    args, _ = COMMANDS[command]
    out = w.root / "out"
    rc, err = cdsp(capsys, *args(w, out))
    assert rc == 0, err
    garble(w)
    before = tree(w.root)
    rc, err = cdsp(capsys, *args(w, out))
    assert rc == 2, err
    assert tree(w.root) == before  # the finished output whole, and no staging folder left beside it


# ---------------------------------------------------------------------------- (b) foreign --out


@pytest.mark.parametrize("foreign", ["notes.txt", "config.json"])
@pytest.mark.parametrize("command", COMMANDS)
def test_an_out_holding_foreign_files_is_refused_and_kept(command, foreign, w, capsys):
    args, _ = COMMANDS[command]
    out = w.root / "mine"
    out.mkdir()
    (out / foreign).write_text('{"mine": true}\n')  # e.g. the user's own config.json
    before = tree(w.root)
    rc, err = cdsp(capsys, *args(w, out))
    refused(rc, err, out, "not")
    assert tree(w.root) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_an_out_holding_another_kind_of_output_is_refused_and_kept(command, w, capsys):
    args, _ = COMMANDS[command]
    other = w.classifier if command == "train-seg" else w.segmenter  # a finished model of another kind
    out = w.root / "model"
    shutil.copytree(other, out)
    before = tree(w.root)
    rc, err = cdsp(capsys, *args(w, out))
    refused(rc, err, out, "holds a model folder" if command in ON_POLICY else "not empty")
    assert tree(w.root) == before


# ---------------------------------------------------------------------------- (c) --out and the inputs


@pytest.mark.parametrize("where", ["is", "inside", "holding"])
@pytest.mark.parametrize("command", ON_POLICY)
def test_an_out_that_is_inside_or_holds_an_input_is_refused(command, where, w, capsys):
    args, source = COMMANDS[command]
    given = source(w)
    out = {"is": given, "inside": given / "out", "holding": w.root}[where]
    before = tree(w.root)
    rc, err = cdsp(capsys, *args(w, out))
    refused(rc, err, out, "input")
    assert tree(w.root) == before


def test_an_out_reached_through_a_link_into_the_input_is_refused(w, capsys):
    link = w.root / "elsewhere"
    link.symlink_to(w.data)
    before = tree(w.root)
    rc, err = cdsp(capsys, "prepare", "--data", w.data, "--out", link / "prepared", "--copy")
    refused(rc, err, link / "prepared", "lies inside the input")
    assert tree(w.root) == before


# ---------------------------------------------------------------------------- (d) escaping paths


def _outside(w) -> None:
    """Scribbles and lists beside the dataset, where `../scribbles` and `../lists` lead: a run that
    followed those names would read and copy them."""
    shutil.copytree(w.data / data.DEFAULT_SCRIBBLE_DIR, w.root / "scribbles")
    shutil.copytree(w.data / "ImageSets" / "Segmentation", w.root / "lists")


def _store_with(w, record: dict | None = None, change=None) -> str:
    """Run "evil" in the store: run-1's record with `record`'s entries, or with run-1's manifest
    changed by `change(manifest)`; its run id."""
    base = datastore.read_record(str(w.store), "run-1")
    if change is not None:
        manifest = datastore.read_manifest(str(w.store), base["manifest"])
        change(manifest)
        record = {"manifest": datastore.write_manifest(str(w.store), manifest)[0]}
    datastore.write_record(str(w.store), "evil", {**base, **record})
    return "evil"


def _files_key(manifest: dict) -> None:
    manifest["files"]["../evil.jpg"] = next(iter(manifest["files"].values()))


def _manifest_names_lists(w) -> None:
    (w.data / data.MANIFEST).write_text(json.dumps({"split_dir": "../lists"}))


# case -> (what to change, the arguments (with --out OUT), the path the error names)
ESCAPES = {
    "--scribble-dir ../": (None, lambda w: ["prepare", "--data", w.data, "--out", w.root / "out", "--copy",
                                            "--scribble-dir", "../scribbles"], lambda w: "../scribbles"),
    "--scribble-dir absolute": (None, lambda w: ["prepare", "--data", w.data, "--out", w.root / "out", "--copy",
                                                 "--scribble-dir", w.root / "scribbles"],
                                (lambda w: w.root / "scribbles")),
    "--split-dir into the input": (None, lambda w: ["prepare", "--data", w.data, "--out", w.root / "out", "--copy",
                                                    "--split-dir", w.data / "ImageSets" / "Segmentation"],
                                   lambda w: w.data / "ImageSets" / "Segmentation"),
    "manifest only, --scribble-dir ../": (None, lambda w: ["prepare", "--data", w.data, "--out", w.root / "out",
                                                           "--scribble-dir", "../scribbles"], lambda w: "../scribbles"),
    "--store, --split-dir ../": (None, lambda w: ["prepare", "--data", w.data, "--out", w.root / "out", "--store",
                                                  w.store, "--split-dir", "../lists"], lambda w: "../lists"),
    "the dataset's manifest names ../lists": (
        _manifest_names_lists, lambda w: ["prepare", "--data", w.data, "--out", w.root / "out", "--copy"],
        lambda w: "../lists"),
    "checkout: manifest split_dir ../escaped": (
        None, lambda w: ["checkout", "--store", w.store, "--out", w.root / "out", "--run",
                         _store_with(w, change=lambda m: m.update(split_dir="../escaped"))], lambda w: "../escaped"),
    "checkout: a file key ../evil.jpg": (
        None, lambda w: ["checkout", "--store", w.store, "--out", w.root / "out", "--run",
                         _store_with(w, change=_files_key)], lambda w: "../evil.jpg"),
    "checkout: an image id with a line break": (
        None, lambda w: ["checkout", "--store", w.store, "--out", w.root / "out", "--run",
                         _store_with(w, change=lambda m: m["images"][0].update(id="a\nb"))], lambda w: "'a\\nb'"),
    "checkout: a record's manifest ../": (
        None, lambda w: ["checkout", "--store", w.store, "--out", w.root / "out", "--run",
                         _store_with(w, {"manifest": "../../secret.json"})], lambda w: "../../secret.json"),
}


@pytest.mark.parametrize("case", ESCAPES)
def test_an_escaping_path_is_one_line_naming_it_and_nothing_is_written(case, w, capsys):
    setup, args, named = ESCAPES[case]
    _outside(w)
    if setup is not None:
        setup(w)
    args = args(w)  # writes the tampered records first
    before = tree(w.root)
    rc, err = cdsp(capsys, *args)
    refused(rc, err, named(w), "")
    assert tree(w.root) == before  # nothing beside --out, nothing in the input, no --out


# ---------------------------------------------------------------------------- links, old outputs, resume


def test_a_dataset_view_made_of_links_works_and_its_copy_holds_real_files(w, capsys):
    view = w.root / "view"
    subprocess.run([sys.executable, "benchmarks/carve_split.py", "--data", str(w.data), "--out", str(view),
                    "--holdout", "1"], cwd=REPO, check=True, capture_output=True)
    assert (view / data.IMAGE_DIR).is_symlink()
    rc, err = cdsp(capsys, "prepare", "--data", view, "--out", w.root / "copy", "--copy")
    assert rc == 0, err
    copied = w.root / "copy" / data.IMAGE_DIR
    assert not copied.is_symlink() and all(not p.is_symlink() for p in copied.iterdir())
    assert outputs.kind_of(w.root / "copy") == "dataset"
    # an --out inside the view's linked folder lies in the view as named: refused, nothing written
    before = tree(w.data)
    rc, err = cdsp(capsys, "prepare", "--data", view, "--out", view / data.IMAGE_DIR / "x", "--copy")
    refused(rc, err, view / data.IMAGE_DIR / "x", "lies inside the input")
    assert tree(w.data) == before


def test_outputs_of_older_versions_are_recognised_by_their_files(w, capsys):
    model = w.root / "model"
    shutil.copytree(w.segmenter, model)
    (model / outputs.MARKER).unlink()  # a segmenter folder written before the marker
    before = tree(model)
    rc, err = cdsp(capsys, *COMMANDS["train-classifier"][0](w, model))
    refused(rc, err, model, "is not a model folder (classifier)")
    assert tree(model) == before
    rc, err = cdsp(capsys, *COMMANDS["train-seg"][0](w, model))
    assert rc == 0, err
    assert outputs.kind_of(model) == "segmenter"
    copy = w.root / "copy"  # a `prepare --copy` output of before: manifest.json with "copied": true
    assert cdsp(capsys, *COMMANDS["prepare --copy"][0](w, copy))[0] == 0
    (copy / outputs.MARKER).unlink()
    assert cdsp(capsys, *COMMANDS["prepare --copy"][0](w, copy))[0] == 0
    assert cdsp(capsys, *COMMANDS["checkout"][0](w, copy))[0] == 0  # the same kind: a dataset copy
    rc, err = cdsp(capsys, *COMMANDS["prepare"][0](w, copy))  # a manifest folder would lose the copy
    refused(rc, err, copy, "holds a dataset copy")


def test_training_over_a_finished_model_stages_beside_it_and_resumes_there(w):
    out = w.root / "model"
    shutil.copytree(w.segmenter, out)
    finished = tree(out)
    staging = outputs.staging(out)

    def fail_after_epoch_2(metrics, step):
        if metrics["epoch"] == 2:
            raise CdspError("stopped after epoch 2")

    cfg = dataclasses.replace(SEG, epochs=2)
    with pytest.raises(CdspError, match="stopped after epoch 2"):
        train.train_segmenter(str(w.data), str(w.pseudo), str(out), cfg, resume=True, on_metrics=fail_after_epoch_2)
    assert tree(out) == finished  # the finished model, whole
    assert torch.load(staging / "checkpoint.pt", weights_only=True)["epoch"] == 2  # resumed from out's epoch 1
    cfg = dataclasses.replace(SEG, epochs=3)
    train.train_segmenter(str(w.data), str(w.pseudo), str(out), cfg, resume=True)
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1, 2, 3]
    assert not staging.exists() and outputs.kind_of(out) == "segmenter"
    # nothing left to train: the model is written again, with the very checkpoint it resumed from
    checkpoint = (out / "checkpoint.pt").read_bytes()
    train.train_segmenter(str(w.data), str(w.pseudo), str(out), cfg, resume=True)
    assert (out / "checkpoint.pt").read_bytes() == checkpoint and not staging.exists()
    # a run from scratch (no --resume) discards an earlier run's staging folder
    train.train_segmenter(str(w.data), str(w.pseudo), str(out), SEG)
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1]
