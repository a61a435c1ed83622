"""Long-context retrieval through the cache: passkey and RULER's synthetic tasks, run over kvquant caches,
transformers' KIVI-style ``QuantizedCache`` and kvpress eviction at equal memory.

* :mod:`~kvquant.eval.longctx.tasks`: seeded task generators (:func:`make_cell`, :data:`TASKS`);
* :mod:`~kvquant.eval.longctx.scoring`: RULER's string match;
* :mod:`~kvquant.eval.longctx.caches`: the caches by name;
* :mod:`~kvquant.eval.longctx.runner`: one cell through one cache (batched ``generate``);
* :mod:`~kvquant.eval.longctx.grid`: every cell, resumable;
* :mod:`~kvquant.eval.longctx.results`: the JSON-lines results file.
"""

from kvquant.eval.longctx.grid import GridSettings, evaluate_longctx
from kvquant.eval.longctx.results import ResultsFile
from kvquant.eval.longctx.scoring import accuracy, string_match_all, string_match_part
from kvquant.eval.longctx.tasks import TASKS, Sample, make_cell, make_sample

__all__ = ["TASKS", "GridSettings", "ResultsFile", "Sample", "accuracy", "evaluate_longctx", "make_cell",
           "make_sample", "string_match_all", "string_match_part"]
