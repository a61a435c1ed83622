"""Per-layer calibrated codebooks add no kernel specialisation.

A Triton kernel is compiled once per distinct *specialisation*: its ``constexpr`` arguments, the dtypes of its
tensors, and the integers equal to 1 (which Triton folds into the compiled code unless told not to). A value
derived from a layer's codebook in any of those places (its zero code, its levels) would compile every kernel once
per layer and datatype: seconds to minutes before the first token. This test records every launch of a prefill and
a few decode steps of a two-layer model whose layers have different calibrated codebooks (zero codes 1 and 2), and
checks that the launches specialise exactly as when both layers share one codebook.

The launches are recorded through Triton's interpreter (CPU); on CUDA the compiled kernels follow the same rules.
"""

from __future__ import annotations

import importlib
from collections import defaultdict

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")
if torch.cuda.is_available():
    pytest.skip("records launches through Triton's interpreter (CPU only)", allow_module_level=True)
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kvquant import QuantConfig  # noqa: E402
from kvquant.cache import kernel_attention  # noqa: E402
from kvquant.cache.hf_cache import KVQuantCache  # noqa: E402
from kvquant.cache.hf_compat import cache_kwargs  # noqa: E402
from kvquant.models import tiny_llama  # noqa: E402
from kvquant.quant.calibration_file import Calibration, LayerCalibration  # noqa: E402
from kvquant.quant.codebook import Codebook  # noqa: E402

LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg"}


def _spec(arg, name: str, skip: set[str]):
    """What Triton specialises a runtime argument on."""
    if isinstance(arg, torch.Tensor):
        return ("tensor", arg.dtype)
    if isinstance(arg, bool):
        return ("bool", arg)
    if isinstance(arg, int):
        return ("int", None if name in skip else arg == 1)
    if isinstance(arg, float):
        return ("float",)
    return (type(arg).__name__,)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, set]:
    seen: dict[str, set] = defaultdict(set)
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        skip = set(self.kwargs.get("do_not_specialize") or ())
        names = self.arg_names
        runtime = tuple(_spec(a, names[i], skip) for i, a in enumerate(args))
        const = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k not in LAUNCH_OPTIONS))
        seen[self.fn.__name__].add((runtime, const))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    # prefill thresholds from topk (the interpreter's sort is slow); decode steps still seal through the kernels
    monkeypatch.setattr(importlib.import_module("kvquant.kernels.encode"), "LARGE_THRESHOLDS", 0)
    return seen


def _calibration(model, codebooks: list[tuple[list[float], list[float]]]) -> Calibration:
    H, D = model.config.num_key_value_heads, model.config.head_dim
    layers = [LayerCalibration(key_lo=-torch.full((H, D), 2.0), key_hi=torch.full((H, D), 2.0),
                               key_codebooks={2: Codebook(torch.tensor(k))},
                               value_codebooks={2: Codebook(torch.tensor(v))}) for k, v in codebooks]
    return Calibration(layers, model_id="tiny", outlier_fraction=0.02, n_sink=1, pre_rope=True, num_kv_heads=H,
                       head_dim=D)


def _run(model, calibration: Calibration) -> None:
    cfg = QuantConfig(min_range_tokens=1,
                      datatype="nuq2", outlier_fraction=0.02, n_sink=1, residual_length=0, page_size=32,
                      backend="triton")
    cache = KVQuantCache(model, cfg, calibration=calibration)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1), use_cache=True,
              **cache_kwargs(model, cache))
        for _ in range(2):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            model(input_ids=ids[:, :1], attention_mask=mask, position_ids=(mask.cumsum(1) - 1)[:, -1:],
                  use_cache=True, **cache_kwargs(model, cache))
    kernel_attention.uninstall_kernel_attention(model)


def test_calibrated_layers_share_every_kernel_specialisation(launches: dict[str, set]) -> None:
    model = tiny_llama(seed=1, num_layers=2, hidden=128, heads=4, kv_heads=2, head_dim=64, vocab=96)
    a = ([-1.0, -0.2, 0.4, 1.0], [-1.0, 0.05, 0.5, 1.0])  # zero codes 1 and 1
    b = ([-1.0, -0.6, 0.1, 1.0], [-1.0, -0.5, -0.05, 1.0])  # zero codes 2 and 2
    per_layer = _calibration(model, [a, b])
    assert [lay.value_codebooks[2].zero_code for lay in per_layer.layers] == [1, 2]
    _run(model, per_layer)
    mixed = {k: set(v) for k, v in launches.items()}
    launches.clear()
    _run(model, _calibration(model, [a, a]))
    shared = {k: set(v) for k, v in launches.items()}
    assert {"key_tokens_kernel", "value_pages_kernel", "keys_kernel", "values_kernel"} <= set(mixed)
    for name in mixed:
        extra = mixed[name] - shared.get(name, set())
        assert not extra, f"{name}: {len(extra)} specialisation(s) only the per-layer codebooks need: {extra}"
