"""The batch kinds moee accepts everywhere: a tensor, an (inputs, labels) pair, or a dict of
keyword inputs (e.g. `input_ids` + `attention_mask` for BERT or LLaMA)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moee.errors import BadBatchError, NonFiniteError

Batch = Any  # torch.Tensor | tuple | list | dict[str, Any]


def model_inputs(batch: Batch) -> Batch:
    """What goes into the model: the tensor, the pair's first element, or the dict."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise BadBatchError("an empty tuple is not a batch: pass a tensor, (inputs, labels) "
                                "or a dict of keyword inputs")
        return batch[0]
    return batch


def check_batch(batch: Batch, index: int) -> None:
    """Refuse, naming the batch, inputs that are not tensors (or a dict holding tensors) and
    float inputs with NaN or Inf: both would fail or poison results deep inside a stage."""
    inputs = model_inputs(batch)
    if isinstance(inputs, torch.Tensor):
        tensors = [inputs]
    elif isinstance(inputs, dict):
        tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    else:
        tensors = []
    if not tensors:
        hint = " (convert with torch.from_numpy)" if type(inputs).__module__ == "numpy" else ""
        raise BadBatchError(
            f"batch {index}: the model inputs are a {type(inputs).__name__}{hint}; a batch is a "
            "tensor, an (inputs, labels) pair or a dict of keyword tensors")
    for t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"batch {index}: the inputs hold NaN or Inf values")


def call_model(model: nn.Module, batch: Batch) -> Any:
    """`model(**batch)` for dicts, else `model(inputs)`."""
    inputs = model_inputs(batch)
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output: `logits` if it has them, else `last_hidden_state`
    (encoders such as BERT), else the output itself."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """The same batch with its tensors on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def mean_pooled(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) hidden states -> (B, d) means over the real tokens (all tokens without a
    mask): the sentence embedding sentence-transformers encoders return."""
    if mask is None:
        return h.mean(1)
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


def token_mask(batch: Batch) -> torch.Tensor | None:
    """(B, T) bool mask of real tokens when the batch carries an `attention_mask`."""
    inputs = model_inputs(batch)
    if isinstance(inputs, dict) and inputs.get("attention_mask") is not None:
        return inputs["attention_mask"].bool()
    return None
