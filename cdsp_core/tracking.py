"""MLflow tracking: a parent run per pipeline run, a nested run per stage, their params, metrics and artifacts.

    parent = tracking.start_pipeline_run(kfp_run_id, experiment="cdsp", fingerprint=fp, data_uri=uri)
    with tracking.stage_run(parent, "train_segmenter", config.to_dict(cfg)):
        train.train_segmenter(..., on_metrics=telemetry.chain(tracking.log_metrics, prometheus))
        version = registry.log_segmenter(model_dir)      # the model registry: cdsp_core/registry.py
    ...
    with tracking.stage_run(parent, "evaluate", config.to_dict(eval_cfg)):
        tracking.log_evaluation(eval_dir)

Where: `MLFLOW_TRACKING_URI` when set (a tracking server: PostgreSQL backend, S3 artifacts),
else the embedded store `<project>/mlflow.db` with artifacts in `<project>/mlruns` (the
source checkout when running from one, else the current folder); `make mlflow-ui` shows it.

Retries are safe: a stage run is found again by its parent and stage, the parent by the
pipeline run id (tags, never names), so a KFP retry adds no run.

What a person sees: a parent run is named after what it is (`run_name`: the KFP run's name, a
bench row and seed such as `cdsp · s0`), each stage run after its parent (`cdsp · s0 /
train_segmenter`) and holds its stage's settings as params; curves have step = epoch (1..n);
the headline results (`headline`: miou, pixel_acc, iou_<class>, pseudo_miou) are logged on the
parent too, so the runs table and the compare view (`compare_url`) show them.

When the server is unreachable: per-step metrics (`log_metrics`, `MetricsLogger`) never
block or fail training; they are buffered and sent from a background thread, retried with
backoff after one warning. Final recording (`log_final_metrics`, `log_evaluation`, the end of
`stage_run`, and the registry's calls, through `recording`) raises a CdspError naming the
server and what was not recorded; stages call it after their local outputs are written.
Params and tags never carry secrets (cdsp_core/credentials.py): credential-like keys are
dropped and user:password@ is removed from URIs.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from cdsp_core import credentials, report
from cdsp_core.credentials import redact
from cdsp_core.errors import CdspError

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "cdsp"
PIPELINE_STAGE = "pipeline"  # the stage tag of parent runs

TAG_PIPELINE_RUN = "cdsp.pipeline_run_id"
TAG_STAGE = "cdsp.stage"
TAG_FINGERPRINT = "cdsp.dataset_fingerprint"
TAG_CODE_VERSION = "cdsp.code_version"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # the description MLflow's UI shows on an experiment or run
# MLflow 3's UI opens an experiment of no kind as a GenAI one (a traces overview); ours train models.
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: a saved runs-table view (`share_view`)
UI_PORT = 5000  # `make mlflow-ui`'s default port (MLFLOW_UI_PORT)

FLUSH_TIMEOUT_S = 120.0  # how long the end of a stage waits for buffered metrics to reach MLflow
MAX_BACKOFF_S = 60.0
MAX_BUFFERED = 1_000_000  # metric points kept while the server is away (oldest dropped beyond)

_SAFE_ID = re.compile(r"[A-Za-z0-9_.:@+=/-]{1,200}")


# --- where, and what version ----------------------------------------------------------------

def project_dir() -> Path:
    """The source checkout when cdsp_core runs from one, else the current folder."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else the embedded SQLite store `<project>/mlflow.db`.

    A `user:password@` in an http(s) URI goes to MLflow as MLFLOW_TRACKING_USERNAME/PASSWORD
    instead: MLflow prints the URI it is given ("View run ... at: <uri>/#/...") into the logs.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return f"sqlite:///{project_dir() / 'mlflow.db'}"
    if urllib.parse.urlsplit(uri).scheme in ("http", "https"):
        uri, user, password = credentials.split_userinfo(uri)
        if user is not None:
            os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
            os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    return uri


@functools.lru_cache(maxsize=1)
def _git_commit() -> str:
    if os.environ.get("CDSP_GIT_COMMIT"):  # set in the images, which hold no .git
        return os.environ["CDSP_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def code_version() -> str:
    """The package version, plus `+g<commit>` where the git commit is known."""
    from cdsp_core import __version__

    commit = _git_commit()
    return f"{__version__}+g{commit[:12]}" if commit else __version__


def safe_params(params: dict | None) -> dict[str, str]:
    """Params as MLflow strings, without anything that looks like a credential."""
    out = {}
    for key, value in (params or {}).items():
        text = redact(str(value))
        if credentials.looks_secret(key, text):
            continue
        out[str(key)] = text[:6000]  # MLflow's limit on a param value
    return out


def snake(name: str) -> str:
    """A metric-key-safe snake-case name: 'potted plant' -> 'potted_plant'."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_") or "unnamed"


def _check_id(value: str, what: str) -> str:
    if not _SAFE_ID.fullmatch(value):
        raise CdspError(f"{what} {value!r}: use letters, digits and _ . : @ + = / - only (at most 200)")
    return value


# --- the client -----------------------------------------------------------------------------

def mlflow_client():
    """A client of the tracking server (and registry) at `tracking_uri()`, which also becomes mlflow's global one."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # mlflow.pytorch.log_model and download_artifacts use the global one
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def recording(what: str) -> Iterator[None]:
    """Turn MLflow and connection failures into a CdspError that says what was not recorded, where."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, requests.RequestException, OSError) as e:
        msg = redact(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise CdspError(f"MLflow at {redact(tracking_uri())}: could not record {what}: {msg}") from e


def not_found(e: Exception) -> bool:
    """An MlflowException that says the run, model or version does not exist."""
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def _experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        uri = tracking_uri()
        if uri.startswith("sqlite:///"):  # embedded: artifacts beside the database
            location = (Path(uri[len("sqlite:///"):]).parent / "mlruns").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as e:  # created meanwhile by a parallel step
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise e from None
    if exp.lifecycle_stage != "active":
        raise CdspError(f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) "
                        "or choose another name")
    return exp.experiment_id


def _find_or_create_run(client, experiment_id: str, match: dict[str, str], tags: dict[str, str],
                        name: str) -> str:
    """The run whose tags equal `match` (the oldest one, should retries have raced), else a new one."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in match.items())

    def oldest() -> str | None:
        runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=5)
        return runs[0].info.run_id if runs else None

    found = oldest()
    if found:
        return found
    run_id = client.create_run(experiment_id, tags={**tags, **match}, run_name=name).info.run_id
    first = oldest()
    if first and first != run_id:  # another attempt created one at the same moment: keep the oldest
        client.delete_run(run_id)
        return first
    return run_id


def _log_params(client, run_id: str, params: dict | None) -> None:
    from mlflow.entities import Param

    have = client.get_run(run_id).data.params
    new = safe_params(params)
    changed = sorted(k for k, v in new.items() if k in have and have[k] != v)
    if changed:
        log.warning("MLflow run %s already has other values for %s; keeping the first ones", run_id,
                    ", ".join(changed))
    items = [Param(k, v) for k, v in new.items() if k not in have]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])


def set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    """Set the run's tags, credentials removed from the values."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, redact(v)[:5000]) for k, v in tags.items() if v is not None])


# --- runs -----------------------------------------------------------------------------------

def start_pipeline_run(pipeline_run_id: str = "", *, experiment: str = DEFAULT_EXPERIMENT, fingerprint: str = "",
                       params: dict | None = None, run_name: str = "", **tags: object) -> str:
    """The parent run of a pipeline run (found again on a retry, by its tags); returns its run id.

    Named `run_name` (what people read in MLflow's runs table: the KFP run's name, `cdsp · s0`),
    else the pipeline run id. Tagged with the pipeline run id (a new `local-...` id when empty),
    the dataset fingerprint, the code version and `cdsp.<key>` for each extra keyword (e.g. data_uri).
    """
    pipeline_run_id = _check_id(pipeline_run_id or f"local-{uuid.uuid4().hex[:12]}", "pipeline run id")
    run_tags = {TAG_PIPELINE_RUN: pipeline_run_id, TAG_CODE_VERSION: code_version(),
                **{f"cdsp.{snake(k)}": str(v) for k, v in tags.items()}}
    if fingerprint:
        run_tags[TAG_FINGERPRINT] = fingerprint
    if _git_commit():
        run_tags["mlflow.source.git.commit"] = _git_commit()
    client = mlflow_client()
    with recording(f"the parent run of pipeline run {pipeline_run_id}"):
        experiment_id = _experiment_id(client, experiment)
        name = run_name.strip()[:250] or pipeline_run_id
        run_id = _find_or_create_run(client, experiment_id, {TAG_PIPELINE_RUN: pipeline_run_id,
                                                             TAG_STAGE: PIPELINE_STAGE}, run_tags, name)
        if client.get_run(run_id).info.run_name != name:  # a run named by an older version
            client.update_run(run_id, name=name)
        set_tags(client, run_id, run_tags)
        _log_params(client, run_id, params)
    log.info("MLflow: pipeline run %s is run %s in experiment %r at %s", pipeline_run_id, run_id, experiment,
             redact(tracking_uri()))
    return run_id


# the open stage runs, innermost last: (run id, its metrics logger, the parent's logger or None)
_active: list[tuple[str, MetricsLogger, MetricsLogger | None]] = []


def stage_run_name(parent_name: str, stage: str) -> str:
    """`cdsp · s0 / train_segmenter`: MLflow's compare view and charts label a run by its name alone."""
    return f"{parent_name} / {stage}"


@contextlib.contextmanager
def stage_run(parent_run_id: str, stage: str, params: dict | None = None, *,
              curves_on_parent: bool = False) -> Iterator[str]:
    """A nested run for one stage of the pipeline run `parent_run_id`, named `<parent's name> /
    <stage>` and holding `params` (the stage's settings); yields its run id.

    Found again (not duplicated) when a retried step enters it again. The stage's params
    are also added to the parent, so that the parent holds the whole config. Inside,
    `log_metrics` goes to this run without ever blocking, and with `curves_on_parent` to the
    parent as well (a bench run is one training: its parent is the run people click and
    compare); at the end the buffered metrics are flushed, and the run (and its parent) marked
    FINISHED, or FAILED on an exception (KILLED when interrupted or preempted).
    """
    _check_id(parent_run_id, "MLflow parent run id")
    _check_id(stage, "stage name")
    client = mlflow_client()
    with recording(f"the start of stage {stage}"):
        parent = client.get_run(parent_run_id)
        inherited = {k: v for k, v in parent.data.tags.items()
                     if k in (TAG_PIPELINE_RUN, TAG_FINGERPRINT, TAG_CODE_VERSION, "mlflow.source.git.commit")}
        name = stage_run_name(parent.info.run_name or parent_run_id, stage)
        run_id = _find_or_create_run(client, parent.info.experiment_id, {PARENT_TAG: parent_run_id, TAG_STAGE: stage},
                                     inherited, name)
        client.update_run(run_id, status="RUNNING", name=name)
        client.update_run(parent_run_id, status="RUNNING")
        _log_params(client, run_id, params)
        _log_params(client, parent_run_id, params)
    logger = MetricsLogger(run_id)
    on_parent = MetricsLogger(parent_run_id) if curves_on_parent else None
    entry = (run_id, logger, on_parent)
    loggers = [lg for lg in (logger, on_parent) if lg is not None]
    _active.append(entry)
    try:
        yield run_id
    except BaseException as e:
        _active.remove(entry)
        for lg in loggers:
            lg.close(timeout=5.0, check=False)
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"  # e.g. preempted
        with contextlib.suppress(Exception):  # best effort: the stage's own error is what matters
            client.set_terminated(run_id, status)
            client.set_terminated(parent_run_id, status)
        raise
    _active.remove(entry)
    unsent = []
    for lg in loggers:  # each gets its chance to send, whatever the other's fate
        try:
            lg.close()
        except CdspError as e:
            unsent.append(e)
    if unsent:
        raise unsent[0]
    with recording(f"the end of stage {stage}"):
        client.set_terminated(run_id, "FINISHED")
        client.set_terminated(parent_run_id, "FINISHED")


def open_run_id() -> str | None:
    """The innermost open stage run, or None outside `stage_run`."""
    return _active[-1][0] if _active else None


def active_run_id() -> str:
    if not _active:
        raise CdspError("no MLflow stage run is open: call this inside `with tracking.stage_run(...)`")
    return _active[-1][0]


def run_or_active(run_id: str | None) -> str:
    """`run_id`, else the open stage run (a CdspError outside `stage_run`)."""
    return run_id or active_run_id()


# --- metrics while training -----------------------------------------------------------------

class _QuietRetries(logging.Filter):
    """Hide urllib3's per-retry warnings from metric threads: each outage is reported once by us."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.threadName.startswith("mlflow-metrics")


logging.getLogger("urllib3.connectionpool").addFilter(_QuietRetries())


class MetricsLogger:
    """An `on_metrics(metrics, step)` callback that never blocks: points are queued and sent to
    MLflow from a background thread; when the server is away they stay queued (one warning),
    sending is retried with exponential backoff, and training goes on.

    A point whose (key, step) the run already holds is not sent again: a retried stage that
    enters its run again (and, resuming, reports the epochs before the interruption again, or
    trains them again from scratch) adds no second point to a metric's history.
    """

    def __init__(self, run_id: str, flush_interval: float = 1.0):
        from mlflow import MlflowClient

        self.run_id = run_id
        self.uri = tracking_uri()
        self._client = MlflowClient(tracking_uri=self.uri)
        self._flush_interval = flush_interval
        self._pending: deque = deque(maxlen=MAX_BUFFERED)
        self._cond = threading.Condition()
        self._closing = False
        self._abandoned = False
        self._warned = False
        self._in_flight = 0
        self.failures = 0
        self.delivered = 0
        self.skipped = 0  # points the run already held
        self._recorded: dict[str, set[int]] | None = None  # key -> steps in the run; read before the first send
        self._thread = threading.Thread(target=self._send_loop, name=f"mlflow-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    def __call__(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(snake(k), float(v), now, int(step)) for k, v in metrics.items()
                  if isinstance(v, (int, float))]
        with self._cond:
            self._pending.extend(points)
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Points not yet accepted by the server."""
        with self._cond:
            return len(self._pending) + self._in_flight

    def _send_loop(self) -> None:
        backoff = 1.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closing)
                if self._abandoned or (self._closing and not self._pending):
                    return
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), 1000))]  # MLflow's limit
                self._in_flight = len(batch)
            try:
                fresh = self._unrecorded(batch)
                if fresh:
                    self._client.log_batch(self.run_id, metrics=fresh)
            except Exception as e:
                self.failures += 1
                if not self._warned:
                    self._warned = True
                    log.warning("MLflow at %s unreachable (%s); training goes on, metrics are kept and sent "
                                "when it is back", redact(self.uri), redact(str(e).splitlines()[0] if str(e) else e))
                with self._cond:  # put them back; back off (once closing, retry every second until close gives up)
                    self._pending.extendleft(reversed(batch))
                    self._in_flight = 0
                    closing = self._closing
                    self._cond.wait_for(lambda c=closing: self._abandoned or (self._closing and not c),
                                        timeout=min(backoff, 1.0) if closing else backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            for m in fresh:
                self._recorded.setdefault(m.key, set()).add(m.step)
            with self._cond:
                self._in_flight = 0
                self.delivered += len(fresh)
                self.skipped += len(batch) - len(fresh)
            if self.failures and backoff > 1.0:
                log.info("MLflow at %s reachable again; buffered metrics sent", redact(self.uri))
            backoff = 1.0
            with self._cond:  # gather a few more points per request, unless closing
                self._cond.wait_for(lambda: self._closing, timeout=self._flush_interval)

    def _unrecorded(self, batch: list) -> list:
        """The points of `batch` whose (key, step) the run does not hold yet (the run is read once)."""
        if self._recorded is None:
            keys = list(self._client.get_run(self.run_id).data.metrics)
            self._recorded = {k: {m.step for m in self._client.get_metric_history(self.run_id, k)} for k in keys}
        return [m for m in batch if m.step not in self._recorded.get(m.key, ())]

    def close(self, timeout: float | None = None, check: bool = True) -> None:
        """Send what is queued, waiting at most `timeout` s (FLUSH_TIMEOUT_S); CdspError if some could not be sent."""
        timeout = FLUSH_TIMEOUT_S if timeout is None else timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            left = self.pending  # the condition's lock is re-entrant
            self._abandoned = True
            self._cond.notify_all()
        if left and check:
            raise CdspError(f"MLflow at {redact(self.uri)}: {left} metric points of run {self.run_id} could not be "
                            f"sent within {timeout:.0f} s; the stage's local outputs are complete")


def log_metrics(metrics: dict, step: int) -> None:
    """`on_metrics` callback for the open stage run (training calls it once per epoch, step = the
    epoch, 1..n): queued, never blocks (see MetricsLogger)."""
    if not _active:
        raise CdspError("no MLflow stage run is open: call this inside `with tracking.stage_run(...)`")
    _, logger, on_parent = _active[-1]
    logger(metrics, step)
    if on_parent is not None:
        on_parent(metrics, step)


# --- final recording ------------------------------------------------------------------------

def flat_metrics(metrics: dict) -> dict[str, float]:
    """Numeric entries in snake case; nested dicts flattened (`per_class_iou` -> `iou_<class>`)."""
    out = {}
    for key, value in metrics.items():
        key = snake(key)
        if isinstance(value, dict):
            prefix = "iou" if key == "per_class_iou" else key
            out.update({f"{prefix}_{snake(k)}": float(v) for k, v in value.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


HEADLINE = ("miou", "pixel_acc", "pseudo_miou")  # with iou_<class>: what runs are compared by


def headline(metrics: dict) -> dict[str, float]:
    """The results a run is compared by, flattened: `miou`, `pixel_acc`, `iou_<class>`, `pseudo_miou`
    (fractions in [0, 1]). Stages log them on their parent too, where the runs table shows them."""
    return {k: v for k, v in flat_metrics(metrics).items() if k in HEADLINE or k.startswith("iou_")}


def log_final_metrics(metrics: dict, run_id: str | None = None, step: int = 0) -> dict[str, float]:
    """Log (synchronously) the numeric entries of `metrics`, to 4 decimals; returns what was logged.

    Rounded because the UI prints every digit it is given (0.17961111…) and cuts the column: a
    seed moves an mIoU by far more than 1e-4."""
    from mlflow.entities import Metric

    run_id = run_or_active(run_id)
    flat = {k: round(v, 4) if math.isfinite(v) else v for k, v in flat_metrics(metrics).items()}
    now = int(time.time() * 1000)
    points = [Metric(k, v, now, step) for k, v in flat.items()]
    with recording(f"the final metrics of run {run_id}"):
        client = mlflow_client()
        for i in range(0, len(points), 1000):
            client.log_batch(run_id, metrics=points[i:i + 1000])
    return flat


def log_artifacts(*paths: str | os.PathLike, artifact_path: str | None = None, run_id: str | None = None) -> None:
    """Upload files and folders (folders keep their name) to the run's artifacts."""
    run_id = run_or_active(run_id)
    client = mlflow_client()
    with recording(f"artifacts of run {run_id}"):
        for p in map(Path, paths):
            if p.is_dir():
                sub = f"{artifact_path}/{p.name}" if artifact_path else p.name
                client.log_artifacts(run_id, str(p), sub)
            elif p.is_file():
                client.log_artifact(run_id, str(p), artifact_path)
            else:
                raise CdspError(f"{p}: no such file or folder to record in MLflow")


def log_dict(obj: dict | list, name: str, run_id: str | None = None) -> None:
    """Record a JSON artifact `name` (e.g. a manifest)."""
    run_id = run_or_active(run_id)
    with recording(f"{name} of run {run_id}"):
        mlflow_client().log_text(run_id, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", name)


def log_evaluation(eval_dir: str | os.PathLike, run_id: str | None = None,
                   class_names: list[str] | None = None) -> dict[str, float]:
    """Record an evaluation folder: final metrics (`miou`, `pixel_acc`, `iou_<class>`), a per-class
    table (CSV and Markdown), a confusion-matrix plot, `report.md`, `metrics.json` and `overlays/`.
    """
    run_id = run_or_active(run_id)
    folder = Path(eval_dir)
    path = folder / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CdspError(f"{path}: unreadable evaluation metrics ({e})") from e
    flat = log_final_metrics(metrics, run_id)
    per_class = metrics.get("per_class_iou") or {}
    matrix = metrics.get("confusion_matrix")
    with tempfile.TemporaryDirectory(prefix="cdsp-eval-") as tmp:
        tmp = Path(tmp)
        with open(tmp / "per_class_iou.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["class", "iou"])
            writer.writerows([name, f"{iou:.4f}"] for name, iou in per_class.items())
        (tmp / "per_class_iou.md").write_text(report.iou_table({"IoU": per_class}), encoding="utf-8")
        files = [tmp / "per_class_iou.csv", tmp / "per_class_iou.md", path]
        if matrix:
            names = class_names or report.matrix_names(metrics)
            report.confusion_plot(matrix, names, tmp / "confusion_matrix.png")
            files.append(tmp / "confusion_matrix.png")
        files += [p for p in (folder / "report.md", folder / "overlays") if p.exists()]
        log_artifacts(*files, run_id=run_id)
    return flat


# --- what people read in the UI -------------------------------------------------------------

def describe_experiment(experiment: str, text: str) -> str:
    """Set the experiment's description (what MLflow's UI shows above its runs); its id."""
    client = mlflow_client()
    with recording(f"the description of experiment {experiment}"):
        experiment_id = _experiment_id(client, experiment)
        tags = client.get_experiment(experiment_id).tags
        if tags.get(NOTE_TAG) != text:
            client.set_experiment_tag(experiment_id, NOTE_TAG, text)
        if tags.get(KIND_TAG) != TRAINING_KIND:
            client.set_experiment_tag(experiment_id, KIND_TAG, TRAINING_KIND)
    return experiment_id


def share_view(experiment_id: str, key: str, columns: list[str], *, order_by: str = "", search: str = "") -> str:
    """A saved view of the experiment's runs table (MLflow's "shared view": an experiment tag the UI reads
    from `?viewStateShareKey=`): these columns (`metrics.miou`, `params.bench_run`) shown, sorted by
    `order_by` (descending), runs matching `search`. Its address, so that a link opens the runs with
    their results as columns rather than none of 90 picked."""
    def column(name: str) -> str:
        kind, _, field = name.partition(".")
        return f"{kind}.`{field}`"  # the UI's column ids

    state = {"selectedColumns": [column(c) for c in columns], "runsExpanded": {}}
    if order_by:
        state.update(orderByKey=column(order_by), orderByAsc=False)
    if search:
        state["searchFilter"] = search
    client = mlflow_client()
    with recording(f"the runs-table view {key} of experiment {experiment_id}"):
        client.set_experiment_tag(experiment_id, f"{SHARED_VIEW_TAG}{key}", json.dumps(state))
    return ui_url(f"experiments/{experiment_id}/runs?viewStateShareKey={urllib.parse.quote(key)}")[0]


def ui_address() -> tuple[str, str]:
    """The address of the MLflow UI for `tracking_uri()`, and a note when it has to be started first.

    A tracking server (http/https) is its own UI. A database or folder store has none: the
    address is where `make mlflow-ui` serves the project's store (or where `mlflow server` does
    for another store), and the note says which command to run.
    """
    uri = tracking_uri()
    if urllib.parse.urlsplit(uri).scheme in ("http", "https"):
        return redact(uri).rstrip("/"), ""
    port = os.environ.get("MLFLOW_UI_PORT", "").strip() or str(UI_PORT)
    address = f"http://127.0.0.1:{port}"
    if uri == f"sqlite:///{project_dir() / 'mlflow.db'}":
        return address, f"the runs are in {uri}, not on a server: start the UI with `make mlflow-ui` first"
    return address, (f"the runs are in {redact(uri)}, not on a server: start the UI with "
                     f"`mlflow server --host 127.0.0.1 --port {port} --backend-store-uri {redact(uri)}` first")


def compare_url(run_ids: list[str], experiment_ids: list[str]) -> tuple[str, str]:
    """MLflow's compare page for these runs (their params side by side, differing ones marked, and
    every metric), and `ui_address`'s note. The route and its JSON query are the UI's own
    (mlflow/server/js: `getCompareRunPageRoute`), percent-encoded so that terminals keep the link whole."""
    query = urllib.parse.urlencode({"runs": json.dumps(list(run_ids), separators=(",", ":")),
                                    "experiments": json.dumps(list(dict.fromkeys(experiment_ids)),
                                                              separators=(",", ":"))},
                                   quote_via=urllib.parse.quote)
    return ui_url(f"compare-runs?{query}")


def ui_url(route: str) -> tuple[str, str]:
    """The address of a page of the MLflow UI (`route`: `compare-runs?...`, `experiments/1`), and
    `ui_address`'s note."""
    address, note = ui_address()
    return report.mlflow_ui_url(address, route), note
