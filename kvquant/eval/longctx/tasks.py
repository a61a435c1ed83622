"""Seeded, deterministic long-context tasks: passkey retrieval and RULER's synthetic tasks.

Every task builds a prompt of at most ``length`` model tokens, *including* the tokens the answer may take
(``max_new_tokens``), as RULER does, by fitting the amount of haystack with the model's own tokenizer. A prompt is
split into ``context`` (everything before the question: what a cache compresses) and ``query`` (the question and
the answer prefix), so that a runner can feed the query after the context has been cached. Prompts are template-free
text that a base or instruction-tuned model continues.

Tasks (RULER's names and definitions, Hsieh et al. 2024; passkey as Landmark Attention / KVQuant run it):

========================  ======================  ========================  =====================  ==========
task                      haystack                needles (keys x values)   query                  scoring
========================  ======================  ========================  =====================  ==========
``passkey``               grass-is-green noise    one 5-digit pass key      the pass key           all
``niah_single_1``         noise                   1 word key -> number      that key               all
``niah_single_2``         essays                  1 word key -> number      that key               all
``niah_single_3``         essays                  1 word key -> UUID        that key               all
``niah_multikey_1``       essays                  4 word keys -> numbers    one of them            all
``niah_multikey_2``       other needles           word key -> number        one key                all
``niah_multikey_3``       other needles           UUID key -> UUID          one key                all
``niah_multivalue``       essays                  1 word key -> 4 numbers   that key (4 answers)   all
``niah_multiquery``       essays                  4 word keys -> numbers    all 4 keys             all
``vt``                    noise                   a chain of 4 hops         the chain's variables  all
``cwe``                   a numbered word list    10 words x30, rest x3     the 10 most common     all
========================  ======================  ========================  =====================  ==========

Word keys are RULER's ``adjective-noun``-style pairs (two words of :data:`~kvquant.eval.longctx.words.WORDS`). The
queried needle sits at the cell's ``depth`` (percent of the haystack); other needles at seeded random depths. ``vt``
and ``cwe`` have no depth (``None``). Samples are seeded by ``(seed, task, length, depth, index)`` through a string
seed, so a sample never depends on the order in which cells are built.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

from kvquant.eval.longctx.haystack import NOISE, Haystack, insert_at_depths
from kvquant.eval.longctx.words import WORDS, random_number, random_uuid, random_variable, sample_words

CountTokens = Callable[[str], int]
"""Number of model tokens of a text (as the runner will tokenize it, BOS included)."""


@dataclass(frozen=True)
class Sample:
    """One prompt and its reference answers.

    Attributes:
        task, length, depth, index: the cell (``depth`` in percent, ``None`` for tasks without one) and the
            sample's number in it.
        context: the prompt up to the question.
        query: the question and answer prefix; the prompt is ``context + query``.
        answers: every string the answer must contain (RULER ``string_match_all``).
        max_new_tokens: the answer budget (counted in ``length``).
        needle_chars: character offset of the queried needle in ``context`` (``-1`` when there is none).
    """

    task: str
    length: int
    depth: float | None
    index: int
    context: str
    query: str
    answers: tuple[str, ...]
    max_new_tokens: int
    needle_chars: int = -1

    @property
    def prompt(self) -> str:
        return self.context + self.query

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TaskDef:
    """How one task is built: ``build(n, rng, depth) -> (context, query, answers, needle text)`` for ``n`` filler
    units; ``uses_depth``: whether cells have a needle depth; ``essay``: whether the filler is the essay text."""

    name: str
    build: Callable[[int, random.Random, float, Haystack], tuple[str, str, tuple[str, ...], str]]
    max_new_tokens: int
    uses_depth: bool = True
    essay: bool = False


# ----------------------------------------------------------------------------------------------------
# passkey (Landmark Attention, KVQuant)

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")


def _passkey(n: int, rng: random.Random, depth: float, hay: Haystack):
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    body = insert_at_depths([NOISE] * n, [(depth, needle)])
    context = PASSKEY_INTRO + "\n" + " ".join(body)
    return context, "\nWhat is the pass key? The pass key is", (key,), needle


# ----------------------------------------------------------------------------------------------------
# RULER needle-in-a-haystack family

NIAH_INTRO = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the {kind} afterwards.")
NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_QUESTION = "\nWhat are all the special magic {kind} for {query} mentioned in the provided text?"
NIAH_ANSWER = " The special magic {kind} for {query} mentioned in the provided text are"


def _word_keys(rng: random.Random, n: int) -> list[str]:
    keys: set[str] = set()
    while len(keys) < n:
        a, b = sample_words(rng, 2)
        keys.add(f"{a}-{b}")
    return sorted(keys, key=lambda _: rng.random())


def _niah(keys: str = "words", values: str = "numbers", haystack: str = "essay", n_keys: int = 1, n_values: int = 1,
          n_queries: int = 1):
    """A RULER needle task builder (see the module table)."""
    kind = "uuids" if values == "uuids" else "numbers"

    def value(rng: random.Random) -> str:
        return random_uuid(rng) if values == "uuids" else random_number(rng)

    def key_list(rng: random.Random, n: int) -> list[str]:
        return [random_uuid(rng) for _ in range(n)] if keys == "uuids" else _word_keys(rng, n)

    def build(n: int, rng: random.Random, depth: float, hay: Haystack):
        names = key_list(rng, n_keys)
        pairs = [(k, [value(rng) for _ in range(n_values)]) for k in names]
        needles = [NIAH_NEEDLE.format(kind=kind, key=k, value=v) for k, vs in pairs for v in vs]
        # the first needle is the queried one (first value of the first queried key); it goes at `depth`
        items = [(depth, needles[0])] + [(rng.uniform(0, 100), t) for t in needles[1:]]
        if haystack == "needles":  # RULER's multikey_2/3: the haystack is made of other keys' needles
            distractors = key_list(rng, n + n_keys)
            filler = [NIAH_NEEDLE.format(kind=kind, key=k, value=value(rng)) for k in distractors if k not in names]
            filler = filler[:n]
        else:
            filler = hay.units(n, rng) if haystack == "essay" else [NOISE] * n
        body = insert_at_depths(filler, items)
        queried = pairs[:n_queries]
        query = ", ".join(k for k, _ in queried[:-1]) + (" and " if len(queried) > 1 else "") + queried[-1][0]
        answers = tuple(v for _, vs in queried for v in vs)
        context = NIAH_INTRO.format(kind=kind) + "\n" + " ".join(body)
        return (context, NIAH_QUESTION.format(kind=kind, query=query) + NIAH_ANSWER.format(kind=kind, query=query),
                answers, needles[0])

    return build


# ----------------------------------------------------------------------------------------------------
# variable tracking and common-word extraction

VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
             "assgined the value {value}, they are: ")  # RULER's spelling, kept: models are scored on its prompts


def _vt(num_hops: int = 4):
    def build(n: int, rng: random.Random, depth: float, hay: Haystack):
        names: list[str] = []
        for _ in range(num_hops + 1):
            names.append(random_variable(rng, set(names)))
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
        depths = sorted(rng.uniform(0, 100) for _ in chain)
        body = insert_at_depths([NOISE] * n, list(zip(depths, chain)))
        context = VT_INTRO + "\n" + " ".join(body)
        return (context, VT_QUESTION.format(value=value) + VT_ANSWER.format(n=len(names), value=value),
                tuple(names), chain[0])

    return build


CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
             "ones that appear most often.")
CWE_QUESTION = "\nQuestion: What are the {n} most common words in the above list?"
CWE_ANSWER = " Answer: The top {n} words that appear most often in the list are:"

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _pseudo_words(rng: random.Random, n: int, avoid: list[str]) -> list[str]:
    """``n`` distinct made-up three-syllable words containing none of ``avoid`` (the uncommon words beyond the
    built-in pool, for long lists)."""
    out: set[str] = set()
    while len(out) < n:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(3))
        if not any(a in w or w in a for a in avoid):
            out.add(w)
    return sorted(out, key=lambda _: rng.random())


def _cwe(num_cw: int = 10, freq_cw: int = 30, freq_ucw: int = 3):
    """``n`` (the filler units) is the number of uncommon words, each listed ``freq_ucw`` times."""

    def build(n: int, rng: random.Random, depth: float, hay: Haystack):
        common = sample_words(rng, num_cw)
        pool = [w for w in WORDS if w not in common and not any(c in w or w in c for c in common)]
        uncommon = rng.sample(pool, min(n, len(pool)))
        if n > len(uncommon):
            uncommon += _pseudo_words(rng, n - len(uncommon), common)
        words = common * freq_cw + uncommon * freq_ucw
        rng.shuffle(words)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return (CWE_INTRO + "\n" + listing, CWE_QUESTION.format(n=num_cw) + CWE_ANSWER.format(n=num_cw),
                tuple(common), "")

    return build


TASKS: dict[str, TaskDef] = {t.name: t for t in (
    TaskDef("passkey", _passkey, 8),
    TaskDef("niah_single_1", _niah(haystack="noise"), 24),
    TaskDef("niah_single_2", _niah(), 24, essay=True),
    TaskDef("niah_single_3", _niah(values="uuids"), 48, essay=True),
    TaskDef("niah_multikey_1", _niah(n_keys=4), 24, essay=True),
    TaskDef("niah_multikey_2", _niah(haystack="needles"), 24),
    TaskDef("niah_multikey_3", _niah(keys="uuids", values="uuids", haystack="needles"), 48),
    TaskDef("niah_multivalue", _niah(n_values=4), 64, essay=True),
    TaskDef("niah_multiquery", _niah(n_keys=4, n_queries=4), 64, essay=True),
    TaskDef("vt", _vt(), 32, uses_depth=False),
    TaskDef("cwe", _cwe(), 96, uses_depth=False),
)}
"""Every task by name. ``max_new_tokens`` is the answer budget (RULER gives 128 to needles, 30 to ``vt``, 120 to
``cwe``; the budgets here fit the answers of each task with room to spare)."""

RULER_TASKS = tuple(n for n in TASKS if n != "passkey")


def parse_tasks(text: str) -> list[str]:
    """Comma list of task names; ``ruler`` stands for every RULER task, ``all`` for every task.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    out: list[str] = []
    for name in (t.strip().lower() for t in text.split(",") if t.strip()):
        if name == "all":
            out += list(TASKS)
        elif name == "ruler":
            out += list(RULER_TASKS)
        elif name in TASKS:
            out.append(name)
        else:
            raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)} (or ruler, all)")
    if not out:
        raise ValueError("no task given")
    return list(dict.fromkeys(out))


def sample_seed(seed: int, task: str, length: int, depth: float | None, index: int) -> str:
    """The string seed of one sample (``random.Random(str)`` is stable across runs and Python versions)."""
    return f"kvquant-longctx/{seed}/{task}/{length}/{depth}/{index}"


def make_sample(task: str, length: int, depth: float | None, index: int, count_tokens: CountTokens,
                haystack: Haystack | None = None, seed: int = 0, max_new_tokens: int | None = None) -> Sample:
    """Build sample ``index`` of a cell: the most filler such that ``context + query`` has at most
    ``length - max_new_tokens`` tokens.

    Args:
        task: a name of :data:`TASKS`.
        length: the cell's length in model tokens (prompt plus answer budget).
        depth: percent of the haystack before the queried needle (``None`` for tasks without depth: ignored).
        index: the sample's number within the cell.
        count_tokens: tokens of a text, as the model will see it.
        haystack: the essay haystack (the tasks that need one raise without it).
        seed: the run's seed.
        max_new_tokens: the answer budget (default: the task's).

    Raises:
        ValueError: unknown task, a task that needs essays without them, or a length too short for the task's
            fixed text.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    spec = TASKS[task]
    if spec.essay and (haystack is None or haystack.is_noise):
        raise ValueError(f"task {task} hides its needle in essays: pass a haystack text")
    hay = haystack or Haystack()
    budget = max_new_tokens if max_new_tokens is not None else spec.max_new_tokens
    d = float(depth) if spec.uses_depth and depth is not None else 50.0
    key = sample_seed(seed, task, length, depth if spec.uses_depth else None, index)

    def build(n: int):
        return spec.build(n, random.Random(key), d, hay)

    def fits(n: int) -> bool:
        context, query, _, _ = build(n)
        return count_tokens(context + query) + budget <= length

    if not fits(1):
        raise ValueError(f"length {length} is too short for task {task} (its fixed text and a {budget}-token answer "
                         "do not fit)")
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    context, query, answers, needle = build(lo)
    return Sample(task, length, depth if spec.uses_depth else None, index, context, query, answers, budget,
                  context.find(needle) if needle else -1)


def make_cell(task: str, length: int, depth: float | None, n: int, count_tokens: CountTokens,
              haystack: Haystack | None = None, seed: int = 0, max_new_tokens: int | None = None) -> list[Sample]:
    """The ``n`` samples of one (task, length, depth) cell (see :func:`make_sample`)."""
    return [make_sample(task, length, depth, i, count_tokens, haystack, seed, max_new_tokens) for i in range(n)]
