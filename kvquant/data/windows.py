"""Turning a text corpus into token windows for perplexity and calibration."""

from __future__ import annotations

from typing import Any

import torch

DOC_SEPARATOR = "<|endoftext|>"


def tokenize_corpus(
    text: str, tokenizer: Any, bos_id: int | None = None, doc_separator: str | None = DOC_SEPARATOR
) -> torch.LongTensor:
    """Tokenize a whole corpus into a 1-D ``LongTensor``.

    The tokenizer is called on the full text with its default special tokens, as the standard
    perplexity evaluation does. ``bos_id``, when given, is the id to prepend because the tokenizer adds
    no BOS itself (see :attr:`kvquant.models.ModelSpec.bos_id`); it is not added twice. With ``bos_id``
    set and ``doc_separator`` present in the text (TinyStories' ``<|endoftext|>``), each document is
    stripped, tokenized on its own and prefixed with ``bos_id`` (the llama2.c training layout) and the
    separators are dropped.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("text to tokenize must be a non-empty string")
    if bos_id is not None and doc_separator and doc_separator in text:
        docs = [d.strip() for d in text.split(doc_separator)]
        return torch.cat([_encode(d, tokenizer, bos_id) for d in docs if d])
    return _encode(text, tokenizer, bos_id)


def _encode(text: str, tokenizer: Any, bos_id: int | None) -> torch.LongTensor:
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    out = torch.as_tensor(ids, dtype=torch.long).flatten()
    if bos_id is not None and (out.numel() == 0 or int(out[0]) != bos_id):
        out = torch.cat([torch.tensor([bos_id], dtype=torch.long), out])
    return out


def _check_ids(ids: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D tensor of token ids, got {type(ids).__name__} {getattr(ids, 'shape', '')}")


def _check_positive(**kw: int | None) -> None:
    for name, value in kw.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def make_windows(
    ids: torch.Tensor, ctx_len: int, stride: int | None = None, max_windows: int | None = None
) -> list[torch.LongTensor]:
    """Cut a 1-D token tensor into windows of exactly ``ctx_len`` tokens.

    By default the windows are non-overlapping (``stride = ctx_len``) and the incomplete tail is dropped:
    the standard WikiText-2 perplexity protocol (``len(ids) // ctx_len`` windows). A smaller ``stride``
    gives overlapping windows starting every ``stride`` tokens. ``max_windows`` keeps only the first ones.
    The windows are views of ``ids``.
    """
    _check_ids(ids)
    _check_positive(ctx_len=ctx_len, stride=stride, max_windows=max_windows)
    n = ids.numel()
    if n < ctx_len:
        raise ValueError(f"corpus has {n} tokens, fewer than ctx_len={ctx_len}; no full window fits")
    step = ctx_len if stride is None else stride
    starts = range(0, n - ctx_len + 1, step)
    if max_windows is not None:
        starts = starts[:max_windows]
    return [ids[s : s + ctx_len] for s in starts]


def sample_calibration_sequences(ids: torch.Tensor, n_seqs: int, seq_len: int, seed: int = 0) -> torch.LongTensor:
    """``n_seqs`` random crops of ``seq_len`` tokens from ``ids`` as an ``[n_seqs, seq_len]`` tensor.

    Start positions are drawn uniformly with a private generator seeded by ``seed``, so the result is
    deterministic for a seed and the global RNG is untouched.
    """
    _check_ids(ids)
    _check_positive(n_seqs=n_seqs, seq_len=seq_len)
    n = ids.numel()
    if n < seq_len:
        raise ValueError(f"corpus has {n} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - seq_len + 1, (n_seqs,), generator=gen)
    offsets = torch.arange(seq_len)
    return ids[starts[:, None] + offsets[None, :]].long()
