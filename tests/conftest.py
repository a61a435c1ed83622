import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, i.e. when kvquant.kernels is first imported (hf_cache
    # imports it): set it before any test module can, so every module sees the interpreted kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(os.environ.get("KVQUANT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED} (set KVQUANT_SHARED to its path)")
    return SHARED


@pytest.fixture
def seed(request) -> int:
    """A fresh random seed per test run; reported in the test's properties so a failure can be replayed."""
    value = int.from_bytes(os.urandom(4), "little") % (2**31)
    env = os.environ.get("KVQUANT_TEST_SEED")
    if env:
        value = int(env)
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value
