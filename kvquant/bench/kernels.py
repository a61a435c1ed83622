"""Kernel benchmarks: decode attention over the packed KV cache, and prefill quantization throughput.

Decode rows compare, per (context, batch, heads) config:

* ``fp16_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` over a dense fp16 cache;
* ``dequant``: :func:`~kvquant.kernels.reference.decode_attention_reference` (dequantize everything, then
  attend: what a dequantize-then-attend cache such as transformers' ``QuantizedCache`` does);
* ``kernel``: :func:`~kvquant.kernels.decode_attention.decode_attention` (Triton);
* ``hf_<name>`` (``--hf-baselines quanto4,hqq4``, where the backend installs): one decode step of transformers'
  own ``QuantizedCache`` (append the token, dequantize the whole layer, concatenate, then SDPA), the path users
  of ``cache_implementation="quantized"`` run today.

Each row: device time of the call replayed from a CUDA graph (the launch overhead a captured decode step no
longer pays; the eager time is reported beside it), ratio vs fp16, bytes moved, and the fraction of the
bandwidth floor (bytes / measured device-to-device copy bandwidth) reached. Caches hold real quantized
heavy-tailed data (their bits per element measured, not assumed).

Prefill rows (``[1, H, S, 128]`` fp16, H = 32 or 8 KV heads), keys and values: the whole
``quantize_keys`` / ``quantize_values`` on the triton and torch writers (same bytes checked), as time, GB/s of the
bytes an append must move (tokens read, codes + scales + outliers written) and fraction of the copy bandwidth.
Decode-append rows time one appended token per sequence, eager and static (graph-replayed).

Run: ``python -m kvquant.bench.kernels [--quick] [--sweep] [--out results.json]``; prefill only:
``--skip-decode [--prefill-lengths ...]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kvquant.bench.cuda import copy_bandwidth
from kvquant.bench.kernel_rows import format_row
from kvquant.bench.kernels_decode import SHAPES, bench_decode, hf_quantized_step, sweep, synthetic_caches
from kvquant.bench.kernels_prefill import PREFILL_SHAPES, bench_prefill
from kvquant.flags import ArgumentParser, add_quant_config_args, quant_config_from_args

__all__ = ["bench_decode", "bench_prefill", "hf_quantized_step", "main", "sweep", "synthetic_caches"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``kvquant bench kernels``."""
    p = ArgumentParser(prog="kvquant bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer configs (a few minutes)")
    p.add_argument("--out", type=Path, default=None, help="JSON file, rewritten after every row")
    p.add_argument("--contexts", type=int, nargs="*", default=None,
                   help="decode contexts (default: 1K to 128K; --quick: 1K, 4K, 32K, 128K)")
    p.add_argument("--batches", type=int, nargs="*", default=None,
                   help="decode batch sizes (default: 1, 4, 8, 16, 32; --quick: 1, 8, 32)")
    p.add_argument("--shapes", nargs="*", default=["mha", "gqa"], choices=sorted(SHAPES),
                   help="decode head layouts: mha (32 KV heads), gqa (8 KV heads)")
    p.add_argument("--datatype", default="nuq3", help="kvquant datatype of the cache")
    add_quant_config_args(p, defaults={"residual_length": 32},
                          aliases={"outlier_fraction": ["--outliers"], "residual_length": ["--residual"]})
    p.add_argument("--rope", action="store_true", help="rotate keys in the kernel")
    p.add_argument("--no-dequant", action="store_true", help="skip the (slow) dequantize-everything path")
    p.add_argument("--hf-baselines", default="quanto4,hqq4",
                   help="transformers QuantizedCache backends to time per decode row (comma list; '' for none)")
    p.add_argument("--prefill-lengths", type=int, nargs="*", default=None,
                   help="prompt lengths of the prefill rows (default: the benchmark's own list)")
    p.add_argument("--prefill-shapes", nargs="*", default=["mha", "gqa"], choices=sorted(PREFILL_SHAPES),
                   help="head layouts of the prefill rows")
    p.add_argument("--sweep", action="store_true", help="tune the decode kernel's launch first (32K context)")
    p.add_argument("--skip-decode", action="store_true", help="no decode rows")
    p.add_argument("--skip-prefill", action="store_true", help="no prefill rows")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point (``kvquant bench kernels``). Returns a process exit code."""
    p = build_parser()
    args = p.parse_args(argv)
    args.hf_baselines = [x.strip() for x in args.hf_baselines.split(",") if x.strip()]
    try:
        quant_config_from_args(args, datatype=args.datatype)
    except ValueError as exc:
        p.error(str(exc))
    if not torch.cuda.is_available():
        print("kvquant bench kernels: needs a CUDA GPU")
        return 1
    if args.contexts is None:
        args.contexts = [1024, 4096, 32768, 131072] if args.quick else [1024, 4096, 8192, 16384, 32768, 65536,
                                                                         131072]
    if args.batches is None:
        args.batches = [1, 8, 32] if args.quick else [1, 4, 8, 16, 32]
    if args.prefill_lengths is None:
        args.prefill_lengths = [4096, 32768]
    rows: list = []
    bw = copy_bandwidth("cuda")
    props = torch.cuda.get_device_properties(0)
    rows.append({"kind": "device", "name": props.name, "sms": props.multi_processor_count,
                 "copy_bw_GBps": bw / 1e9, "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M")})
    print(f"{props.name}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    launch = None
    if args.sweep:
        launch = sweep(args, bw, rows, args.out)
        rows.append({"kind": "tuning", **launch})
    if not args.skip_decode:
        bench_decode(args, bw, rows, args.out, launch)
    if not args.skip_prefill:
        bench_prefill(args, bw, rows, args.out)
    print("\n".join(format_row(r) for r in rows if r["kind"] in ("decode", "prefill", "decode_append")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
