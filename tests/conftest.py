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
