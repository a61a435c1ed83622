"""Which kernels write a store: the seam between the storage (``quant``) and the kernels that fill it.

A :class:`~kvquant.quant.store.QuantizedKVCache` writes its appends through an *ops* object, one of
:mod:`kvquant.kernels.ops` (``TorchOps``: the PyTorch reference; ``TritonOps``: the fused quantize-append
kernel). :class:`~kvquant.cache.hf_cache.KVQuantCache` resolves one when it is built and hands it to every store
it makes; a store built without one (e.g. by a :class:`~kvquant.quant.quantizer.BatchedKVQuantizer` used on its
own) asks :func:`store_ops` once, in its constructor.

``quant`` never imports ``kernels`` (the kernels depend on the storage format, not the other way round): the
resolver behind :func:`store_ops` is provided by :mod:`kvquant.kernels.ops` when it is imported, which importing
``kvquant`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_STORE_OPS: Callable[[Any, Any], Any] | None = None


def provide_store_ops(resolver: Callable[[Any, Any], Any]) -> None:
    """Install the function :func:`store_ops` asks (``kvquant.kernels.ops.store_ops``)."""
    global _STORE_OPS
    _STORE_OPS = resolver


def store_ops(store: Any, ops: Any = None) -> Any:
    """The ops object ``store`` writes with: ``ops`` when it can write this store, else one resolved from
    ``store.config.backend`` and the store's device (see ``kvquant.kernels.ops.store_ops``)."""
    if _STORE_OPS is None:  # pragma: no cover - importing kvquant provides it
        raise RuntimeError("no kernels are registered: import kvquant (it imports kvquant.kernels.ops)")
    return _STORE_OPS(store, ops)
