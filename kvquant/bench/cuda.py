"""CUDA utilities of the benchmarks: synchronisation, OOM detection and clean-up, device names, kernel timing."""

from __future__ import annotations

import gc
from functools import partial

import torch


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device | str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


def model_devices(model: torch.nn.Module, device: torch.device | str) -> list[torch.device]:
    """Every CUDA device holding a parameter of ``model`` (a ``device_map`` pipeline spans several), else
    ``[device]``: what a timer must synchronize so that no layer's work is still running."""
    devs = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    return devs or [torch.device(device)]


def synchronize_all(devices: list[torch.device]) -> None:
    """:func:`synchronize` each of ``devices``."""
    for d in devices:
        synchronize(d)


def free_memory(device: torch.device | str) -> None:
    """Collect garbage and return cached blocks to the driver (after an OOM or between configs)."""
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """True for ``torch.cuda.OutOfMemoryError`` (and the generic ``torch.OutOfMemoryError``)."""
    types: tuple[type, ...] = (torch.cuda.OutOfMemoryError,)
    generic = getattr(torch, "OutOfMemoryError", None)
    if isinstance(generic, type):
        types += (generic,)
    if isinstance(exc, types):
        return True
    # allocations outside the caching allocator (cuBLAS workspaces, ...) fail with a plain RuntimeError
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def gpu_name(device: torch.device | str) -> str | None:
    if is_cuda(device) and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return None


def do_bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` (device events, ``triton.testing.do_bench``)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graph_bench(fn, reps: int = 20, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of one ``fn()`` replayed from a CUDA graph of ``reps`` calls: the device's time, without
    the host's launch cost (what a captured decode step pays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return do_bench(g.replay, warmup=warmup, rep=rep) / reps


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    ms = do_bench(partial(y.copy_, x))
    return 2 * nbytes / (ms * 1e-3)


def rotating(fns):
    """A function calling ``fns`` in turn (inputs rotated over several copies, so that none stays in L2)."""
    state = {"i": 0}

    def call():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()

    return call
