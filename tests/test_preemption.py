"""Pre-emption as a KFP pod meets it, with real processes and signals.

- SIGTERM to the step's whole process group (Argo's emissary kills `-pgid`), data-loader
  workers included: `cdsp train-seg` and `cdsp train-classifier` with 2 workers checkpoint,
  exit 143 and leave no process behind; `--resume` continues from that checkpoint.
- Timed checkpoints (`checkpoint_minutes`, `cls_checkpoint_minutes`): written and mirrored
  within an epoch, so a step killed outright (SIGKILL: the KFP launcher exits on SIGTERM and
  the pod ends) loses at most that interval; its retry, in an empty folder, resumes mid-epoch
  from the mirror and ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_faults import ONE_THREAD, TINY, finish, position
from tiny_data import data_with_gt_pseudo, leftovers

from cdsp_core import checkpoints, cli, config, losses, train
from cdsp_core.config import ClassifierConfig, SegTrainConfig
from cdsp_core.errors import EXIT_PREEMPTED, CdspError

REPO = Path(__file__).resolve().parents[1]
# Narrow nets (small checkpoints), 8 images of 32 px: four steps an epoch, so a signal finds the
# workers busy mid-epoch.
SEG = {**TINY, "width": 16}
CLS = dict(cls_backbone="resnet18", cls_width=16, cls_output_stride=8, cls_epochs=2, cls_batch_size=2,
           cls_crop_size=32, cls_warmup_epochs=1, cls_amp=False, cls_workers=0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preemption")
    data_with_gt_pseudo(root, n_train=8, n_val=1, size=32, seed=7)
    return root


def seg_command(tiny: Path, out: Path, **settings) -> list[str]:
    return [sys.executable, "-m", "cdsp_core", "train-seg", "--data", str(tiny / "data"), "--pseudo",
            str(tiny / "pseudo"), "--out", str(out), *train.to_flags(SegTrainConfig(**{**SEG, **settings}))]


def cls_command(tiny: Path, out: Path, **settings) -> list[str]:
    return [sys.executable, "-m", "cdsp_core", "train-classifier", "--data", str(tiny / "data"), "--out", str(out),
            "--device", "cpu", *train.to_flags(ClassifierConfig(**{**CLS, **settings}))]


def start(args: list[str], log: Path, new_session: bool = False) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=new_session,
                                env={**os.environ, **ONE_THREAD})


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, from /proc."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            state, _ppid, pgrp = entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                found.append(int(entry.name))
    return found


def wait_until(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"training ended (status {proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"not {what} within {timeout} s:\n{log.read_text()}")
        time.sleep(0.01)


# ---------------------------------------------------------------------------- SIGTERM to the process group


def finished_epochs(caplog) -> list[int]:
    return [int(r.getMessage().split()[1].split("/")[0]) for r in caplog.records
            if r.name == "cdsp.train" and r.getMessage().startswith("epoch ")]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["segmenter", "classifier"])
def test_sigterm_to_the_process_group_with_workers_checkpoints_and_the_retry_resumes(stage, tiny, tmp_path, caplog):
    command = seg_command if stage == "segmenter" else cls_command
    # one epoch of four steps, two data-loader workers
    settings = {"workers": 2, "epochs": 1} if stage == "segmenter" else {"cls_workers": 2, "cls_epochs": 1}
    out, ckpt, log1 = tmp_path / "model", tmp_path / "model" / "checkpoint.pt", tmp_path / "1.log"

    # 1. once the two workers are up: SIGTERM to the whole group, as Argo's emissary sends it
    first = start(command(tiny, out, **settings), log1, new_session=True)
    wait_until(lambda: len(checkpoints._children(first.pid)) >= 2, first, log1, "two data-loader workers ran")
    os.killpg(first.pid, signal.SIGTERM)
    assert finish(first) == EXIT_PREEMPTED, log1.read_text()
    text = log1.read_text()
    assert "SIGTERM: checkpoint written to" in text and str(ckpt) in text
    assert "killed by signal" not in text and "Traceback" not in text
    # the workers went with the main process: nothing of the group is left
    deadline = time.monotonic() + 30
    while group_members(first.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(first.pid) == []
    epoch, batch = position(ckpt)
    assert (0, 1) <= (epoch, batch) <= (1, 0)
    assert not (out / "model.pt").exists()

    # 2. the retry (here, in this process) resumes from that checkpoint and finishes
    caplog.set_level(logging.INFO, logger="cdsp.train")
    assert cli.main([*command(tiny, out, **settings)[3:], "--resume"]) == 0
    assert f"resumed from epoch {epoch}{f', batch {batch}' if batch else ''} (" in caplog.text
    assert finished_epochs(caplog) == list(range(epoch + 1, 2))
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1]
    assert (out / "model.pt").is_file() and leftovers(out) == []


# Data-loader workers as `fit` starts them: a SIGTERM to the whole group leaves them running; the
# main process still stops them, also when its iterator is alive at exit (multiprocessing then
# terminates and joins them: with SIGTERM simply ignored, that join never returned).
WORKERS = """
import os, signal, sys, time
import torch
from torch.utils.data import DataLoader, Dataset
from cdsp_core import train

class Numbers(Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return torch.tensor([i])

got = []
signal.signal(signal.SIGTERM, lambda *_: got.append(1))
loader = DataLoader(Numbers(), batch_size=2, num_workers=2, worker_init_fn=train.leave_sigterm_to_the_main_process)
batches = train.start_workers(loader)
next(batches)
print("ready", flush=True)
deadline = time.monotonic() + 120
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)
print("after the group's SIGTERM:", [int(next(batches)[0]) for _ in range(4)], flush=True)
raise SystemExit(143)  # the iterator is still alive: shutting its workers down is left to the exit
"""


@pytest.mark.slow
def test_workers_outlive_a_group_sigterm_and_still_stop_with_their_main_process(tmp_path):
    log = tmp_path / "workers.log"
    proc = start([sys.executable, "-c", WORKERS], log, new_session=True)
    wait_until(lambda: "ready" in log.read_text(), proc, log, "the workers were up")
    os.killpg(proc.pid, signal.SIGTERM)  # from outside, as Argo's emissary sends it
    assert finish(proc, timeout=120) == 143, log.read_text()
    assert log.read_text().splitlines() == ["ready", "after the group's SIGTERM: [2, 4, 6, 8]"]
    deadline = time.monotonic() + 30
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(proc.pid) == []


def test_sigterm_in_the_last_step_of_an_epoch_ends_the_epoch_first(tiny, tmp_path, caplog, monkeypatch):
    # a checkpoint "after batch 4 of 4" would resume into an empty epoch: the epoch ends, then exit 143
    caplog.set_level(logging.INFO, logger="cdsp.train")
    real, calls = losses.partial_ce, []

    def sigterm_in_step_4(logits, target):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal through the real handler
        return real(logits, target)

    monkeypatch.setattr(losses, "partial_ce", sigterm_in_step_4)
    out, cfg = tmp_path / "model", SegTrainConfig(**SEG)
    with pytest.raises(SystemExit) as exit_:
        train.train_segmenter(str(tiny / "data"), str(tiny / "pseudo"), str(out), cfg)
    monkeypatch.undo()
    assert exit_.value.code == EXIT_PREEMPTED
    assert f"SIGTERM: checkpoint written to {out / 'checkpoint.pt'} after epoch 1; exiting" in caplog.text
    assert position(out / "checkpoint.pt") == (1, 0)
    caplog.clear()
    train.train_segmenter(str(tiny / "data"), str(tiny / "pseudo"), str(out), cfg, resume=True)
    assert "resumed from epoch 1 (" in caplog.text and finished_epochs(caplog) == [2]
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and all("loss" in h for h in history)


# ---------------------------------------------------------------------------- timed checkpoints


def positions_of_every_checkpoint() -> tuple[list, callable]:
    seen: list[tuple[int, int]] = []
    return seen, lambda path: seen.append(position(path))


@pytest.mark.parametrize("minutes", [1e-9, 0.0])
def test_timed_checkpoints_are_written_within_epochs_through_the_mirror_hook(minutes, tiny, tmp_path):
    # 1e-9 min: due after every step; 0: at epoch ends only (8 images, batches of 2: four steps an epoch)
    seen, record = positions_of_every_checkpoint()
    cfg = SegTrainConfig(**{**SEG, "checkpoint_minutes": minutes})
    train.train_segmenter(str(tiny / "data"), str(tiny / "pseudo"), str(tmp_path / "seg"), cfg, on_checkpoint=record)
    # never after an epoch's last batch: the epoch's own checkpoint follows at once
    within = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]
    assert seen == (within if minutes else [(1, 0), (2, 0)])

    seen, record = positions_of_every_checkpoint()
    cls = ClassifierConfig(**{**CLS, "cls_epochs": 1, "cls_checkpoint_minutes": minutes})
    train.train_classifier(str(tiny / "data"), str(tmp_path / "cls"), cls, device="cpu", on_checkpoint=record)
    assert seen == ([(0, 1), (0, 2), (0, 3), (1, 0)] if minutes else [(1, 0)])


def test_a_negative_checkpoint_interval_is_refused_by_name(tiny, tmp_path):
    with pytest.raises(CdspError, match=r"^--checkpoint-minutes must be a number from 0 to 10080, got -1.0"):
        train.train_segmenter(str(tiny / "data"), str(tiny / "pseudo"), str(tmp_path / "seg"),
                              SegTrainConfig(**{**SEG, "checkpoint_minutes": -1.0}))
    with pytest.raises(CdspError, match=r"^--cls-checkpoint-minutes must be a number from 0 to 10080, got nan"):
        train.train_classifier(str(tiny / "data"), str(tmp_path / "cls"),
                               ClassifierConfig(**{**CLS, "cls_checkpoint_minutes": float("nan")}), device="cpu")


# A training step as the pipeline runs it (components/steps.py): the mirror restores into the pod's
# empty output folder and receives every checkpoint through `on_checkpoint`.
DRIVER = """
import json, logging, sys
from cdsp_core import checkpoints, train
from cdsp_core.config import SegTrainConfig

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
a = json.loads(sys.argv[1])
mirror = checkpoints.for_stage("kfp-run-1", "train_segmenter", a["settings"], root=a["root"])
resume = mirror.restore(a["out"])
train.train_segmenter(a["data"], a["pseudo"], a["out"], SegTrainConfig(**a["settings"]), resume=resume,
                      on_checkpoint=mirror.upload)
"""


@pytest.mark.slow
def test_a_step_killed_outright_resumes_mid_epoch_from_its_last_timed_checkpoint(tiny, tmp_path, caplog):
    settings = config.to_dict(SegTrainConfig(**{**SEG, "checkpoint_minutes": 1e-9}))
    root = tmp_path / "mirror"
    mirrored = root / "kfp-run-1" / "train_segmenter" / "checkpoint.pt"

    def step(out: Path, log: Path) -> subprocess.Popen:
        payload = json.dumps({"data": str(tiny / "data"), "pseudo": str(tiny / "pseudo"), "out": str(out),
                              "root": str(root), "settings": settings})
        return start([sys.executable, "-c", DRIVER, payload], log)

    # 1. the pod ends without a SIGTERM checkpoint (SIGKILL) right after the first timed one
    log1 = tmp_path / "1.log"
    first = step(tmp_path / "pod1" / "model", log1)
    wait_until(lambda: "timed checkpoint written to" in log1.read_text(), first, log1, "a timed checkpoint")
    first.kill()
    assert finish(first) == -signal.SIGKILL
    epoch, batch = position(mirrored)
    assert epoch == 0 and batch >= 1  # within the first epoch: epoch checkpoints alone would have lost it all

    # 2. the retry (here, in this process), in a new pod's empty folder, resumes there from the mirror
    caplog.set_level(logging.INFO)
    out2 = tmp_path / "pod2" / "model"
    mirror = checkpoints.for_stage("kfp-run-1", "train_segmenter", settings, root=str(root))
    assert mirror.restore(out2) is True
    train.train_segmenter(str(tiny / "data"), str(tiny / "pseudo"), str(out2), SegTrainConfig(**settings),
                          resume=True, on_checkpoint=mirror.upload)
    assert f"resuming from the checkpoint mirrored at {mirrored}" in caplog.text
    assert f"resumed from epoch 0, batch {batch} (" in caplog.text
    assert [h["epoch"] for h in json.loads((out2 / "history.json").read_text())] == [1, 2]

    # the same weights as an uninterrupted run without timed checkpoints
    straight = tmp_path / "straight"
    train.train_segmenter(str(tiny / "data"), str(tiny / "pseudo"), str(straight),
                          SegTrainConfig(**{**settings, "checkpoint_minutes": 0.0}))
    want = torch.load(straight / "model.pt", weights_only=True)
    got = torch.load(out2 / "model.pt", weights_only=True)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.allclose(got[k].float(), want[k].float(), rtol=1e-4, atol=1e-5), k
