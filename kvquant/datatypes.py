"""Names of the storage datatypes kvquant understands.

One name says how keys and values are stored:

* ``fp16``: not quantized;
* ``nuq2|nuq3|nuq4`` / ``int2|int3|int4``: non-uniform (NUQ) / uniform codes, keys and values at the same width;
* ``k<K>v<V>`` / ``int-k<K>v<V>`` (``k4v2``, ``int-k4v2``; ``K, V`` in 2-4): NUQ / uniform codes with ``K``-bit keys
  and ``V``-bit values. ``k3v3`` is the same datatype as ``nuq3`` (its canonical name);
* ``nuq-alloc``: NUQ codes whose key and value widths are chosen per layer by the calibration file it runs with
  (``kvquant calibrate --bit-budget``); a cache built with it gives each layer its own ``k<K>v<V>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DATATYPES: tuple[str, ...] = ("fp16", "nuq2", "nuq3", "nuq4", "int2", "int3", "int4")
"""The datatypes with one width for keys and values (the others: ``k<K>v<V>``, ``int-k<K>v<V>``, ``nuq-alloc``)."""

ALLOC_DATATYPE = "nuq-alloc"
"""The datatype whose widths come per layer from the calibration's bit allocation."""

WIDTHS: tuple[int, ...] = (2, 3, 4)
"""Code widths a quantized side can take."""

DATATYPE_HELP = "fp16, nuq2-4, int2-4, k<K>v<V> (NUQ keys K bits, values V: k4v2), int-k<K>v<V>, nuq-alloc"
"""One phrase listing every datatype name, for help texts and error messages."""

_SPLIT = re.compile(r"^(?:(nuq|int)-)?k([0-9]+)v([0-9]+)$")


@dataclass(frozen=True)
class DataType:
    """A parsed datatype name.

    Attributes:
        name: the canonical name (``nuq3`` for ``k3v3``, ``k4v2``, ``int-k4v2``, ...).
        kind: ``fp`` (unquantized), ``nuq`` or ``int``.
        key_bits, value_bits: code widths of keys and values (16 for ``fp16``; ``None`` for ``nuq-alloc``, whose
            widths are per layer).
    """

    name: str
    kind: str
    key_bits: int | None
    value_bits: int | None

    @property
    def per_layer(self) -> bool:
        """Whether the widths are chosen per layer by a calibration (``nuq-alloc``)."""
        return self.key_bits is None

    @property
    def bits(self) -> int:
        """The one code width of keys and values; a ``ValueError`` when they differ (use :attr:`key_bits` and
        :attr:`value_bits`) or are chosen per layer."""
        if self.per_layer:
            raise ValueError(f"datatype {self.name} has no single width: its widths are chosen per layer by the "
                             "calibration's bit allocation")
        if self.key_bits != self.value_bits:
            raise ValueError(f"datatype {self.name} stores {self.key_bits}-bit keys and {self.value_bits}-bit "
                             "values: use key_bits / value_bits")
        return self.key_bits

    @property
    def mean_bits(self) -> float:
        """Average code width of a key and a value element (what a bit budget counts)."""
        if self.per_layer:
            raise ValueError(f"datatype {self.name}: its widths are chosen per layer by the calibration")
        return (self.key_bits + self.value_bits) / 2

    def side(self, kind: str) -> str:
        """The single-width datatype the ``kind`` (``"key"``/``"value"``) side is stored in: ``k4v2`` ->
        ``nuq4`` for keys, ``nuq2`` for values (``fp16`` for ``fp16``)."""
        if kind not in ("key", "value"):
            raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")
        if self.kind == "fp":
            return "fp16"
        bits = self.key_bits if kind == "key" else self.value_bits
        if bits is None:
            raise ValueError(f"datatype {self.name}: its widths are chosen per layer by the calibration")
        return f"{self.kind}{bits}"


def datatype_name(kind: str, key_bits: int, value_bits: int) -> str:
    """The canonical name of ``kind`` (``nuq``/``int``) codes with these widths: ``nuq3``, ``k4v2``, ``int-k4v2``."""
    if kind not in ("nuq", "int"):
        raise ValueError(f"kind must be 'nuq' or 'int', got {kind!r}")
    for side, b in (("key", key_bits), ("value", value_bits)):
        if b not in WIDTHS:
            raise ValueError(f"{side} bits must be one of {WIDTHS}, got {b!r}")
    if key_bits == value_bits:
        return f"{kind}{key_bits}"
    return f"k{key_bits}v{value_bits}" if kind == "nuq" else f"int-k{key_bits}v{value_bits}"


def parse_datatype(name: str) -> DataType:
    """Parse a datatype name (see the module docstring); anything else is a ``ValueError`` naming the problem."""
    if not isinstance(name, str):
        raise TypeError(f"datatype must be a string such as 'nuq3', got {type(name).__name__}")
    key = name.strip().lower()
    if key == "fp16":
        return DataType(key, "fp", 16, 16)
    if key == ALLOC_DATATYPE:
        return DataType(key, "nuq", None, None)
    if key in DATATYPES:
        return DataType(key, key[:-1], int(key[-1]), int(key[-1]))
    m = _SPLIT.match(key)
    if m:
        kind, kb, vb = m.group(1) or "nuq", int(m.group(2)), int(m.group(3))
        if kb not in WIDTHS or vb not in WIDTHS:
            raise ValueError(f"datatype {name!r}: key and value widths must be 2, 3 or 4 bits, got {kb} and {vb}")
        return DataType(datatype_name(kind, kb, vb), kind, kb, vb)
    raise ValueError(f"unknown datatype {name!r}; expected {DATATYPE_HELP}")


#: The datatype name of the unquantized cache. It keeps K/V in the model's dtype (float32 on a CPU run), so results
#: call it :func:`exact_label` rather than by this name, kept for compatibility.
EXACT_DATATYPE = "fp16"

_SHORT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def exact_label(dtype: object) -> str:
    """What results call the unquantized cache holding K/V in ``dtype`` (a ``torch.dtype`` or its name):
    ``exact (fp32)``, ``exact (fp16)``, ``exact (bf16)``."""
    name = str(dtype).removeprefix("torch.")
    return f"exact ({_SHORT_DTYPES.get(name, name)})"


def result_label(datatype: str, dtype: object) -> str:
    """The name a result row shows for ``datatype`` run with K/V in ``dtype``: :func:`exact_label` for
    :data:`EXACT_DATATYPE`, the datatype itself otherwise."""
    return exact_label(dtype) if datatype == EXACT_DATATYPE else datatype
