"""What the CLI runs on: a dense model from a name, and batches from text files or
Fashion-MNIST."""

from __future__ import annotations

import argparse
from pathlib import Path

from moee.errors import ConfigError


def load_dense(spec: str):
    """(model in eval mode, its tokenizer or None) for 'default' (the embedded ViT), a `.gguf`
    file (a llama.cpp checkpoint, dequantised to fp32 by transformers) or a transformers model
    directory or hub id (the class its config names, e.g. LlamaForCausalLM)."""
    if spec == "default":
        from moee.demo import load_default_model

        return load_default_model(), None
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
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # an image model
    return model, tokenizer


def check_data(args: argparse.Namespace) -> None:
    """Fail on a missing text file or data folder before any model is loaded."""
    missing = [p for p in getattr(args, "data", None) or [] if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"data: no such file {missing[0]}")
    if args.data_dir is not None and not args.download and not Path(args.data_dir).is_dir():
        raise ConfigError(f"data-dir: the data folder {args.data_dir} does not exist")


def _text_batches(args: argparse.Namespace, tokenizer, max_tokens: int | None):
    from moee.text import read_texts, token_batches

    if tokenizer is None:
        raise ConfigError("data: text files need a model with a tokenizer")
    return token_batches(tokenizer, read_texts(args.data), args.seq_len, max_tokens=max_tokens)


def calibration_data(args: argparse.Namespace, tokenizer):
    """Recording batches: the text files' tokens, or shuffled Fashion-MNIST training images."""
    if args.data:
        return _text_batches(args, tokenizer, args.tokens)
    from moee.demo import load_fashion_mnist
    from moee.demo.pipeline import calibration_batches

    train_x, _ = load_fashion_mnist("train", args.data_dir, args.download)
    return calibration_batches(train_x, args.seed)


def training_data(args: argparse.Namespace, tokenizer):
    """Distillation batches: the text files' tokens, or augmented Fashion-MNIST images."""
    if args.data:
        return _text_batches(args, tokenizer, None)
    from moee.demo import TrainingBatches, load_fashion_mnist

    train_x, _ = load_fashion_mnist("train", args.data_dir, args.download)
    return TrainingBatches(train_x, args.kd_batch_size, seed=args.seed)
