"""Checks of a command's inputs made before its expensive work (fetching, converting or loading a model).

Each raises :class:`~kvquant.cli.errors.CLIError` with the exit code of the problem, or returns what it read so the
command does not read it twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from kvquant.cli.errors import CLIError, ExitCode
from kvquant.config import QuantConfig

if TYPE_CHECKING:
    import torch

    from kvquant.calibration import Calibration


def read_text(data: str, splits: tuple[str, ...]) -> dict[str, str]:
    """The text of each split of ``data`` (``--data``); a missing source is exit code 3."""
    from kvquant.data import load_text

    texts = {}
    for split in splits:
        try:
            texts[split] = load_text(data, split)
        except FileNotFoundError as exc:
            raise CLIError(f"--data {data}: {exc}", ExitCode.MISSING) from exc
        if not texts[split].strip():
            raise CLIError(f"--data {data}: the {split} text is empty")
    return texts


def read_calibration(path: str | Path | None, config: QuantConfig) -> Calibration | None:
    """Load and check a ``--calibration`` file (``X`` or ``X.safetensors``) against the quantization flags (exit
    code 3 when it is not there, 2 when it is not a valid calibration or was made for other settings)."""
    from kvquant.calibration import Calibration, CalibrationError
    from kvquant.calibration.format import find_calibration

    if path is None:
        return None
    path = find_calibration(path)
    if not path.is_file():
        raise CLIError(f"--calibration {path}: no such file", ExitCode.MISSING)
    try:
        cal = Calibration.load(path)
        cal.check_compatible(cal.num_layers, cal.num_kv_heads, cal.head_dim, config.outlier_fraction, config.pre_rope,
                             rotation=config.rotation, rotation_seed=config.rotation_seed)
    except CalibrationError as exc:
        raise CLIError(f"--calibration {path}: {exc}") from exc
    return cal


def check_calibration_widths(names: list[str], cal: Calibration | None) -> None:
    """Every NUQ datatype of ``names`` has its widths in ``cal`` (codebooks of each side's width; a bit allocation
    for ``nuq-alloc``, which also needs a calibration): exit code 2 naming the datatype and what is missing. Names
    that are not kvquant datatypes are skipped."""
    from kvquant.datatypes import parse_datatype
    from kvquant.quant.calibration_file import require_allocation

    for name in names:
        try:
            dt = parse_datatype(name)
        except ValueError:
            continue
        if dt.kind != "nuq":
            continue
        if dt.per_layer:
            try:
                require_allocation(name, cal, "--calibration")
            except ValueError as exc:
                raise CLIError(str(exc)) from exc
            continue
        if cal is None:
            continue
        for side, bits in (("key", dt.key_bits), ("value", dt.value_bits)):
            if bits not in cal.widths:
                raise CLIError(f"datatype {name} stores {side}s at {bits} bits but the --calibration file has "
                               f"codebooks for {cal.widths}-bit codes only")


def check_calibration_fits(cal: Calibration | None, model: torch.nn.Module, name: str, config: QuantConfig) -> None:
    """Once the model is loaded: the calibration's shape and weights fingerprint are this model's (exit code 2)."""
    from kvquant.cache.identity import check_calibration_model
    from kvquant.calibration import CalibrationError

    if cal is None:
        return
    cfg = getattr(model.config, "text_config", None) or model.config
    heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    try:
        cal.check_compatible(int(cfg.num_hidden_layers), heads, head_dim, config.outlier_fraction, config.pre_rope,
                             rotation=config.rotation, rotation_seed=config.rotation_seed)
        check_calibration_model(cal, model, name=name)
    except CalibrationError as exc:
        raise CLIError(f"--calibration: {exc}") from exc


def check_datatypes(names: list[str], extra: tuple[str, ...] = ()) -> None:
    """Every name is a kvquant datatype, a baseline or one of ``extra`` (exit code 2 naming the first that is not)."""
    from kvquant.datatypes import parse_datatype
    from kvquant.eval.baselines import parse_baseline

    if not names:
        raise CLIError("--datatypes: no datatype given")
    for name in names:
        if name in extra or parse_baseline(name) is not None:
            continue
        try:
            parse_datatype(name)
        except ValueError as exc:
            others = f"{', '.join(extra)} or " if extra else ""
            raise CLIError(f"--datatypes: {exc}, {others}a baseline (quanto2/4, quanto2k/4k, hqq2/4)") from None


def check_positive(**values: int | None) -> None:
    """Each value (by flag name, ``max_windows=...``) is ``None`` or at least 1 (exit code 2)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def check_writable(path: Path, flag: str = "--out") -> None:
    """``path`` can be written: its folder exists or can be made, and is writable (exit code 3)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if path.is_dir():
        raise CLIError(f"{flag} {path} is a folder; give a file name", ExitCode.USAGE)
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path}: cannot write in {folder}", ExitCode.MISSING)
