"""Text corpora and token windows for perplexity evaluation and calibration."""

from kvquant.data.paths import find_shared_dir, repo_root
from kvquant.data.text import DATASETS, load_text
from kvquant.data.windows import DOC_SEPARATOR, make_windows, sample_calibration_sequences, tokenize_corpus

__all__ = [
    "DATASETS",
    "DOC_SEPARATOR",
    "find_shared_dir",
    "load_text",
    "make_windows",
    "repo_root",
    "sample_calibration_sequences",
    "tokenize_corpus",
]
