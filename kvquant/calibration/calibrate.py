"""``kvquant calibrate``: collect pre-RoPE keys and values on calibration text, fit ranges and codebooks."""

from __future__ import annotations

import gc
import sys
from typing import Any

import torch
from tqdm.auto import tqdm

from kvquant.cache.hf_cache import KVQuantCache, KVQuantLayer
from kvquant.cache.hf_compat import cache_kwargs
from kvquant.cache.identity import model_identity
from kvquant.config import QuantConfig
from kvquant.quant.calibration_file import SENSITIVITIES, Calibration, LayerCalibration
from kvquant.quant.codebook import Codebook, compute_nuq_codebook
from kvquant.quant.encode import normalize_value_tokens, range_to_scale_zero
from kvquant.quant.rope import invert_rope
from kvquant.quant.rotation import rotate, rotation_matrix
from kvquant.quant.stats import masked_quantile_pair
from kvquant.version import __version__


class _RecordingLayer(KVQuantLayer):
    """Stands in for a cache layer during calibration: records pre-RoPE keys, values (and their grads), in the basis
    the cache stores them in (rotated by ``rotation [D, D]`` when the config has one)."""

    def __init__(self, owner: _RecordingCache, layer_idx: int, want_grads: bool,
                 rotation: torch.Tensor | None = None) -> None:
        super().__init__(owner, layer_idx)
        self.want_grads = want_grads
        self.rotation = rotation
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.live: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        B, _, s, _ = key_states.shape
        _, positions = self.owner._step_inputs(B, s, 0, key_states.device)
        cos = sin = None
        if self.owner.pre_rope:
            cos, sin = self.owner.rotary(positions)
            k = invert_rope(key_states.detach(), cos, sin)
        else:
            k = key_states.detach().float()
        self.keys.append(rotate(k.cpu(), self.rotation))
        self.values.append(rotate(value_states.detach().float().cpu(), self.rotation))
        if self.want_grads and key_states.requires_grad:
            key_states.retain_grad()
            value_states.retain_grad()
            self.live.append((key_states, value_states, cos, sin))
        return key_states, value_states

    def collect_grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Squared gradients (diagonal Fisher information) w.r.t. pre-RoPE keys and values (w.r.t. the rotated
        ones with a rotation: ``x' = x R`` with ``R`` orthogonal has the gradient ``g R``)."""
        kg, vg = [], []
        for k, v, cos, sin in self.live:
            gk = k.grad.float()
            if cos is not None:  # the rotation is orthogonal: pull the gradient back through it
                gk = invert_rope(gk, cos, sin) * (cos * cos + sin * sin)[:, None]
            kg.append(rotate(gk.cpu(), self.rotation) ** 2)
            vg.append(rotate(v.grad.float().cpu(), self.rotation) ** 2)
        self.live = []
        return kg, vg



class _RecordingCache(KVQuantCache):
    def __init__(self, model: torch.nn.Module, config: QuantConfig, want_grads: bool) -> None:
        super().__init__(model, config)
        rot = rotation_matrix(config.rotation, self.head_dim, config.rotation_seed) if config.rotated else None
        self.layers = [_RecordingLayer(self, i, want_grads, rot) for i in range(self.num_layers)]


def _fit_layer(keys: torch.Tensor, values: torch.Tensor, kw: torch.Tensor | None, vw: torch.Tensor | None,
               config: QuantConfig, bits_list: tuple[int, ...], max_samples: int, seed: int,
               key_magnitude: bool = False, query_energy: torch.Tensor | None = None) -> LayerCalibration:
    """keys/values: ``[N, H, D]`` float32 calibration tokens (sinks excluded); kw/vw: Fisher weights.
    ``key_magnitude``: weight each normalised key by its magnitude ``|k|`` (the ``"magnitude"`` sensitivity).
    ``query_energy``: ``[H, D]`` logit sensitivity of each key channel (the ``"query"`` sensitivity): a key
    error ``e`` moves the logits by ``q·R e``; averaged over relative rotations ``R`` its square is
    ``1/2 sum_pairs |q_pair|^2 |e_pair|^2``, so a normalised error in channel ``c`` weighs
    ``E|q_pair(c)|^2 * scale_c^2``.

    Also measures, per width, each side's squared quantization error with the fitted codebook (in the units of the
    activations, outliers exact, summed over the tokens), weighted by the Fisher weights ``kw``/``vw`` when given:
    the errors the bit allocation compares (:mod:`kvquant.quant.allocation`)."""
    f = config.outlier_fraction
    N, H, D = keys.shape
    lo, hi = masked_quantile_pair(keys.permute(1, 2, 0), None, f / 2, 1 - f / 2)  # [H, D]
    scale, zero = range_to_scale_zero(lo, hi)
    kn = (keys - zero) / scale
    k_in = (kn >= -1) & (kn <= 1)
    vn, v_out, vscale, _ = normalize_value_tokens(values, f, torch.float16)
    v_in = ~v_out
    # error weights of a normalised error: the activation's scale squared, times its Fisher weight when known
    k_err_w = (scale.float() ** 2).expand(N, H, D)[k_in]
    v_err_w = (vscale.float()[..., None] ** 2).expand(N, H, D)[v_in]
    if kw is not None:
        k_err_w = k_err_w * kw[k_in]
    if vw is not None:
        v_err_w = v_err_w * vw[v_in]
    if key_magnitude:
        kw = kn.abs()
    if query_energy is not None:
        kw = (query_energy * scale.float() ** 2).expand(N, H, D)
    kcb, vcb, kerr, verr = {}, {}, {}, {}
    for bits in bits_list:
        kcb[bits] = compute_nuq_codebook(kn[k_in], bits, None if kw is None else kw[k_in], seed, max_samples)
        vcb[bits] = compute_nuq_codebook(vn[v_in], bits, None if vw is None else vw[v_in], seed, max_samples)
        kerr[bits] = _weighted_error(kn[k_in], kcb[bits], k_err_w)
        verr[bits] = _weighted_error(vn[v_in], vcb[bits], v_err_w)
    return LayerCalibration(lo, hi, kcb, vcb, kerr, verr)


def _weighted_error(x: torch.Tensor, codebook: Codebook, weights: torch.Tensor) -> float:
    """``sum weights * (x - Q(x))^2`` of normalised data ``x`` quantized with ``codebook`` (float64 sum)."""
    q = codebook.decode(codebook.encode(x.float()))
    return float((weights.double() * (x.double() - q.double()) ** 2).sum())


def calibrate(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    config: QuantConfig | None = None,
    bits: tuple[int, ...] = (2, 3, 4),
    sensitivity: str = "none",
    batch_size: int = 4,
    max_samples: int = 1 << 17,
    seed: int = 0,
    model_id: str = "",
    dataset: str = "",
    progress: bool = True,
    bit_budget: float | None = None,
) -> Calibration:
    """Calibrate kvquant for ``model``.

    Args:
        sequences: ``[n, L]`` token ids (no padding), e.g. random crops of Wikitext-2 train/valid.
        config: outlier fraction, sink count, pre-RoPE setting and channel rotation the calibration is for (with a
            rotation, ranges, codebooks and errors are fitted to the rotated keys and values, Fisher weights to the
            gradients w.r.t. them; the file records it and caches with another rotation refuse it).
        bits: codebook widths to fit.
        sensitivity: ``"none"`` (plain k-means), ``"fisher"`` (k-means weighted by squared gradients of
            the language-model loss w.r.t. each K/V activation, as in KVQuant) or ``"magnitude"`` (keys
            weighted by their normalised magnitude ``|k|``, values plain). Plain k-means pulls the outer key
            levels inwards and clips the large key entries that dominate ``q·k``; on SmolLM2-135M the
            magnitude weighting brings NUQ keys close to the uniform grid (docs/design.md, "Accuracy findings").
        batch_size: sequences per forward. A forward that raises ``torch.OutOfMemoryError`` is undone and
            retried with half as many sequences (one line on stderr), and the rest of the run keeps the smaller
            size; the result is the one of a run at that batch size from the start. Running out of memory on a
            single sequence raises ``torch.OutOfMemoryError`` saying what to change.
        model_id: the model's name; the calibration records it with a fingerprint of the weights
            (``NAME@weights:HEX``, :func:`~kvquant.cache.identity.model_identity`), which
            :class:`~kvquant.cache.hf_cache.KVQuantCache` checks against the model it is used with.
        progress: show tqdm progress bars.
        bit_budget: also choose each layer's (key bits, value bits) among the pairs of ``bits`` so that the average
            width is at most this budget with least measured error (:meth:`Calibration.with_allocation`): the
            widths of the ``nuq-alloc`` datatype. Each side's error at each width is its squared quantization error
            on the calibration activations, Fisher-weighted with ``sensitivity="fisher"`` (recommended: the other
            sensitivities compare plain squared errors).

    Returns:
        A :class:`Calibration`; ``.save(path)`` writes it.
    """
    config = config or QuantConfig()
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {sensitivity!r}")
    if sensitivity == "query" and config.rotation != "none":
        raise ValueError(f"sensitivity 'query' weights key channels by their rotary pairs, which a channel rotation "
                         f"({config.rotation!r}) mixes: use fisher, magnitude or none with a rotation")
    if sequences.ndim != 2 or sequences.shape[1] <= config.n_sink:
        raise ValueError(f"sequences must be [n, L] with L > n_sink, got {tuple(sequences.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bits = tuple(sorted(set(bits)))
    if not bits or any(b not in (2, 3, 4) for b in bits):
        raise ValueError(f"bits must be widths among 2, 3, 4, got {bits}")
    if bit_budget is not None and not (min(bits) <= bit_budget):
        raise ValueError(f"bit budget {bit_budget} is below the narrowest width calibrated ({min(bits)} bits)")
    want_grads = sensitivity == "fisher"
    rec = _RecordingCache(model, replace_datatype(config), want_grads)
    queries = _QueryEnergy(model, rec.num_layers) if sensitivity == "query" else None
    device = next(model.parameters()).device
    kgrads: list[list[torch.Tensor]] = [[] for _ in range(rec.num_layers)]
    vgrads: list[list[torch.Tensor]] = [[] for _ in range(rec.num_layers)]

    def forward(ids: torch.Tensor) -> None:
        """Record one batch of sequences (its keys, values, and gradients or query energies)."""
        if want_grads:
            model.zero_grad(set_to_none=True)
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            out = model(inputs_embeds=emb, labels=ids, **cache_kwargs(model, rec), use_cache=True)
            # the loss is a mean over the batch's tokens: times the batch size, every sequence weighs the same
            # whatever the batch it ran in (a smaller last batch, or one halved after running out of memory)
            (out.loss * ids.shape[0]).backward()
            for i, layer in enumerate(rec.layers):
                kg, vg = layer.collect_grads()
                kgrads[i] += kg
                vgrads[i] += vg
        else:
            with torch.no_grad():
                model(input_ids=ids, **cache_kwargs(model, rec), use_cache=True)

    # the gradients wanted are those of the keys/values: no parameter gradients (a model's worth of memory)
    frozen = [p for p in model.parameters() if p.requires_grad] if want_grads else []
    for p in frozen:
        p.requires_grad_(False)
    n, limit, start = sequences.shape[0], int(batch_size), 0
    bar = tqdm(total=n, desc="calibration forward", unit="seq", disable=not progress)
    try:
        while start < n:
            chunk = sequences[start:start + limit]
            mark = _Checkpoint(rec, queries, kgrads, vgrads)
            try:
                forward(chunk.to(device))
            except torch.OutOfMemoryError as exc:
                mark.rollback()
                if chunk.shape[0] == 1:
                    raise torch.OutOfMemoryError(_oom_message(model, model_id, sequences.shape[1], sensitivity,
                                                              device)) from exc
                oom = True
            else:
                oom = False
            if oom:  # outside the except block: its traceback no longer holds the failed forward's tensors
                del mark
                _free_memory(model, device, want_grads)
                old, limit = chunk.shape[0], (chunk.shape[0] + 1) // 2
                print(f"calibration: out of memory with a batch of {old} sequences of {sequences.shape[1]} tokens; "
                      f"retrying with batch size {limit}", file=sys.stderr)
                continue
            start += chunk.shape[0]
            bar.update(chunk.shape[0])
    finally:
        bar.close()
        if queries is not None:  # the energies are summed: the model leaves without our hooks, error or not
            queries.remove()
        for p in frozen:
            p.requires_grad_(True)
    layers = []
    s0 = config.n_sink
    for i, layer in enumerate(tqdm(rec.layers, desc="fitting codebooks", disable=not progress)):
        keys = torch.cat(layer.keys, 0)[:, :, s0:].permute(0, 2, 1, 3).reshape(-1, rec.num_kv_heads, rec.head_dim)
        vals = torch.cat(layer.values, 0)[:, :, s0:].permute(0, 2, 1, 3).reshape(-1, rec.num_kv_heads, rec.head_dim)
        kw = vw = None
        if want_grads:
            kw = torch.cat(kgrads[i], 0)[:, :, s0:].permute(0, 2, 1, 3).reshape(keys.shape)
            vw = torch.cat(vgrads[i], 0)[:, :, s0:].permute(0, 2, 1, 3).reshape(vals.shape)
        qe = None if queries is None else queries.per_key_channel(i, rec.num_kv_heads, rec.head_dim)
        layers.append(_fit_layer(keys, vals, kw, vw, config, bits, max_samples, seed,
                                 key_magnitude=sensitivity == "magnitude", query_energy=qe))
        layer.keys = layer.values = []
    cal = Calibration(layers, model_identity(model_id, model), config.outlier_fraction, config.n_sink,
                      config.pre_rope, rec.num_kv_heads, rec.head_dim, sensitivity, int(sequences.numel()), dataset,
                      __version__, rotation=config.rotation, rotation_seed=config.rotation_seed)
    return cal if bit_budget is None else cal.with_allocation(bit_budget)


class _QueryEnergy:
    """Running ``sum q^2`` per layer, query head and channel (pre-RoPE queries, from hooks on ``q_proj``)."""

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        self.sums: list[torch.Tensor | None] = [None] * num_layers
        self.hooks = []
        for module in model.modules():
            proj, idx = getattr(module, "q_proj", None), getattr(module, "layer_idx", None)
            if isinstance(proj, torch.nn.Module) and isinstance(idx, int) and 0 <= idx < num_layers:
                self.hooks.append(proj.register_forward_hook(self._hook(idx)))
        if len(self.hooks) != num_layers:
            self.remove()
            raise ValueError(f"--sensitivity query needs a q_proj in every attention layer; found {len(self.hooks)} "
                             f"of {num_layers} (not a Llama-style model?)")

    def _hook(self, idx: int):
        def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
            sq = out.detach().float().pow(2).reshape(-1, out.shape[-1]).sum(0)
            self.sums[idx] = sq if self.sums[idx] is None else self.sums[idx] + sq
        return hook

    def per_key_channel(self, layer: int, kv_heads: int, head_dim: int) -> torch.Tensor:
        """``[H_kv, D]``: query energy of each rotary pair, summed over the query heads that read the KV head."""
        q = self.sums[layer]
        if q is None:
            raise RuntimeError(f"no queries were recorded for layer {layer}")
        q = q.cpu().reshape(kv_heads, -1, head_dim).sum(1)  # GQA: the query heads sharing each KV head
        h = head_dim // 2
        pair = q[:, :h] + q[:, h:]  # rotate_half layout: channel i rotates with channel i + D/2
        return torch.cat([pair, pair], 1) / pair.mean()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


class _Checkpoint:
    """What the recorders have collected before one forward, to undo a forward that ran out of memory: the
    recorded lists are truncated and the query energies restored, so a retry at a smaller batch size leaves the
    statistics exactly as if the sequences had been run at that batch size from the start."""

    def __init__(self, rec: _RecordingCache, queries: _QueryEnergy | None, kgrads: list[list[torch.Tensor]],
                 vgrads: list[list[torch.Tensor]]) -> None:
        self.rec, self.queries, self.kgrads, self.vgrads = rec, queries, kgrads, vgrads
        self.lengths = [(len(layer.keys), len(layer.values)) for layer in rec.layers]
        self.grad_lengths = [(len(k), len(v)) for k, v in zip(kgrads, vgrads)]
        # the hooks rebind their sums (never add in place), so the current tensors are the snapshot
        self.sums = None if queries is None else list(queries.sums)

    def rollback(self) -> None:
        for layer, (nk, nv) in zip(self.rec.layers, self.lengths):
            del layer.keys[nk:], layer.values[nv:]
            layer.live = []  # the failed forward's K/V and their autograd graph
        for k, v, (nk, nv) in zip(self.kgrads, self.vgrads, self.grad_lengths):
            del k[nk:], v[nv:]
        if self.queries is not None:
            self.queries.sums = list(self.sums)


def _oom_message(model: torch.nn.Module, model_id: str, seq_len: int, sensitivity: str, device: torch.device) -> str:
    name = model_id or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return (f"calibration ran out of memory on a single sequence (model {name}, seq_len {seq_len}, dtype {dtype}, "
            f"sensitivity {sensitivity}, device {device}); use a shorter --seq-len or a lower-precision --dtype "
            "(bfloat16 / float16)")


def _free_memory(model: torch.nn.Module, device: torch.device, want_grads: bool) -> None:
    """Release what a forward that ran out of memory left behind before the retry."""
    if want_grads:
        model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def replace_datatype(config: QuantConfig) -> QuantConfig:
    """The recording cache must un-rotate keys like a quantized cache would: use a lossy datatype."""
    from dataclasses import replace

    return replace(config, datatype="nuq4") if not config.is_quantized or config.per_layer else config
