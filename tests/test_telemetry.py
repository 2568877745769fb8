"""telemetry: metrics pushed to Debian's real Pushgateway on 127.0.0.1 and read back over HTTP."""

from __future__ import annotations

import logging
import re
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from services import free_port, pushgateway

from cdsp_core import telemetry


@pytest.fixture
def gateway(pushgateway_service):
    """The session's Pushgateway: each test pushes under its own `pipeline_run` label."""
    return pushgateway_service


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of every `cdsp_` sample at url/metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("cdsp_"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float | None:
    for (n, lab), v in samples.items():
        if n == name and all(dict(lab).get(k) == want for k, want in labels.items()):
            return v
    return None


def wait_for(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_pushes_periodically_and_at_the_end(gateway):
    run = "run-push"
    m = telemetry.metrics_callback("train_segmenter", run, push_url=gateway.url, interval=0.5)
    m({"loss": 0.5, "loss_seg": 0.3, "lr": 0.01, "images_per_sec": 12.5, "epoch": 1, "step": 10}, 1)
    # The background thread pushes without any further call.
    got = wait_for(lambda: (s := scrape(gateway.url)) and value(s, "cdsp_training_loss", pipeline_run=run) and s)
    assert value(got, "cdsp_training_loss", stage="train_segmenter", pipeline_run=run,
                 job="cdsp_train_segmenter") == 0.5
    assert value(got, "cdsp_training_learning_rate", pipeline_run=run) == 0.01
    assert value(got, "cdsp_training_images_per_second", pipeline_run=run) == 12.5
    assert value(got, "cdsp_training_step", pipeline_run=run) == 10
    assert value(got, "cdsp_val_miou_ratio", pipeline_run=run) is None  # not reported yet: absent, not 0

    m({"loss": 0.25, "epoch": 2, "step": 20, "val_miou": 0.61}, 2)
    time.sleep(0.05)
    assert m.close() is True
    final = scrape(gateway.url)
    assert value(final, "cdsp_training_loss", pipeline_run=run) == 0.25
    assert value(final, "cdsp_training_epoch", pipeline_run=run) == 2
    assert value(final, "cdsp_training_step", pipeline_run=run) == 20  # the optimizer steps, not the epoch
    assert value(final, "cdsp_val_miou_ratio", pipeline_run=run) == 0.61
    assert value(final, "cdsp_training_reports_total", pipeline_run=run) == 2
    assert value(final, "cdsp_stage_duration_seconds", pipeline_run=run) > 0
    assert abs(value(final, "cdsp_stage_last_success_timestamp_seconds", pipeline_run=run) - time.time()) < 60


def test_metric_names_and_labels_follow_the_rules(gateway):
    m = telemetry.metrics_callback("evaluate", "run-names", push_url=gateway.url)
    m({"loss": 1.0, "lr": 0.1, "images_per_sec": 3.0, "epoch": 0, "val_miou": 0.2}, 1)
    assert m.close() is True
    samples = {k: v for k, v in scrape(gateway.url).items() if dict(k[1]).get("pipeline_run") == "run-names"}
    names = {name for name, _ in samples}
    assert {"cdsp_training_loss", "cdsp_training_images_per_second", "cdsp_training_epoch",
            "cdsp_training_learning_rate", "cdsp_val_miou_ratio", "cdsp_stage_duration_seconds",
            "cdsp_training_reports_total"} <= names
    for name, labels in samples:
        assert re.fullmatch(r"cdsp_[a-z0-9_]+", name)
        # `job` and `instance` are added by the gateway from the grouping key.
        assert {k for k, _ in labels} <= {"stage", "pipeline_run", "job", "instance"}, (name, labels)
    for family in m.registry.collect():
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)


def test_serve_exposes_metrics_for_scraping():
    port = free_port()
    m = telemetry.metrics_callback("train_classifier", "run-serve", push_url="", serve_port=port)
    m({"loss": 2.5, "epoch": 3}, 7)
    got = scrape(f"http://127.0.0.1:{port}")
    assert value(got, "cdsp_training_loss", stage="train_classifier", pipeline_run="run-serve") == 2.5
    assert value(got, "cdsp_training_epoch", pipeline_run="run-serve") == 3
    assert m.close() is True  # nothing to push; stops the server
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.fixture
def own_gateway(tmp_path):
    """A Pushgateway of the test's own, for a test that stops it."""
    with pushgateway(tmp_path / "pgw") as gw:
        yield gw


@pytest.mark.slow
def test_gateway_stopped_mid_run_warns_once_and_recovers(own_gateway, caplog):
    gateway = own_gateway
    run = "run-outage"
    m = telemetry.metrics_callback("train_segmenter", run, push_url=gateway.url, interval=0.5)
    with caplog.at_level(logging.INFO, "cdsp_core.telemetry"):
        m({"loss": 1.0}, 1)
        wait_for(lambda: value(scrape(gateway.url), "cdsp_training_loss", pipeline_run=run) == 1.0)
        gateway.stop()
        started = time.monotonic()
        for step in range(2, 40):  # training goes on, never waiting on the gateway
            m({"loss": 1.0 / step}, step)
            time.sleep(0.05)
        assert time.monotonic() - started < 5
        wait_for(lambda: m._failing)
        gateway.start()  # same port, empty (in-memory): everything must be pushed again
        wait_for(lambda: value(scrape(gateway.url), "cdsp_training_loss", pipeline_run=run) == 1.0 / 39, 15)
        assert m.close() is True
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert value(scrape(gateway.url), "cdsp_push_failures_total", pipeline_run=run) >= 1


def test_gateway_that_never_answers_never_crashes_training(caplog):
    port = free_port()  # nothing listens here
    with caplog.at_level(logging.WARNING, "cdsp_core.telemetry"):
        m = telemetry.metrics_callback("train_segmenter", "run-down", push_url=f"http://user:s3cr3t@127.0.0.1:{port}",
                                       interval=0.5)
        for step in range(5):
            m({"loss": 0.1 * step}, step)
        time.sleep(1.2)
        assert m.close(attempts=2) is False
    assert "s3cr3t" not in caplog.text and "user" not in caplog.text  # credentials never logged
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
    assert any("could not be pushed" in r.getMessage() for r in caplog.records)


def test_chain_calls_every_callback():
    seen = []
    m = telemetry.metrics_callback("train_segmenter", "run-chain", push_url="")
    both = telemetry.chain(m, None, lambda metrics, step: seen.append((metrics["loss"], step)))
    both({"loss": 0.75}, 4)
    assert seen == [(0.75, 4)]
    assert m.registry.get_sample_value("cdsp_training_loss", {"stage": "train_segmenter",
                                                              "pipeline_run": "run-chain"}) == 0.75
    assert m.close() is True
