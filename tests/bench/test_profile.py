"""``kvquant bench profile``: prefill ops and syncs, decode steps' labelled parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvquant.bench.model import BenchModel, load_bench_model
from kvquant.config import QuantConfig


@pytest.fixture(scope="module")
def tiny() -> BenchModel:
    return load_bench_model("random:tiny", None, "cpu")


def test_prefill_profile_names_ops_and_syncs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kvquant.bench import profile as prof

    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.02, n_sink=1, residual_length=0, page_size=32,
                      backend="torch")
    res = prof.profile_prefill("values", 2, 2, 96, 16, cfg, "cpu", dtype=torch.float32, warmup=1)
    ops = {r["op"] for r in res["rows"]}
    assert res["wall_ms"] > 0 and all(r["count"] >= 1 and r["host_ms"] >= 0 for r in res["rows"])
    assert any(op.startswith("aten::") for op in ops)
    # host reads are named by the ops that make them (on the CPU a tolist is no op: possibly none at all)
    assert isinstance(res["syncs"], dict) and set(res["syncs"]) <= set(prof.SYNC_OPS)
    with pytest.raises(ValueError, match="kind must be"):
        prof.profile_prefill("queries", 1, 1, 8, 16, cfg, "cpu")
    out = tmp_path / "p.json"
    assert prof.main(["--kind", "keys", "--heads", "2", "--tokens", "64", "--head-dim", "16", "--backend", "torch",
                      "--device", "cpu", "--top", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prefill keys [1, 2, 64, 16]" in printed and "by host time" in printed and "by GPU time" not in printed
    doc = json.loads(out.read_text())
    assert doc["config"]["tokens"] == 64 and doc["rows"] and "syncs" in doc
    with pytest.raises(SystemExit):
        prof.main(["--tokens", "0", "--device", "cpu"])


def test_decode_profile_labels_kvquant_parts(tiny: BenchModel, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    from kvquant.bench import profile as prof
    from kvquant.cache.hf_cache import KVQuantLayer
    from kvquant.quant.store import QuantizedKVCache

    update, append = KVQuantLayer.update, QuantizedKVCache.append
    quant = QuantConfig(datatype="nuq3", outlier_fraction=0.02, n_sink=1, residual_length=0, backend="torch")
    q = prof.profile_decode(tiny, "nuq3", 2, 24, quant, steps=3, warmup_steps=1)
    assert KVQuantLayer.update is update and QuantizedKVCache.append is append  # the labels are taken off again
    layers = tiny.text_config.num_hidden_layers
    assert q["wall_ms_per_step"] > 0 and q["profiled_ms_per_step"] > 0 and q["device_busy_ms_per_step"] is None
    # torch path: every layer's update dequantizes the past and appends keys and values (nested in update)
    assert q["regions"]["kvquant.update"]["calls_per_step"] == pytest.approx(layers)
    assert q["regions"]["kvquant.append"]["calls_per_step"] == pytest.approx(2 * layers)
    assert q["regions"]["kvquant.append"]["host_ms_per_step"] <= q["regions"]["kvquant.update"]["host_ms_per_step"]
    assert "kvquant.kernel_decode" not in q["regions"] and q["syncs_per_step"] > 0
    f = prof.profile_decode(tiny, "fp16", 2, 24, quant, steps=2, warmup_steps=0)
    assert f["regions"] == {} and f["syncs_per_step"] == 0 and any(r["op"] == "aten::mm" for r in f["rows"])
    with pytest.raises(ValueError, match="steps"):
        prof.profile_decode(tiny, "nuq3", 1, 8, quant, steps=0)

    out = tmp_path / "d.json"
    assert prof.main(["--kind", "decode", "--model", "random:tiny", "--device", "cpu", "--datatype", "fp16,nuq2",
                      "--backend", "torch", "--tokens", "16", "--steps", "2", "--warmup-steps", "0", "--top", "3",
                      "--out", str(out)]) == 0
    table = capsys.readouterr().out.split("| datatype | wall ms/step")[1]
    assert "\n| fp16 |" in table and "\n| nuq2 |" in table
    doc = json.loads(out.read_text())
    assert [r["datatype"] for r in doc["results"]] == ["fp16", "nuq2"] and doc["random_weights"] is True


def test_chunk_profile_times_every_chunk_and_labels_its_parts(tiny: BenchModel, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    from transformers.modeling_utils import AttentionInterface

    from kvquant.bench import profile as prof
    from kvquant.cache.layer import KVQuantLayer

    read_past, get_interface = KVQuantLayer._read_past, AttentionInterface.get_interface
    out = tmp_path / "c.json"
    assert prof.main(["--kind", "chunk", "--model", "random:tiny", "--device", "cpu", "--datatype", "fp16,nuq3",
                      "--backend", "torch", "--batch", "2", "--tokens", "40", "--chunk", "16", "--steps", "2",
                      "--top", "3", "--out", str(out)]) == 0
    assert KVQuantLayer._read_past is read_past and AttentionInterface.get_interface is get_interface  # restored
    table = capsys.readouterr().out.split("| datatype | chunks |")[1]
    assert "\n| fp16 | 3 |" in table and "\n| nuq3 | 3 |" in table
    doc = json.loads(out.read_text())
    fp16, nuq3 = doc["results"]
    layers = tiny.text_config.num_hidden_layers
    for r in (fp16, nuq3):
        assert len(r["chunk_ms"]) == 3 and all(t > 0 for t in r["chunk_ms"]) and r["profiled_chunks"] == [1, 2]
        assert r["device_busy_ms_per_chunk"] is None and r["rows"]
        assert r["phases"]["kvquant.attention"]["calls_per_chunk"] == pytest.approx(layers)
        assert all(p["host_ms_per_chunk"] >= 0 and p["device_ms_per_chunk"] is None for p in r["phases"].values())
    assert set(fp16["phases"]) == {"kvquant.attention"}  # DynamicCache: no kvquant parts
    ph = nuq3["phases"]
    assert set(ph) == set(prof.CHUNK_REGIONS)
    assert ph["kvquant.read_past"]["calls_per_chunk"] == pytest.approx(layers)
    assert ph["kvquant.append"]["calls_per_chunk"] == pytest.approx(2 * layers)  # keys and values
    assert ph["kvquant.read_past"]["host_ms_per_chunk"] <= ph["kvquant.update"]["host_ms_per_chunk"]

    for bad in (["--chunk", "40"], ["--chunk", "64"], ["--chunk", "0"], [], ["--chunk", "16", "--steps", "3"]):
        with pytest.raises(SystemExit):
            prof.main(["--kind", "chunk", "--model", "random:tiny", "--device", "cpu", "--tokens", "40", *bad])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("kvquant bench profile: error: ") and ("--chunk" in err or "--steps" in err)
    with pytest.raises(ValueError, match="chunk must be"):
        prof.profile_chunks(tiny, "nuq3", 1, 8, 8, QuantConfig(datatype="nuq3", backend="torch"))
