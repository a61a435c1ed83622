"""``kvquant bench generate`` on several GPUs, the parts testable on the CPU: ``--device-map`` and ``--nproc``
parsing, the torchrun relaunch command, merging the ranks' records (with a fake all-gather)."""

from __future__ import annotations

import sys

import pytest

from kvquant.bench import generate as gen
from kvquant.bench import parallel
from kvquant.bench.model import load_bench_model
from kvquant.config import QuantConfig


def _rank_record(rank: int, **kw) -> dict:
    rec = {k: None for k in gen.FIELDS}
    rec.update(status="ok", batch=2, prompt_len=64, decode_steps=3, generated_tokens=8, prefill_s=0.5 + rank,
               decode_s=0.3 * (1 + rank), total_s=0.8 + 1.3 * rank, kv_bytes=1000, kv_bytes_allocated=1000,
               kv_bytes_used=900, kv_fp16_bytes=4000, kv_elements=2000, peak_memory_bytes=10**9 + rank,
               kv_bytes_by_device={f"cuda:{rank}": 1000}, energy_available=True, energy_j=40.0 + rank,
               prefill_energy_j=10.0, decode_energy_j=30.0 + rank, prefill_j_per_token=0.1, decode_j_per_token=1.0,
               mean_power_w=300.0, peak_power_w=400.0, j_per_token=(40.0 + rank) / 8)
    rec.update(kw)
    return rec


def test_merge_sums_memory_and_energy_over_ranks_and_takes_the_slowest_time():
    m = parallel.merge_rank_records([_rank_record(0), _rank_record(1)])
    assert m["world_size"] == 2
    assert m["rank_peak_memory_bytes"] == [10**9, 10**9 + 1] and m["peak_memory_bytes"] == 2 * 10**9 + 1
    assert m["rank_kv_bytes"] == [1000, 1000] and m["kv_bytes"] == 2000 and m["kv_elements"] == 4000
    assert m["kv_bytes_by_device"] == {"cuda:0": 1000, "cuda:1": 1000}
    assert m["bits_per_element"] == 8 * 2000 / 4000 and m["compression_vs_fp16"] == 8000 / 2000
    assert m["rank_energy_j"] == [40.0, 41.0] and m["energy_j"] == 81.0
    assert m["j_per_token"] == pytest.approx(81.0 / 8)  # tokens counted once: the ranks make them together
    assert m["mean_power_w"] == 600.0 and m["decode_j_per_token"] == 2.0
    assert m["prefill_s"] == 1.5 and m["decode_s"] == pytest.approx(0.6)  # the slowest rank
    assert m["prefill_tokens_per_s"] == pytest.approx(2 * 64 / 1.5)
    assert m["decode_tokens_per_s"] == pytest.approx(2 * 3 / 0.6)
    assert m["e2e_tokens_per_s"] == pytest.approx(8 / 2.1)
    assert m["status"] == "ok"


def test_merge_reports_a_failed_rank_and_missing_energy():
    m = parallel.merge_rank_records([_rank_record(0), _rank_record(1, status="OOM", error="CUDA out of memory")])
    assert m["status"] == "OOM" and m["error"] == "rank 1: CUDA out of memory"
    m = parallel.merge_rank_records([_rank_record(0), _rank_record(1, energy_available=False, energy_j=None,
                                                                   energy_note="unavailable: no NVML")])
    assert m["energy_available"] is False and m["energy_j"] is None and m["j_per_token"] is None
    assert m["energy_note"] == "rank 1: unavailable: no NVML"
    assert m["peak_memory_bytes"] is not None
    with pytest.raises(ValueError, match="no rank records"):
        parallel.merge_rank_records([])


def test_torchrun_command_and_world():
    cmd = parallel.torchrun_command(4, ["--model", "m", "--nproc", "4", "--gen", "8", "--nproc=4"])
    assert cmd[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m"]
    assert cmd[7:] == ["kvquant.bench.generate", "--model", "m", "--gen", "8"]
    with pytest.raises(ValueError, match="--nproc must be >= 2"):
        parallel.torchrun_command(1, [])
    assert parallel.world_from_env({}) == (0, 1, 0)
    assert parallel.world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)


def test_nproc_relaunches_under_torchrun(monkeypatch):
    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("subprocess.call", lambda cmd: calls.append(cmd) or 0)
    assert gen.main(["--model", "random:tiny", "--nproc", "2", "--gen", "2"]) == 0
    assert calls == [parallel.torchrun_command(2, ["--model", "random:tiny", "--gen", "2"])]


def test_flags_that_do_not_mix_are_clear_errors(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        gen.main(["--model", "random:tiny", "--device", "cpu", "--nproc", "0"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        gen.main(["--model", "random:tiny", "--device-map", "auto"])
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit):
        gen.main(["--model", "random:tiny", "--device", "cpu", "--device-map", "auto", "--gen", "2"])
    err = capsys.readouterr().err
    assert "--nproc must be >= 1" in err
    assert "--device-map does not run under tensor parallelism" in err
    assert "random models are built on one device" in err
    with pytest.raises(ValueError, match="random models"):
        load_bench_model("random:tiny", None, "cpu", tp_plan="auto")


def test_device_map_reaches_from_pretrained(monkeypatch, tmp_path):
    seen = {}

    def fake_load_model(name, dtype=None, device="cpu", device_map=None, tp_plan=None):
        seen.update(device_map=device_map, tp_plan=tp_plan)
        raise RuntimeError("stop after loading")

    monkeypatch.setattr("kvquant.models.load_model", fake_load_model)
    with pytest.raises(RuntimeError, match="stop after loading"):
        gen.main(["--model", "some/hub-id", "--device-map", "auto", "--gen", "2", "--out", str(tmp_path)])
    assert seen == {"device_map": "auto", "tp_plan": None}


def test_records_merged_with_a_fake_gather_and_only_rank_zero_writes(tmp_path, monkeypatch):
    bm = load_bench_model("random:tiny", None, "cpu")
    gathered = []

    def fake_gather(rec):  # rank 1 held the same bytes, used twice the energy-free time
        gathered.append(rec)
        other = dict(rec, prefill_s=2 * rec["prefill_s"], peak_memory_bytes=None)
        return [rec, other]

    monkeypatch.setattr(parallel, "all_gather_record", fake_gather)
    settings = gen.GenerateSettings(datatypes=["nuq3"], batches=[2], prompt_lens=[64], gen=3, warmup=0,
                                    progress=False, quant=QuantConfig(min_range_tokens=1), world_size=2, rank=0)
    recs = gen.run_generate_benchmark(bm, settings, tmp_path / "r0")
    assert len(gathered) == 1 and len(recs) == 1
    r, own = recs[0], gathered[0]
    assert set(r) == set(gen.FIELDS) and r["world_size"] == 2 and r["status"] == "ok"
    assert r["rank_kv_bytes"] == [own["kv_bytes"]] * 2 and r["kv_bytes"] == 2 * own["kv_bytes"]
    assert r["kv_bytes_by_device"] == {"cpu": 2 * own["kv_bytes"]}
    assert r["prefill_s"] == 2 * own["prefill_s"]
    assert (tmp_path / "r0" / "generate.jsonl").read_text().count("\n") == 1
    settings.rank = 1
    gen.run_generate_benchmark(bm, settings, tmp_path / "r1")
    assert not (tmp_path / "r1" / "generate.jsonl").exists()
