"""What the CLI runs on: a dense model from a name, and batches from text files, an image
folder, or the data of the embedded default (moee-lab's)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moee.cli.plugins import embedded_default
from moee.errors import ConfigError


def load_dense(spec: str):
    """(model in eval mode, its tokenizer or image processor or None) for 'default' (the
    embedded ViT), a `.gguf` file (a llama.cpp checkpoint, dequantised to fp32 by
    transformers) or a transformers model directory or hub id (the class its config names,
    e.g. LlamaForCausalLM)."""
    if spec == "default":
        return embedded_default().load_model(), None
    looks_local = spec.endswith(".gguf") or spec.startswith((".", "/", "~"))
    if looks_local and not Path(spec).expanduser().exists():
        raise ConfigError(f"model: {spec} does not exist (a model is 'default', a .gguf "
                          "file, a transformers model directory or a hub id)")
    import torch
    import transformers

    try:
        if spec.endswith(".gguf"):
            folder, name = str(Path(spec).parent), Path(spec).name
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32)
            return model.eval(), transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = transformers.AutoConfig.from_pretrained(spec)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        model = (cls or transformers.AutoModel).from_pretrained(spec).eval()
    except (OSError, ValueError) as e:
        raise ConfigError(f"model: cannot load {spec!r} ({str(e).splitlines()[0]})") from e
    for kind in (transformers.AutoTokenizer, transformers.AutoImageProcessor):
        try:
            return model, kind.from_pretrained(spec)
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return model, None


def check_data(args: argparse.Namespace) -> None:
    """Fail on a missing text file or data folder before any model is loaded."""
    data = getattr(args, "data", None) or []
    missing = [p for p in data if not Path(p).exists()]
    if missing:
        raise ConfigError(f"data: no such file or folder {missing[0]}")
    odd = [p for p in data if not (Path(p).is_file() or Path(p).is_dir())]
    if odd:  # a fifo or a device would block or never end
        raise ConfigError(f"data: {odd[0]} is not a regular file or folder (a fifo, device or "
                          "socket): give text files or one image folder")
    if any(Path(p).is_dir() for p in data) and len(data) > 1:
        raise ConfigError("data: give one image folder, or text files")
    check_default_data = getattr(args, "check_default_data", None)
    if check_default_data is not None:  # the embedded default's own options (plugins.py)
        check_default_data(args)


def user_batches(args: argparse.Namespace, preprocessor, max_tokens: int | None,
                 batch_size: int | None = None):
    """Batches from --data: one image folder (`batch_size` images a batch, default the
    command's --kd-batch-size or --image-batch), or text files."""
    if Path(args.data[0]).is_dir():
        from moee.util.image_folder import image_batches

        if preprocessor is None and args_model(args) == "default":
            preprocessor = embedded_default().preprocess_images
        if preprocessor is None or hasattr(preprocessor, "decode"):
            raise ConfigError("data: an image folder needs a model with an image processor")
        size = getattr(args, "kd_batch_size", None) if max_tokens is None else None
        return image_batches(args.data[0], preprocessor, batch_size or size or args.image_batch)
    from moee.util.text import read_texts, token_batches

    if not hasattr(preprocessor, "decode"):
        raise ConfigError("data: text files need a model with a tokenizer")
    return token_batches(preprocessor, read_texts(args.data), args.seq_len,
                         max_tokens=max_tokens)


def args_model(args: argparse.Namespace) -> str:
    """The dense model a command runs on: --model, --teacher or --dense."""
    for name in ("model", "teacher", "dense"):
        if getattr(args, name, None):
            return getattr(args, name)
    return "default"


def calibration_data(args: argparse.Namespace, tokenizer):
    """Recording batches: the text files' tokens, or the embedded default's."""
    if args.data:
        return user_batches(args, tokenizer, args.tokens)
    return embedded_default().calibration_data(args)


def training_data(args: argparse.Namespace, tokenizer):
    """Distillation batches: the text files' tokens, or the embedded default's."""
    if args.data:
        return user_batches(args, tokenizer, None)
    return embedded_default().training_data(args)


def positions(model) -> int | None:
    """How many positions the model's position embeddings cover (None: no such limit)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(args: argparse.Namespace, model) -> None:
    """Refuse text rows longer than the model's positions before any work (else an
    IndexError deep in the embedding)."""
    limit = positions(model)
    if getattr(args, "data", None) and not Path(args.data[0]).is_dir() and limit is not None \
            and args.seq_len > limit:
        raise ConfigError(f"seq-len: {args.seq_len} tokens a row, but the model has "
                          f"{limit} positions; give --seq-len {limit} or less")


def check_pair(moe_model, dense, role: str) -> None:
    """Refuse a dense `role` model (teacher, reference) whose outputs cannot be compared with
    the MoE model's; warn when it is another model than the one the MoE came from."""
    a, b = getattr(moe_model, "config", None), getattr(dense, "config", None)
    if a is None or b is None:
        return
    for key in ("vocab_size", "num_labels"):
        x, y = getattr(a, key, None), getattr(b, key, None)
        if key == "num_labels" and getattr(a, "vocab_size", None) is not None:
            continue  # a language model's labels are its vocabulary
        if x is not None and y is not None and x != y:
            raise ConfigError(f"{role}: its {key} is {y}, the MoE model's {x}: their outputs "
                              f"cannot be compared; give the model the checkpoint came from")
    differ = [k for k in ("model_type", "hidden_size", "num_hidden_layers")
              if getattr(a, k, None) != getattr(b, k, None)]
    if differ:
        print(f"moee: warning: the {role} differs from the model the checkpoint came from in "
              f"{', '.join(differ)}")

