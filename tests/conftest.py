"""Shared fixtures. Tests run on CPU with one thread each so the suite fits 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Real benchmark files: XMODAL_TEST_DATA=DIR if set, else ../shared/data beside the checkout.
SHARED = Path(os.environ.get("XMODAL_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder (XMODAL_TEST_DATA or ../shared/data); skip when absent."""
    if not SHARED.is_dir():
        pytest.skip(f"real test data not found at {SHARED} (set XMODAL_TEST_DATA=DIR or place ../shared/data)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_backbone_factory():
    """Build the small `xmodal-test` architecture with a fixed seed (fresh each call)."""
    from xmodal.backbones.factory import create_backbone

    def make(seed: int = 0, name: str = "xmodal-test"):
        return create_backbone(name, seed=seed)

    return make


@pytest.fixture
def tiny_backbone(tiny_backbone_factory):
    return tiny_backbone_factory(0)
