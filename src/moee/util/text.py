"""Calibration and evaluation batches from plain text, with the model's own tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from moee.errors import ConfigError, EmptyDataError


def read_texts(paths: Iterable[str | Path], max_undecodable: float = 0.01) -> str:
    """The files' contents joined by blank lines (UTF-8, undecodable bytes replaced). A file
    with NUL bytes or more than `max_undecodable` of its characters undecodable is refused:
    it is not text, and calibrating on replacement characters would give a useless model."""
    texts = []
    for p in paths:
        raw = Path(p).read_bytes()
        text = raw.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") + text.count("\x00")
        if text and bad > max_undecodable * len(text):
            raise ConfigError(f"data: {p} is not UTF-8 text ({bad:,} of {len(text):,} "
                              "characters are NUL or undecodable); give plain text files")
        texts.append(text)
    return "\n\n".join(texts)


def token_batches(tokenizer, text: str, length: int = 256, batch_size: int = 4,
                  max_tokens: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Keyword batches (`input_ids`, `attention_mask`) of `batch_size` rows of `length`
    consecutive tokens of `text`, at most `max_tokens` tokens in all; the tail that does not
    fill a row is dropped, so no padding is needed."""
    ids = torch.as_tensor(tokenizer(text, return_tensors="pt")["input_ids"]).reshape(-1)
    usable = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    rows = ids[: usable // length * length].view(-1, length)  # (rows, length)
    if len(rows) == 0:
        raise EmptyDataError(f"the text gave {len(ids)} tokens, fewer than one row of {length}")
    return [{"input_ids": r, "attention_mask": torch.ones_like(r)}
            for r in rows.split(batch_size)]
