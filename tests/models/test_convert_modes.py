"""The safetensors copy of a converted GGUF is readable by the machine's other users (the umask's modes)."""

from __future__ import annotations

import os
import stat

import kvquant.models.loading as loading
from kvquant.models.registry import ModelSpec


class _Tokenizer:
    def save_pretrained(self, folder) -> None:
        (folder / "tokenizer.json").write_text("{}")


def test_converted_copy_has_the_umask_modes(tmp_path, monkeypatch):
    from kvquant.models.tiny import tiny_llama

    monkeypatch.setenv("KVQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "_load_from", lambda spec, dtype, device_map: (tiny_llama(), _Tokenizer()))
    spec = ModelSpec(name="tiny", path=str(tmp_path), gguf_file="tiny.gguf", alias="tiny", source="cache")
    old = os.umask(0o022)
    try:
        converted = loading.convert_gguf_to_cache(spec)
    finally:
        os.umask(old)
    folder = tmp_path / "models" / "tiny" / loading.CONVERTED_SUBDIR
    assert converted is not None and converted.path == str(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o644 for p in files}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
