import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    return Path(os.environ.get("N3_DATA", ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data (../shared/data or $N3_DATA); tests that need it skip when it is missing."""
    root = _data_root()
    if not (root / "strecha").is_dir():
        pytest.skip(f"real data not found at {root} (set N3_DATA)")
    return root


@pytest.fixture(scope="session")
def strecha_root(data_root) -> Path:
    return data_root / "strecha"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
