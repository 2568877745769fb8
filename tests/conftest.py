"""Shared test fixtures: the real ScribbleSup sample (skipped cleanly where absent), the servers
of the session, and the `slow` marker of every test that uses one (left out of `make test-fast`)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "scribblesup-sample"
# A test that uses one of these is `slow`: `make test-fast` leaves it out, `make test` runs it.
SERVERS = ("s3_service", "mlflow_service", "pushgateway_service")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(name in SERVERS for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real ScribbleSup sample beside the repository (read-only)."""
    if not SAMPLE.is_dir():
        pytest.skip(f"the shared ScribbleSup sample is absent ({SAMPLE})")
    return SAMPLE


@pytest.fixture(scope="session")
def mlflow_service(tmp_path_factory):
    """One real `mlflow server` (SQLite backend) for every test that needs one and keeps to its own
    experiments and model names: a new server costs about 15 s of CPU (database migrations)."""
    from services import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow-service")) as server:
        yield server


@pytest.fixture
def mlflow_env(mlflow_service, monkeypatch, tmp_path):
    """The session's MLflow server as MLFLOW_TRACKING_URI for this test (failing fast while it is away,
    models cached in the test's folder); a client of it."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_service.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast while the server is away
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setenv("CDSP_CACHE_DIR", str(tmp_path / "cache"))
    return MlflowClient(mlflow_service.url, registry_uri=mlflow_service.url)


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory):
    """One moto S3 server for the session; each test keeps to its own buckets (`new_bucket`)."""
    from services import s3_server

    with s3_server(tmp_path_factory.mktemp("s3-service")) as server:
        yield server


@pytest.fixture
def s3(s3_service, monkeypatch):
    """The session's S3 server, with boto3's variables pointing at it for this test."""
    for k, v in s3_service.env().items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    return s3_service


@pytest.fixture(scope="session")
def pushgateway_service(tmp_path_factory):
    """One Pushgateway for the session; each test pushes under its own `pipeline_run` label."""
    from services import pushgateway

    with pushgateway(tmp_path_factory.mktemp("pushgateway-service")) as server:
        yield server


@pytest.fixture
def one_torch_thread():
    """Torch on one intra-op thread for the test: on a busy 2-core machine that is several
    times faster than two threads fighting over the cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
