"""Shared pieces of the end-to-end benchmarks (``kvquant bench generate`` / ``kvquant bench capacity``).

* argument parsing: size lists (``1024,4096``, ``1K..32K``) and datatype lists;
* models: a real checkpoint through :func:`kvquant.models.load_model`, or ``random:<preset>``, a model
  built from a config with random weights (memory/throughput only, never accuracy);
* CUDA helpers: synchronisation, peak memory, OOM detection and clean-up;
* incremental result files: one JSON line per record and a CSV with a fixed header, flushed and
  fsync'ed after every record so that a crash loses nothing already measured.
"""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvquant.quant.datatypes import DATATYPES, parse_datatype

RANDOM_PREFIX = "random:"
RANDOM_WEIGHTS_NOTE = "random weights: memory/throughput only, not accuracy"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


# ----------------------------------------------------------------------------------------------------
# argument parsing


def parse_size(text: str) -> int:
    """``"4096"`` -> 4096, ``"4K"``/``"4k"`` -> 4096, ``"1M"`` -> 1048576 (binary multiples).

    Raises:
        ValueError: not a positive integer size.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"bad size {text!r}: expected an integer optionally followed by K or M (e.g. 4096, 4K)")
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]
    if value != int(value) or value <= 0:
        raise ValueError(f"bad size {text!r}: must be a positive integer number of tokens/sequences")
    return int(value)


def parse_size_list(text: str) -> list[int]:
    """Parse a list of sizes: comma-separated items, each a size or a range ``A..B``.

    A range ``A..B`` means ``A, 2A, 4A, ...`` up to ``B`` inclusive (``1K..32K`` = 1024, 2048, ..., 32768);
    ``B`` must be ``A`` times a power of two. The result is sorted and without duplicates.

    Raises:
        ValueError: empty list, a bad size, a range with ``B < A`` or ``B`` not reached by doubling ``A``.
    """
    if not text or not text.strip():
        raise ValueError("empty size list")
    out: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty item in size list {text!r}")
        if ".." in item:
            lo_s, _, hi_s = item.partition("..")
            lo, hi = parse_size(lo_s), parse_size(hi_s)
            if hi < lo:
                raise ValueError(f"bad range {item!r}: end {hi} is smaller than start {lo}")
            ratio = hi / lo
            if ratio != int(ratio) or int(ratio) & (int(ratio) - 1):
                raise ValueError(f"bad range {item!r}: a range doubles from its start, so {hi} must be {lo} "
                                 "times a power of two (e.g. 1K..32K)")
            v = lo
            while v <= hi:
                out.add(v)
                v *= 2
        else:
            out.add(parse_size(item))
    return sorted(out)


def parse_datatypes(text: str) -> list[str]:
    """Comma list of kvquant datatypes (``fp16,nuq4,nuq3,nuq2``), validated, order kept, no duplicates.

    Raises:
        ValueError: an unknown datatype (the message lists the known ones) or an empty list.
    """
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"no datatype given; choose from {', '.join(DATATYPES)}")
    for n in names:
        parse_datatype(n)
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------------
# models

#: ``random:<preset>`` model shapes (Llama architecture). Keys are LlamaConfig fields.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    # Llama-2-7B: 32 layers, 32 heads (MHA), head dim 128, hidden 4096, MLP 11008, vocab 32000
    "7b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
               head_dim=128, intermediate_size=11008, vocab_size=32000, rope_theta=10000.0),
    # Llama-3-8B: GQA 32/8 heads, MLP 14336, vocab 128256
    "8b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
    # Llama-3.2-1B shape: 16 layers, GQA 32/8, head dim 64
    "1b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
               head_dim=64, intermediate_size=8192, vocab_size=128256, rope_theta=500000.0),
    # a few-MB model for quick CPU runs
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, intermediate_size=512, vocab_size=1024, rope_theta=10000.0),
    # the shape of kvquant.models.tiny_llama (tests)
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, vocab_size=128, rope_theta=10000.0),
}


def is_random_model(name: str | None) -> bool:
    return bool(name) and name.lower().startswith(RANDOM_PREFIX)


def random_model_config(name: str, max_positions: int = 1 << 20):
    """The ``LlamaConfig`` of ``random:<preset>`` (presets: :data:`RANDOM_PRESETS`).

    Raises:
        ValueError: unknown preset.
    """
    from transformers import LlamaConfig

    preset = name[len(RANDOM_PREFIX):].strip().lower()
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"unknown random model preset {preset!r}; choose from "
                         f"{', '.join(RANDOM_PREFIX + k for k in RANDOM_PRESETS)}")
    p = dict(RANDOM_PRESETS[preset])
    theta = p.pop("rope_theta")
    return LlamaConfig(**p, max_position_embeddings=max_positions,
                       rope_parameters={"rope_type": "default", "rope_theta": theta},
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


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


def build_random_model(name: str, dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> torch.nn.Module:
    """A Llama of preset ``random:<preset>`` built directly on ``device`` with random weights."""
    from transformers import AutoModelForCausalLM

    config = random_model_config(name)
    with torch.random.fork_rng(devices=[torch.device(device)] if str(device).startswith("cuda") else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_bench_model(name: str | None, dtype: str | torch.dtype | None, device: str, seed: int = 0) -> BenchModel:
    """Load ``name``: ``random:<preset>`` (random weights) or anything :func:`kvquant.models.load_model`
    accepts. ``dtype`` None picks :func:`default_dtype`."""
    from kvquant.models.loading import parse_dtype

    dt = parse_dtype(dtype) if dtype is not None else default_dtype(device)
    if dt == "auto":
        dt = default_dtype(device)
    if is_random_model(name):
        model = build_random_model(name, dt, device, seed)
        return BenchModel(model, None, name, "random init from config", True, dt, torch.device(device))
    from kvquant.models import load_model

    model, tok, spec = load_model(name, dtype=dt, device=device)
    return BenchModel(model, tok, spec.name, f"{spec.source}: {spec.path}", False, next(model.parameters()).dtype,
                      torch.device(device), spec.bos_id)


# ----------------------------------------------------------------------------------------------------
# CUDA helpers


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device | str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


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


# ----------------------------------------------------------------------------------------------------
# incremental result files


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return v


class ResultWriter:
    """Append records to ``<stem>.jsonl`` and ``<stem>.csv`` in ``out_dir``, durably, one at a time.

    Existing files are appended to (several runs may share a folder; records carry a ``run_id``). The CSV
    header is ``fields``; a CSV written earlier with a different header is left alone and a new
    ``<stem>_<n>.csv`` is used.
    """

    def __init__(self, out_dir: str | Path, stem: str, fields: Sequence[str]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.fields = list(fields)
        self.jsonl_path = self.out_dir / f"{stem}.jsonl"
        self.csv_path = self._pick_csv(stem)

    def _pick_csv(self, stem: str) -> Path:
        k = 1
        while True:
            path = self.out_dir / (f"{stem}.csv" if k == 1 else f"{stem}_{k}.csv")
            if not path.exists() or path.stat().st_size == 0:
                return path
            with open(path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            if header == self.fields:
                return path
            k += 1

    def write(self, record: dict[str, Any]) -> None:
        """Append one record to both files and fsync them."""
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        with open(self.csv_path, "a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if new:
                w.writerow(self.fields)
            w.writerow([_csv_value(record.get(k)) for k in self.fields])
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str | Path, doc: Any) -> None:
    """Write ``doc`` as JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def format_table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    """A Markdown table (``None`` shows as ``-``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in r) + " |")
    return "\n".join(lines)


def fmt_num(v: Any, spec: str = ".3g") -> str | None:
    """Format a number, or None for missing/non-numeric values."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return format(v, spec)
