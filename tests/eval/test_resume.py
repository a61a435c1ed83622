"""A perplexity run stopped part-way leaves a file marked partial; the rerun keeps its finished rows."""

from __future__ import annotations

import json

import pytest
import torch

import kvquant.eval.perplexity as ppl
from kvquant.eval.perplexity import evaluate_perplexity, format_table
from kvquant.models import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.fixture
def windows(model):
    return torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def computed(monkeypatch) -> list[str]:
    """The datatypes whose rows are computed (not kept from the file)."""
    names: list[str] = []
    real = ppl._evaluate_one

    def record(name, *args, **kwargs):
        names.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ppl, "_evaluate_one", record)
    return names


def test_stopped_run_is_marked_partial_and_resumes(model, windows, computed, monkeypatch, tmp_path):
    out = tmp_path / "ppl.json"
    real = ppl._evaluate_one

    def stop_at_nuq3(name, *args, **kwargs):
        if name == "nuq3":
            raise KeyboardInterrupt  # the run is killed while nuq3 runs
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ppl, "_evaluate_one", stop_at_nuq3)
    run = dict(chunk=8, out_path=out, progress=False, resume=True)
    with pytest.raises(KeyboardInterrupt):
        evaluate_perplexity(model, windows, ["fp16", "nuq4", "nuq3"], **run)
    partial = json.loads(out.read_text())
    assert partial["meta"]["complete"] is False
    assert [r["datatype"] for r in partial["results"]] == ["fp16", "nuq4"] and computed == ["fp16", "nuq4"]

    monkeypatch.setattr(ppl, "_evaluate_one", real)  # the fixture's recorder
    computed.clear()
    res = evaluate_perplexity(model, windows, ["fp16", "nuq4", "nuq3"], **run)
    assert computed == ["nuq3"]  # fp16 and nuq4 were kept
    done = json.loads(out.read_text())
    assert done["meta"]["complete"] is True
    assert done["results"][:2] == partial["results"]  # the kept rows, time included, as the stopped run wrote them
    assert res[2].delta_ppl == pytest.approx(res[2].ppl - res[0].ppl)


def test_rows_describe_their_own_config_and_what_they_store(model, windows, computed, tmp_path):
    out = tmp_path / "ppl.json"
    res = evaluate_perplexity(model, windows, ["fp16", "nuq3"], chunk=8, out_path=out, progress=False)
    doc = json.loads(out.read_text())
    assert "datatype" not in doc["meta"]["config"] and doc["meta"]["dtype"] == "float32"
    assert [(r["datatype"], r["label"], r["config"]["datatype"]) for r in doc["results"]] == [
        ("fp16", "exact (fp32)", "fp16"), ("nuq3", "nuq3", "nuq3")]
    assert doc["results"][0]["bits_per_element"] > 30  # an fp32 model's exact cache holds 32 bits, and says so
    table = format_table(res)
    assert "| exact (fp32) |" in table and "| fp16 |" not in table
    half = evaluate_perplexity(model.to(torch.bfloat16), windows, ["fp16"], chunk=8, progress=False)
    model.to(torch.float32)
    assert half[0].label == "exact (bf16)"


def test_another_protocol_or_no_resume_recomputes_every_row(model, windows, computed, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    evaluate_perplexity(model, windows, ["fp16", "nuq3"], chunk=8, out_path=out, progress=False, resume=True)
    evaluate_perplexity(model, windows[:1], ["fp16", "nuq3"], chunk=8, out_path=out, progress=False, resume=True)
    assert computed == ["fp16", "nuq3"] * 2
    assert "another protocol (differs in windows)" in capsys.readouterr().err
    evaluate_perplexity(model, windows[:1], ["fp16", "nuq3"], chunk=8, out_path=out, progress=False, resume=False)
    assert computed == ["fp16", "nuq3"] * 3
    from kvquant.config import QuantConfig

    evaluate_perplexity(model, windows[:1], ["fp16", "nuq3"], base_config=QuantConfig(residual_length=8), chunk=8,
                        out_path=out, progress=False, resume=True)
    assert computed == ["fp16", "nuq3"] * 4  # another config: no row is kept
