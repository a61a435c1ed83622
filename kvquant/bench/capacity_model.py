"""The analytic side of ``kvquant bench capacity``: a model's shape, random heavy-tailed K/V of that shape, and
the per-layer KV bytes model ``fixed + B * (per_seq + per_token * S)`` measured from real quantized caches (see
:mod:`kvquant.bench.capacity` for the method)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kvquant.config import QuantConfig


@dataclass
class ModelShape:
    """What the KV cache and the budget depend on."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int | None
    vocab_size: int
    params: int
    weights_bytes: int
    dtype: str

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        cfg = model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        heads = int(cfg.num_attention_heads)
        params = list(model.parameters())
        return cls(
            num_layers=int(cfg.num_hidden_layers), num_heads=heads,
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
            hidden_size=int(cfg.hidden_size), intermediate_size=getattr(cfg, "intermediate_size", None),
            vocab_size=int(cfg.vocab_size), params=sum(p.numel() for p in params),
            weights_bytes=sum(t.numel() * t.element_size() for t in (*params, *model.buffers())),
            dtype=str(params[0].dtype).removeprefix("torch."),
        )


class HeavyTailedKV:
    """Random K/V ``[B, H, n, D]`` with fixed per-channel scales: Student-t (df 4) times a per-(head,
    channel) scale in [0.2, 2.2], two outlier channels per head with 15x scale (cf. real pre-RoPE keys).
    Sampled directly on ``device``."""

    def __init__(self, num_heads: int, head_dim: int, device: torch.device | str, dtype: torch.dtype,
                 seed: int = 0, df: float = 4.0) -> None:
        g = torch.Generator().manual_seed(seed)
        scale = 0.2 + 2.0 * torch.rand(num_heads, head_dim, generator=g)
        for h in range(num_heads):
            scale[h, torch.randperm(head_dim, generator=g)[: min(2, head_dim)]] *= 15.0
        self.scale = scale.to(device)[None, :, None, :]
        self.device, self.dtype = torch.device(device), dtype
        self.dist = torch.distributions.StudentT(torch.tensor(float(df), device=self.device))
        self.num_heads, self.head_dim = num_heads, head_dim

    def sample(self, batch: int, n: int) -> torch.Tensor:
        x = self.dist.sample((batch, self.num_heads, n, self.head_dim))
        return (x * self.scale).to(self.dtype)


@dataclass
class KVFit:
    """Per-layer KV bytes (keys + values) = ``fixed + B * (per_seq + per_token * S)``."""

    datatype: str
    per_token: float
    per_seq: float
    fixed: float
    method: str
    bits_per_element: float
    """At ``S2`` tokens, ``B = 1`` (held bytes / elements)."""
    key_outlier_fraction: float | None = None
    value_outlier_fraction: float | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def layer_bytes(self, batch: int, length: int) -> float:
        return self.fixed + batch * (self.per_seq + self.per_token * length)


def fp16_fit(shape: ModelShape, dtype_bytes: int = 2) -> KVFit:
    """``DynamicCache``: ``2 * H_kv * D * dtype_bytes`` bytes per token per layer, nothing else."""
    per_token = 2 * shape.num_kv_heads * shape.head_dim * dtype_bytes
    return KVFit("fp16", float(per_token), 0.0, 0.0,
                 f"formula: DynamicCache holds 2 x H_kv x D x {dtype_bytes} bytes per token per layer",
                 8.0 * dtype_bytes)


def _quantize_layer(quantizer: Any, sampler: HeavyTailedKV, batch: int, length: int) -> tuple[Any, Any]:
    k = sampler.sample(batch, length)
    kq = quantizer.quantize_keys(k)
    del k
    v = sampler.sample(batch, length)
    vq = quantizer.quantize_values(v)
    return kq, vq


def measure_fit(shape: ModelShape, datatype: str, quant: QuantConfig, device: torch.device | str,
                dtype: torch.dtype, lengths: tuple[int, int] = (512, 1024), seed: int = 0) -> KVFit:
    """Measure the per-layer bytes model of ``datatype`` by quantizing random K/V of the model's shape."""
    if datatype == "fp16":
        return fp16_fit(shape, torch.empty(0, dtype=dtype).element_size())
    from kvquant.quant.quantizer import BatchedKVQuantizer

    quantizer = BatchedKVQuantizer(replace(quant, datatype=datatype))
    sampler = HeavyTailedKV(shape.num_kv_heads, shape.head_dim, device, dtype, seed)
    s1, s2 = lengths
    samples = []
    reports = {}
    for b, s in ((1, s1), (1, s2), (2, s2)):
        kq, vq = _quantize_layer(quantizer, sampler, b, s)
        rk, rv = kq.memory_report(), vq.memory_report()
        reports[(b, s)] = (rk, rv)
        samples.append({"batch": b, "tokens": s, "key_bytes": rk["total"], "value_bytes": rv["total"],
                        "bytes": rk["total"] + rv["total"], "elements": rk["elements"] + rv["elements"],
                        "bits_per_element": 8 * (rk["total"] + rv["total"]) / (rk["elements"] + rv["elements"])})
        del kq, vq
    m11, m12, m22 = (x["bytes"] for x in samples)
    per_token = (m12 - m11) / (s2 - s1)
    per_seq = m22 - m12 - per_token * s2
    fixed = m12 - per_seq - per_token * s2
    rk, rv = reports[(1, s2)]
    return KVFit(datatype, per_token, per_seq, fixed,
                 f"measured: memory_report() of BatchedKVQuantizer caches of random heavy-tailed K/V at "
                 f"(B, S) = (1, {s1}), (1, {s2}), (2, {s2}), fitted exactly", samples[1]["bits_per_element"],
                 rk["outlier_fraction"], rv["outlier_fraction"], samples)


def analytic_capacity(shape: ModelShape, fit: KVFit, budget_bytes: float, reserve_bytes: float,
                      contexts: list[int]) -> dict[str, Any]:
    """Largest batch per context and the longest single-sequence context that fit the budget."""
    L = shape.num_layers
    avail = budget_bytes - shape.weights_bytes - reserve_bytes
    rows = {}
    for s in contexts:
        per_seq = L * (fit.per_seq + fit.per_token * s)
        b = math.floor((avail - L * fit.fixed) / per_seq) if per_seq > 0 else 0
        b = max(b, 0)
        rows[s] = {"max_batch": b, "max_tokens": b * s, "kv_bytes_per_seq": per_seq,
                   "kv_bytes_at_max": L * fit.layer_bytes(b, s) if b else 0.0}
    s1 = math.floor((avail / L - fit.fixed - fit.per_seq) / fit.per_token) if fit.per_token > 0 else 0
    return {"rows": rows, "max_context_batch1": max(s1, 0), "kv_budget_bytes": avail}
