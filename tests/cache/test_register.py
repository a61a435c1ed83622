"""``cache_implementation="kvquant"`` for one model."""

import pytest
import torch
from transformers import DynamicCache

from kvquant import QuantConfig
from kvquant.cache.hf_cache import KVQuantCache
from kvquant.models import tiny_llama
from tests.hf_tiny import greedy_generate, padded_batch


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def test_cache_implementation_kvquant_matches_explicit_cache(model, seed):
    from kvquant.cache.register import register_cache_implementation, unregister_cache_implementation

    ids, mask = padded_batch(seed, model.config.vocab_size)
    explicit = greedy_generate(model, ids, mask, KVQuantCache(model, QuantConfig(datatype="nuq3", page_size=32)))
    register_cache_implementation(model)
    register_cache_implementation(model)  # idempotent
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 pad_token_id=0, cache_implementation="kvquant",
                                 cache_config={"datatype": "nuq3", "page_size": 32})
            plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0, cache_implementation="dynamic")
        assert torch.equal(out, explicit.sequences)
        assert isinstance(model.kvquant_last_cache, KVQuantCache)
        assert model.kvquant_last_cache.config.datatype == "nuq3"
        assert model.kvquant_last_cache.layers[0].qkeys.bits == 3
        ref = greedy_generate(model, ids, mask, DynamicCache(config=model.config))
        assert torch.equal(plain, ref.sequences)  # other cache implementations pass through untouched
        with pytest.raises(ValueError, match="not both"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, cache_implementation="kvquant",
                           past_key_values=DynamicCache(config=model.config))
        with pytest.raises(TypeError, match="cache_config"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, cache_implementation="kvquant",
                           cache_config="nuq3")
    finally:
        unregister_cache_implementation(model)
    assert "generate" not in vars(model)
