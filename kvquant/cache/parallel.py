"""Multi-GPU placement of a :class:`~kvquant.cache.hf_cache.KVQuantCache`: which calibration heads a tensor-parallel
rank holds, and the device every layer's data lives on.

**Pipelines (``device_map="auto"``).** Each layer of the cache keeps its quantized store on the device of the K/V
that layer receives; its calibration (key ranges ``[H_kv, D]``, codebooks) is copied there the first time the layer
needs it (:meth:`KVQuantCache.quantizer_for`), never all to one device. Nothing to configure.

**Tensor parallelism (``tp_plan="auto"`` under ``torchrun``).** Each rank's attention computes
``num_key_value_heads / tp_size`` KV heads, the contiguous block ``[r * H / N, (r + 1) * H / N)`` of rank ``r`` of
``N``. The calibration describes all ``H`` heads; a layer that receives fewer takes its rank's block
(:func:`kv_head_slice`). The rank and size come from the cache's ``tp_rank``/``tp_size`` arguments or, when those
are not given, from the model (``model.tp_size``) and ``torch.distributed`` (``rank % tp_size``: tensor
parallelism on the innermost dimension of the device mesh, transformers' layout).

**Fewer KV heads than ranks.** transformers (5.2x) cannot shard such a model: ``k_proj``'s rows are split across the
ranks and the model's own reshape fails before the cache is reached. Serving stacks that instead *replicate* KV
heads give rank ``r`` head ``r * H // N`` (``N / H`` consecutive ranks share one head); a layer that receives one
head with ``H < N`` and ``N % H == 0`` takes that head's calibration. Any other head count is an error that names
the numbers.
"""

from __future__ import annotations

from typing import Any

import torch


def kv_head_slice(num_kv_heads: int, observed_heads: int, tp_rank: int, tp_size: int) -> slice:
    """The calibration heads that a layer receiving ``observed_heads`` KV heads holds.

    Args:
        num_kv_heads: ``H``, the model's KV heads (what the calibration describes).
        observed_heads: the heads of the K/V the layer received (``key_states.shape[1]``).
        tp_rank, tp_size: this process's tensor-parallel rank ``r`` and the number of ranks ``N`` (``0, 1`` without
            tensor parallelism).

    Returns:
        ``slice(0, H)`` when the layer holds every head; ``slice(r * H/N, (r + 1) * H/N)`` when the heads are
        sharded; ``slice(h, h + 1)`` with ``h = r * H // N`` when ``H < N`` and the heads are replicated.

    Raises:
        ValueError: any other head count, with the numbers and what was expected.
    """
    H, n, r, N = int(num_kv_heads), int(observed_heads), int(tp_rank), int(tp_size)
    if N < 1 or not 0 <= r < N:
        raise ValueError(f"tensor-parallel rank {r} of {N} ranks is not a valid rank")
    if n == H:
        return slice(0, H)
    if N > 1 and H % N == 0 and n == H // N:
        return slice(r * n, (r + 1) * n)
    if N > 1 and H < N and N % H == 0 and n == 1:
        h = r * H // N
        return slice(h, h + 1)
    if N == 1:
        raise ValueError(f"the layer receives {n} KV heads but the model has {H} and there is no tensor parallelism "
                         "(pass tp_rank/tp_size to KVQuantCache if the model is sharded some other way)")
    if H % N and H > N:
        raise ValueError(f"the layer receives {n} KV heads: the model's {H} KV heads do not divide among {N} "
                         "tensor-parallel ranks")
    expected = f"{H} (unsharded) or {H // N} (rank {r}'s block)" if H % N == 0 else f"{H} or 1 (a replicated head)"
    raise ValueError(f"the layer receives {n} KV heads; with {H} KV heads over {N} tensor-parallel ranks it should "
                     f"receive {expected}")


def resolve_tp(model: torch.nn.Module, tp_rank: int | None, tp_size: int | None) -> tuple[int, int]:
    """``(rank, size)`` of this process's tensor parallelism: the arguments when given (both or neither), else
    ``model.tp_size`` (transformers sets it under ``tp_plan``; else ``torch.distributed``'s world size, else 1)
    and ``torch.distributed``'s rank modulo that size (0 without ``torch.distributed``)."""
    if (tp_rank is None) != (tp_size is None):
        raise ValueError("pass both tp_rank and tp_size, or neither (then they come from the model and "
                         "torch.distributed)")
    if tp_size is not None:
        if int(tp_size) < 1 or not 0 <= int(tp_rank) < int(tp_size):
            raise ValueError(f"tp_rank must be in [0, tp_size), got tp_rank={tp_rank}, tp_size={tp_size}")
        return int(tp_rank), int(tp_size)
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    size = getattr(model, "tp_size", None) or getattr(model, "_tp_size", None)
    if not isinstance(size, int) or size < 1:
        size = torch.distributed.get_world_size() if dist_on else 1
    rank = torch.distributed.get_rank() % size if dist_on else 0
    return rank, size


def device_key(device: torch.device | str) -> str:
    """A device as a dictionary key and report label: ``"cuda:0"``, ``"cpu"``, ``"meta"``; an index-less ``cuda``
    is the current CUDA device."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)


def tensors_bytes_by_device(tensors: Any) -> dict[str, int]:
    """Bytes of the storages of ``tensors`` per device (a storage shared by several tensors counted once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        s = t.untyped_storage()
        dev = device_key(t.device)
        ptr = s.data_ptr()
        key = (dev, ptr if ptr else id(s))  # (meta storages have no address)
        seen[key] = s.nbytes()
    out: dict[str, int] = {}
    for (dev, _), n in seen.items():
        out[dev] = out.get(dev, 0) + n
    return out
