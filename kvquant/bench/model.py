"""The model a benchmark runs: a real checkpoint (:func:`kvquant.models.load_model`) or ``random:<preset>``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvquant.models.random import build_random_model, is_random_model


def default_dtype(device: str) -> torch.dtype:
    """float16 on CUDA, float32 elsewhere (CPU half matmuls are slow and partly unsupported)."""
    return torch.float16 if str(device).startswith("cuda") else torch.float32


@dataclass
class BenchModel:
    """A loaded model and what the benchmarks need to know about it."""

    model: torch.nn.Module
    tokenizer: Any | None
    name: str
    source: str
    random_weights: bool
    dtype: torch.dtype
    device: torch.device
    bos_id: int | None = None

    @property
    def text_config(self) -> Any:
        cfg = self.model.config
        return getattr(cfg, "text_config", None) or cfg

    @property
    def weights_bytes(self) -> int:
        """Bytes of parameters and buffers (what the weights take on the device)."""
        return sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))


def load_bench_model(name: str | None, dtype: str | torch.dtype | None, device: str, seed: int = 0,
                     device_map: str | dict[str, Any] | None = None, tp_plan: str | None = None) -> BenchModel:
    """Load ``name``: ``random:<preset>`` (random weights) or anything :func:`kvquant.models.load_model`
    accepts. ``dtype`` None picks :func:`default_dtype`. ``device_map`` (e.g. ``"auto"``: layers spread over the
    GPUs) and ``tp_plan`` (``"auto"`` under ``torchrun``: tensor parallelism) go to ``from_pretrained``; the
    :attr:`BenchModel.device` is then where the inputs go (the input embeddings' device)."""
    from kvquant.models.loading import parse_dtype

    dt = parse_dtype(dtype) if dtype is not None else default_dtype(device)
    if dt == "auto":
        dt = default_dtype(device)
    if is_random_model(name):
        if device_map is not None or tp_plan is not None:
            raise ValueError(f"{name}: random models are built on one device (no --device-map, no torchrun)")
        model = build_random_model(name, dt, device, seed)
        return BenchModel(model, None, name, "random init from config", True, dt, torch.device(device))
    from kvquant.models import load_model

    model, tok, spec = load_model(name, dtype=dt, device=device, device_map=device_map, tp_plan=tp_plan)
    where = torch.device(device)
    if device_map is not None or tp_plan is not None:
        emb = model.get_input_embeddings().weight
        where = getattr(emb, "to_local", lambda: emb)().device
    return BenchModel(model, tok, spec.name, f"{spec.source}: {spec.path}", False, next(model.parameters()).dtype,
                      where, spec.bos_id)
