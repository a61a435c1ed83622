"""Quantization codebooks: sorted levels in the normalised range [-1, 1].

Every lossy datatype is a codebook. ``int<b>`` is the uniform grid, ``nuq<b>`` is non-uniform: either the
heuristic one (Lloyd-Max levels for a Gaussian truncated at the outlier thresholds) or one calibrated on
real activations by (sensitivity-weighted) 1-D k-means, as in KVQuant. Encoding compares with the sorted
midpoints between levels (``torch.bucketize``), never an argmin over a distance tensor.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvquant.datatypes import parse_datatype

# Normalised data spans the [f/2, 1-f/2] quantiles; for f = 1 % a Gaussian reaches +-2.576 sigma there.
_HEURISTIC_SIGMA = 1.0 / 2.576


@dataclass
class Codebook:
    """Sorted quantization levels.

    Attributes:
        levels: ``[2**bits]`` float32, strictly increasing.
        name: e.g. ``"nuq3"`` or ``"nuq3-kmeans"``.
    """

    levels: torch.Tensor
    name: str = "codebook"

    def __post_init__(self) -> None:
        lv = torch.as_tensor(self.levels)
        if lv.ndim != 1:
            raise ValueError(f"codebook levels must be 1-D, got shape {tuple(lv.shape)}")
        n = lv.numel()
        if n not in (4, 8, 16):
            raise ValueError(f"codebook must have 4, 8 or 16 levels (2-4 bits), got {n}")
        lv = lv.to(torch.float32)
        if not torch.isfinite(lv).all():
            raise ValueError("codebook levels must be finite")
        if not (lv[1:] > lv[:-1]).all():
            raise ValueError("codebook levels must be strictly increasing")
        self.levels = lv

    @property
    def bits(self) -> int:
        return int(math.log2(self.levels.numel()))

    @property
    def midpoints(self) -> torch.Tensor:
        """``[2**bits - 1]`` decision thresholds between neighbouring levels."""
        return (self.levels[1:] + self.levels[:-1]) * 0.5

    @functools.cached_property
    def zero_code(self) -> int:
        """Code of the level nearest 0: the dense code stored where a value went to the sparse part (computed
        once: reading it is a device sync)."""
        return int(self.levels.abs().argmin())

    def to(self, device: torch.device | str) -> Codebook:
        """This codebook on ``device`` (itself when it is there already). The levels were checked when it was made:
        not again (no device sync), and a computed :attr:`zero_code` comes along."""
        if self.levels.device == torch.device(device):
            return self
        moved = object.__new__(Codebook)
        moved.__dict__.update(self.__dict__)
        moved.levels = self.levels.to(device)
        return moved

    def encode(self, x_norm: torch.Tensor) -> torch.Tensor:
        """Nearest level of each normalised value. ``x_norm [...]`` float -> codes ``[...]`` uint8."""
        mids = self.midpoints.to(device=x_norm.device, dtype=x_norm.dtype)
        return torch.bucketize(x_norm.contiguous(), mids).to(torch.uint8)  # (strided input: copied anyway)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[...]`` (any integer dtype) -> levels ``[...]`` float32."""
        return self.levels.to(codes.device)[codes.long()]

    def save(self, path: str | Path) -> None:
        """Write as safetensors (tensor ``levels``, metadata ``name``)."""
        save_file({"levels": self.levels.contiguous().cpu()}, str(path),
                  metadata={"kvquant_format": "codebook", "name": self.name})

    @classmethod
    def load(cls, path: str | Path) -> Codebook:
        """Read a codebook written by :meth:`save`; a file that is not one is a ``ValueError``."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("kvquant_format") != "codebook" or "levels" not in f.keys():  # noqa: SIM118
                    raise ValueError(f"{path} is not a kvquant codebook file")
                levels = f.get_tensor("levels")
        except (OSError, json.JSONDecodeError, RuntimeError) as e:  # safetensors raises these on garbage
            raise ValueError(f"cannot read codebook {path}: {e}") from e
        except Exception as e:  # safetensors' own SafetensorError
            if type(e).__name__ == "SafetensorError":
                raise ValueError(f"cannot read codebook {path}: {e}") from e
            raise
        return cls(levels, meta.get("name", "codebook"))


def _weighted_kmeans_1d(x: torch.Tensor, w: torch.Tensor, k: int, n_iter: int = 200) -> torch.Tensor:
    """Lloyd's algorithm in 1-D, float64, initialised at weighted quantiles. Deterministic.

    The data is sorted once; each iteration then finds the cluster boundaries with a binary search and
    the cluster sums from prefix sums, so it costs O(k log n) instead of O(n).
    """
    order = torch.argsort(x)
    x, w = x[order], w[order]
    zero = torch.zeros(1, dtype=torch.float64)
    cw = torch.cat([zero, torch.cumsum(w, 0)])
    cwx = torch.cat([zero, torch.cumsum(w * x, 0)])
    total = cw[-1]
    if total <= 0:
        raise ValueError("k-means weights sum to zero")
    targets = (torch.arange(k, dtype=torch.float64) + 0.5) / k * total
    levels = x[torch.searchsorted(cw[1:], targets).clamp(max=x.numel() - 1)]
    n = torch.tensor([x.numel()])
    for _ in range(n_iter):
        mids = (levels[1:] + levels[:-1]) * 0.5
        # cluster c holds x in (mids[c-1], mids[c]], exactly torch.bucketize's assignment
        ends = torch.cat([torch.searchsorted(x, mids, right=True), n])
        starts = torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1]])
        cnt = cw[ends] - cw[starts]
        sums = cwx[ends] - cwx[starts]
        new = torch.where(cnt > 0, sums / cnt.clamp_min(1e-300), levels)
        new, _ = torch.sort(new)
        done = torch.max(torch.abs(new - levels)) < 1e-9
        levels = new
        if done:
            break
    # Degenerate data (fewer distinct values than levels): keep levels strictly increasing.
    for i in range(1, k):
        if levels[i] <= levels[i - 1]:
            levels[i] = levels[i - 1] + 1e-6
    return levels


def create_uniform_codebook(bits: int) -> Codebook:
    """``int<bits>``: ``2**bits`` evenly spaced levels from -1 to 1 (asymmetric min/max integer grid)."""
    if bits not in (2, 3, 4):
        raise ValueError(f"bits must be 2, 3 or 4, got {bits}")
    return Codebook(torch.linspace(-1.0, 1.0, 2**bits), f"int{bits}")


def create_heuristic_codebook(datatype: str) -> Codebook:
    """A codebook that needs no data.

    ``nuq<b>``: Lloyd-Max levels for a Gaussian of sigma ``1/2.576`` truncated to [-1, 1], the shape of
    normalised activations once the 1 % outliers are removed. ``int<b>``: the uniform grid.
    """
    dt = parse_datatype(datatype)
    if dt.kind == "int":
        return create_uniform_codebook(dt.bits)
    if dt.kind != "nuq":
        raise ValueError(f"datatype {datatype!r} has no codebook (it is not quantized)")
    return Codebook(_heuristic_levels(dt.bits).clone(), dt.name)


@functools.cache
def _heuristic_levels(bits: int) -> torch.Tensor:
    grid = torch.linspace(-1.0, 1.0, 40001, dtype=torch.float64)
    weights = torch.exp(-0.5 * (grid / _HEURISTIC_SIGMA) ** 2)
    return _weighted_kmeans_1d(grid, weights, 2**bits).float()


def compute_nuq_codebook(
    data: torch.Tensor,
    bits: int,
    weights: torch.Tensor | None = None,
    seed: int = 0,
    max_samples: int = 1 << 21,
    n_iter: int = 200,
) -> Codebook:
    """Calibrated NUQ codebook: (weighted) 1-D k-means on normalised data.

    Args:
        data: normalised activations, any shape (flattened). Values are expected in about [-1, 1].
        bits: 2, 3 or 4.
        weights: optional non-negative sensitivity weights, same shape as ``data`` (KVQuant uses the
            diagonal Fisher information, i.e. squared gradients).
        seed: seed of the subsampling when ``data`` has more than ``max_samples`` values.

    Returns:
        A :class:`Codebook` named ``nuq<bits>-kmeans``; the same inputs and seed give the same levels.
    """
    if bits not in (2, 3, 4):
        raise ValueError(f"bits must be 2, 3 or 4, got {bits}")
    x = torch.as_tensor(data).detach().reshape(-1).to("cpu", torch.float64)
    if x.numel() < 2**bits:
        raise ValueError(f"need at least {2**bits} values to fit a {bits}-bit codebook, got {x.numel()}")
    if not torch.isfinite(x).all():
        raise ValueError("calibration data contains NaN or Inf")
    if weights is None:
        w = torch.ones_like(x)
    else:
        w = torch.as_tensor(weights).detach().reshape(-1).to("cpu", torch.float64)
        if w.numel() != x.numel():
            raise ValueError(f"weights has {w.numel()} values but data has {x.numel()}")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and non-negative")
    if x.numel() > max_samples:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(x.numel(), generator=g)[:max_samples]
        x, w = x[keep], w[keep]
    return Codebook(_weighted_kmeans_1d(x, w, 2**bits, n_iter).float(), f"nuq{bits}-kmeans")


def codebook_for(datatype: str, calibrated: Codebook | None = None) -> Codebook | None:
    """The codebook a datatype uses: ``None`` for fp16, the calibrated one for nuq when given."""
    dt = parse_datatype(datatype)
    if dt.kind == "fp":
        return None
    if calibrated is not None:
        if calibrated.bits != dt.bits:
            raise ValueError(f"calibrated codebook has {calibrated.bits} bits but datatype is {datatype}")
        if dt.kind == "nuq":
            return calibrated
    return create_heuristic_codebook(dt.name)
