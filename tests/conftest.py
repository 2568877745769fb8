"""Shared test fixtures: the real ScribbleSup sample (skipped cleanly where absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "scribblesup-sample"


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
def one_torch_thread():
    """Torch on one intra-op thread for the test: on a busy 2-core machine that is several
    times faster than two threads fighting over the cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
