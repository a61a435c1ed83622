"""``kvquant bench`` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvquant.models.random import RANDOM_WEIGHTS_NOTE


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kvquant.cli.main import main

    main(["bench", "generate", "--model", "random:tiny", "--device", "cpu", "--datatypes", "fp16,nuq2",
          "--batch", "1", "--prompt-len", "32..64", "--gen", "2", "--warmup", "1", "--no-progress",
          "--backend", "torch", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    out = captured.out
    assert "| datatype | batch | prompt | status |" in out and "nuq2 | 1 | 64 | ok" in out
    assert RANDOM_WEIGHTS_NOTE in out
    # one log line per configuration as it ends, progress bar or not (long GPU runs are read from logs)
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0] for ln in lines] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert "nuq2 B=1 S=64: ok, prefill" in lines[3] and "ms/step" in lines[3]
    records = _jsonl(tmp_path / "generate.jsonl")
    assert len(records) == 4
    assert {r["cache_backend"] for r in records if r["datatype"] == "nuq2"} == {"torch"}


def test_bench_help_is_the_benchmarks_own(capsys: pytest.CaptureFixture) -> None:
    from kvquant.cli.main import main

    for what, option in (("generate", "--prompt-len"), ("capacity", "--contexts"), ("kernels", "--prefill-lengths")):
        with pytest.raises(SystemExit) as exc:
            main(["bench", what, "--help"])
        assert exc.value.code == 0
        assert option in capsys.readouterr().out, what
    with pytest.raises(SystemExit) as exc:
        main(["bench"])
    assert exc.value.code == 2 and "kvquant bench WHAT --help" in capsys.readouterr().out
