"""Long-context task generators (seeded, deterministic, lengths in model tokens, needles at their depth) and RULER's
string-match scoring."""

import random
from collections import Counter

import pytest

from kvquant.eval.longctx.haystack import NOISE, Haystack, insert_at_depths, split_sentences
from kvquant.eval.longctx.scoring import accuracy, clean_prediction, string_match_all, string_match_part
from kvquant.eval.longctx.tasks import TASKS, make_cell, make_sample, parse_tasks
from kvquant.eval.longctx.words import WORDS

ESSAY = " ".join(f"Sentence number {i} talks about {WORDS[i % len(WORDS)]} and nothing else." for i in range(400))


def count(text: str) -> int:  # a stand-in tokenizer: one token per word
    return len(text.split())


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_is_seeded_fits_its_length_and_holds_its_answers(task):
    hay = Haystack(ESSAY)
    a = make_sample(task, 900, 40, 0, count, hay, seed=7)
    assert a == make_sample(task, 900, 40, 0, count, hay, seed=7)
    assert a.prompt != make_sample(task, 900, 40, 0, count, hay, seed=8).prompt
    assert a.prompt != make_sample(task, 900, 40, 1, count, hay, seed=7).prompt
    n = count(a.prompt) + a.max_new_tokens
    assert 900 - 40 < n <= 900  # the most filler that fits (a filler unit is at most ~13 words)
    assert a.answers and all(ans in a.context for ans in a.answers) or task == "cwe"
    assert a.prompt == a.context + a.query and a.query.strip()


@pytest.mark.parametrize("depth", [0, 10, 50, 75, 100])
def test_depth_places_the_needle_where_it_says(depth):
    for task in ("passkey", "niah_single_2"):
        s = make_sample(task, 3000, depth, 0, count, Haystack(ESSAY))
        intro = s.context.index("\n") + 1
        where = (s.needle_chars - intro) / (len(s.context) - intro)
        assert abs(where - depth / 100) < 0.03, (task, where)
        assert s.depth == depth


def test_niah_variants_follow_ruler():
    hay = Haystack(ESSAY)
    mk = make_sample("niah_multikey_1", 1500, 50, 0, count, hay)
    assert mk.context.count("One of the special magic numbers for") == 4 and len(mk.answers) == 1
    mv = make_sample("niah_multivalue", 1500, 50, 0, count, hay)
    key = mv.query.split(" for ")[1].split(" mentioned")[0]
    assert len(mv.answers) == 4 and mv.context.count(f"for {key} is:") == 4
    mq = make_sample("niah_multiquery", 1500, 50, 0, count, hay)
    assert len(mq.answers) == 4 and mq.query.count(" and ") == 2  # "a, b, c and d" twice (question, answer prefix)
    uu = make_sample("niah_multikey_3", 1500, 50, 0, count)
    assert len(uu.answers[0]) == 36 and uu.context.count("One of the special magic uuids") > 20
    noise = make_sample("niah_single_1", 1500, 50, 0, count)
    assert NOISE in noise.context and "Sentence number" not in noise.context
    with pytest.raises(ValueError, match="essays"):
        make_sample("niah_single_2", 1500, 50, 0, count)


def test_vt_and_cwe():
    vt = make_sample("vt", 1500, None, 0, count)
    value = vt.query.split("assigned the value ")[1].split(" ")[0]
    first = vt.answers[0]
    assert f"VAR {first} = {value}." in vt.context
    assert all(f"VAR {b} = VAR {a}." in vt.context for a, b in zip(vt.answers, vt.answers[1:]))
    assert vt.depth is None
    cwe = make_sample("cwe", 3000, None, 0, count)
    words = Counter(w for w in cwe.context.split("\n", 1)[1].split() if not w.endswith("."))
    assert all(words[w] == 30 for w in cwe.answers) and len(cwe.answers) == 10
    assert max(c for w, c in words.items() if w not in cwe.answers) == 3


def test_length_too_short_and_task_names():
    with pytest.raises(ValueError, match="too short"):
        make_sample("passkey", 20, 50, 0, count)
    assert parse_tasks("passkey, vt,passkey") == ["passkey", "vt"]
    assert "passkey" not in parse_tasks("ruler") and len(parse_tasks("all")) == len(TASKS)
    with pytest.raises(ValueError, match="unknown task 'needle'"):
        parse_tasks("needle")
    assert len(make_cell("passkey", 400, 50, 3, count)) == 3


def test_haystack_helpers():
    assert split_sentences("A b. C d?  E!\nF") == ["A b.", "C d?", "E!", "F"]
    units = ["aaaa", "bbbb", "cccc", "dddd"]
    assert insert_at_depths(units, [(0, "X"), (100, "Z"), (50, "Y")]) == ["X", "aaaa", "bbbb", "Y", "cccc", "dddd",
                                                                           "Z"]
    hay = Haystack(ESSAY)
    assert hay.units(3, random.Random(1)) == hay.units(3, random.Random(1))
    with pytest.raises(ValueError, match="sentences"):
        Haystack("Too short.")


def test_ruler_string_match():
    refs = ["123", "456", "789"]
    assert string_match_all("The numbers are 123 and 456.", refs) == pytest.approx(2 / 3)
    assert string_match_all("ABC-def", ["abc-DEF"]) == 1.0  # case-insensitive
    assert string_match_part("only 456 here", refs) == 1.0 and string_match_part("none", refs) == 0.0
    assert clean_prediction("  42\x00 junk") == "42"
    assert string_match_all("12\x0045", ["1245"]) == 0.0
    assert accuracy(["123 456 789", "123"], [refs, refs]) == pytest.approx(100 * (1 + 1 / 3) / 2)
    with pytest.raises(ValueError):
        accuracy([], [])
