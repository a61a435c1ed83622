"""Every class of user error ends as one line on stderr and its exit code, checked before any model is loaded."""

from __future__ import annotations

import json

import pytest
import torch

from kvquant.cli.errors import ExitCode, classify, one_line
from kvquant.cli.main import main


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> list:
    """Loading a model records the call and fails: a test sees whether a command got that far."""
    import kvquant.bench.model
    import kvquant.models

    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the command loaded a model before checking its inputs")

    monkeypatch.setattr(kvquant.models, "load_model", refuse)
    monkeypatch.setattr(kvquant.bench.model, "load_bench_model", refuse)
    import kvquant.bench.generate
    monkeypatch.setattr(kvquant.bench.generate, "load_bench_model", refuse)
    return calls


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("Some words to read. " * 200)
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """Exit code and stderr lines of ``kvquant argv``."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err.strip().splitlines()


def assert_one_line(lines: list[str], *needles: str) -> None:
    assert len(lines) == 1, lines
    assert lines[0].startswith("kvquant") and "Traceback" not in lines[0], lines
    for n in needles:
        assert n in lines[0], (n, lines)


def test_missing_data_is_code_3_before_the_model(no_model, capsys, tmp_path):
    code, err = run(["demo", "--data", str(tmp_path / "nowhere.txt")], capsys)
    assert code == ExitCode.MISSING and not no_model
    assert_one_line(err, "--data", "nowhere.txt")


def test_missing_model_is_code_3(capsys, text, tmp_path):
    code, err = run(["eval", "ppl", "--model", str(tmp_path / "no-model"), "--data", str(text), "--out",
                     str(tmp_path / "ppl.json")], capsys)
    assert code == ExitCode.MISSING
    assert [line for line in err if not line.startswith("loading model")] == err[-1:]
    assert_one_line(err[-1:], "no-model")


def test_calibration_missing_or_bad_is_refused_before_the_model(no_model, capsys, text, tmp_path):
    code, err = run(["eval", "ppl", "--calibration", str(tmp_path / "none.safetensors"), "--data", str(text)], capsys)
    assert code == ExitCode.MISSING
    assert_one_line(err, "--calibration", "no such file")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    code, err = run(["eval", "ppl", "--calibration", str(garbage), "--data", str(text)], capsys)
    assert code == ExitCode.USAGE
    assert_one_line(err, "garbage.safetensors", "not a readable safetensors file")
    assert not no_model


def test_nan_in_a_calibration_file_or_a_flag_is_code_2(no_model, capsys, text, tmp_path):
    from kvquant.calibration import Calibration, LayerCalibration

    lo = torch.full((2, 16), float("nan"))
    bad = Calibration([LayerCalibration(lo, lo.clone())], "m", 0.01, 1, True, 2, 16)
    bad.save(tmp_path / "nan.safetensors")
    code, err = run(["eval", "ppl", "--calibration", str(tmp_path / "nan.safetensors"), "--data", str(text)], capsys)
    assert code == ExitCode.USAGE
    assert_one_line(err, "not finite")
    code, err = run(["eval", "ppl", "--outlier-fraction", "nan"], capsys)
    assert code == ExitCode.USAGE
    assert_one_line(err, "outlier_fraction", "nan")
    assert not no_model


@pytest.mark.parametrize(("argv", "needle"), [
    (["eval", "ppl", "--datatypes", "fp16,nuq9"], "unknown datatype 'nuq9'"),
    (["eval", "ppl", "--ctx", "64", "--prefill", "100"], "--prefill must be in 1..62"),
    (["eval", "ppl", "--chunk", "0"], "--chunk must be at least 1"),
    (["eval", "ppl", "--dtype", "float7"], "unknown dtype 'float7'"),
    (["calibrate", "--out", "x", "--n-seqs", "0"], "--n-seqs must be at least 1"),
    (["eval", "ppl", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["eval"], "required"),
    (["bench", "profile", "--batch", "0"], "--batch must be >= 1"),
    (["bench", "profile", "--kind", "decode", "--datatype", "nuq9"], "unknown datatype 'nuq9'"),
    (["bench", "roundtrip", "--shape", "1", "0", "8", "8"], "--shape sizes must be >= 1"),
    (["bench", "generate", "--datatypes", "fp16,int9"], "unknown datatype 'int9'"),
    (["eval", "ppl", "--datatypes", "fp16,k5v2"], "key and value widths must be 2, 3 or 4 bits"),
    (["bench", "generate", "--datatypes", "k4v"], "unknown datatype 'k4v'"),
    (["calibrate", "--out", "x", "--bit-budget", "1.5"], "--bit-budget must be at least 2"),
])
def test_usage_errors_are_code_2_and_one_line(argv, needle, no_model, capsys, text):
    if argv[:2] == ["eval", "ppl"]:
        argv = [*argv, "--data", str(text)]
    code, err = run(argv, capsys)
    assert code == ExitCode.USAGE
    assert_one_line(err, needle)
    assert not no_model


def test_bench_checks_its_calibration_before_the_model(no_model, capsys, tmp_path):
    code, err = run(["bench", "generate", "--model", "random:tiny", "--calibration", str(tmp_path / "none"),
                     "--out", str(tmp_path)], capsys)
    assert code == ExitCode.MISSING and not no_model
    assert_one_line(err, "no such file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_is_code_2(capsys, text, tmp_path):
    code, err = run(["eval", "ppl", "--device", "cuda", "--data", str(text), "--out", str(tmp_path / "p.json")],
                    capsys)
    assert code == ExitCode.USAGE
    assert_one_line(err[-1:], "CUDA is not available")


def test_report_of_a_missing_folder_is_code_3(capsys, tmp_path):
    code, err = run(["report", str(tmp_path / "nothing")], capsys)
    assert code == ExitCode.MISSING
    assert_one_line(err, "does not exist")


def test_run_time_failures_are_code_4_and_bugs_code_1_with_traceback(monkeypatch, capsys, tmp_path):
    import kvquant.cli.commands as commands

    def oom(a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(commands, "cmd_report", oom)
    code, err = run(["report", str(tmp_path)], capsys)
    assert code == ExitCode.RUNTIME
    assert_one_line(err, "out of memory")

    def bug(a):
        return {}["missing key"]

    monkeypatch.setattr(commands, "cmd_report", bug)
    code, err = run(["report", str(tmp_path)], capsys)
    assert code == ExitCode.BUG
    assert err[0].startswith("Traceback") and "KeyError" in err[-1] and "bug" in err[-1]


def test_debug_flag_and_variable_show_the_traceback_and_keep_the_code(monkeypatch, capsys, tmp_path):
    code, err = run(["report", str(tmp_path / "nothing"), "--debug"], capsys)
    assert code == ExitCode.MISSING and err[0].startswith("Traceback") and "does not exist" in err[-1]
    code, err = run(["--debug", "report", str(tmp_path / "nothing")], capsys)
    assert code == ExitCode.MISSING and err[0].startswith("Traceback")
    monkeypatch.setenv("KVQUANT_DEBUG", "1")
    code, err = run(["report", str(tmp_path / "nothing")], capsys)
    assert code == ExitCode.MISSING and err[0].startswith("Traceback")


def test_classify_and_one_line() -> None:
    from kvquant.calibration import CalibrationError
    from kvquant.models.fetch import ModelFetchError

    assert classify(CalibrationError("x")) == ExitCode.USAGE
    assert classify(FileNotFoundError("x")) == ExitCode.MISSING
    assert classify(ModelFetchError("x")) == ExitCode.MISSING
    assert classify(OSError(28, "No space left on device")) == ExitCode.RUNTIME
    assert classify(RuntimeError("CUDA error: an illegal memory access")) == ExitCode.RUNTIME
    assert classify(RuntimeError("shape mismatch")) == ExitCode.BUG
    assert classify(KeyboardInterrupt()) == ExitCode.INTERRUPTED
    msg = "could not find 'x'. Looked in:\n  - $KVQUANT_DATA (not set)\n  - shared/ (missing)\nFix: set it."
    assert one_line(msg) == "could not find 'x'. Looked in: $KVQUANT_DATA (not set); shared/ (missing); Fix: set it."
    assert json.dumps(one_line("a\n\n b")) == '"a b"'


def test_calibration_named_without_suffix_is_found(no_model, capsys, text, tmp_path):
    """`--calibration cal` reads the `cal.safetensors` that `calibrate --out cal` wrote (here: a garbage one, so the
    command stops at reading it, before the model)."""
    (tmp_path / "cal.safetensors").write_bytes(b"garbage")
    code, err = run(["eval", "ppl", "--calibration", str(tmp_path / "cal"), "--data", str(text)], capsys)
    assert code == ExitCode.USAGE
    assert_one_line(err, "cal.safetensors", "not a readable safetensors file")
