"""Text corpora, windows and calibration sequences."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kvquant.data import (
    find_shared_dir,
    load_text,
    make_windows,
    sample_calibration_sequences,
    tokenize_corpus,
)
from kvquant.data import text as data_text


def test_load_named_datasets_from_shared(shared: Path) -> None:
    raw = load_text("wikitext2-raw", "test")
    tok = load_text("wikitext2", "test")
    val = load_text("wikitext2", "valid")
    assert raw.startswith("\n\n = Robert Boulter = \n")
    assert tok.startswith("\n\n = Robert <unk> = \n") and "@-@" in tok
    assert "Homarus gammarus" in val[:100]
    # Rebuilt as the hub's "\n\n".join(rows): one row per line of the file, blank rows empty.
    n_rows = len((shared / "data/wikitext-2-raw/test.txt").read_text(encoding="utf-8").splitlines())
    assert raw.count("\n\n") >= n_rows - 1
    assert "Once upon a time" in load_text("tinystories", "test")
    assert load_text("WikiText2", "validation") == val


def test_wikitext_raw_missing_split_falls_back_with_warning(shared: Path) -> None:
    with pytest.warns(UserWarning, match="not available offline"):
        text = load_text("wikitext2-raw", "validation")
    assert text == load_text("wikitext2", "validation")


def test_load_explicit_file_and_directory(tmp_path: Path) -> None:
    f = tmp_path / "corpus.txt"
    f.write_text(" line one \n \n line two \n", encoding="utf-8")
    assert load_text(str(f), "test") == " line one \n \n line two \n"  # a plain file comes back verbatim
    (tmp_path / "valid.txt").write_text("validation text", encoding="utf-8")
    assert load_text(str(tmp_path), "validation") == "validation text"
    assert load_text(str(tmp_path), "valid") == "validation text"
    with pytest.raises(FileNotFoundError, match="no 'train' split"):
        load_text(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="known dataset"):
        load_text(str(tmp_path / "nope.txt"), "test")
    with pytest.raises(ValueError, match="unknown split"):
        load_text(str(f), "dev-test")


def test_kvquant_data_env_file_and_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "mine.txt"
    f.write_text(" \n = A = \n \n b c \n", encoding="utf-8")
    monkeypatch.setenv("KVQUANT_DATA", str(f))
    assert load_text("wikitext2", "test") == "\n\n".join(["", " = A = \n", "", " b c \n"])
    assert load_text("tinystories", "train") == f.read_text(encoding="utf-8")

    root = tmp_path / "data-root"
    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "wikitext-2-raw" / "test.txt").write_text(" x \n", encoding="utf-8")
    monkeypatch.setenv("KVQUANT_DATA", str(root))
    assert load_text("wikitext2-raw", "test") == " x \n"


def test_missing_dataset_error_lists_every_place(no_shared: None, tmp_path: Path, monkeypatch) -> None:
    assert find_shared_dir() is None
    monkeypatch.setenv("KVQUANT_DATA", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError) as info:
        load_text("wikitext2-raw", "validation")
    msg = str(info.value)
    assert "KVQUANT_DATA" in msg and "does not exist" in msg
    assert "shared/ folder (not found" in msg and str(tmp_path / "repo") in msg
    assert "wikitext/wikitext-2-raw-v1" in msg and "`datasets` package is not installed" in msg
    assert "Fix:" in msg


def test_find_shared_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVQUANT_SHARED", str(tmp_path))
    assert find_shared_dir() == tmp_path.resolve()


def test_make_windows_non_overlapping_protocol() -> None:
    ids = torch.arange(1000)
    wins = make_windows(ids, 100)
    assert len(wins) == 10 and all(w.shape == (100,) for w in wins)
    assert torch.equal(torch.cat(wins), ids)  # non-overlapping and contiguous
    assert len(make_windows(ids, 300)) == 3  # incomplete tail dropped
    assert [int(w[0]) for w in make_windows(ids, 300)] == [0, 300, 600]
    assert len(make_windows(ids, 1000)) == 1
    assert len(make_windows(ids, 100, max_windows=4)) == 4


def test_make_windows_stride() -> None:
    ids = torch.arange(1000)
    wins = make_windows(ids, 100, stride=50)
    assert len(wins) == (1000 - 100) // 50 + 1
    assert [int(w[0]) for w in wins[:3]] == [0, 50, 100]
    assert all(len(w) == 100 for w in wins)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ctx_len": 0}, "ctx_len must be a positive"),
        ({"ctx_len": -4}, "ctx_len must be a positive"),
        ({"ctx_len": 10, "stride": 0}, "stride must be a positive"),
        ({"ctx_len": 10, "max_windows": 0}, "max_windows must be a positive"),
        ({"ctx_len": 101}, "fewer than ctx_len=101"),
    ],
)
def test_make_windows_bad_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_windows(torch.arange(100), **kwargs)


def test_make_windows_needs_1d() -> None:
    with pytest.raises(ValueError, match="1-D"):
        make_windows(torch.zeros(2, 50, dtype=torch.long), 10)


def test_calibration_crops_deterministic() -> None:
    ids = torch.arange(5000)
    a = sample_calibration_sequences(ids, 8, 64, seed=0)
    b = sample_calibration_sequences(ids, 8, 64, seed=0)
    c = sample_calibration_sequences(ids, 8, 64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # each row is a contiguous crop
    assert sample_calibration_sequences(ids[:64], 3, 64, seed=5).tolist() == [list(range(64))] * 3


@pytest.mark.parametrize(
    ("n", "seq_len", "match"),
    [(0, 8, "n_seqs"), (2, 0, "seq_len must"), (2, 101, "fewer than seq_len=101")],
)
def test_calibration_bad_args(n: int, seq_len: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sample_calibration_sequences(torch.arange(100), n, seq_len, seed=0)


class _CharTokenizer:
    """Minimal stand-in tokenizer: one id per character, optional BOS."""

    def __init__(self, add_bos: bool = False) -> None:
        self.add_bos = add_bos

    def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
        return {"input_ids": ([1] if self.add_bos else []) + [ord(c) for c in text]}


def test_tokenize_corpus_bos_and_documents() -> None:
    assert tokenize_corpus("ab", _CharTokenizer()).tolist() == [97, 98]
    assert tokenize_corpus("ab", _CharTokenizer(), bos_id=1).tolist() == [1, 97, 98]
    assert tokenize_corpus("ab", _CharTokenizer(add_bos=True), bos_id=1).tolist() == [1, 97, 98]  # not twice
    docs = "ab\n<|endoftext|>\ncd\n<|endoftext|>\n"
    assert tokenize_corpus(docs, _CharTokenizer(), bos_id=1).tolist() == [1, 97, 98, 1, 99, 100]
    assert len(tokenize_corpus(docs, _CharTokenizer())) == len(docs)  # no BOS: text kept whole
    with pytest.raises(ValueError):
        tokenize_corpus("", _CharTokenizer())


def test_hub_route_reads_the_text_through_datasets(no_shared: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $KVQUANT_DATA and shared/, the hub's rows come through `datasets.load_dataset`, joined as the
    standard perplexity evaluation joins them."""
    import types

    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(path: str, name: str | None, split: str) -> dict:
        calls.append((path, name, split))
        return {"text": [" = Title =", "", " words"]}

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(data_text, "hub_unreachable", lambda: None)
    monkeypatch.delenv("KVQUANT_DATA", raising=False)
    assert load_text("wikitext2-raw", "test") == " = Title =\n\n\n\n words"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]


def test_the_hf_extra_brings_datasets() -> None:
    """The README installs `.[hf]`: that must be enough to read the hub's text."""
    import re

    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    hf = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["hf"]
    assert any(re.match(r"datasets\b", req) for req in hf), hf


def test_an_unreachable_hub_is_not_asked(no_shared: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline (a switch set, or the hub's name not resolving), the stand-in is used at once, with the reason."""
    import types

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: pytest.fail("the hub was asked")
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.delenv("KVQUANT_DATA", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"HF_DATASETS_OFFLINE is set"):
        load_text("wikitext2-raw", "test")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://no-such-host.invalid")
    with pytest.raises(FileNotFoundError, match=r"no-such-host.invalid does not resolve"):
        load_text("wikitext2-raw", "test")
