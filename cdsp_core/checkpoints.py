"""Training checkpoints mirrored to storage that outlives the pod, so that a retried step resumes.

A KFP step writes its outputs into a folder local to its pod, which KFP uploads only when the
step succeeds: the retry of a pre-empted pod starts with an empty one. The training steps
therefore copy every checkpoint (through `train`'s `on_checkpoint` hook, synchronously, so the
SIGTERM checkpoint is up before the process exits 143) to

    <checkpoint root>/<pipeline run id>/<stage>/checkpoint.pt

beside `settings.json`, the SHA-256 of everything the checkpoint depends on (the stage's
settings, the data fingerprint, the GPU count). The root is an `s3://` URI or a local folder
(default `<pipeline_root>/checkpoints`, compiled into the training steps as the environment
variable CDSP_CHECKPOINT_ROOT). Uploads are atomic (`storage.upload_file`): a failed or cut-off
upload leaves the previous checkpoint under the key.

At the start of the step, `CheckpointMirror.restore` fetches a mirrored checkpoint of the same
settings into the empty output folder and the step trains with `resume=True` (the log says
`resumed from epoch N`). A checkpoint of other settings under the key (a reused run id), or one
that does not load, is not resumed: a warning names it and training starts from epoch 0,
replacing it. `clear` removes the mirror once the stage has finished (and its model is an
output artifact of the step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from cdsp_core import config, storage
from cdsp_core.errors import EXIT_PREEMPTED, CdspError
from cdsp_core.modelfolder import CHECKPOINT

log = logging.getLogger("cdsp.checkpoints")

ENV = "CDSP_CHECKPOINT_ROOT"
SETTINGS = "settings.json"


def root_for(pipeline_root: str, checkpoint_root: str = "") -> str:
    """The checkpoint root: `checkpoint_root` if set, else `<pipeline_root>/checkpoints` ('' if neither)."""
    if checkpoint_root:
        return checkpoint_root.rstrip("/")
    return f"{pipeline_root.rstrip('/')}/checkpoints" if pipeline_root else ""


def data_fingerprint(data_dir: str | os.PathLike) -> str:
    """The dataset fingerprint from `cdsp prepare`'s manifest ('' where there is none)."""
    manifest = Path(data_dir) / "manifest.json"
    if not manifest.is_file():
        return ""
    return str(json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint", ""))


class CheckpointMirror:
    """The mirror of one stage of one pipeline run (disabled, doing nothing, without a root or run id)."""

    def __init__(self, root: str, pipeline_run_id: str, stage: str, settings: dict):
        self.enabled = bool(root and pipeline_run_id)
        self.digest = config.settings_digest(settings)
        self.prefix = ""
        if self.enabled:
            key = storage.check_key(f"{pipeline_run_id}/{stage}", f"{root}/{pipeline_run_id}/{stage}")
            self.prefix = f"{root.rstrip('/')}/{key}"
        self.uri = f"{self.prefix}/{CHECKPOINT}"
        self.settings_uri = f"{self.prefix}/{SETTINGS}"

    # -- start of the step

    def restore(self, out_dir: str | os.PathLike) -> bool:
        """Put the mirrored checkpoint of these settings into `out_dir`; True if training should resume.

        A checkpoint already in `out_dir` (a retry in the same folder) is resumed as it is.
        """
        if not self.enabled:
            return False
        local = Path(out_dir) / CHECKPOINT
        if local.is_file():
            log.info("%s: resuming from the checkpoint already in the output folder", local)
            self._record_settings(self._recorded_digest())
            return True
        recorded = self._recorded_digest()
        if storage.exists(self.uri):
            if recorded == self.digest:
                storage.download_file(self.uri, local)
                problem = _unloadable(local)
                if problem is None:
                    log.info("resuming from the checkpoint mirrored at %s", self.uri)
                    return True
                local.unlink()
                log.warning("%s: mirrored checkpoint does not load (%s); training starts from epoch 0 and "
                            "replaces it", self.uri, problem)
            else:
                log.warning("%s: a checkpoint of other settings is stored under this pipeline run and stage "
                            "(settings %s, this run %s); not resuming from it: training starts from epoch 0 "
                            "and replaces it", self.uri, (recorded or "unknown")[:12], self.digest[:12])
            storage.delete(self.uri)
        self._record_settings(recorded)
        return False

    def _recorded_digest(self) -> str | None:
        if not storage.exists(self.settings_uri):
            return None
        try:
            return str(json.loads(storage.read_bytes(self.settings_uri, 64 * 1024)).get("settings_sha256"))
        except (ValueError, AttributeError):
            return None

    def _record_settings(self, recorded: str | None) -> None:
        if recorded == self.digest:
            return
        with tempfile.TemporaryDirectory(prefix="cdsp-mirror-") as tmp:
            path = Path(tmp) / SETTINGS
            path.write_text(json.dumps({"settings_sha256": self.digest}) + "\n", encoding="utf-8")
            storage.upload_file(path, self.settings_uri)

    # -- during training

    def upload(self, path: str | os.PathLike) -> None:
        """`on_checkpoint` hook: copy the checkpoint just written to the mirror.

        A failure is a warning, not the end of training: the mirror keeps the previous checkpoint.
        """
        if not self.enabled:
            return
        try:
            storage.upload_file(path, self.uri)
        except (CdspError, OSError) as e:
            log.warning("%s: could not mirror the checkpoint (%s); training goes on, a retried step would "
                        "resume from the previous mirrored one", self.uri, e)
            return
        log.info("checkpoint mirrored to %s", self.uri)

    @contextlib.contextmanager
    def watching(self, out_dir: str | os.PathLike, interval: float = 2.0) -> Iterator[None]:
        """Mirror `out_dir/checkpoint.pt` while another process (torchrun) trains into it.

        A thread uploads each new version of the file (a copy, taken from one open file: the
        trainer renames new checkpoints into place) and once more when the block ends. SIGTERM
        to this process is passed on to its child processes (torchrun passes it to its workers,
        which checkpoint and exit); the block then ends in SystemExit(143) after the last upload.
        """
        if not self.enabled:
            yield
            return
        path = Path(out_dir) / CHECKPOINT
        stop = threading.Event()
        seen: list = [_identity(path)] if path.is_file() else [None]  # a restored checkpoint is mirrored already

        def sync() -> None:
            ident = _identity(path)
            if ident is None or ident == seen[0]:
                return
            with tempfile.TemporaryDirectory(prefix="cdsp-mirror-") as tmp:
                copy = Path(tmp) / CHECKPOINT
                try:
                    with open(path, "rb") as src, open(copy, "wb") as dst:
                        ident = _identity_of(os.fstat(src.fileno()))
                        shutil.copyfileobj(src, dst, 1024 * 1024)
                except FileNotFoundError:
                    return
                self.upload(copy)
            seen[0] = ident

        def loop() -> None:
            while not stop.wait(interval):
                sync()

        terminated: list[int] = []
        previous = None
        if threading.current_thread() is threading.main_thread():
            def forward(signum, frame) -> None:
                terminated.append(signum)
                for pid in _children(os.getpid()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signum)

            previous = signal.signal(signal.SIGTERM, forward)
        thread = threading.Thread(target=loop, name="cdsp-checkpoint-mirror", daemon=True)
        thread.start()
        try:
            yield
        except CdspError:
            if not terminated:
                raise
        finally:
            stop.set()
            thread.join()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            sync()
        if terminated:
            log.warning("SIGTERM: the training processes checkpointed and stopped; checkpoint mirrored to %s",
                        self.uri)
            raise SystemExit(EXIT_PREEMPTED)

    # -- end of the step

    def clear(self) -> None:
        """Remove the mirror (the stage has finished); a failure is a warning (the objects stay)."""
        if not self.enabled:
            return
        try:
            for uri in (self.uri, self.settings_uri):
                storage.delete(uri)
        except (CdspError, OSError) as e:
            log.warning("%s: could not remove the mirrored checkpoint (%s); delete it by hand", self.prefix, e)
            return
        if not storage.is_remote(self.prefix):  # local folders: leave no empty run/stage folders behind
            for folder in (Path(self.prefix), Path(self.prefix).parent):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        log.info("mirrored checkpoint %s removed: the stage has finished", self.uri)


def for_stage(pipeline_run_id: str, stage: str, settings: dict, data_dir: str | os.PathLike | None = None,
              root: str | None = None) -> CheckpointMirror:
    """The mirror of `stage` in this pipeline run; root from CDSP_CHECKPOINT_ROOT unless given.

    The data fingerprint of `data_dir` (a `cdsp prepare` output) joins the settings.
    """
    root = os.environ.get(ENV, "") if root is None else root
    if data_dir is not None:
        settings = {**settings, "data_fingerprint": data_fingerprint(data_dir)}
    mirror = CheckpointMirror(root, pipeline_run_id, stage, settings)
    if not mirror.enabled:
        log.info("checkpoints of %s are not mirrored (%s): a retried step trains from epoch 0", stage,
                 "no pipeline run id" if root else f"{ENV} is not set")
    return mirror


def _unloadable(path: Path) -> str | None:
    """Why the checkpoint at `path` does not load as a cdsp training checkpoint (None: it does)."""
    from cdsp_core import train

    try:
        train.load_checkpoint(path, {})
    except CdspError as e:
        return str(e)
    return None


def _identity(path: Path):
    try:
        return _identity_of(path.stat())
    except FileNotFoundError:
        return None


def _identity_of(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_mtime_ns, st.st_size


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc; empty where there is none)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found

