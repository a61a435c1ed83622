"""Calibration files: safetensors tensors + JSON metadata, validated on load (never pickle).

The file format lives here, below the cache that reads it; :mod:`kvquant.calibration` makes the files
(:func:`kvquant.calibration.calibrate.calibrate`) and re-exports these names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvquant.quant.allocation import allocate_bits, mean_bits
from kvquant.quant.codebook import Codebook
from kvquant.quant.rotation import ROTATIONS

SENSITIVITIES = ("none", "fisher", "magnitude", "query")
"""How ``kvquant calibrate`` weights the k-means points (see :func:`kvquant.calibration.calibrate.calibrate`)."""

FORMAT_VERSION = 1
ROTATED_FORMAT_VERSION = 2
"""The format version of a file fitted after a channel rotation: a kvquant that predates rotations (reads only
:data:`FORMAT_VERSION`) refuses it instead of using rotated ranges and codebooks on unrotated keys and values."""


class CalibrationError(ValueError):
    """A calibration file is missing, corrupt, or does not match the model or config."""


@dataclass
class LayerCalibration:
    """One layer's calibration.

    Attributes:
        key_lo, key_hi: ``[H_kv, D]`` per-channel key range (pre-RoPE if ``pre_rope``), the outlier
            thresholds at the ``f/2`` and ``1-f/2`` quantiles of the calibration keys.
        key_codebooks, value_codebooks: ``{bits: Codebook}`` k-means NUQ codebooks of normalised data.
        key_errors, value_errors: ``{bits: error}``: the squared quantization error of the layer's calibration keys
            / values with that width's codebook (outliers exact), summed over the calibration tokens and weighted by
            the Fisher information when calibrated with ``sensitivity="fisher"`` (what the bit allocation
            minimises, :mod:`kvquant.quant.allocation`); empty in files written before they were measured.
    """

    key_lo: torch.Tensor
    key_hi: torch.Tensor
    key_codebooks: dict[int, Codebook] = field(default_factory=dict)
    value_codebooks: dict[int, Codebook] = field(default_factory=dict)
    key_errors: dict[int, float] = field(default_factory=dict)
    value_errors: dict[int, float] = field(default_factory=dict)


def require_allocation(datatype: str, calibration: Calibration | None, source: str = "calibration=") -> None:
    """A datatype with per-layer widths (``nuq-alloc``) needs a calibration that holds a bit allocation: a
    ``ValueError`` naming what is missing otherwise (``source``: how the caller passes the calibration, e.g.
    ``"--calibration"`` on the command line)."""
    if calibration is None:
        raise ValueError(f"datatype {datatype} takes its per-layer widths from a calibration file: give {source} "
                         "(a file made with kvquant calibrate --bit-budget)")
    if calibration.allocation is None:
        raise ValueError(f"datatype {datatype} needs a calibration with a bit allocation; the {source} file has no "
                         "bit allocation (make it with kvquant calibrate --bit-budget)")


def calibration_digest(path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a calibration file's tensors: what a results file records, so that runs
    with different calibrations saved under the same path are never taken for the same protocol."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class Calibration:
    """Everything ``kvquant calibrate`` produces for one model.

    ``allocation``: per layer, the ``(key bits, value bits)`` the ``nuq-alloc`` datatype stores that layer with,
    chosen under ``bit_budget`` by :meth:`with_allocation` (``None``: no allocation).

    ``rotation``, ``rotation_seed``: the channel rotation (:attr:`kvquant.config.QuantConfig.rotation`) the ranges
    and codebooks were fitted after (they are in the rotated basis); a cache with another rotation is refused
    (:meth:`check_compatible`). Files written before rotations existed read as ``"none"``.
    """

    layers: list[LayerCalibration]
    model_id: str
    outlier_fraction: float
    n_sink: int
    pre_rope: bool
    num_kv_heads: int
    head_dim: int
    sensitivity: str = "none"
    n_tokens: int = 0
    dataset: str = ""
    kvquant_version: str = ""
    allocation: list[tuple[int, int]] | None = None
    bit_budget: float | None = None
    rotation: str = "none"
    rotation_seed: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def widths(self) -> list[int]:
        """The code widths the file has codebooks for (every layer, keys and values)."""
        return sorted(self.layers[0].key_codebooks) if self.layers else []

    def with_allocation(self, budget: float, candidates: list[tuple[int, int]] | None = None) -> Calibration:
        """This calibration with a per-layer ``(key bits, value bits)`` allocation of average width at most
        ``budget`` and least measured error (:func:`~kvquant.quant.allocation.allocate_bits`; ``candidates``
        default: every pair of :attr:`widths`). A ``CalibrationError`` when the file has no measured errors."""
        if any(not (lc.key_errors and lc.value_errors) for lc in self.layers):
            raise CalibrationError("this calibration has no measured quantization errors to allocate bits with "
                                   "(made by an older kvquant): recalibrate")
        try:
            alloc = allocate_bits([lc.key_errors for lc in self.layers], [lc.value_errors for lc in self.layers],
                                  budget, candidates)
        except ValueError as exc:
            raise CalibrationError(f"bit allocation: {exc}") from exc
        return dataclasses.replace(self, allocation=alloc, bit_budget=float(budget))

    @property
    def allocation_mean_bits(self) -> float | None:
        """Average dense code width of :attr:`allocation` (``None`` without one)."""
        return None if self.allocation is None else mean_bits(self.allocation)

    def metadata(self) -> dict:
        """The JSON metadata of the file (``rotation``/``rotation_seed`` only for a rotated calibration: an unrotated
        one writes the same bytes as before rotations existed)."""
        meta = {
            "format": "kvquant-calibration", "format_version": FORMAT_VERSION, "model_id": self.model_id,
            "outlier_fraction": self.outlier_fraction, "n_sink": self.n_sink, "pre_rope": self.pre_rope,
            "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "bits": sorted(self.layers[0].key_codebooks) if self.layers else [], "sensitivity": self.sensitivity,
            "n_tokens": self.n_tokens, "dataset": self.dataset, "kvquant_version": self.kvquant_version,
            "errors": {"key": [{str(b): e for b, e in sorted(lc.key_errors.items())} for lc in self.layers],
                       "value": [{str(b): e for b, e in sorted(lc.value_errors.items())} for lc in self.layers]},
            "allocation": None if self.allocation is None else [list(p) for p in self.allocation],
            "bit_budget": self.bit_budget, "allocation_mean_bits": self.allocation_mean_bits,
        }
        if self.rotation != "none":
            meta |= {"format_version": ROTATED_FORMAT_VERSION, "rotation": self.rotation,
                     "rotation_seed": self.rotation_seed}
        return meta

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.safetensors``) and ``path.json`` (the same metadata, human readable)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            tensors[f"layer{i}.key_lo"] = layer.key_lo.float().contiguous().cpu()
            tensors[f"layer{i}.key_hi"] = layer.key_hi.float().contiguous().cpu()
            for bits, cb in layer.key_codebooks.items():
                tensors[f"layer{i}.key_codebook.{bits}"] = cb.levels.contiguous().cpu()
            for bits, cb in layer.value_codebooks.items():
                tensors[f"layer{i}.value_codebook.{bits}"] = cb.levels.contiguous().cpu()
        meta = self.metadata()
        save_file(tensors, str(path), metadata={"kvquant": json.dumps(meta)})
        path.with_suffix(path.suffix + ".json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read and validate a calibration file; every problem is a :class:`CalibrationError`."""
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"calibration file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = (f.metadata() or {}).get("kvquant")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except Exception as e:  # safetensors raises its own error type on garbage
            raise CalibrationError(f"{path} is not a readable safetensors file: {e}") from e
        if raw_meta is None:
            raise CalibrationError(f"{path} has no kvquant metadata: not a kvquant calibration file")
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}: metadata is not valid JSON: {e}") from e
        if meta.get("format") != "kvquant-calibration":
            raise CalibrationError(f"{path} is not a kvquant calibration file")
        if meta.get("format_version") not in (FORMAT_VERSION, ROTATED_FORMAT_VERSION):
            raise CalibrationError(f"{path} has format version {meta.get('format_version')}, "
                                   f"this kvquant reads {FORMAT_VERSION} and {ROTATED_FORMAT_VERSION}")
        required = ("model_id", "outlier_fraction", "n_sink", "pre_rope", "num_layers", "num_kv_heads",
                    "head_dim", "bits")
        missing = [k for k in required if k not in meta]
        if missing:
            raise CalibrationError(f"{path}: metadata lacks {missing}")
        H, D = int(meta["num_kv_heads"]), int(meta["head_dim"])
        n_layers = int(meta["num_layers"])
        key_err, value_err = _read_errors(path, meta.get("errors"), n_layers)
        layers = []
        for i in range(n_layers):
            try:
                lo, hi = tensors[f"layer{i}.key_lo"], tensors[f"layer{i}.key_hi"]
                kcb = {b: Codebook(tensors[f"layer{i}.key_codebook.{b}"], f"nuq{b}-kmeans") for b in meta["bits"]}
                vcb = {b: Codebook(tensors[f"layer{i}.value_codebook.{b}"], f"nuq{b}-kmeans") for b in meta["bits"]}
            except KeyError as e:
                raise CalibrationError(f"{path}: tensor {e} is missing") from e
            except ValueError as e:
                raise CalibrationError(f"{path}: layer {i} has an invalid codebook: {e}") from e
            if lo.shape != (H, D) or hi.shape != (H, D):
                raise CalibrationError(f"{path}: layer {i} key ranges have shape {tuple(lo.shape)}, expected {(H, D)}")
            if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()) or (hi < lo).any():
                raise CalibrationError(f"{path}: layer {i} key ranges are not finite with hi >= lo")
            layers.append(LayerCalibration(lo, hi, kcb, vcb, key_err[i], value_err[i]))
        allocation = _read_allocation(path, meta.get("allocation"), n_layers, [int(b) for b in meta["bits"]])
        budget = meta.get("bit_budget")
        rotation = meta.get("rotation", "none")
        if rotation not in ROTATIONS:
            raise CalibrationError(f"{path}: metadata rotation {rotation!r} is not one of {ROTATIONS}")
        try:
            rotation_seed = int(meta.get("rotation_seed", 0))
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"{path}: metadata rotation_seed is not an integer: {exc}") from exc
        return cls(layers, meta["model_id"], float(meta["outlier_fraction"]), int(meta["n_sink"]),
                   bool(meta["pre_rope"]), H, D, meta.get("sensitivity", "none"), int(meta.get("n_tokens", 0)),
                   meta.get("dataset", ""), meta.get("kvquant_version", ""), allocation,
                   None if budget is None else float(budget), rotation, rotation_seed)

    def check_compatible(self, num_layers: int, num_kv_heads: int, head_dim: int, outlier_fraction: float,
                         pre_rope: bool, model_id: str | None = None, rotation: str = "none",
                         rotation_seed: int = 0) -> None:
        """Refuse, with the reason, a calibration made for another model or configuration (``rotation``,
        ``rotation_seed``: the cache's channel rotation, which must be the one the calibration was fitted with)."""
        problems = []
        if model_id is not None and self.model_id != model_id:
            problems.append(f"model {self.model_id!r} != {model_id!r}")
        if (self.num_layers, self.num_kv_heads, self.head_dim) != (num_layers, num_kv_heads, head_dim):
            problems.append(f"shape (layers, kv heads, head_dim) {(self.num_layers, self.num_kv_heads, self.head_dim)}"
                            f" != {(num_layers, num_kv_heads, head_dim)}")
        if abs(self.outlier_fraction - outlier_fraction) > 1e-9:
            problems.append(f"outlier_fraction {self.outlier_fraction} != {outlier_fraction}")
        if self.pre_rope != pre_rope:
            problems.append(f"pre_rope {self.pre_rope} != {pre_rope}")
        if self.rotation != rotation or (rotation != "none" and self.rotation_seed != rotation_seed):
            problems.append(f"rotation {self.rotation!r} (seed {self.rotation_seed}) != {rotation!r} (seed "
                            f"{rotation_seed}): the calibration's ranges and codebooks are in the basis of its "
                            "rotation; calibrate with the cache's --rotation")
        if problems:
            raise CalibrationError("calibration does not match: " + "; ".join(problems))


def _read_errors(path: Path, errors: object, n_layers: int) -> tuple[list[dict[int, float]], list[dict[int, float]]]:
    """The per-layer measured errors of the metadata (empty tables when the file has none)."""
    if errors is None:
        return [{} for _ in range(n_layers)], [{} for _ in range(n_layers)]
    out = []
    for side in ("key", "value"):
        tables = errors.get(side) if isinstance(errors, dict) else None
        if not isinstance(tables, list) or len(tables) != n_layers:
            raise CalibrationError(f"{path}: metadata 'errors.{side}' must be a list of {n_layers} tables")
        try:
            out.append([{int(b): float(e) for b, e in t.items()} for t in tables])
        except (AttributeError, TypeError, ValueError) as exc:
            raise CalibrationError(f"{path}: metadata 'errors.{side}' is malformed: {exc}") from exc
    return out[0], out[1]


def _read_allocation(path: Path, alloc: object, n_layers: int, widths: list[int]) -> list[tuple[int, int]] | None:
    """The per-layer ``(key bits, value bits)`` of the metadata, checked against the layers and the codebooks."""
    if alloc is None:
        return None
    if not isinstance(alloc, list) or len(alloc) != n_layers:
        raise CalibrationError(f"{path}: the bit allocation must list (key bits, value bits) for each of the "
                               f"{n_layers} layers")
    out = []
    for i, pair in enumerate(alloc):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(b, int) for b in pair)):
            raise CalibrationError(f"{path}: layer {i} of the bit allocation is {pair!r}, not [key bits, value bits]")
        if pair[0] not in widths or pair[1] not in widths:
            raise CalibrationError(f"{path}: layer {i} is allocated {pair[0]}-bit keys and {pair[1]}-bit values but "
                                   f"the file has codebooks for {widths} bits only")
        out.append((pair[0], pair[1]))
    return out
