"""Calibration and evaluation batches from plain text, with the model's own tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from moee.errors import EmptyDataError


def read_texts(paths: Iterable[str | Path]) -> str:
    """The files' contents joined by blank lines (UTF-8, undecodable bytes replaced)."""
    return "\n\n".join(Path(p).read_text(encoding="utf-8", errors="replace") for p in paths)


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
