"""Prometheus metrics of a running stage, for watching long jobs in Grafana (prometheus-client).

    metrics = telemetry.metrics_callback("train_segmenter", pipeline_run=run_id)
    train.train_segmenter(..., on_metrics=metrics)   # or telemetry.chain(metrics, mlflow_logger)
    metrics.close()

Every metric has the `cdsp_` prefix, a unit suffix where it has one (`_seconds`, `_bytes`,
`_ratio`), `_total` on counters, and the labels `stage` and `pipeline_run` only (no
per-image, per-step or per-class labels). The stage's own registry is pushed to the
Pushgateway at `PUSHGATEWAY_URL` when that is set (grouping key: job `cdsp_<stage>` and
`pipeline_run`): every `interval` seconds from a background thread and once more at the end.
`serve_port` (or `serve()`) exposes `/metrics` for scraping instead.

Telemetry never stops training: an unreachable gateway is reported with one warning, pushes
are retried with exponential backoff, and `close()` returns False rather than raising.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway, start_http_server
from prometheus_client.exposition import basic_auth_handler, default_handler

from cdsp_core import credentials

log = logging.getLogger(__name__)

MetricsCallback = Callable[[dict, int], None]

LABELS = ("stage", "pipeline_run")
PUSH_INTERVAL_S = 15.0
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.5, 300.0  # the push interval is clamped to these bounds
MAX_BACKOFF_S = 120.0
PUSH_TIMEOUT_S = 10.0

# on_metrics key -> (metric name, help). Training reports these; anything else is MLflow's.
GAUGES = {
    "loss": ("cdsp_training_loss", "Total training loss at the last reported step."),
    "images_per_sec": ("cdsp_training_images_per_second", "Training throughput in images per second."),
    "epoch": ("cdsp_training_epoch", "Current training epoch."),
    "step": ("cdsp_training_step", "Optimizer steps done at the last report."),
    "lr": ("cdsp_training_learning_rate", "Current learning rate."),
    "val_miou": ("cdsp_val_miou_ratio", "Mean IoU on the val split (0 to 1) at the last evaluation."),
}


class StageMetrics:
    """The `on_metrics` callback of one stage: sets the gauges, and pushes them in the background."""

    def __init__(self, stage: str, pipeline_run: str, *, push_url: str | None = None, job: str | None = None,
                 interval: float = PUSH_INTERVAL_S, serve_port: int | None = None):
        self.stage, self.pipeline_run = stage, pipeline_run
        self.job = job or f"cdsp_{stage}"
        self.interval = min(max(interval, MIN_INTERVAL_S), MAX_INTERVAL_S)
        self.registry = CollectorRegistry()
        self._labels = {"stage": stage, "pipeline_run": pipeline_run}
        self._start = time.monotonic()

        def gauge(name: str, help_text: str) -> Gauge:
            return Gauge(name, help_text, LABELS, registry=self.registry)

        # Children are created on first use, so a metric never reported is absent, not 0.
        self._gauges = {key: gauge(name, help_text) for key, (name, help_text) in GAUGES.items()}
        self._duration = gauge("cdsp_stage_duration_seconds", "Seconds since the stage started (final at its end).")
        self._success = gauge("cdsp_stage_last_success_timestamp_seconds", "Unix time the stage last succeeded.")
        self._gpu = {"allocated": gauge("cdsp_gpu_memory_allocated_bytes", "GPU memory held by tensors."),
                     "peak": gauge("cdsp_gpu_memory_peak_allocated_bytes", "Peak GPU memory held by tensors.")}
        self._reports = Counter("cdsp_training_reports", "Metric reports received from training.", LABELS,
                                registry=self.registry).labels(**self._labels)
        self._push_failures = Counter("cdsp_push_failures", "Failed pushes to the Pushgateway.", LABELS,
                                      registry=self.registry).labels(**self._labels)
        self._duration.labels(**self._labels).set(0)

        self._server = serve(serve_port, self.registry) if serve_port is not None else None
        self.push_url = None
        self._failing = False
        self._warned = False
        self._stop = threading.Event()
        self._thread = None
        url = push_url if push_url is not None else os.environ.get("PUSHGATEWAY_URL", "")
        if url:
            self.push_url, user, password = credentials.split_userinfo(url if "://" in url else "http://" + url)
            self._handler = default_handler
            if user is not None:
                def handler(url, method, timeout, headers, data):
                    return basic_auth_handler(url, method, timeout, headers, data, user, password)
                self._handler = handler
            self._thread = threading.Thread(target=self._push_loop, name=f"pushgateway-{stage}", daemon=True)
            self._thread.start()

    def __call__(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if key in self._gauges and isinstance(value, (int, float)):
                self._gauges[key].labels(**self._labels).set(float(value))
        self._reports.inc()
        self._sample()

    def _sample(self) -> None:
        self._duration.labels(**self._labels).set(time.monotonic() - self._start)
        torch = sys.modules.get("torch")  # never import torch just for this
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            self._gpu["allocated"].labels(**self._labels).set(torch.cuda.memory_allocated())
            self._gpu["peak"].labels(**self._labels).set(torch.cuda.max_memory_allocated())

    def push(self) -> bool:
        """Push the registry once; False (and one warning per outage) if the gateway is unreachable."""
        if not self.push_url:
            return False
        self._sample()
        try:
            push_to_gateway(self.push_url, job=self.job, registry=self.registry,
                            grouping_key={"pipeline_run": self.pipeline_run}, timeout=PUSH_TIMEOUT_S,
                            handler=self._handler)
        except Exception as e:
            self._push_failures.inc()
            if not self._warned:
                log.warning("Pushgateway %s unreachable (%s); training goes on, pushes are retried with backoff",
                            self.push_url, e)
            self._warned = self._failing = True
            return False
        if self._failing:
            log.info("Pushgateway %s reachable again", self.push_url)
            self._failing = False
        return True

    def _push_loop(self) -> None:
        delay, backoff = self.interval, 1.0
        while not self._stop.wait(delay):
            if self.push():
                delay, backoff = self.interval, 1.0
            else:  # retry after 1, 2, 4, ... seconds, at most MAX_BACKOFF_S
                delay, backoff = backoff, min(backoff * 2, MAX_BACKOFF_S)

    def close(self, success: bool = True, attempts: int = 3) -> bool:
        """Stop the background pushes and push the final values; True if they reached the gateway."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=PUSH_TIMEOUT_S + 1)
        if success:
            self._success.labels(**self._labels).set_to_current_time()
        self._sample()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if not self.push_url:
            return True
        for attempt in range(attempts):
            if self.push():
                return True
            if attempt + 1 < attempts:
                time.sleep(0.5 * 2**attempt)
        log.warning("Pushgateway %s: the final metrics of stage %s could not be pushed", self.push_url, self.stage)
        return False


def metrics_callback(stage: str, pipeline_run: str = "local", *, push_url: str | None = None,
                     job: str | None = None, interval: float = PUSH_INTERVAL_S,
                     serve_port: int | None = None) -> StageMetrics:
    """The `on_metrics(metrics, step)` callback of a stage; call `.close()` at the stage's end.

    Pushes to `push_url` (default: `PUSHGATEWAY_URL`, nothing when unset) and serves
    `/metrics` on `serve_port` when given.
    """
    return StageMetrics(stage, pipeline_run, push_url=push_url, job=job, interval=interval, serve_port=serve_port)


def serve(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0"):
    """Serve `registry` at http://addr:port/metrics from a background thread; returns the server."""
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server


def chain(*callbacks: MetricsCallback | None) -> MetricsCallback:
    """One `on_metrics` callback that calls each given one (None entries are skipped)."""
    active = [cb for cb in callbacks if cb is not None]

    def on_metrics(metrics: dict, step: int) -> None:
        for cb in active:
            cb(metrics, step)

    return on_metrics
