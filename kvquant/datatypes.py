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
