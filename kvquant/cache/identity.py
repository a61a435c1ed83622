"""Which model a calibration belongs to: a fingerprint of the weights, checked wherever a calibration meets a model.

A calibration's ``model_id`` is ``NAME@weights:HEX``: the name the model was loaded by and a fingerprint of its
weights, the signs of :data:`FINGERPRINT_BITS` weights sampled at fixed places from up to
:data:`FINGERPRINT_TENSORS` matrices spread over the model. Signs survive a change of dtype (fp32, fp16, bf16) and
of device, so the same model loaded another way keeps its fingerprint; two models of the same shape with other
weights agree on about half of the signs. Two fingerprints match when at least :data:`MATCH_FRACTION` of the signs
agree.

:func:`check_calibration_model` is the one check, used by :class:`~kvquant.cache.hf_cache.KVQuantCache` (without a
name) and by the command line (with the name the user gave): a calibration whose fingerprint does not match the
model is refused. The names are compared only when one side has no fingerprint (files written before fingerprints
existed), since the same weights may be loaded by an alias or by a path.
"""

from __future__ import annotations

import torch

from kvquant.quant.calibration_file import Calibration, CalibrationError

#: Sampled weight signs in a fingerprint.
FINGERPRINT_BITS = 256
#: Weight matrices the samples are spread over (evenly, in the model's parameter order).
FINGERPRINT_TENSORS = 8
#: Share of equal signs from which two fingerprints are the same model (other weights agree on about 0.5).
MATCH_FRACTION = 0.75
_SEP = "@weights:"


def model_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint of ``model``'s weights (:data:`FINGERPRINT_BITS` bits as hex), or ``""`` when the model has
    no weight matrix in memory (e.g. every parameter on the ``meta`` device). A model sharded with ``tp_plan`` is
    fingerprinted whole (its sampled ``DTensor`` weights are gathered: call it on every rank)."""
    params = [p for p in model.parameters() if p.ndim >= 2 and p.numel() > 0 and p.device.type != "meta"]
    if not params:
        return ""
    n = min(FINGERPRINT_TENSORS, len(params))
    picks = [params[round(i * (len(params) - 1) / max(n - 1, 1))] for i in range(n)]
    per = -(-FINGERPRINT_BITS // n)
    signs = []
    with torch.no_grad():
        for p in picks:
            flat = _whole(p.detach()).reshape(-1)
            signs.append((flat[sample_indices(flat.numel(), per).to(flat.device)] > 0).cpu())
    bits = torch.cat(signs)[:FINGERPRINT_BITS].tolist()
    value = sum(1 << i for i, b in enumerate(bits) if b)
    return f"{value:0{FINGERPRINT_BITS // 4}x}"


def _whole(p: torch.Tensor) -> torch.Tensor:
    """The whole weight of a tensor-parallel ``DTensor`` (an all-gather: every rank fingerprints the same, full
    model, in the same order), else the tensor itself."""
    full = getattr(p, "full_tensor", None)
    return full() if callable(full) else p


def sample_indices(numel: int, count: int) -> torch.Tensor:
    """``count`` places spread evenly over ``0 .. numel - 1`` (both ends included), in exact integer arithmetic."""
    return torch.arange(count, dtype=torch.int64) * (numel - 1) // max(count - 1, 1)


def fingerprint_agreement(a: str, b: str) -> float:
    """Share of equal bits of two fingerprints (0.0 when their lengths differ)."""
    if len(a) != len(b) or not a:
        return 0.0
    differ = bin(int(a, 16) ^ int(b, 16)).count("1")
    return 1.0 - differ / (4 * len(a))


def model_identity(name: str, model: torch.nn.Module) -> str:
    """The ``model_id`` a calibration of ``model`` records: ``NAME@weights:HEX`` (just ``NAME`` without weights)."""
    fp = model_fingerprint(model)
    return f"{name}{_SEP}{fp}" if fp else name


def split_model_id(model_id: str) -> tuple[str, str]:
    """``(name, fingerprint)`` of a calibration's ``model_id`` (fingerprint ``""`` when it has none)."""
    name, sep, fp = model_id.rpartition(_SEP)
    return (name, fp) if sep else (model_id, "")


def check_calibration_model(calibration: Calibration, model: torch.nn.Module, name: str | None = None) -> None:
    """Refuse a calibration made for another model.

    Args:
        calibration: the calibration about to be used.
        model: the model it is about to be used with.
        name: the name the model was loaded by (the command line's ``--model``), compared with the calibration's
            when either side has no fingerprint.

    Raises:
        CalibrationError: the fingerprints do not match, or (without fingerprints) the names differ.
    """
    cal_name, cal_fp = split_model_id(calibration.model_id)
    fp = model_fingerprint(model) if cal_fp else ""
    if cal_fp and fp:
        agree = fingerprint_agreement(cal_fp, fp)
        if agree < MATCH_FRACTION:
            raise CalibrationError(
                f"calibration was made for another model ({cal_name or 'unnamed'}): only {agree:.0%} of the sampled "
                f"weight signs agree (the same model: at least {MATCH_FRACTION:.0%}); calibrate this model, or pass "
                "check_model=False if you know the calibration fits it")
        return
    if name is not None and cal_name and cal_name != name:
        raise CalibrationError(f"calibration does not match: model {cal_name!r} != {name!r}")
