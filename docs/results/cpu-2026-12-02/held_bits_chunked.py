"""Bits per element a nuq3 cache holds and uses after the eval-ppl protocol (1024 tokens prefilled, then 64-token
chunks to 2048) on a Qwen2.5-1.5B-shaped attention (2 KV heads x 128, fp32, random weights, 2 layers), on both
backends (Triton under TRITON_INTERPRET=1 on a CPU). Run: TRITON_INTERPRET=1 python held_bits_chunked.py"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvquant.cache.hf_cache import KVQuantCache
from kvquant.config import QuantConfig
from kvquant.eval.perplexity import window_nll

torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=384, intermediate_size=512, num_hidden_layers=2, num_attention_heads=12,
                  num_key_value_heads=2, head_dim=128, vocab_size=1000, max_position_embeddings=32768)
model = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 1000, (1, 2048))
for backend in ("torch", "triton"):
    cache = KVQuantCache(model, QuantConfig(datatype="nuq3", backend=backend))
    with torch.no_grad():
        window_nll(model, ids, cache, 1024, 64)
    r = cache.memory_report()
    print(f"{backend}: {r['bits_per_element']:.3f} bits per element held, {r['bits_per_element_used']:.3f} in use "
          f"(keys held {8 * r['key_allocated'] / (r['key_elements'] + r['value_elements']):.3f} of them)")
