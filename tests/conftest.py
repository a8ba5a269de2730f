"""Shared fixtures: where the shared datasets are, and tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

# CI clones the repo next to a copy of shared/, as the developers' checkout sits next to it.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The directory of the real datasets, or a clean skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    return SHARED_DATA
