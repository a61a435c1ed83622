"""``KVQuantCache`` under tensor parallelism: each rank's layers receive ``num_key_value_heads / tp_size`` KV heads
and use their rank's block of the calibration.

transformers' ``tp_plan="auto"`` runs on the CPU with the gloo backend, so the end-to-end test is real: two ranks
under ``torch.distributed.run`` generate greedily with the calibrated quantized cache and must give the tokens of a
single process, each rank's key store holding exactly its heads of the single process's one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvquant import QuantConfig
from kvquant.cache.hf_cache import KVQuantCache
from kvquant.cache.parallel import kv_head_slice, resolve_tp
from kvquant.calibration.calibrate import calibrate
from kvquant.models import tiny_llama

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("H", "seen", "rank", "size", "want"), [
    (8, 8, 0, 1, slice(0, 8)),  # no tensor parallelism
    (8, 8, 1, 2, slice(0, 8)),  # heads not sharded (replicated attention)
    (8, 4, 0, 2, slice(0, 4)),
    (8, 4, 1, 2, slice(4, 8)),
    (8, 2, 3, 4, slice(6, 8)),
    (2, 1, 0, 8, slice(0, 1)),  # fewer KV heads than ranks, replicated: ranks 0-3 share head 0
    (2, 1, 3, 8, slice(0, 1)),
    (2, 1, 4, 8, slice(1, 2)),
    (2, 1, 7, 8, slice(1, 2)),
])
def test_kv_head_slice(H, seen, rank, size, want):
    assert kv_head_slice(H, seen, rank, size) == want


@pytest.mark.parametrize(("H", "seen", "rank", "size", "match"), [
    (8, 3, 0, 2, "should receive 8 \\(unsharded\\) or 4"),
    (8, 4, 0, 1, "no tensor parallelism"),
    (6, 1, 0, 4, "do not divide among 4"),
    (2, 2, 0, 3, None),  # (2 heads received = unsharded: fine)
    (3, 1, 0, 2, "do not divide among 2"),
    (8, 4, 2, 2, "not a valid rank"),
])
def test_kv_head_slice_errors_name_the_numbers(H, seen, rank, size, match):
    if match is None:
        assert kv_head_slice(H, seen, rank, size) == slice(0, H)
        return
    with pytest.raises(ValueError, match=match):
        kv_head_slice(H, seen, rank, size)


def test_resolve_tp_arguments():
    model = torch.nn.Linear(2, 2)
    assert resolve_tp(model, None, None) == (0, 1)  # no torch.distributed, no tp_size on the model
    assert resolve_tp(model, 1, 2) == (1, 2)
    model.tp_size = 4  # what transformers sets under tp_plan
    assert resolve_tp(model, None, None) == (0, 4)
    with pytest.raises(ValueError, match="both tp_rank and tp_size"):
        resolve_tp(model, 1, None)
    with pytest.raises(ValueError, match="tp_rank must be in"):
        resolve_tp(model, 2, 2)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def test_rank_caches_hold_their_block_of_the_calibrated_heads(model):
    """Each rank's layer, fed its heads of the same K/V, stores exactly those heads of a single process's store."""
    H, D = model.config.num_key_value_heads, model.config.head_dim
    assert H % 2 == 0
    seqs = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    cal = calibrate(model, seqs, QuantConfig(), bits=(4,), model_id="tiny", progress=False)
    cfg = QuantConfig(datatype="nuq4", page_size=32, residual_length=0)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, H, 40, D, generator=g), torch.randn(2, H, 40, D, generator=g)
    full = KVQuantCache(model, cfg, calibration=cal)
    full.layers[0].update(k, v)
    for rank in (0, 1):
        heads = slice(rank * H // 2, (rank + 1) * H // 2)
        part = KVQuantCache(model, cfg, calibration=cal, tp_rank=rank, tp_size=2)
        part.layers[0].update(k[:, heads], v[:, heads])
        torch.testing.assert_close(part.layers[0].qkeys.channel_scale, full.layers[0].qkeys.channel_scale[:, heads],
                                   rtol=0, atol=0)
        torch.testing.assert_close(part.layers[0].qkeys.dequantize()[0], full.layers[0].qkeys.dequantize()[0][:, heads],
                                   rtol=0, atol=0)
    bad = KVQuantCache(model, cfg, calibration=cal, tp_rank=0, tp_size=2)
    with pytest.raises(ValueError, match=f"layer 0: the layer receives {H + 1} KV heads; with {H} KV heads over 2"):
        bad.layers[0].update(torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_generate_the_single_process_tokens(shared_dir, tmp_path):
    """``tp_plan="auto"`` on two CPU ranks (gloo): same greedy tokens as one process; rank r's key store holds
    heads ``[r H/2, (r+1) H/2)`` of the single process's (same per-channel scales, same dequantized keys)."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import tp_worker
    finally:
        sys.path.pop(0)
    path = shared_dir / "models" / "stories260k"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    model = AutoModelForCausalLM.from_pretrained(path)
    seqs = torch.randint(3, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    cal = calibrate(model, seqs, QuantConfig(), bits=(4,), model_id="stories260k", progress=False)
    cal_path = cal.save(tmp_path / "cal.safetensors")
    ref = tp_worker.run(model, str(cal_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).with_name("tp_worker.py")), str(path), str(cal_path), str(tmp_path)]
    # its own process group: on a timeout the launcher *and* its ranks are killed
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"two-rank run did not finish in 90 s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    H = model.config.num_key_value_heads
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["tp"] == (rank, 2)
        assert torch.equal(got["tokens"], ref["tokens"])
        heads = slice(rank * H // 2, (rank + 1) * H // 2)
        for lg, lr in zip(got["layers"], ref["layers"]):
            assert lg["keys"].shape[1] == H // 2
            torch.testing.assert_close(lg["channel_scale"], lr["channel_scale"][:, heads], rtol=0, atol=0)
            torch.testing.assert_close(lg["keys"], lr["keys"][:, heads], rtol=1e-4, atol=1e-4)
            # values: per-token quantization of this rank's heads (outliers chosen among them): close, not equal
            torch.testing.assert_close(lg["values"], lr["values"][:, heads], rtol=0.1, atol=0.1)
