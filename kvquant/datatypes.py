"""Names of the storage datatypes kvquant understands."""

from __future__ import annotations

from dataclasses import dataclass

DATATYPES: tuple[str, ...] = ("fp16", "nuq2", "nuq3", "nuq4", "int2", "int3", "int4")


@dataclass(frozen=True)
class DataType:
    """A parsed datatype name: ``kind`` is ``fp`` (unquantized), ``nuq`` or ``int``."""

    name: str
    kind: str
    bits: int


def parse_datatype(name: str) -> DataType:
    """Parse ``fp16 | nuq2 | nuq3 | nuq4 | int2 | int3 | int4``; anything else is a ``ValueError``."""
    if not isinstance(name, str):
        raise TypeError(f"datatype must be a string such as 'nuq3', got {type(name).__name__}")
    key = name.strip().lower()
    if key not in DATATYPES:
        raise ValueError(f"unknown datatype {name!r}; expected one of {', '.join(DATATYPES)}")
    if key == "fp16":
        return DataType(key, "fp", 16)
    return DataType(key, key[:-1], int(key[-1]))


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
