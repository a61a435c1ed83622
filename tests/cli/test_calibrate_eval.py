"""``kvquant calibrate`` and ``kvquant eval ppl`` from the command line."""

import dataclasses
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
              "--max-windows", "2", "--datatypes", "fp16,nuq2", "--residual-length", str(r), "--out", str(out),
              "--min-range-tokens", "1"])  # 64-token windows: ranges from the first tokens, no exact hold
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


def test_eval_ppl_cli_resumes_a_stopped_run(shared_dir, tmp_path, capsys, monkeypatch):
    """Stopped while its second datatype runs (exit 130), the run leaves a file marked partial; the same command
    again computes only what is missing and marks the file complete."""
    import kvquant.eval.perplexity as ppl
    from kvquant.cli.main import main

    monkeypatch.setenv("KVQUANT_SHARED", str(shared_dir))
    out = tmp_path / "ppl.json"
    argv = ["eval", "ppl", "--model", "stories260k", "--data", "tinystories", "--ctx", "32", "--chunk", "8",
            "--max-windows", "1", "--datatypes", "fp16,nuq3", "--out", str(out), "--no-progress"]
    real, computed = ppl._evaluate_one, []

    def killed_at_nuq3(name, *args, **kwargs):
        computed.append(name)
        if name == "nuq3":
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ppl, "_evaluate_one", killed_at_nuq3)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 130 and computed == ["fp16", "nuq3"]
    assert json.loads(out.read_text())["meta"]["complete"] is False
    monkeypatch.setattr(ppl, "_evaluate_one", lambda name, *a, **k: computed.append(name) or real(name, *a, **k))
    main(argv)
    assert computed == ["fp16", "nuq3", "nuq3"]
    doc = json.loads(out.read_text())
    assert doc["meta"]["complete"] is True and [r["label"] for r in doc["results"]] == ["exact (fp32)", "nuq3"]
    assert "| exact (fp32) |" in capsys.readouterr().out


def test_calibrate_cli_out_without_suffix_names_the_files_it_wrote(shared_dir, tmp_path, capsys, monkeypatch):
    import os
    import stat

    from kvquant.cli.main import main

    monkeypatch.setenv("KVQUANT_SHARED", str(shared_dir))
    old = os.umask(0o022)
    try:
        main(["calibrate", "--model", "stories260k", "--data", "tinystories", "--n-seqs", "2", "--seq-len", "32",
              "--out", str(tmp_path / "cal"), "--no-progress"])
    finally:
        os.umask(old)
    tensors, sidecar = tmp_path / "cal.safetensors", tmp_path / "cal.safetensors.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == [tensors.name, sidecar.name]
    assert f"calibration written to {tensors} and {sidecar}" in capsys.readouterr().out
    assert stat.S_IMODE(tensors.stat().st_mode) == stat.S_IMODE(sidecar.stat().st_mode) == 0o644


def test_calibrate_bit_budget_and_eval_per_layer_widths(shared_dir, tmp_path, capsys, monkeypatch):
    """`kvquant calibrate --bit-budget 3` writes a per-layer allocation that `--datatypes nuq-alloc` runs; the rows
    of k4v2 and nuq-alloc measure their bits per element; a file without the widths a datatype needs is refused
    before the model is loaded."""
    from kvquant.calibration import Calibration
    from kvquant.cli.main import main

    monkeypatch.setenv("KVQUANT_SHARED", str(shared_dir))
    common = ["--model", "stories260k", "--data", "tinystories"]
    cal = tmp_path / "cal.safetensors"
    main(["calibrate", *common, "--n-seqs", "2", "--seq-len", "64", "--batch-size", "2", "--sensitivity", "fisher",
          "--bit-budget", "3", "--out", str(cal), "--no-progress"])
    printed = capsys.readouterr().out
    loaded = Calibration.load(cal)
    assert loaded.allocation_mean_bits <= 3.0 and loaded.bit_budget == 3.0
    assert " ".join(f"k{k}v{v}" for k, v in loaded.allocation) in printed
    out = tmp_path / "ppl.json"
    main(["eval", "ppl", *common, "--ctx", "64", "--chunk", "16", "--max-windows", "1", "--min-range-tokens", "1",
          "--datatypes", "nuq2,k4v2,nuq4,nuq-alloc", "--calibration", str(cal), "--out", str(out), "--no-progress"])
    rows = {r["datatype"]: r for r in json.loads(out.read_text())["results"]}
    bits = {d: r["bits_per_element"] for d, r in rows.items()}
    assert bits["nuq2"] < bits["k4v2"] < bits["nuq4"] and bits["nuq2"] < bits["nuq-alloc"] < bits["nuq4"]
    assert rows["k4v2"]["config"]["datatype"] == "k4v2"

    plain = tmp_path / "plain.safetensors"
    dataclasses.replace(loaded, allocation=None, bit_budget=None).save(plain)
    for datatypes, cal_path, needle in (("nuq-alloc", plain, "has no bit allocation"),
                                        ("fp16,nuq-alloc", None, "give --calibration")):
        argv = ["eval", "ppl", *common, "--datatypes", datatypes, "--out", str(tmp_path / "x.json")]
        if cal_path is not None:
            argv += ["--calibration", str(cal_path)]
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_calibrate_and_eval_with_a_rotation(shared_dir, tmp_path, capsys, monkeypatch):
    """`--rotation hadamard` on both commands: the calibration records it, the rows run with it (their config says
    so), and the file is refused, naming the rotation, by a run without it."""
    from kvquant.calibration import Calibration
    from kvquant.cli.main import main

    monkeypatch.setenv("KVQUANT_SHARED", str(shared_dir))
    common = ["--model", "stories260k", "--data", "tinystories", "--no-progress"]
    cal = tmp_path / "rot.safetensors"
    main(["calibrate", *common, "--n-seqs", "2", "--seq-len", "64", "--batch-size", "2", "--sensitivity", "fisher",
          "--rotation", "hadamard", "--rotation-seed", "3", "--out", str(cal)])
    assert (Calibration.load(cal).rotation, Calibration.load(cal).rotation_seed) == ("hadamard", 3)
    out = tmp_path / "ppl.json"
    main(["eval", "ppl", *common, "--ctx", "64", "--chunk", "16", "--max-windows", "1", "--datatypes",
          "fp16,int4,nuq3", "--calibration", str(cal), "--rotation", "hadamard", "--rotation-seed", "3",
          "--out", str(out)])
    rows = {r["datatype"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["nuq3"]["config"]["rotation"] == "hadamard" and rows["int4"]["config"]["rotation_seed"] == 3
    assert rows["int4"]["ppl"] < 1.5 * rows["fp16"]["ppl"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["eval", "ppl", *common, "--datatypes", "nuq3", "--calibration", str(cal), "--out", str(out)])
    assert exc.value.code == 2 and "rotation 'hadamard'" in capsys.readouterr().err
