"""Soak test: many random steps through ``KVQuantCache`` on a tiny random Llama (CPU, torch backend).

The driver starts episodes of random batch size, prompt lengths (left padding) and datatype, then feeds chunks of
random size, with padding inside chunks too. Faults are injected at random: NaN or Inf in one layer's keys or
values, an exception raised inside one decoder layer in the middle of a step, an exception raised between steps.

Every step is run twice: through the cache under test, and (only when the cache under test accepted it) through a
reference cache fed with the accepted steps alone. After every step the two must hold the same thing layer by
layer (lengths, masks, dequantized keys and values, bit for bit), the stored lengths must be the real tokens
accepted, and the stored values must be the model's values of those tokens (exactly for ``fp16``, within the
quantization error otherwise).

``KVQUANT_SOAK_STEPS`` (default 24) sets the steps per test; the seed is printed and ``KVQUANT_TEST_SEED`` replays
it. The tests marked ``xfail(strict=True)`` fail today because of the cache defect their reason names; they pass
(and must then lose their mark) once it is fixed.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch

from kvquant.cache.hf_cache import KVQuantCache
from kvquant.cache.hf_compat import cache_kwargs
from kvquant.config import QuantConfig
from kvquant.models.tiny import tiny_llama

STEPS = int(os.environ.get("KVQUANT_SOAK_STEPS", "24"))
DATATYPES = ("fp16", "nuq3", "int4")
#: Largest relative error of the stored values against the model's, per datatype (3-4 bits, 1 % outliers exact).
VALUE_RTOL = {"fp16": 0.0, "nuq3": 0.35, "int4": 0.2}


class InjectedError(RuntimeError):
    """The exception the driver raises on purpose."""


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(seed=0, num_layers=3)


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.model.layers)


@contextmanager
def _hook(module: torch.nn.Module, fn) -> Iterator[None]:
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------------
# what a cache holds


def held_bytes(cache: KVQuantCache) -> int:
    """Bytes of every tensor the cache's layers hold (their stores, masks and position buffers), each storage once."""
    seen: dict[int, int] = {}

    def visit(obj: object, depth: int = 0) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, depth + 1)
        elif depth < 6 and type(obj).__module__.startswith(("kvquant.quant", "kvquant.sparse")):
            for name, v in vars(obj).items():
                if name != "codebook":  # the calibration's, shared by the stores of a layer
                    visit(v, depth + 1)

    for layer in cache.layers:
        for obj in (layer.qkeys, layer.qvalues, layer.seen_mask, layer.pos_offset, layer._pos_offset_i32):
            if obj is not None:
                visit(obj)
    return sum(seen.values())


def _state(cache: KVQuantCache) -> list[tuple]:
    """Per layer: cumulative length, seen mask, stored lengths, dequantized keys and values."""
    out = []
    for layer in cache.layers:
        if layer.qkeys is None:
            out.append((layer.cumulative_length, None))
            continue
        out.append((layer.cumulative_length, layer.seen_mask, layer.qkeys.lengths, layer.qvalues.lengths,
                    *layer.qkeys.dequantize(), *layer.qvalues.dequantize()))
    return out


def assert_same(a: KVQuantCache, b: KVQuantCache, where: str) -> None:
    for i, (x, y) in enumerate(zip(_state(a), _state(b))):
        assert len(x) == len(y) and x[0] == y[0], f"{where}: layer {i} cumulative length {x[0]} != {y[0]}"
        for u, v in zip(x[1:], y[1:]):
            assert u.shape == v.shape and torch.equal(u, v), f"{where}: layer {i} differs from the reference"


# ----------------------------------------------------------------------------------------------------
# the driver


@dataclass
class Episode:
    """One cache under test and its reference, with what was accepted so far."""

    datatype: str
    batch: int
    sut: KVQuantCache
    ref: KVQuantCache
    mask: torch.Tensor | None = None  # [B, T] bool, every accepted token (padding False)
    values: list[list[torch.Tensor]] = field(default_factory=list)  # per layer, accepted values [B, s, H*D]


class Driver:
    """Random steps with random faults; checks after every step (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, seed: int) -> None:
        self.model = model
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.ep: Episode | None = None
        self.accepted = self.rejected = 0

    def new_episode(self) -> None:
        dt = self.rng.choice(DATATYPES)
        # the exact hold: none, ended within an episode, or longer than one
        cfg = QuantConfig(datatype=dt, backend="torch", min_range_tokens=self.rng.choice((1, 12, 400)))
        B = self.rng.randint(1, 4)
        self.ep = Episode(dt, B, KVQuantCache(self.model, cfg), KVQuantCache(self.model, cfg),
                          values=[[] for _ in _layers(self.model)])

    def random_chunk(self, prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and mask ``[B, s]``: a prompt (left padding, every row a real token) or a chunk (padding anywhere)."""
        B = self.ep.batch
        if prompt:
            s = self.rng.randint(1, 24)
            mask = torch.zeros(B, s, dtype=torch.bool)
            for b in range(B):
                mask[b, s - self.rng.randint(1, s):] = True
        else:
            s = self.rng.randint(1, 8)
            mask = torch.rand(B, s, generator=self.gen) > 0.2
        ids = torch.randint(3, self.model.config.vocab_size, (B, s), generator=self.gen)
        return ids, mask

    def _forward(self, cache: KVQuantCache, ids: torch.Tensor, full_mask: torch.Tensor) -> None:
        s = ids.shape[1]
        positions = (full_mask.long().cumsum(1) - 1).clamp_min(0)[:, -s:]
        with torch.no_grad():
            self.model(input_ids=ids, attention_mask=full_mask.long(), position_ids=positions, use_cache=True,
                       **cache_kwargs(self.model, cache))

    def step(self, fault: str | None = None) -> bool:
        """One random step with an optional fault; whether the cache under test accepted it."""
        ep = self.ep
        ids, mask = self.random_chunk(prompt=ep.mask is None)
        full = mask if ep.mask is None else torch.cat([ep.mask, mask], 1)
        captured: list[torch.Tensor] = []
        hooks = [_hook(layer.self_attn.v_proj, lambda m, i, o: captured.append(o.detach().clone()))
                 for layer in _layers(self.model)]
        if fault in ("nan", "inf"):
            hooks.append(self._poison(mask, float(fault)))
        elif fault == "raise_mid_step":
            layer = self.rng.randrange(len(_layers(self.model)))

            def boom(m, i, o):
                raise InjectedError(f"injected in layer {layer}")

            hooks.append(_hook(_layers(self.model)[layer], boom))
        try:
            with _all(hooks):
                self._forward(ep.sut, ids, full)
        except (ValueError, RuntimeError) as exc:
            assert fault is not None, f"a clean step was refused: {exc}"
            self.rejected += 1
            return False
        assert fault not in ("nan", "inf"), "a step with NaN/Inf in the keys or values was accepted"
        assert fault != "raise_mid_step", "the injected exception did not reach the caller"
        self._forward(ep.ref, ids, full)
        ep.mask = full
        for per_layer, v in zip(ep.values, captured):
            per_layer.append(v)
        self.accepted += 1
        return True

    def _poison(self, mask: torch.Tensor, value: float):
        """A hook putting ``value`` in one real new token of one layer's keys or values."""
        real = mask.nonzero().tolist()
        b, t = self.rng.choice(real) if real else (0, 0)
        layer = self.rng.choice(_layers(self.model))
        proj = self.rng.choice((layer.self_attn.k_proj, layer.self_attn.v_proj))
        channel = self.rng.randrange(proj.out_features)

        def poison(m, i, o):
            o = o.clone()
            o[b, t, channel] = value
            return o

        return _hook(proj, poison)

    def check(self, where: str) -> None:
        ep = self.ep
        assert_same(ep.sut, ep.ref, where)
        if ep.mask is None:
            return
        H, D = self.model.config.num_key_value_heads, self.model.config.head_dim
        real = ep.mask.sum(1)
        for i, layer in enumerate(ep.sut.layers):
            assert torch.equal(layer.qkeys.lengths.cpu(), real) and torch.equal(layer.qvalues.lengths.cpu(), real), \
                f"{where}: layer {i} stores {layer.qvalues.lengths.tolist()} tokens, {real.tolist()} were accepted"
            exact = torch.cat(ep.values[i], 1).view(ep.batch, -1, H, D).transpose(1, 2)  # [B, H, T, D]
            stored, valid = layer.qvalues.dequantize()
            for b in range(ep.batch):
                want = exact[b][:, ep.mask[b]]
                got = stored[b][:, valid[b]].to(want.dtype)
                err = (got - want).norm() / want.norm().clamp_min(1e-12)
                assert err <= VALUE_RTOL[ep.datatype] + 1e-6, f"{where}: layer {i} row {b} values off by {err:.3f}"


@contextmanager
def _all(contexts: list) -> Iterator[None]:
    if not contexts:
        yield
        return
    with contexts[0], _all(contexts[1:]):
        yield


def soak(model: torch.nn.Module, seed: int, faults: tuple[str, ...], fault_rate: float = 0.3,
         memory: bool = False) -> Driver:
    """Run :data:`STEPS` random steps, a new episode every few steps, ``faults`` injected at ``fault_rate``;
    check after every step (and the memory report against the bytes held when ``memory``)."""
    d = Driver(model, seed)
    left = 0
    for n in range(STEPS):
        if left == 0:
            d.new_episode()
            left = d.rng.randint(3, 8)
        left -= 1
        first = d.ep.mask is None
        fault = d.rng.choice(faults) if faults and not first and d.rng.random() < fault_rate else None
        if fault == "raise_between":
            with pytest.raises(InjectedError):
                raise InjectedError("between two steps")  # user code failing between steps: the cache is untouched
            fault = None
        where = f"step {n} ({d.ep.datatype}, B={d.ep.batch}, fault {fault})"
        d.step(fault)
        d.check(where)
        if memory and d.ep.mask is not None:
            report = d.ep.sut.memory_report()
            assert report["total_bytes"] == held_bytes(d.ep.sut), f"{where}: memory_report() is not what is held"
    assert d.accepted > 0
    return d


# ----------------------------------------------------------------------------------------------------
# the tests


def test_soak_random_steps_match_the_reference(model, seed):
    """Random batches, lengths, padding and chunks, and exceptions between steps: every step is accepted and the
    cache holds exactly the accepted tokens."""
    d = soak(model, seed, faults=("raise_between",))
    assert d.rejected == 0


def test_soak_nan_or_inf_leaves_every_layer_as_before(model, seed):
    d = soak(model, seed, faults=("nan", "inf"), fault_rate=0.5)
    assert d.rejected > 0


def test_soak_exception_inside_a_step_leaves_every_layer_as_before(model, seed):
    d = soak(model, seed, faults=("raise_mid_step",), fault_rate=0.5)
    assert d.rejected > 0


def test_soak_memory_report_is_the_bytes_held(model, seed):
    soak(model, seed, faults=(), memory=True)


def test_a_poisoned_store_is_never_read(seed):
    from kvquant.quant.quantizer import BatchedKVQuantizer

    q = BatchedKVQuantizer(QuantConfig(datatype="nuq3", min_range_tokens=1))
    g = torch.Generator().manual_seed(seed)
    store = q.quantize_values(torch.randn(2, 2, 16, 16, generator=g), torch.ones(2, 16, dtype=torch.bool))
    bad = torch.randn(2, 2, 1, 16, generator=g)
    bad[0, 0, 0, 3] = float("nan")
    try:
        store.append(bad)
    except ValueError:
        return  # refused at once: nothing poisoned was stored
    with pytest.raises(ValueError):
        store.dequantize()
