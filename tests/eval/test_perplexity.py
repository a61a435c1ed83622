"""Perplexity through the cache: the fp16 row equals the model's plain perplexity."""

import json

import pytest
import torch

from kvquant.eval.perplexity import evaluate_perplexity
from kvquant.models import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def test_perplexity_fp16_row_equals_plain(model, seed, tmp_path, capsys):
    windows = torch.randint(0, model.config.vocab_size, (2, 48))
    out = tmp_path / "ppl.json"
    res = {r.datatype: r for r in evaluate_perplexity(model, windows, ["plain", "fp16", "nuq3"], chunk=5,
                                                      out_path=out, progress=False)}
    assert res["fp16"].tokens == res["plain"].tokens == 2 * 23
    assert res["fp16"].ppl == pytest.approx(res["plain"].ppl, rel=1e-5)
    assert res["nuq3"].delta_ppl is not None and res["nuq3"].bits_per_element is not None
    # one log line per datatype as it ends; the JSON holds every row (rewritten after each)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ppl ")]
    assert [ln.split(":")[0] for ln in lines] == ["ppl exact (fp32)", "ppl plain", "ppl nuq3"]
    assert f"{res['nuq3'].ppl:.4f} ({res['nuq3'].delta_ppl_pct:+.2f} %)" in lines[2]
    assert [r["datatype"] for r in json.loads(out.read_text())["results"]] == ["fp16", "plain", "nuq3"]
