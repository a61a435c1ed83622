"""lm-evaluation-harness through the cache: log-likelihoods read the stored past chunk by chunk, generation gets a
fresh cache, and the registered ``kvquant`` model runs a small local task offline."""

import json

import pytest
import torch
from transformers import DynamicCache

from kvquant.config import QuantConfig
from kvquant.eval.lm_harness import cache_maker, chunked_logits

from .longctx_fakes import word_model


def test_chunked_logits_read_the_cache():
    model = word_model(seed=3)
    ids = torch.randint(2, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(chunked_logits(model, ids, DynamicCache(), 32), plain, atol=1e-4, rtol=1e-4)
    no_hold = QuantConfig(min_range_tokens=1)  # 96 tokens: ranges from the first chunk, no exact hold
    quantized = chunked_logits(model, ids, cache_maker(model, "nuq2", config=no_hold)(0), 32)
    torch.testing.assert_close(quantized[:, :32], plain[:, :32], atol=1e-4, rtol=1e-4)  # the first chunk is exact
    assert (quantized[:, 32:] - plain[:, 32:]).abs().max() > 1e-3  # later chunks read the 2-bit past
    with pytest.raises(ValueError, match="presses are not supported"):
        cache_maker(model, "snapkv@nuq3")


def test_registered_model_runs_a_local_task(shared_dir, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install kvquant[longctx])")
    from transformers import AutoTokenizer, LlamaForCausalLM

    from kvquant.eval.lm_harness import KVQuantLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    path = shared_dir / "models" / "stories260k"
    model = LlamaForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    docs = [{"prompt": "Once upon a time, there was a little", "answer": " girl", "choices": [" girl", " rock"],
             "label": 0} for _ in range(3)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
              "test_split: test\ndoc_to_text: '{{prompt}}'\n")
    (tmp_path / "gen.yaml").write_text("task: kvq_gen\n" + common + "output_type: generate_until\n"
                                       "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['.']\n"
                                       "  max_gen_toks: 4\n  do_sample: false\n"
                                       "metric_list:\n  - metric: exact_match\n")
    (tmp_path / "choice.yaml").write_text("task: kvq_choice\n" + common + "output_type: multiple_choice\n"
                                          "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
                                          "metric_list:\n  - metric: acc\n")
    lm = KVQuantLM(pretrained=model, tokenizer=tok, cache="nuq4", chunk_size=4, batch_size=2, device="cpu")
    made = []
    make = lm._make_cache
    lm._make_cache = lambda reserve=0: made.append(type(make(reserve)).__name__) or make(reserve)
    out = lm_eval.simple_evaluate(model=lm, tasks=["kvq_gen", "kvq_choice"],
                                  task_manager=lm_eval.tasks.TaskManager(include_path=str(tmp_path)))
    assert set(out["results"]) == {"kvq_gen", "kvq_choice"}
    assert "acc,none" in out["results"]["kvq_choice"] and "exact_match,none" in out["results"]["kvq_gen"]
    assert "KVQuantCache" in made and len(made) >= 2  # both kinds of request went through the cache
