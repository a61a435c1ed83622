import os
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run under the interpreter. The variable must be set before anything imports
# triton (transformers does, when test_hf_cache is collected; hf_cache imports kvquant.kernels): triton.language's
# own jit functions are decorated at import, and non-interpreted ones fail inside an interpreted kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _quanto_unpack_in_torch() -> torch.library.Library | None:
    """optimum-quanto compiles a C++ extension (about two minutes on a 2-core machine, in every fresh environment)
    for one CPU op, ``quanto::unpack``; the baselines' tests run its own bit arithmetic in torch instead (the same
    values as quanto's default implementation)."""
    import importlib.util
    import warnings

    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        return None
    import optimum.quanto  # noqa: F401  (defines the op and its C++ CPU kernel)

    def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
        parts = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]
        return torch.cat(parts).to(torch.uint8)

    lib = torch.library.Library("quanto", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib.impl("unpack", unpack, "CPU")
    return lib


_QUANTO_LIB = _quanto_unpack_in_torch()  # kept alive: the registration lasts as long as the library object

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
