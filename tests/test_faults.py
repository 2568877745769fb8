"""Faults a training job meets on a shared cluster, each injected for real.

- a `cdsp train-seg` process pre-empted (SIGTERM) and then killed (SIGKILL), each time resumed
  with `--resume`, ends with the weights of an uninterrupted run;
- the disk fills while a checkpoint or the pseudo-labels are written (a real, tiny tmpfs where
  the tests may mount one; else writes past a quota raise ENOSPC at the file-object boundary):
  a clear error, and the previous checkpoint / output folder intact;
- a stage re-run with the same inputs (a KFP retry) gives the same outputs and adds no MLflow
  run and no registered model version (a real `mlflow server`,
  the session's `mlflow_service` of conftest.py).

Covered elsewhere and not repeated here (see docs/reliability.md): in-process crash and SIGTERM
resume, bit for bit (tests/test_train.py), the S3 endpoint going away mid-transfer
(tests/test_storage.py), the MLflow server and the Pushgateway going away mid-run
(tests/test_tracking.py, tests/test_telemetry.py).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from tiny_data import data_with_gt_pseudo, leftovers

from cdsp_core import registry, tracking, train
from cdsp_core.config import PseudoLabelConfig, SegTrainConfig
from cdsp_core.errors import CdspError
from cdsp_core.pseudolabel import pseudo_label

REPO = Path(__file__).resolve().parents[1]
# Tiny and quick: ResNet-18 DeepLab-v2 on 32 px crops, two steps an epoch, one thread.
TINY = dict(segmenter="deeplabv2", backbone="resnet18", crop_size=32, scale_min=0.8, scale_max=1.2, epochs=2,
            batch_size=2, lr=0.01, warmup_epochs=1, workers=0, amp=False, device="cpu", seed=0)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # real processes, full disks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """4 train / 1 val images of 32 px; the ground truth stands in for pseudo-labels (fast, real files)."""
    root = tmp_path_factory.mktemp("faults")
    data_with_gt_pseudo(root, n_train=4, n_val=1, size=32, seed=5)
    return root


def files_of(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- pre-emption and kill


def start_training(tiny: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`cdsp train-seg` in its own process, one thread, its log in `log`."""
    flags = train.to_flags(SegTrainConfig(**{**TINY, "epochs": 4}))
    args = [sys.executable, "-m", "cdsp_core", "train-seg", "--data", str(tiny / "data"), "--pseudo",
            str(tiny / "pseudo"), "--out", str(out), *flags, *extra]
    with open(log, "wb") as fh:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **ONE_THREAD})


def wait_for_new_checkpoint(proc: subprocess.Popen, path: Path, log: Path, old_inode: int | None = None,
                            timeout: float = 240.0) -> None:
    """Until `path` exists and is not the file `old_inode` (each checkpoint is a new file, renamed in)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino != old_inode:
                return
        if proc.poll() is not None:
            pytest.fail(f"training ended (status {proc.returncode}) before a new checkpoint:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no new checkpoint within {timeout} s:\n{log.read_text()}")
        time.sleep(0.02)


def finish(proc: subprocess.Popen, timeout: float = 240.0) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def position(ckpt: Path) -> tuple[int, int]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return state["epoch"], state["iteration"]


def epoch_lines(log: Path) -> list[int]:
    """The epochs a run finished, from its `epoch k/n ...` log lines."""
    return [int(line.split(" epoch ", 1)[1].split("/", 1)[0]) for line in log.read_text().splitlines()
            if "INFO cdsp.train: epoch " in line]


def test_sigterm_then_sigkill_of_train_seg_resumes_to_the_weights_of_an_uninterrupted_run(tiny, tmp_path):
    # alongside, for comparison: an uninterrupted run, into a folder where a run killed while writing
    # its very first checkpoint left only the temporary file
    (tmp_path / "straight").mkdir()
    (tmp_path / "straight" / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"\0" * 4096)
    straight = start_training(tiny, tmp_path / "straight", tmp_path / "straight.log")
    out, ckpt = tmp_path / "chain", tmp_path / "chain" / "checkpoint.pt"

    # 1. pre-empted: SIGTERM once epoch 1 is checkpointed -> a checkpoint at once, exit status 143
    first = start_training(tiny, out, tmp_path / "1.log")
    wait_for_new_checkpoint(first, ckpt, tmp_path / "1.log")
    first.send_signal(signal.SIGTERM)
    assert finish(first) == 128 + signal.SIGTERM
    log1 = (tmp_path / "1.log").read_text()
    assert "SIGTERM: checkpoint written to" in log1 and str(ckpt) in log1
    assert not (out / "model.pt").exists()
    epoch1, batch1 = position(ckpt)
    assert (epoch1, batch1) >= (1, 0) and epoch1 < 4

    # 2. the retry resumes from it; then killed outright (SIGKILL: no handler runs) after a checkpoint
    second = start_training(tiny, out, tmp_path / "2.log", "--resume")
    wait_for_new_checkpoint(second, ckpt, tmp_path / "2.log", old_inode=ckpt.stat().st_ino)
    second.kill()
    assert finish(second) == -signal.SIGKILL
    log2 = (tmp_path / "2.log").read_text()
    assert f"resumed from epoch {epoch1}{f', batch {batch1}' if batch1 else ''} (" in log2
    assert not (out / "model.pt").exists()
    epoch2, batch2 = position(ckpt)
    assert (epoch2, batch2) > (epoch1, batch1)

    # 3. the next retry continues from the last checkpoint, not from epoch 0, and finishes; a kill
    # in the middle of writing a checkpoint leaves its temporary file, which the retry removes
    (out / ".checkpoint.pt.k1ll3d.tmp").write_bytes(ckpt.read_bytes()[:4096])
    third = start_training(tiny, out, tmp_path / "3.log", "--resume")
    assert finish(third) == 0, (tmp_path / "3.log").read_text()
    assert f"resumed from epoch {epoch2}" in (tmp_path / "3.log").read_text()
    assert epoch_lines(tmp_path / "3.log") == list(range(epoch2 + 1, 5))
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1, 2, 3, 4]
    assert leftovers(out) == []

    assert finish(straight) == 0, (tmp_path / "straight.log").read_text()
    assert epoch_lines(tmp_path / "straight.log") == [1, 2, 3, 4] and leftovers(tmp_path / "straight") == []
    want = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    got = torch.load(out / "model.pt", weights_only=True)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.allclose(got[k].float(), want[k].float(), rtol=1e-4, atol=1e-5), k
    losses = [json.loads((d / "history.json").read_text())[-1]["loss"] for d in (out, tmp_path / "straight")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


# ---------------------------------------------------------------------------- the disk fills


class TmpfsDisk:
    """A real, small filesystem (tmpfs) mounted at `folder`; `fill` leaves only `leave` bytes free."""

    kind = "tmpfs"
    block = 4096  # tmpfs allocates whole pages

    def __init__(self, folder: Path, size: str):
        self.folder = folder
        folder.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
                       check=True, capture_output=True)
        self.filler = folder / "filler"

    def fill(self, leave: int = 0) -> None:
        free = os.statvfs(self.folder).f_bavail * os.statvfs(self.folder).f_frsize
        with open(self.filler, "ab") as fh:
            fh.write(b"\0" * max(0, free - leave))

    def free(self) -> None:
        self.filler.unlink()

    def close(self) -> None:
        subprocess.run(["umount", str(self.folder)], check=False, capture_output=True)


class QuotaDisk:
    """Where mounting is not allowed: files opened for writing under `folder` go through a
    quota, and a write past it raises OSError(ENOSPC) from the file object, as on a full disk.
    (Every writer of these stages writes through a Python file object.)"""

    kind = "quota"
    block = 256  # about one tiny PNG

    def __init__(self, folder: Path, monkeypatch):
        self.folder = folder
        folder.mkdir(parents=True)
        self.left: int | None = None  # None: no limit
        real_open, disk = builtins.open, self

        class Limited:
            def __init__(self, fh):
                self._fh = fh

            def write(self, data) -> int:
                n = memoryview(data).nbytes
                if disk.left is not None:
                    if n > disk.left:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    disk.left -= n
                return self._fh.write(data)

            def __getattr__(self, name):
                return getattr(self._fh, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._fh.close()

        def limited_open(file, mode="r", *args, **kwargs):
            fh = real_open(file, mode, *args, **kwargs)
            inside = isinstance(file, (str, os.PathLike)) and Path(file).resolve().is_relative_to(folder.resolve())
            return Limited(fh) if inside and any(c in mode for c in "wax+") else fh

        monkeypatch.setattr(builtins, "open", limited_open)

    def fill(self, leave: int = 0) -> None:
        self.left = leave

    def free(self) -> None:
        self.left = None

    def close(self) -> None:
        pass


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A tmpfs of 256 MiB where this process may mount one (root); else the quota stand-in.
    CDSP_TEST_DISK=quota forces the stand-in."""
    disk = None
    if os.environ.get("CDSP_TEST_DISK") != "quota" and hasattr(os, "geteuid") and os.geteuid() == 0:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            disk = TmpfsDisk(tmp_path / "disk", "256m")
    if disk is None:
        disk = QuotaDisk(tmp_path / "quota-disk", monkeypatch)
    print(f"small disk: {disk.kind}")
    yield disk
    disk.close()


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny, small_disk, caplog):
    out = small_disk.folder / "model"
    ckpt = out / "checkpoint.pt"
    saved = {}

    def fill_after_epoch_1(metrics, step):
        if metrics["epoch"] == 1:
            saved["checkpoint"] = ckpt.read_bytes()
            small_disk.fill()

    cfg = SegTrainConfig(**TINY)
    with pytest.raises(CdspError) as err:
        train.train_segmenter(str(tiny / "data"), str(tiny / "pseudo"), str(out), cfg, on_metrics=fill_after_epoch_1)
    assert str(err.value).startswith(f"{ckpt}: cannot write: No space left on device")
    assert "\n" not in str(err.value)
    assert ckpt.read_bytes() == saved["checkpoint"]  # epoch 1's checkpoint, whole
    assert position(ckpt) == (1, 0)
    assert leftovers(out) == [] and not (out / "model.pt").exists()

    # space again: the retry resumes from the kept checkpoint and finishes
    small_disk.free()
    caplog.set_level(logging.INFO, logger="cdsp.train")
    summary = train.train_segmenter(str(tiny / "data"), str(tiny / "pseudo"), str(out), cfg, resume=True)
    assert "resumed from epoch 1 (" in caplog.text and summary["epoch"] == 2
    assert (out / "model.pt").is_file() and leftovers(out) == []


def test_disk_full_while_writing_pseudo_labels_keeps_the_previous_output(tiny, small_disk):
    out = small_disk.folder / "pseudo"
    cfg = PseudoLabelConfig()
    external = str(tiny / "data" / "SegmentationClass")
    pseudo_label(str(tiny / "data"), str(out), cfg, external_pseudo=external)
    before = files_of(out)

    small_disk.fill(leave=2 * small_disk.block)  # room for a map or two, not for all 12
    with pytest.raises(CdspError, match=rf"^{out}/\S+\.png: cannot write: No space left on device") as err:
        pseudo_label(str(tiny / "data"), str(out), cfg, external_pseudo=external)
    assert ".tmp" not in str(err.value)  # it names the user's folder, not our temporary one
    assert files_of(out) == before  # the earlier output, untouched
    assert leftovers(small_disk.folder) == [] and leftovers(out) == []

    small_disk.free()
    pseudo_label(str(tiny / "data"), str(out), cfg, external_pseudo=external)
    after = files_of(out)
    assert {k: v for k, v in after.items() if k != "summary.json"} == \
        {k: v for k, v in before.items() if k != "summary.json"}  # same inputs, same maps (summary has a time)


# ---------------------------------------------------------------------------- a retried stage


def test_a_retried_stage_gives_the_same_outputs_without_new_runs_or_versions(tiny, tmp_path, monkeypatch,
                                                                              mlflow_service):
    model_name = f"cdsp-segmenter-retry-{uuid.uuid4().hex[:6]}"
    monkeypatch.setattr(registry, "MODEL_NAME", model_name)
    experiment = f"retry-{uuid.uuid4().hex[:6]}"
    pseudo_cfg, seg_cfg = PseudoLabelConfig(), SegTrainConfig(**{**TINY, "epochs": 1})
    pseudo_out, model_out = tmp_path / "pseudo", tmp_path / "model"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_service.url)
    client = MlflowClient(mlflow_service.url, registry_uri=mlflow_service.url)
    outputs, stage_runs, versions = [], [], []
    for attempt in (1, 2):  # the same step, retried by KFP with the same inputs
        parent = tracking.start_pipeline_run("kfp-run-retry", experiment=experiment, fingerprint="fp-1")
        with tracking.stage_run(parent, "pseudo_label", {"cam_threshold": pseudo_cfg.cam_threshold}) as run:
            pseudo_label(str(tiny / "data"), str(pseudo_out), pseudo_cfg,
                         external_pseudo=str(tiny / "data" / "SegmentationClass"))
        stage_runs.append(run)
        with contextlib.suppress(SystemExit), \
                tracking.stage_run(parent, "train_segmenter", {"lr": seg_cfg.lr, "epochs": 1}) as run:
            train.train_segmenter(str(tiny / "data"), str(pseudo_out), str(model_out), seg_cfg,
                                  on_metrics=tracking.log_metrics)
            versions.append(registry.log_segmenter(model_out))
            if attempt == 1:  # pre-empted right after registering: the step fails, KFP retries it
                raise SystemExit(128 + signal.SIGTERM)
        stage_runs.append(run)
        maps = {k: v for k, v in files_of(pseudo_out).items() if k != "summary.json"}
        outputs.append((maps, torch.load(model_out / "model.pt", weights_only=True)))
        if attempt == 1:
            assert client.get_run(run).info.status == "KILLED"

    assert outputs[0][0] == outputs[1][0]  # the same pseudo-labels and distance maps, byte for byte
    first, second = outputs[0][1], outputs[1][1]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert stage_runs[:2] == stage_runs[2:]  # each stage found its run again
    assert versions == ["1", "1"]
    assert len(client.search_model_versions(f"name='{model_name}'")) == 1
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([exp_id])
    stages = sorted(r.data.tags[tracking.TAG_STAGE] for r in runs)
    assert stages == ["pipeline", "pseudo_label", "train_segmenter"]  # no duplicate run
    assert all(r.info.status == "FINISHED" for r in runs)
