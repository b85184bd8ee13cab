"""Token batches from text."""

import pytest
import torch

import moee
from moee.util.text import read_texts, token_batches


def char_tokenizer(text, return_tensors="pt"):
    """One token per character: enough to check the batching."""
    return {"input_ids": torch.tensor([[ord(c) % 50 for c in text]])}


def test_token_batches_are_consecutive_rows_without_padding(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefghij")
    (tmp_path / "b.txt").write_text("klmnopqrst")
    text = read_texts([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert text == "abcdefghij\n\nklmnopqrst"
    batches = token_batches(char_tokenizer, text, length=4, batch_size=2, max_tokens=17)
    assert [b["input_ids"].shape for b in batches] == [(2, 4), (2, 4)]  # 16 of 17 tokens
    flat = torch.cat([b["input_ids"].reshape(-1) for b in batches])
    assert flat.tolist() == [ord(c) % 50 for c in text[:16]]
    assert all(b["attention_mask"].all() for b in batches)
    with pytest.raises(moee.EmptyDataError, match="fewer than one row"):
        token_batches(char_tokenizer, "abc", length=4)
