"""How closely a MoE model follows its dense reference on unlabelled data: agreement of their
top-1 predictions, cosine of mean-pooled outputs, and, for causal language models, each one's
perplexity on the data's next tokens. Padding is excluded everywhere."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from moee.errors import EmptyDataError
from moee.util.batches import (
    Batch,
    call_model,
    mean_pooled,
    model_inputs,
    output_tensor,
    token_mask,
)
from moee.util.modes import eval_mode


def _is_causal_lm(model: nn.Module) -> bool:
    """transformers' naming: LlamaForCausalLM, GPT2LMHeadModel, ..."""
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def _next_token_nll(logits: torch.Tensor, batch: Batch) -> tuple[float, int]:
    """Summed cross-entropy of each position's prediction of the next real token."""
    ids = model_inputs(batch)["input_ids"]
    mask = token_mask(batch)
    keep = torch.ones_like(ids[:, 1:], dtype=torch.bool) if mask is None else \
        mask[:, 1:] & mask[:, :-1]
    loss = F.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep], reduction="sum")
    return float(loss), int(keep.sum())


@torch.inference_mode()
def perplexity(model: nn.Module, data: Iterable[Batch]) -> float:
    """A causal LM's perplexity on `data`: exp of the mean cross-entropy of each position's
    prediction of the next real token (padding left out)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in data:
            s, n = _next_token_nll(output_tensor(call_model(model, batch)), batch)
            total, count = total + s, count + n
    if count == 0:
        raise EmptyDataError("perplexity() got no next tokens to predict")
    return math.exp(total / count)


@torch.inference_mode()
def fidelity(model: nn.Module, reference: nn.Module, data: Iterable[Batch]) -> dict[str, float]:
    """`top1_agreement` (share of examples, or real tokens, where both models' argmax agree),
    `cosine` (mean cosine of the outputs mean-pooled over real tokens: sentence embeddings for
    encoders), and `perplexity` / `reference_perplexity` when the reference is a causal LM."""
    causal = _is_causal_lm(reference) or _is_causal_lm(getattr(model, "model", model))
    agree = count = 0
    cosines: list[torch.Tensor] = []
    nll = {"perplexity": [0.0, 0], "reference_perplexity": [0.0, 0]}
    with eval_mode(model), eval_mode(reference):
        for batch in data:
            out, ref = (output_tensor(call_model(m, batch)) for m in (model, reference))
            mask = token_mask(batch)
            if mask is not None and out.dim() == 3 and tuple(out.shape[:2]) == tuple(mask.shape):
                rows, ref_rows = out[mask], ref[mask]
                pooled = [mean_pooled(t, mask) for t in (out, ref)]
            else:
                rows, ref_rows = out.flatten(0, -2), ref.flatten(0, -2)
                pooled = [t.flatten(1) if t.dim() > 1 else t for t in (out, ref)]
            agree += int((rows.argmax(-1) == ref_rows.argmax(-1)).sum())
            count += rows.shape[0]
            cosines.append(F.cosine_similarity(pooled[0].float(), pooled[1].float(), dim=-1))
            if causal:
                for key, logits in (("perplexity", out), ("reference_perplexity", ref)):
                    s, n = _next_token_nll(logits, batch)
                    nll[key][0] += s
                    nll[key][1] += n
    if count == 0:
        raise EmptyDataError("fidelity() got no examples")
    result = {"top1_agreement": agree / count, "cosine": float(torch.cat(cosines).mean()),
              "examples": count}
    if causal:
        result.update({k: math.exp(s / max(n, 1)) for k, (s, n) in nll.items()})
    return result
