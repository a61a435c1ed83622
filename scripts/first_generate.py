"""Time the first ``generate`` through a KVQuantCache in a fresh process, and the same call warm.

    python scripts/first_generate.py --model random:1b --out results/first_generate.json

Calibrates the model once (random tokens: the codebooks differ per layer and per head, which is what the first call
must not pay for), then runs every case in its own fresh Python process: build the model, load the calibration,
construct ``KVQuantCache``, time the first ``generate`` (prompt of ``--prompt-len`` tokens, ``--new-tokens`` new
ones), then the same call again (warm). One process before the cases fills Triton's on-disk kernel cache, as any
earlier run on the machine would; ``--cold-triton`` gives every case an empty cache instead. Results are one JSON
file, rewritten after every case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _case(a: argparse.Namespace) -> None:
    """One case, in this (fresh) process: prints one JSON line."""
    import torch

    from kvquant import QuantConfig
    from kvquant.bench.cuda import synchronize
    from kvquant.bench.model import load_bench_model
    from kvquant.cache.hf_cache import KVQuantCache
    from kvquant.cache.hf_compat import cache_kwargs
    from kvquant.calibration import Calibration

    t0 = time.perf_counter()
    model = load_bench_model(a.model, a.dtype, a.device).model
    cal = Calibration.load(a.calibration) if a.calibration else None
    synchronize(a.device)
    t_load = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (1, a.prompt_len), generator=g).to(a.device)
    times = []
    for _ in range(2):
        t = time.perf_counter()
        cache = KVQuantCache(model, QuantConfig(datatype=a.datatype, backend=a.backend), calibration=cal)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                           max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)
        synchronize(a.device)
        times.append(time.perf_counter() - t)
    print(json.dumps({"datatype": a.datatype, "calibrated": bool(a.calibration), "first_s": round(times[0], 3),
                      "warm_s": round(times[1], 3), "model_load_s": round(t_load, 3)}))


def _calibrate(a: argparse.Namespace, path: Path) -> None:
    import torch

    from kvquant import QuantConfig
    from kvquant.bench.model import load_bench_model
    from kvquant.calibration.calibrate import calibrate

    bm = load_bench_model(a.model, a.dtype, a.device)
    seqs = torch.randint(3, 1000, (4, 512), generator=torch.Generator().manual_seed(0))
    calibrate(bm.model, seqs, QuantConfig(), model_id=bm.name, progress=False).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:1b")
    p.add_argument("--prompt-len", type=int, default=300)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--cases", default="nuq4+cal,nuq3+cal,nuq2+cal,int3+cal,nuq3",
                   help="comma list of DATATYPE or DATATYPE+cal")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--backend", default="triton")
    p.add_argument("--cold-triton", action="store_true", help="an empty Triton cache for every case")
    p.add_argument("--out", type=Path, default=Path("results/first_generate.json"))
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case
    p.add_argument("--datatype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--calibration", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.case:
        _case(a)
        return
    import torch

    work = Path(tempfile.mkdtemp(prefix="kvquant_first_"))
    cal = work / "cal.safetensors"
    _calibrate(a, cal)
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device
    res = {"device": device, "torch": torch.__version__, "model": a.model,
           "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "cold_triton": a.cold_triton, "rows": []}
    env = dict(os.environ)
    if not a.cold_triton:
        env["TRITON_CACHE_DIR"] = str(work / "triton")
    me = [sys.executable, __file__, "--model", a.model, "--prompt-len", str(a.prompt_len),
          "--new-tokens", str(a.new_tokens), "--device", a.device, "--dtype", a.dtype, "--backend", a.backend,
          "--case", "1"]
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    if not a.cold_triton:  # fill the on-disk kernel cache, as any earlier run would have
        subprocess.run(me + ["--datatype", "nuq3"], env=env, check=True, capture_output=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases):
        dt, _, tag = case.partition("+")
        if a.cold_triton:
            env["TRITON_CACHE_DIR"] = str(work / f"triton{i}")
        cmd = me + ["--datatype", dt] + (["--calibration", str(cal)] if tag == "cal" else [])
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        res["rows"].append(row)
        print(f"{case:10s} first {row['first_s']:7.2f} s  warm {row['warm_s']:6.2f} s", flush=True)
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(a.out)


if __name__ == "__main__":
    main()
