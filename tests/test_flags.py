"""The flags every command shares: sizes, datatype lists, QuantConfig fields, --device."""

from __future__ import annotations

import argparse

import pytest
import torch

from kvquant.config import QuantConfig
from kvquant.flags import (
    add_device_arg,
    add_quant_config_args,
    field_docs,
    parse_datatypes,
    parse_size,
    parse_size_list,
    quant_config_from_args,
    resolve_device,
)


def test_size_lists() -> None:
    assert parse_size_list("1K..32K") == [1024, 2048, 4096, 8192, 16384, 32768]
    assert parse_size_list("1024, 4096") == [1024, 4096]
    assert parse_size_list("1,8,32") == [1, 8, 32]
    assert parse_size_list("4k,1..4,4096") == [1, 2, 4, 4096]
    for bad in ["", "32K..1K", "1K..3K", "abc", "0", "1.5", "4,,8", "-4"]:
        with pytest.raises(ValueError):
            parse_size_list(bad)


def test_datatype_list() -> None:
    assert parse_datatypes("fp16, NUQ3,nuq3") == ["fp16", "nuq3"]
    with pytest.raises(ValueError, match="unknown datatype 'nuq5'.*fp16"):
        parse_datatypes("fp16,nuq5")
    with pytest.raises(ValueError):
        parse_datatypes(" , ")


def test_parse_size() -> None:
    assert parse_size("4096") == parse_size("4K") == parse_size("4k") == 4096
    assert parse_size("1M") == 1 << 20
    with pytest.raises(ValueError, match="bad size"):
        parse_size("4G")


def test_a_flag_per_quant_config_field_with_its_docs_and_default() -> None:
    p = argparse.ArgumentParser()
    add_quant_config_args(p)
    helps: dict = {}
    for a in p._actions:
        helps.setdefault(a.dest, a)  # pre_rope: --pre-rope/--no-pre-rope first, then its --post-rope alias
    docs = field_docs()
    for name in QuantConfig.__dataclass_fields__:
        if name == "datatype":
            assert name not in helps  # each command names its datatype(s)
            continue
        assert name in helps, name
        assert docs[name] and docs[name].split(".")[0][:30] in helps[name].help
        assert "%(default)s" in helps[name].help
        assert helps[name].default == QuantConfig.__dataclass_fields__[name].default
    assert quant_config_from_args(p.parse_args([])) == QuantConfig()


def test_flag_names_users_rely_on() -> None:
    p = argparse.ArgumentParser()
    add_quant_config_args(p)
    a = p.parse_args(["--outlier-fraction", "0.02", "--n-sink", "2", "--residual-length", "128", "--post-rope",
                      "--page-size", "128", "--block-nnz", "64", "--backend", "torch"])
    assert quant_config_from_args(a, datatype="nuq4") == QuantConfig(
        datatype="nuq4", outlier_fraction=0.02, n_sink=2, residual_length=128, pre_rope=False, page_size=128,
        block_nnz=64, backend="torch")
    assert quant_config_from_args(p.parse_args(["--no-pre-rope"])).pre_rope is False
    assert quant_config_from_args(p.parse_args(["--pre-rope"])).pre_rope is True
    with pytest.raises(SystemExit):
        p.parse_args(["--backend", "cuda"])
    with pytest.raises(ValueError, match="page_size"):
        quant_config_from_args(p.parse_args(["--page-size", "48"]))


def test_command_defaults_and_aliases() -> None:
    p = argparse.ArgumentParser()
    add_quant_config_args(p, defaults={"residual_length": 32},
                          aliases={"outlier_fraction": ["--outliers"], "residual_length": ["--residual"]})
    assert quant_config_from_args(p.parse_args([])).residual_length == 32
    a = p.parse_args(["--outliers", "0.05", "--residual", "0"])
    cfg = quant_config_from_args(a, datatype="int3", n_sink=0)
    assert (cfg.outlier_fraction, cfg.residual_length, cfg.datatype, cfg.n_sink) == (0.05, 0, "int3", 0)


def test_every_command_that_builds_a_quant_config_takes_the_same_flags(capsys: pytest.CaptureFixture) -> None:
    from kvquant.cli.main import build_parser

    flags = ["--outlier-fraction", "--n-sink", "--residual-length", "--pre-rope", "--post-rope", "--page-size",
             "--block-nnz", "--backend", "--min-range-tokens"]
    top = build_parser()
    sub = top._subparsers._group_actions[0].choices
    helps = {"demo": sub["demo"].format_help(), "calibrate": sub["calibrate"].format_help(),
             "eval ppl": sub["eval"]._subparsers._group_actions[0].choices["ppl"].format_help()}
    from kvquant.bench import capacity, generate, kernels, profile

    for name, mod in (("bench generate", generate), ("bench capacity", capacity), ("bench kernels", kernels),
                      ("bench profile", profile)):
        with pytest.raises(SystemExit):
            mod.main(["--help"])
        helps[name] = capsys.readouterr().out
    for name, text in helps.items():
        missing = [f for f in flags if f not in text]
        assert not missing, f"{name} lacks {missing}"


def test_device_flag() -> None:
    p = argparse.ArgumentParser()
    add_device_arg(p, "cpu")
    assert p.parse_args([]).device == "cpu"
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            resolve_device("cuda:0")
