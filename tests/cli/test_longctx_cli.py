"""``kvquant eval longctx``: a user's mistake is one line naming the option, before any model is loaded."""

import pytest

from kvquant.cli.main import main


@pytest.mark.parametrize("args, message", [
    (["--tasks", "passkey,needle"], "unknown task 'needle'"),
    (["--caches", "fp16,nuq5"], "unknown cache 'nuq5'"),
    (["--caches", "snapkv@fp16"], "quantized datatype"),
    (["--depths", "0,120"], "--depths: '0,120': every depth must be in 0..100"),
    (["--depths", "a"], "not a comma list"),
    (["--n", "0"], "--n must be at least 1"),
    (["--batch", "0"], "--batch must be at least 1"),
])
def test_usage_errors_are_one_line(args, message, monkeypatch, capsys):
    import kvquant.models

    monkeypatch.setattr(kvquant.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as exc:
        main(["eval", "longctx", *args])
    assert exc.value.code == 2
    text = capsys.readouterr().err.strip()
    assert text.startswith("kvquant eval longctx: error: ") and message in text and "\n" not in text


def test_lengths_beyond_the_model_are_refused():
    from kvquant.cli.errors import CLIError
    from kvquant.cli.longctx import _lengths

    assert _lengths("2K..8K", 8192) == [2048, 4096, 8192] and _lengths("1K,max", 4096) == [1024, 4096]
    with pytest.raises(CLIError, match="beyond the model's context"):
        _lengths("16K", 8192)
    with pytest.raises(CLIError, match="--lengths"):
        _lengths("2K..3K", 8192)
