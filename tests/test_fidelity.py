"""moee.fidelity against exact references: perplexity over real next tokens only, agreement
and cosine of identical and of different models."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import text_batches, tiny_bert
from transformers import LlamaConfig, LlamaForCausalLM

import moee
from moee.fidelity import perplexity


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1)).eval()


def padded_batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, 3:] = 0
    return [{"input_ids": ids, "attention_mask": mask}]


def test_perplexity_counts_only_real_next_tokens():
    model, batches = tiny_llama(), padded_batches()
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    with torch.no_grad():
        logits = model(**batches[0]).logits
    nll, n = 0.0, 0
    for row in range(3):  # by hand: each real position predicting the next real token
        real = int(mask[row].sum())
        nll += float(F.cross_entropy(logits[row, : real - 1], ids[row, 1:real], reduction="sum"))
        n += real - 1
    result = moee.fidelity(model, model, batches)
    assert math.isclose(result["perplexity"], math.exp(nll / n), rel_tol=1e-5)
    assert result["perplexity"] == result["reference_perplexity"]
    assert math.isclose(perplexity(model, batches), math.exp(nll / n), rel_tol=1e-5)
    assert result["top1_agreement"] == 1.0 and result["examples"] == int(mask.sum())
    assert math.isclose(result["cosine"], 1.0, rel_tol=1e-6)


def test_different_models_disagree_and_encoders_get_no_perplexity():
    a, b = tiny_llama(0), tiny_llama(1)
    result = moee.fidelity(a, b, padded_batches())
    assert result["top1_agreement"] < 1.0 and result["cosine"] < 0.999
    assert result["perplexity"] != result["reference_perplexity"]
    bert = tiny_bert(dropout=0.0)
    encoded = moee.fidelity(bert, tiny_bert(seed=1, dropout=0.0), text_batches(2))
    assert "perplexity" not in encoded and -1 <= encoded["cosine"] < 0.999


def test_perplexity_of_no_next_token_is_refused():
    one_token = [{"input_ids": torch.tensor([[3]]), "attention_mask": torch.tensor([[1]])}]
    with pytest.raises(moee.MoeeError, match="no next tokens"):
        perplexity(tiny_llama(), one_token)
