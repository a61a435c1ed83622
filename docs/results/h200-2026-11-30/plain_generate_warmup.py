"""Plain HF ``generate`` on the random-weight 7B shape (fp16, B=1, DynamicCache): first vs second call per length.

Shows how much of a first call's decode time is one-off cost (the caching allocator's first cudaMalloc of each
block the growing cache needs, cuBLAS choices): why ``kvquant bench generate`` warms up with a full
rehearsal of each configuration. Run from the checkout: ``PYTHONPATH=$PWD python3 <this file>`` (needs a GPU).
"""

import time

import torch

from kvquant.models.random import build_random_model

m = build_random_model("random:7b", torch.float16, "cuda")
for S in (1024, 32768):
    ids = torch.randint(100, 30000, (1, S), device="cuda")
    for it in range(2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=65, min_new_tokens=65, do_sample=False)
        torch.cuda.synchronize()
        t2 = time.perf_counter() - t
        print(f"S={S} it={it}: prefill+1 {t1:.3f} s, decode {(t2 - t1) / 64 * 1e3:.1f} ms/step", flush=True)
    with torch.no_grad():
        out = m(ids, use_cache=True)
        pkv = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(32):
            o = m(nxt, past_key_values=pkv, use_cache=True)
            nxt = o.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        print(f"S={S} manual loop {(time.perf_counter() - t) / 32 * 1e3:.1f} ms/step", flush=True)
    del ids, out, pkv
