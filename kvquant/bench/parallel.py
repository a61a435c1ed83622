"""``kvquant bench generate`` on several GPUs with tensor parallelism (``torchrun``, ``tp_plan="auto"``).

Every rank runs every configuration on its own GPU (its slice of the heads, its slice of the KV cache) and measures
what it can see: its timings, its peak memory, its cache's bytes, its GPU's energy (NVML). Each record is then
all-gathered and merged by :func:`merge_rank_records`; rank 0 alone writes it. ``--nproc N`` relaunches the command
under ``torch.distributed.run`` (:func:`torchrun_command`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

#: Fields summed over the ranks (each rank holds its own share: heads of the cache, its GPU's energy).
SUMMED = ("kv_elements", "kv_bytes", "kv_bytes_allocated", "kv_bytes_used", "kv_fp16_bytes", "energy_j",
          "prefill_energy_j", "decode_energy_j", "prefill_j_per_token", "decode_j_per_token", "mean_power_w",
          "peak_power_w", "co2_g", "co2_g_per_1k_tokens")
#: Durations: the group is as slow as its slowest rank.
SLOWEST = ("prefill_s", "decode_s", "total_s")


def world_from_env(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` as ``torchrun`` sets them (``0, 1, 0`` outside it)."""
    env = os.environ if env is None else env
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--nproc":
            skip = True
        elif not x.startswith("--nproc="):
            out.append(x)
    return out


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The command that runs ``kvquant bench generate ARGV`` (minus ``--nproc``) on ``nproc`` local ranks."""
    if nproc < 2:
        raise ValueError(f"--nproc must be >= 2 to relaunch under torchrun, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "kvquant.bench.generate", *strip_nproc(argv)]


def all_gather_record(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's record, in rank order (``torch.distributed.all_gather_object``: call it on every rank)."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, rec)
    return out


def _sum(values: list[Any]) -> Any:
    return None if any(v is None for v in values) else sum(values)


def merge_rank_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record of a tensor-parallel configuration from every rank's (rank order).

    Rank 0's record with: ``world_size``; per rank, ``rank_peak_memory_bytes``, ``rank_kv_bytes`` and
    ``rank_energy_j``; memory, KV bytes and elements, energy (J, J/token, W, CO2) summed over the ranks (``None``
    when a rank has none); ``kv_bytes_by_device`` merged; durations of the slowest rank and the token rates from
    them (the ranks generate the same tokens together: tokens are counted once); ``bits_per_element`` and
    ``compression_vs_fp16`` of the sums. A rank that failed makes the record its status and error.
    """
    if not records:
        raise ValueError("no rank records to merge")
    out = dict(records[0])
    out["world_size"] = len(records)
    bad = [(i, r) for i, r in enumerate(records) if r.get("status") != "ok"]
    if bad and out.get("status") == "ok":
        i, r = bad[0]
        out["status"] = r.get("status")
        out["error"] = f"rank {i}: {r.get('error')}"
    out["rank_peak_memory_bytes"] = [r.get("peak_memory_bytes") for r in records]
    out["rank_kv_bytes"] = [r.get("kv_bytes") for r in records]
    out["rank_energy_j"] = [r.get("energy_j") for r in records]
    out["peak_memory_bytes"] = _sum(out["rank_peak_memory_bytes"])
    for k in SUMMED:
        out[k] = _sum([r.get(k) for r in records])
    by: dict[str, float] = {}
    for r in records:
        for dev, n in (r.get("kv_bytes_by_device") or {}).items():
            by[dev] = by.get(dev, 0) + n
    out["kv_bytes_by_device"] = by or None
    if not all(r.get("energy_available") for r in records):
        out["energy_available"] = False
        notes = [f"rank {i}: {r.get('energy_note')}" for i, r in enumerate(records) if not r.get("energy_available")]
        out["energy_note"] = "; ".join(notes)
        for k in ("energy_j", "prefill_energy_j", "decode_energy_j", "j_per_token", "prefill_j_per_token",
                  "decode_j_per_token", "mean_power_w", "peak_power_w", "co2_g", "co2_g_per_1k_tokens"):
            out[k] = None
    elif out.get("energy_j") is not None and out.get("generated_tokens"):
        out["j_per_token"] = out["energy_j"] / out["generated_tokens"]
    for k in SLOWEST:
        vals = [r.get(k) for r in records]
        out[k] = None if any(v is None for v in vals) else max(vals)
    B, S, steps, gen = (out.get(k) for k in ("batch", "prompt_len", "decode_steps", "generated_tokens"))
    pre, dec = out.get("prefill_s"), out.get("decode_s")
    if pre:
        out["prefill_tokens_per_s"] = B * S / pre
    if dec and steps:
        out["decode_tokens_per_s"] = B * steps / dec
        out["decode_ms_per_step"] = 1e3 * dec / steps
    if pre is not None and gen and pre + (dec or 0.0) > 0:
        out["e2e_tokens_per_s"] = gen / (pre + (dec or 0.0))
    if out.get("kv_bytes") and out.get("kv_elements"):
        out["bits_per_element"] = 8 * out["kv_bytes"] / out["kv_elements"]
        out["compression_vs_fp16"] = out["kv_fp16_bytes"] / out["kv_bytes"] if out.get("kv_fp16_bytes") else None
    return out


def merged(rec: dict[str, Any], world_size: int,
           gather: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """``rec`` as it goes in the results: itself in a single process, else every rank's merged (``gather``: default
    :func:`all_gather_record`)."""
    if world_size <= 1:
        return rec
    return merge_rank_records((gather or all_gather_record)(rec))
