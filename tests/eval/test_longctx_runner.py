"""Running cells: batched and one-at-a-time answers agree, baselines run at odd lengths and batches, presses evict
to the bytes asked, finished cells are skipped on a rerun."""

import dataclasses
import json

import pytest

from kvquant.config import QuantConfig
from kvquant.eval.baselines import baseline_available
from kvquant.eval.longctx import caches as caches_mod
from kvquant.eval.longctx import grid as grid_mod
from kvquant.eval.longctx.caches import parse_cache, parse_caches, ratio_for_bits
from kvquant.eval.longctx.grid import GridSettings, evaluate_longctx
from kvquant.eval.longctx.results import ResultsFile, read_records
from kvquant.eval.longctx.runner import PromptEncoder, query_tokens, run_cell
from kvquant.eval.longctx.tasks import make_cell

from .longctx_fakes import KeepRecentPress, WordTokenizer, word_model

TOK = WordTokenizer()
ENC = PromptEncoder(TOK)


@pytest.fixture(scope="module")
def model():
    return word_model()


@pytest.fixture(scope="module")
def cell():
    samples = make_cell("niah_single_1", 200, 50, 3, ENC.count, max_new_tokens=4)
    assert len({ENC.count(s.prompt) for s in samples}) > 1  # lengths differ: the batch is left-padded
    return samples


@pytest.mark.parametrize("name", ["fp16", "nuq4"])
def test_batched_and_one_at_a_time_give_the_same_answers(model, cell, name):
    spec = parse_cache(name)
    base = QuantConfig(min_range_tokens=1)  # ~200-token prompts: ranges from the prompt, no exact hold
    batched = run_cell(model, TOK, cell, spec, encoder=ENC, batch_size=3, base_config=base)
    alone = run_cell(model, TOK, cell, spec, encoder=ENC, batch_size=1, base_config=base)
    assert all(p.strip() for p in batched.predictions)
    assert batched.predictions == alone.predictions
    assert batched.extra["query_tokens"] == query_tokens(cell, ENC) > 10
    if name == "nuq4":
        # ~200 tokens: the open value page (up to 63 tokens) is still exact fp32, so far above 4 bits
        assert 4 < batched.bits_per_element < 16 and batched.kv_bytes < run_cell(
            model, TOK, cell[:1], parse_cache("fp16"), encoder=ENC).kv_bytes / 2


def test_baselines_run_at_odd_lengths_and_batches(model):
    ok, why = baseline_available("quanto2k")
    if not ok:
        pytest.skip(why)
    samples = make_cell("niah_single_1", 207, 30, 5, ENC.count, max_new_tokens=2)
    run = run_cell(model, TOK, samples, parse_cache("quanto2k"), encoder=ENC, batch_size=5)
    assert len(run.predictions) == 5 and 2 < run.bits_per_element < 16  # 128 exact tokens of ~200


def test_press_evicts_to_the_bytes_of_a_datatype(model, cell, monkeypatch):
    made = []

    def fake_press_class(name):
        def make(compression_ratio):
            made.append(KeepRecentPress(compression_ratio))
            return made[-1]
        return make

    monkeypatch.setattr(caches_mod, "press_class", fake_press_class)
    spec = parse_cache("keeprecent@nuq3")
    assert (spec.press, spec.match) == ("keeprecent", "nuq3")
    run = run_cell(model, TOK, cell[:2], spec, encoder=ENC, batch_size=2, press_ratio=ratio_for_bits(4.0))
    assert run.compression_ratio == pytest.approx(0.75) and made[0].prefills == 2 * 2  # 2 layers x 2 prompts
    S, tail = run.prompt_tokens, run.extra["query_tokens"]
    # a quarter of the context, plus the question and the answer, at 16 bits
    assert 16 * 0.25 < run.bits_per_element < 16 * (0.25 * (S - tail) + tail + 4) / S + 0.1
    fixed = parse_cache("keeprecent:0.5")
    assert fixed.ratio == 0.5 and run_cell(model, TOK, cell[:1], fixed, encoder=ENC).compression_ratio == 0.5


def test_real_kvpress_press(model, cell):
    pytest.importorskip("kvpress", reason="kvpress is not installed (pip install kvquant[longctx])")
    ok, why = caches_mod.cache_available(parse_cache("snapkv:0.5"))
    assert ok, why
    run = run_cell(model, TOK, cell[:1], parse_cache("snapkv:0.5"), encoder=ENC)
    S, tail = run.prompt_tokens, run.extra["query_tokens"]
    assert run.compression_ratio == 0.5 and run.predictions[0].strip()
    assert 16 * 0.5 * (S - tail) / S < run.bits_per_element < 16 * (0.5 * (S - tail) + tail + 4) / S + 0.1


def test_cache_names():
    assert [c.kind for c in parse_caches("fp16,nuq3,quanto2k,snapkv@nuq2,knorm:0.5")] == [
        "dynamic", "kvquant", "baseline", "press", "press"]
    for bad, msg in [("nuq5", "unknown cache"), ("snapkv@fp16", "quantized datatype"), ("knorm:1.5", "ratio")]:
        with pytest.raises(ValueError, match=msg):
            parse_cache(bad)
    assert ratio_for_bits(3.9) == pytest.approx(1 - 3.9 / 16)


def test_a_rerun_skips_finished_cells(model, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    settings = GridSettings(model_name="char", tasks=["passkey"], lengths=[200], depths=[0, 100], n=1,
                            caches=parse_caches("fp16"), max_new_tokens=3)
    calls = []
    real = grid_mod.run_cell
    monkeypatch.setattr(grid_mod, "run_cell", lambda *a, **k: calls.append(a[3].name) or real(*a, **k))
    evaluate_longctx(model, TOK, settings, ResultsFile(out), encoder=ENC, progress=False)
    assert len(calls) == 1 and len(read_records(out)) == 2  # both depths in one run of the cache, a record each
    recs = read_records(out)
    rec = recs[0]
    assert {"accuracy", "bits_per_element", "kv_bytes", "seconds", "samples"} <= set(rec)
    for r in recs:  # each record holds its own depth's prompts, scored on their own
        own = make_cell("passkey", 200, r["depth"], 1, ENC.count, None, settings.seed, 3)
        assert [x["answers"] for x in r["samples"]] == [list(s.answers) for s in own]
        assert r["accuracy"] == pytest.approx(100.0 * sum(x["score"] for x in r["samples"]) / len(r["samples"]))
        assert r["run_with_depths"] == [0, 100]
    assert evaluate_longctx(model, TOK, settings, ResultsFile(out), encoder=ENC, progress=False) == []
    assert len(calls) == 1
    # a run killed while writing: the last record lost, a torn line left behind
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    new = evaluate_longctx(model, TOK, settings, ResultsFile(out), encoder=ENC, progress=False)
    assert len(new) == 1 and len(calls) == 2 and (new[0]["cache"], new[0]["depth"]) == (json.loads(lines[-1])["cache"],
                                                                                     json.loads(lines[-1])["depth"])
    assert len(read_records(out)) == 2
    # the same grid under a tag (other settings) is other cells
    tagged = evaluate_longctx(model, TOK, dataclasses.replace(settings, tag="r8"), ResultsFile(out), encoder=ENC,
                              progress=False)
    assert [r["cache"] for r in tagged] == ["fp16+r8", "fp16+r8"] and len(read_records(out)) == 4
