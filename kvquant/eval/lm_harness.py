"""lm-evaluation-harness through the quantized cache: any of its tasks (RULER, LongBench, wikitext, ...) with a
kvquant cache, or a baseline cache, in place of the model's own.

The harness's Hugging Face model (``HFLM``) answers two kinds of request; :class:`KVQuantLM` routes both through a
fresh cache per batch:

* generation (``generate_until``): ``model.generate`` gets the cache; the prompt is prefilled exactly and every
  generated token reads the stored (quantized) prompt;
* log-likelihoods (``loglikelihood``, ``loglikelihood_rolling``, multiple choice): the tokens are fed in chunks of
  ``chunk_size`` through the cache (:func:`chunked_logits`), so that every token after the first chunk reads the
  stored past, as ``kvquant eval ppl`` does.

Use (``pip install kvquant[longctx]``)::

    kvquant lm-eval --model kvquant --model_args pretrained=PATH_OR_HUB_ID,cache=nuq3,calibration=cal.safetensors \\
        --tasks ruler --metadata '{"max_seq_lengths":[4096]}' --device cuda --batch_size 8

(``kvquant lm-eval`` is lm-eval's own command line with the ``kvquant`` model type registered), or from Python::

    import lm_eval
    from kvquant.eval.lm_harness import KVQuantLM
    lm = KVQuantLM(pretrained=model, tokenizer=tok, cache="nuq3", calibration=cal)
    lm_eval.simple_evaluate(model=lm, tasks=["wikitext"])

``cache`` takes the names of ``kvquant eval longctx`` but the eviction presses: ``fp16`` (the model's own
``DynamicCache``), ``nuq2|3|4``, ``int2|3|4``, ``quanto2|4[k]``, ``hqq2|4``. The quantization knobs of
:class:`~kvquant.config.QuantConfig` are model arguments too (``outlier_fraction=0.01,n_sink=1,...``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from kvquant.cache.hf_compat import cache_kwargs
from kvquant.config import QuantConfig
from kvquant.eval.longctx.caches import CacheSpec, make_cache, parse_cache
from kvquant.quant.calibration_file import Calibration


def cache_maker(model: torch.nn.Module, cache: str | CacheSpec, calibration: Calibration | str | None = None,
                config: QuantConfig | None = None) -> Callable[[int], Any]:
    """A function ``reserve_tokens -> fresh cache`` of the named cache for ``model``.

    Raises:
        ValueError: an unknown cache name, or an eviction press (not supported here).
    """
    spec = parse_cache(cache) if isinstance(cache, str) else cache
    if spec.kind == "press":
        raise ValueError(f"cache {spec.name}: eviction presses are not supported in lm-eval (use kvquant eval longctx)")
    if isinstance(calibration, str):
        calibration = Calibration.load(calibration)
    return lambda reserve=0: make_cache(spec, model, calibration, config, reserve_tokens=reserve)


@torch.no_grad()
def chunked_logits(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any, chunk_size: int) -> torch.Tensor:
    """Logits ``[B, S, vocab]`` of ``input_ids [B, S]`` fed through ``cache`` in chunks of ``chunk_size`` tokens:
    the first chunk attends to itself exactly, every later chunk to the cache's stored past and exactly to itself.

    Padding must be on the right (it then changes nothing before it): the harness pads log-likelihood batches so.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    kw = cache_kwargs(model, cache)
    out = [model(input_ids=input_ids[:, s:s + chunk_size], use_cache=True, **kw).logits
           for s in range(0, input_ids.shape[1], chunk_size)]
    return torch.cat(out, dim=1)


def _register() -> type:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    @register_model("kvquant")
    class KVQuantLM(HFLM):
        """lm-eval's ``HFLM`` with a kvquant (or baseline) KV cache; see the module docstring.

        Args:
            cache: cache name (default ``nuq3``).
            calibration: a :class:`~kvquant.quant.calibration_file.Calibration` or the path of one.
            chunk_size: tokens per forward of log-likelihood requests.
            **kwargs: :class:`~kvquant.config.QuantConfig` fields, then ``HFLM``'s own arguments (``pretrained``,
                ``tokenizer``, ``batch_size``, ``device``, ``max_length``, ...).
        """

        def __init__(self, cache: str = "nuq3", calibration: Calibration | str | None = None, chunk_size: int = 32,
                     **kwargs: Any) -> None:
            fields = {f.name for f in dataclasses.fields(QuantConfig)} - {"datatype"}
            config = QuantConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in fields})
            super().__init__(**kwargs)
            self.cache_name = str(cache)
            self.chunk_size = int(chunk_size)
            self._make_cache = cache_maker(self.model, self.cache_name, calibration, config)

        def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
            if attn_mask is not None or labels is not None:  # encoder-decoder models: no decoder cache here
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            return chunked_logits(self.model, inps, self._make_cache(0), self.chunk_size)

        def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                            **generation_kwargs: Any) -> torch.Tensor:
            reserve = max(int(max_length) - context.shape[1], 0)
            generation_kwargs.update(cache_kwargs(self.model, self._make_cache(reserve)))
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    return KVQuantLM


def __getattr__(name: str) -> Any:
    if name == "KVQuantLM":  # built (and registered with lm-eval) on first use: lm-eval is an optional dependency
        cls = _register()
        globals()["KVQuantLM"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``kvquant`` model type registered."""
    import sys

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise ImportError("lm-eval is not installed (pip install kvquant[longctx])") from None
    __getattr__("KVQuantLM")
    old = sys.argv
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = old
