"""One rank of the tensor-parallel test (``tests/cache/test_tensor_parallel.py`` launches it under
``torch.distributed.run`` on the gloo backend): load the model with ``tp_plan="auto"``, generate greedily with a
calibrated ``KVQuantCache`` and save what each rank's cache holds.

Usage: ``python -m torch.distributed.run --nproc-per-node N tp_worker.py MODEL_DIR CALIBRATION OUT_DIR``
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from kvquant import QuantConfig
from kvquant.cache.hf_cache import KVQuantCache

PROMPT = [[1, 400, 30, 77, 12, 90, 33, 250, 11, 7, 301, 45, 78, 5, 260, 19]]
NEW_TOKENS = 10


def run(model: torch.nn.Module, calibration: str) -> dict:
    """Greedy tokens and, per layer, the key store's per-channel scale and the dequantized keys and values."""
    cache = KVQuantCache(model, QuantConfig(datatype="nuq4", page_size=32, residual_length=0),
                         calibration=calibration)
    with torch.no_grad():
        out = model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=cache,
                             pad_token_id=0)
    layers = []
    for layer in cache.layers:
        keys, _ = layer.qkeys.dequantize()
        values, _ = layer.qvalues.dequantize()
        layers.append({"channel_scale": layer.qkeys.channel_scale.clone(), "keys": keys, "values": values})
    return {"tokens": out, "layers": layers, "tp": (cache.tp_rank, cache.tp_size)}


def main() -> None:
    model_dir, calibration, out_dir = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(tp_plan="auto"))
    rank = dist.get_rank()
    torch.save(run(model, calibration), Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
