"""The cache keyword across transformers versions."""

import torch


def test_cache_keyword_follows_the_models_forward() -> None:
    """transformers 5.2x takes the cache as ``cache`` (``past_key_values`` deprecated), 4.5x as ``past_key_values``:
    kvquant passes it under the name the model's forward declares and reads it under either."""
    from kvquant.cache.hf_compat import cache_in, cache_kwarg, cache_kwargs

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return cache

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return past_key_values

    marker = object()
    for cls, name in ((New, "cache"), (Old, "past_key_values")):
        m = cls()
        assert cache_kwarg(m) == name
        assert m(**cache_kwargs(m, marker)) is marker
    assert cache_in({"cache": marker}) is marker and cache_in({"past_key_values": marker}) is marker
    assert cache_in({"cache": None, "past_key_values": marker}) is marker and cache_in({}) is None
