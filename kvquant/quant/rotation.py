"""Orthogonal rotations of a head's channels before quantization (:attr:`kvquant.config.QuantConfig.rotation`).

A token ``x [..., D]`` is stored as ``x R`` and read back as ``(x R)^ R^T``: ``R`` is orthogonal, so the rotation
changes nothing but the basis the quantizer sees. A random rotation spreads a few large channels (outlier channels of
keys) over all of them, so a uniform grid or a codebook fitted to the bulk wastes fewer levels on the tails
(QuaRot, QuIP#; llama.cpp and vLLM rotate with a Hadamard matrix before integer quantization).

* ``"hadamard"``: a randomized Hadamard transform, ``R = diag(s) H / sqrt(D)`` with ``H`` the Sylvester
  Walsh–Hadamard matrix of size ``D`` (a power of two) and ``s`` seeded random signs;
* ``"random"``: the ``Q`` factor of the QR decomposition of a seeded Gaussian ``[D, D]`` matrix (signs fixed so that
  it is Haar-distributed).

The matrices depend on ``(kind, D, seed)`` only, built in float64 on the CPU and held in float32: one per config and
device, shared by every layer and by the key and value stores (never stored per token).
"""

from __future__ import annotations

import torch

from kvquant.config import ROTATIONS

_CACHE: dict[tuple[str, int, int, str], torch.Tensor] = {}


def check_rotation(kind: str) -> None:
    """Raise ``ValueError`` naming the choices if ``kind`` is not a rotation."""
    if kind not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {kind!r}")


def hadamard_matrix(n: int) -> torch.Tensor:
    """The normalized Sylvester Walsh–Hadamard matrix ``[n, n]`` (float64, entries ``±1/sqrt(n)``, orthogonal and
    symmetric); ``n`` a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head size, got {n} (use rotation='random')")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def _build(kind: str, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    if kind == "hadamard":
        signs = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64).double() * 2 - 1
        return signs[:, None] * hadamard_matrix(dim)  # diag(s) H: x R = (x * s) H
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotation_matrix(kind: str, dim: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The rotation ``R [dim, dim]`` (float32, orthogonal) of ``kind``, or ``None`` for ``"none"``.

    Tokens are rotated as ``x @ R`` and restored as ``y @ R.T``. The same ``(kind, dim, seed)`` gives the same
    matrix on every device and in every process; the tensor returned is shared (do not modify it)."""
    check_rotation(kind)
    if kind == "none":
        return None
    if dim < 1:
        raise ValueError(f"head size must be positive, got {dim}")
    key = (kind, int(dim), int(seed), str(torch.device(device)))
    if key not in _CACHE:
        cpu = (kind, int(dim), int(seed), "cpu")
        if cpu not in _CACHE:
            _CACHE[cpu] = _build(kind, int(dim), int(seed)).float().contiguous()
        _CACHE[key] = _CACHE[cpu].to(device)
    return _CACHE[key]


def rotate(x: torch.Tensor, R: torch.Tensor | None) -> torch.Tensor:
    """``x [..., D] @ R`` computed in float32, returned in ``x.dtype`` (``x`` itself when ``R`` is ``None``)."""
    if R is None:
        return x
    return (x.float() @ R.to(x.device)).to(x.dtype)


def unrotate(y: torch.Tensor, R: torch.Tensor | None) -> torch.Tensor:
    """``y [..., D] @ R.T`` computed in float32, returned in ``y.dtype``: the inverse of :func:`rotate`."""
    if R is None:
        return y
    return (y.float() @ R.to(y.device).T).to(y.dtype)
