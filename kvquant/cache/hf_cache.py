"""``KVQuantCache``: a ``transformers`` ``Cache`` that stores K/V with kvquant.

Usage::

    cache = KVQuantCache(model, QuantConfig(datatype="nuq3"), calibration=Calibration.load(path))
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)  # `cache=cache` on transformers 5.2x
    print(cache.memory_report())

The cache needs the model: a forward pre-hook on the decoder tells it the 2-D padding mask and the
position ids of every step (transformers does not pass them to ``Cache.update``), and the model's rotary
module gives the ``cos``/``sin`` for pre-RoPE key quantization. Layer ``i`` keeps one
:class:`~kvquant.quant.store.QuantizedKVCache` for keys and one for values; a prefill is quantized in
one vectorised pass over the padded batch, each decode step appends one token per sequence.

What ``update`` returns: during a prefill the exact K/V (the prompt attends to itself exactly, as in
real serving); afterwards the dequantized cached K/V followed by the exact new tokens, laid out to
match the model's padded attention mask.

Backends (``backend=``), resolved once when the cache is built into an ops object
(:func:`kvquant.kernels.ops.resolve_ops`) that the layers and every store use: ``"torch"`` does the above on every
step. ``"triton"`` (the default ``"auto"`` picks it on CUDA with triton and a quantized datatype) quantizes appends
with the fused kernel, un-rotates incoming keys in one launch and runs single-token decode steps without
dequantizing: the model's attention is wrapped (``kvquant_sdpa``/``kvquant_eager``) and the wrapper calls the
Triton decode kernel over the packed cache (see :mod:`kvquant.cache.kernel_attention` for the mechanism);
prefills and multi-token chunks take the torch attention path.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from transformers.cache_utils import Cache

from kvquant.cache import kernel_attention
from kvquant.cache.hf_compat import cache_in
from kvquant.cache.identity import check_calibration_model
from kvquant.cache.layer import KVQuantLayer
from kvquant.cache.parallel import device_key, kv_head_slice, resolve_tp, tensors_bytes_by_device
from kvquant.cache.rope import RotaryTables, find_rotary_embedding
from kvquant.config import QuantConfig
from kvquant.kernels.ops import TorchOps, TritonOps, resolve_ops
from kvquant.quant.calibration_file import Calibration, CalibrationError, require_allocation
from kvquant.quant.quantizer import BatchedKVQuantizer
from kvquant.quant.validate import same_device

__all__ = ["KVQuantCache", "KVQuantLayer", "install_step_hook"]

_HOOK_ATTR = "_kvquant_step_hook"


class KVQuantCache(Cache):
    """Quantized KV cache for a Hugging Face decoder-only model (Llama, Mistral, Qwen2, ... incl. GQA).

    Args:
        model: the model the cache will be used with (a hook on its decoder is installed once).
        config: quantization settings; keyword overrides are applied on top (``datatype="nuq4"``).
        calibration: per-layer key ranges and NUQ codebooks from ``kvquant calibrate``; without it, key
            ranges come from each prompt and codebooks are the heuristic ones.
        backend: (``QuantConfig.backend``, one knob for writing and reading the cache) ``"torch"``
            (the PyTorch reference: dequantize the past every step), ``"triton"`` (appends go through the
            fused quantize-append kernel and single-token decode steps run
            the Triton kernel over the packed cache; switches the model's attention to the ``kvquant_*``
            wrapper of its ``sdpa``/``eager`` attention, see :mod:`kvquant.cache.kernel_attention`; undo with
            :func:`~kvquant.cache.kernel_attention.uninstall_kernel_attention`) or ``"auto"`` (triton when
            the model is on CUDA, triton imports, the datatype is quantized, the head size is a power of two
            >= 32 and the attention is sdpa/eager; else torch). Decided once, here, into :attr:`ops`
            (:mod:`kvquant.kernels.ops`), which the layers and every store of the cache use.
        reserve_tokens: after the prefill, allocate the pages for this many more tokens per sequence at once
            and exactly (e.g. ``max_new_tokens``); otherwise the page pools grow by a quarter at a time, which
            can leave up to a fifth of what is held unused (counted in :meth:`memory_report`).
        check_model: refuse a calibration whose weights fingerprint is another model's
            (:func:`~kvquant.cache.identity.check_calibration_model`); ``False`` skips the check, for a calibration
            you know fits (e.g. a fine-tuned copy of the calibrated model).
        tp_rank, tp_size: this process's tensor-parallel rank and number of ranks (both or neither). Default: from
            the model (``model.tp_size``, set by transformers under ``tp_plan``) and ``torch.distributed``
            (``get_rank() % tp_size``). A layer that receives ``num_key_value_heads / tp_size`` KV heads uses its
            rank's block of the calibration's heads (:func:`~kvquant.cache.parallel.kv_head_slice`).

    Multi-GPU (see ``docs/multi_gpu.md`` and :mod:`kvquant.cache.parallel`): with ``device_map`` each layer's
    store lives on the device of the K/V the layer receives and its calibration is copied there at first use;
    :meth:`memory_report` adds ``by_device``.
    """

    def __init__(self, model: torch.nn.Module, config: QuantConfig | None = None,
                 calibration: Calibration | str | None = None, reserve_tokens: int = 0, check_model: bool = True,
                 tp_rank: int | None = None, tp_size: int | None = None, **overrides: Any) -> None:
        config = config or QuantConfig()
        if reserve_tokens < 0:
            raise ValueError(f"reserve_tokens must be >= 0, got {reserve_tokens}")
        self.reserve_tokens = int(reserve_tokens)
        self.config = replace(config, **overrides) if overrides else config
        cfg = model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        self._text_config = cfg
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.pre_rope = self.config.pre_rope and self.config.is_quantized
        self.rotary: RotaryTables | None = None
        if self.pre_rope:
            rotary = find_rotary_embedding(model)
            if rotary is None:
                raise ValueError(f"{type(model).__name__} has no model-level rotary embedding; use pre_rope=False")
            self.rotary = RotaryTables(rotary)
        if isinstance(calibration, str):
            calibration = Calibration.load(calibration)
        if calibration is not None:
            calibration.check_compatible(self.num_layers, self.num_kv_heads, self.head_dim,
                                         self.config.outlier_fraction, self.config.pre_rope,
                                         rotation=self.config.rotation, rotation_seed=self.config.rotation_seed)
            if check_model:
                check_calibration_model(calibration, model)
        if self.config.per_layer:
            require_allocation(self.config.datatype, calibration)
        self.calibration = calibration
        if calibration is not None:  # every width this cache will store is calibrated: refuse now, not mid-prefill
            for i in range(self.num_layers):
                cfg = self.layer_config(i)
                if cfg.is_quantized and cfg.dtype_info.kind == "nuq":
                    for side in ("key", "value"):
                        _calibrated_codebook(calibration, cfg, side, i)
        self.tp_rank, self.tp_size = resolve_tp(model, tp_rank, tp_size)
        # (layer, device, heads) -> quantizer with that layer's calibration on that device, sliced to those heads
        self._quantizers: dict[tuple[int, str, int], BatchedKVQuantizer] = {}
        self._step: dict[str, Any] = {}
        self._rope_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per device
        self.ops: TorchOps | TritonOps = self._resolve_ops(self.config.backend, model)
        self.static = False  # begin_static: decode steps with no host work (what a CUDA graph captures)
        # per forward: each layer's state before its first write, to undo a step that fails (see _end_step)
        self._journal: dict[int, Any] | None = None
        install_step_hook(model)
        if self.ops.name == "triton":
            kernel_attention.install_kernel_attention(model)
        super().__init__(layers=[KVQuantLayer(self, i) for i in range(self.num_layers)])

    @property
    def backend(self) -> str:
        """``"torch"`` or ``"triton"``: the backend this cache resolved (``self.ops.name``)."""
        return self.ops.name

    def _resolve_ops(self, backend: str, model: torch.nn.Module) -> TorchOps | TritonOps:
        D = self.head_dim
        problems = []
        if not self.config.is_quantized:
            problems.append(f"datatype {self.config.datatype} is not quantized")
        if D not in (64, 128, 256):
            problems.append(f"head size {D} (the kernels take 64, 128 or 256)")
        if self.config.rotated:
            problems.append(f"rotation {self.config.rotation!r} (the decode kernel reads un-rotated keys and values)")
        if backend != "torch" and not kernel_attention.can_install(model):
            problems.append(f"attention {kernel_attention.current_implementation(model)!r} is not sdpa/eager")
        param = next(model.parameters(), None)
        return resolve_ops(backend, param.device if param is not None else "cpu", problems)

    def _kernel_step(self, layer: KVQuantLayer, s: int) -> bool:
        """Whether this layer's step runs the kernel path (same answer for all layers of a step)."""
        if self.backend != "triton" or s != 1 or kernel_attention.ACTIVE_CACHE.get() is not self:
            return False
        if not kernel_attention.is_installed(self._text_config):
            return False
        if self.static:  # checked once by begin_static: every step is one real, continuing token per sequence
            return True
        key = ("kernel", s, layer.cumulative_length)
        if key not in self._step:  # one host sync per step, not per layer
            mask, positions = self._step_inputs(layer.qkeys.batch, s, layer.cumulative_length, layer.qkeys.device)
            # all real tokens? do they continue each sequence (re-rotation relies on it)? largest position: one sync
            expect = layer.pos_offset + layer.qkeys.lengths
            ok, continues, max_pos = torch.stack([mask.all().long(), (positions[:, 0] == expect).all().long(),
                                                  positions.max()]).tolist()
            self._step[key] = bool(ok)
            if ok:
                if not continues:
                    raise ValueError("position ids of the new tokens do not continue the cached sequences")
                self._step["max_pos"] = int(max_pos) + 1
        return self._step[key]

    def kernel_rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` tables for the kernel covering every position of this step: ``[P, D/2]`` when the
        model's tables have equal halves (Llama's ``rotate_half`` layout), else ``[P, D]``; float32.

        Built once with the model's rotary module and grown by doubling (rebuilt every step for rotary types
        whose tables change with the sequence length, e.g. ``dynamic``/``longrope``; in static mode the tables
        :meth:`begin_static` built). One set per device (layers spread over GPUs each read their own)."""
        key = device_key(device)
        if self.static:
            return self._rope_tables[key]
        need = int(self._step.get("max_pos", 0))
        rope_type = str(getattr(self.rotary.rotary_emb, "rope_type", "default"))
        dynamic = "dynamic" in rope_type or "longrope" in rope_type
        have = self._rope_tables.get(key)
        if have is None or dynamic or have[0].shape[0] < need or not same_device(have[0].device, device):
            n = need if dynamic else max(need, 2 * (have[0].shape[0] if have is not None else 0), 1024)
            cos, sin = self.rotary(torch.arange(n, device=device)[None])
            cos, sin = cos[0].contiguous(), sin[0].contiguous()
            h = cos.shape[-1] // 2
            if torch.equal(cos[:, :h], cos[:, h:]) and torch.equal(sin[:, :h], sin[:, h:]):
                cos, sin = cos[:, :h].contiguous(), sin[:, :h].contiguous()
            self._rope_tables[key] = have = (cos, sin)
        return have

    def layer_config(self, layer_idx: int) -> QuantConfig:
        """The config layer ``layer_idx`` stores its keys and values with: :attr:`config`, except for the
        ``nuq-alloc`` datatype, where each layer takes the (key bits, value bits) the calibration allocated to it."""
        if not self.config.per_layer:
            return self.config
        if not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer {layer_idx} out of range (the model has {self.num_layers} layers)")
        kb, vb = self.calibration.allocation[layer_idx]
        return self.config.with_widths(kb, vb)

    def quantizer_for(self, layer_idx: int, device: torch.device | str | None = None,
                      num_heads: int | None = None) -> BatchedKVQuantizer:
        """The quantizer of a layer (with :meth:`layer_config`), with its calibrated codebooks (each side at its own
        width) and key ranges when available.

        Args:
            layer_idx: the decoder layer.
            device: where the layer's K/V are (its key ranges ``[heads, D]`` and codebooks are copied there once, the
                first time the layer asks: layers on different GPUs each get their own copy); ``None``: where the
                calibration is.
            num_heads: the KV heads the layer receives (``key_states.shape[1]``); fewer than the model's under tensor
                parallelism, then the ranges are this rank's heads (:func:`~kvquant.cache.parallel.kv_head_slice`).
                ``None``: all of them.
        """
        heads = self.num_kv_heads if num_heads is None else int(num_heads)
        key = (layer_idx, "" if device is None else device_key(device), heads)
        if key not in self._quantizers:
            cfg = self.layer_config(layer_idx)
            kcb = vcb = ranges = None
            if self.calibration is not None and cfg.is_quantized:
                lc = self.calibration.layers[layer_idx]
                if cfg.dtype_info.kind == "nuq":
                    kcb = _calibrated_codebook(self.calibration, cfg, "key", layer_idx)
                    vcb = _calibrated_codebook(self.calibration, cfg, "value", layer_idx)
                try:
                    heads_of = kv_head_slice(self.num_kv_heads, heads, self.tp_rank, self.tp_size)
                except ValueError as e:
                    raise ValueError(f"layer {layer_idx}: {e}") from None
                ranges = (lc.key_lo[heads_of], lc.key_hi[heads_of])
                if device is not None:
                    ranges = tuple(r.to(device) for r in ranges)
                    kcb, vcb = (None if cb is None else cb.to(device) for cb in (kcb, vcb))
            quantizer = BatchedKVQuantizer(cfg, key_codebook=kcb, value_codebook=vcb, key_ranges=ranges,
                                           ops=self.ops)
            if device is not None:  # (heuristic codebooks: also once per device)
                quantizer.key_codebook, quantizer.value_codebook = (
                    None if cb is None else cb.to(device) for cb in (quantizer.key_codebook, quantizer.value_codebook))
            self._quantizers[key] = quantizer
        return self._quantizers[key]

    def _set_step(self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> None:
        self._step = {"attention_mask": attention_mask, "position_ids": position_ids}

    # -- atomic steps: a forward either lands in every layer or in none ---------------------------------
    def _begin_step(self) -> None:
        """Start of a forward: refuse layers out of step, open the journal (not in static mode)."""
        lengths = {layer.cumulative_length for layer in self.layers if layer.qkeys is not None}
        if len(lengths) > 1:
            raise RuntimeError(f"the cache's layers hold different numbers of tokens ({sorted(lengths)}); "
                               "reset the cache")
        self._journal = None if self.static else {}

    def _checkpoint(self, layer: KVQuantLayer, tokens: int) -> None:
        """Remember ``layer``'s state before its first write of this forward."""
        if self._journal is not None and layer.layer_idx not in self._journal:
            self._journal[layer.layer_idx] = layer.checkpoint(tokens)

    def _rollback(self, journal: dict[int, Any]) -> None:
        for idx, ck in journal.items():
            self.layers[idx].restore(ck)

    def _end_step(self, completed: bool) -> None:
        """End of a forward. If it raised, every layer it wrote goes back to its state before the forward. If it
        completed, the tokens it appended without a check are checked for NaN/Inf now (one device read): a poisoned
        step is undone and reported, so no later read meets it."""
        journal, self._journal = self._journal, None
        if not journal:
            return
        if not completed:
            self._rollback(journal)
            return
        unchecked = [(idx, store) for idx in journal for store in (self.layers[idx].qkeys, self.layers[idx].qvalues)
                     if store is not None and store._unchecked_appends and store._nonfinite is not None]
        if not unchecked:
            return
        dev = unchecked[0][1]._nonfinite.device  # (layers may be on several devices: one read of all flags)
        bad = torch.cat([store._nonfinite.to(dev) for _, store in unchecked]).isnan().tolist()
        for _, store in unchecked:
            store._unchecked_appends = 0
        if any(bad):
            self._rollback(journal)
            where = sorted({f"layer {idx} {store.kind}s" for (idx, store), b in zip(unchecked, bad) if b})
            raise ValueError(f"NaN or Inf in the new tokens ({', '.join(where)}): the step was undone, the cache "
                             "holds what it held before it")

    def _step_inputs(self, batch: int, s: int, past: int, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padding mask ``[B, s]`` (bool) and position ids ``[B, s]`` of the tokens being added (computed once per
        step: every layer asks with the same arguments)."""
        key = ("inputs", batch, s, past, str(device))
        if key not in self._step:
            self._step[key] = self._compute_step_inputs(batch, s, past, device)
        return self._step[key]

    def _step_rotary(self, batch: int, s: int, past: int, positions: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [B, s, D]`` of the tokens being added (computed once per step, shared by the layers)."""
        key = ("rope", batch, s, past, str(positions.device))
        if key not in self._step:
            self._step[key] = self.rotary(positions)
        return self._step[key]

    def _check_step_positions(self, layer: Any, step_mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Refuse a multi-token step whose real tokens do not continue each sequence's positions (re-rotation of
        the stored keys relies on it). Every layer holds the same lengths and offsets, so the first layer of a
        step on each device checks (one host read per step, not per layer)."""
        key = ("positions_checked", tuple(step_mask.shape), str(step_mask.device))
        if key in self._step:
            return
        rank_new = layer.qkeys.lengths[:, None] + step_mask.long().cumsum(1) - 1
        expect = layer.pos_offset.to(positions.device)[:, None] + rank_new.to(positions.device)
        if not bool(((positions == expect) | ~step_mask).all()):
            raise ValueError("position ids of the new tokens do not continue the cached sequences")
        self._step[key] = True

    def _past_rotary(self, past_mask: torch.Tensor, pos_offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [B, P, D]`` at the past's columns of a multi-token step (``pos_offset + rank`` of each real
        token of ``past_mask [B, P]``; computed once per step and device, shared by the layers)."""
        key = ("past_rope", tuple(past_mask.shape), str(past_mask.device))
        if key not in self._step:
            rank = (past_mask.long().cumsum(1) - 1).clamp_min(0)
            self._step[key] = self.rotary(pos_offset[:, None] + rank)
        return self._step[key]

    def _compute_step_inputs(self, batch: int, s: int, past: int, device: torch.device
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self._step.get("attention_mask")
        if mask is not None:
            if mask.ndim != 2:
                raise ValueError("KVQuantCache needs the 2-D [batch, length] attention mask, got a "
                                 f"{mask.ndim}-D mask")
            if mask.shape[1] < s:
                raise ValueError(f"attention mask covers {mask.shape[1]} tokens, fewer than the {s} being added")
            step_mask = mask[:, -s:].to(device=device).bool()
        else:
            step_mask = torch.ones(batch, s, dtype=torch.bool, device=device)
        pos = self._step.get("position_ids")
        if pos is None:
            pos = torch.arange(past, past + s, device=device)[None].expand(batch, s)
        else:
            pos = pos.to(device).expand(batch, -1)[:, -s:]
        return step_mask, pos.long()

    def begin_static(self, max_new_tokens: int, outlier_headroom: float = 4.0) -> None:
        """Prepare ``max_new_tokens`` decode steps that run with no host work at all, what
        :func:`kvquant.cache.graphs.generate` captures in a CUDA graph. Needs the triton backend, a prefill done, and
        decode steps of one real token per sequence (no padding) whose positions continue the prompts.

        Reserves every page and outlier slot the steps need (see
        :meth:`~kvquant.quant.store.QuantizedKVCache.begin_static`) and builds the RoPE tables for every position
        they reach. :meth:`end_static` returns to normal steps."""
        if self.backend != "triton":
            raise ValueError("static (captured) decode steps need the triton backend")
        layers = [layer for layer in self.layers if layer.qkeys is not None]
        if len(layers) != len(self.layers):
            raise ValueError("static decode needs a prefill first")
        if self.pre_rope:
            rope_type = str(getattr(self.rotary.rotary_emb, "rope_type", "default"))
            if "dynamic" in rope_type or "longrope" in rope_type:
                raise ValueError(f"static decode does not support {rope_type!r} RoPE (its tables change per step)")
            first = layers[0]
            self._step["max_pos"] = int((first.pos_offset + first.qkeys.lengths).max()) + max_new_tokens + 1
            for dev in dict.fromkeys(device_key(layer.qkeys.device) for layer in layers):
                self.kernel_rope_tables(dev)
        for layer in layers:
            layer.qkeys.begin_static(max_new_tokens, outlier_headroom)
            layer.qvalues.begin_static(max_new_tokens, outlier_headroom)
            layer.static_from = (layer.cumulative_length, int(layer.qkeys.lengths[0]))
        self.static = True

    def end_static(self) -> None:
        """Back to normal steps: each store re-reads its lengths once (and checks its NaN/Inf flag), and every
        layer's token mask gets the tokens the static steps added."""
        if not self.static:
            return
        self.static = False
        for layer in self.layers:
            if layer.qkeys is None:
                continue
            layer.qkeys.end_static()
            layer.qvalues.end_static()
            cum0, len0 = layer.static_from
            steps = int(layer.qkeys.lengths[0]) - len0  # every sequence got one token per step
            mask = layer.seen_mask[:, :cum0]
            layer.seen_mask = torch.cat([mask, mask.new_ones(mask.shape[0], steps)], 1)
            layer.cumulative_length = cum0 + steps

    def memory_report(self) -> dict[str, Any]:
        """What the cache holds, over all layers: every component's bytes in use (``key_*``/``value_*``), the
        bytes held (``total_bytes``: in use, capacity reserved ahead and the layers' masks and position buffers,
        every tensor the cache keeps) and the bytes in use (``used_bytes``), the fp16 equivalent, and bits per
        element of each (``bits_per_element`` is the held one, the headline; ``bits_per_element_used``).

        ``by_device``: ``{"cuda:0": bytes, "cuda:1": bytes, ...}``, the bytes held on each device (a layer's stores
        live on the device of its K/V, e.g. under ``device_map="auto"``); its values sum to ``total_bytes``. Every
        other value is a number."""
        total: dict[str, Any] = {}
        by_device: dict[str, float] = {}
        for layer in self.layers:
            rep = layer.memory_report()
            for k, v in rep.items():
                if not k.endswith(("bits_per_element", "bits_per_element_allocated", "outlier_fraction")):
                    total[k] = total.get(k, 0) + v
            if rep:
                dev = device_key(layer.qkeys.device)
                by_device[dev] = by_device.get(dev, 0) + rep["key_allocated"] + rep["value_allocated"]
        if not total:
            return {}
        # layers may share one mask tensor: each storage once
        buffers = tensors_bytes_by_device(t for layer in self.layers for t in layer.buffers())
        total["layer_buffers"] = sum(buffers.values())
        for dev, n in buffers.items():
            by_device[dev] = by_device.get(dev, 0) + n
        used = total["key_total"] + total["value_total"]
        held = total["key_allocated"] + total["value_allocated"] + total["layer_buffers"]
        elements = total["key_elements"] + total["value_elements"]
        total["total_bytes"] = held
        total["used_bytes"] = used
        total["fp16_bytes"] = 2 * elements
        total["bits_per_element"] = 8 * held / elements if elements else float("nan")
        total["bits_per_element_used"] = 8 * used / elements if elements else float("nan")
        total["compression_vs_fp16"] = 2 * elements / held if held else float("nan")
        total["by_device"] = dict(sorted(by_device.items()))
        return total


def _calibrated_codebook(calibration: Calibration, cfg: QuantConfig, side: str, layer_idx: int) -> Any:
    """The calibrated codebook ``side`` (``"key"``/``"value"``) of layer ``layer_idx`` stores with under ``cfg``; a
    :class:`CalibrationError` naming the widths when the calibration has none of that width."""
    lc = calibration.layers[layer_idx]
    codebooks = lc.key_codebooks if side == "key" else lc.value_codebooks
    bits = cfg.bits_for(side)
    if bits not in codebooks:
        raise CalibrationError(f"calibration has no {bits}-bit codebooks for the {side}s (it was calibrated for "
                               f"{sorted(codebooks)}-bit codes): datatype {cfg.datatype} stores {side}s at {bits} "
                               f"bits (layer {layer_idx}); recalibrate with that width")
    return codebooks[bits]


def install_step_hook(model: torch.nn.Module) -> None:
    """Install (once) hooks on the decoder: a forward pre-hook that passes each step's 2-D attention mask and
    position ids to the :class:`KVQuantCache` given as ``cache`` / ``past_key_values`` and makes it the
    :data:`~kvquant.cache.kernel_attention.ACTIVE_CACHE` for the forward (``None`` for any other cache), and
    a forward hook (``always_call``) that restores the previous value and ends the cache's step: a forward that
    raised is undone in every layer it wrote (:meth:`KVQuantCache._end_step`)."""
    base = getattr(model, "model", model)
    if getattr(base, _HOOK_ATTR, None) is not None:
        return

    steps: list[list] = []  # [cache or None, completed] per forward in progress

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        cache = cache_in(kwargs)
        if isinstance(cache, KVQuantCache):
            cache._set_step(kwargs.get("attention_mask"), kwargs.get("position_ids"))
            cache._begin_step()
        else:
            cache = None
        steps.append([cache, False])
        kernel_attention.enter(cache)

    def done_hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        steps[-1][1] = True  # runs only when the forward returned

    def post_hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        kernel_attention.leave()
        cache, completed = steps.pop() if steps else (None, True)
        if cache is not None:
            cache._end_step(completed)

    handles = (base.register_forward_pre_hook(pre_hook, with_kwargs=True),
               base.register_forward_hook(done_hook, with_kwargs=True),
               base.register_forward_hook(post_hook, with_kwargs=True, always_call=True))
    setattr(base, _HOOK_ATTR, handles)
