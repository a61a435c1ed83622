"""``kvquant calibrate`` and ``kvquant eval ppl`` from the command line."""

import hashlib
import json
import re

import pytest


def test_eval_ppl_cli_residual_window(shared_dir, tmp_path, capsys, monkeypatch):
    """`kvquant eval ppl --residual-length R` runs the cache with an exact window of R recent tokens (the KIVI
    baselines keep one): recorded in the JSON, and it costs bits (the window is stored exactly)."""
    from kvquant.cli.main import main

    monkeypatch.setenv("KVQUANT_SHARED", str(shared_dir))
    rows = {}
    for r in (0, 8):
        out = tmp_path / f"ppl{r}.json"
        main(["eval", "ppl", "--model", "stories260k", "--data", "tinystories", "--ctx", "64", "--chunk", "16",
              "--max-windows", "2", "--datatypes", "fp16,nuq2", "--residual-length", str(r), "--out", str(out)])
        doc = json.loads(out.read_text())
        assert doc["meta"]["config"]["residual_length"] == r
        rows[r] = {x["datatype"]: x for x in doc["results"]}
    assert rows[0]["fp16"]["ppl"] == pytest.approx(rows[8]["fp16"]["ppl"])
    assert rows[8]["nuq2"]["bits_per_element"] > rows[0]["nuq2"]["bits_per_element"]
    assert rows[8]["nuq2"]["ppl"] != rows[0]["nuq2"]["ppl"]


def test_no_progress_flag_on_every_long_running_command():
    from kvquant.cli.main import build_parser

    p = build_parser()
    for argv in (["demo"], ["calibrate", "--out", "x"], ["eval", "ppl"]):
        assert p.parse_args(argv).progress is True
        assert p.parse_args([*argv, "--no-progress"]).progress is False


def test_calibrate_and_eval_ppl_cli_no_progress_hides_the_bars(shared_dir, tmp_path, capsys, monkeypatch):
    from kvquant.cli.main import main

    monkeypatch.setenv("KVQUANT_SHARED", str(shared_dir))
    common = ["--model", "stories260k", "--data", "tinystories"]
    for flag in ([], ["--no-progress"]):
        cal = tmp_path / f"cal{len(flag)}.safetensors"
        main(["calibrate", *common, "--n-seqs", "2", "--seq-len", "32", "--batch-size", "2", "--out", str(cal),
              *flag])
        out = tmp_path / f"ppl{len(flag)}.json"
        main(["eval", "ppl", *common, "--ctx", "32", "--chunk", "8", "--max-windows", "1", "--datatypes", "fp16,nuq3",
              "--calibration", str(cal), "--out", str(out), *flag])
        err = capsys.readouterr().err
        assert cal.exists()
        # the results record which calibration (its content, not only its path): reports merge runs by it
        meta = json.loads(out.read_text())["meta"]
        assert meta["calibration_sha256"] == hashlib.sha256(cal.read_bytes()).hexdigest()[:16]
        for bar in ("calibration forward", "fitting codebooks", "ppl exact (fp32)"):
            assert (f"{bar}:   0%" in err) == (not flag), (bar, flag, err)
        assert re.search(r"ppl exact \(fp32\): \d+\.\d{4}, ", err), err  # the per-datatype log line stays
