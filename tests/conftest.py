import os
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run under the interpreter. The variable must be set before anything imports
# triton (transformers does, when test_hf_cache is collected; hf_cache imports kvquant.kernels): triton.language's
# own jit functions are decorated at import, and non-interpreted ones fail inside an interpreted kernel.
if not torch.cuda.is_available():
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
