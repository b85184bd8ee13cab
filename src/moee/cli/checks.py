"""Checks of a command's options, run before any model loads where they can be, so a bad
option costs neither work nor a traceback: the device, the seed, where --json goes, the
inputs' kinds (--gguf-metadata, a moee checkpoint given as a dense model), and options that
would have no effect."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

from moee.checkpoint.io import CONFIG_NAME
from moee.cli.options import SEED_MAX, extract_config
from moee.cli.provenance import recorded
from moee.config import ExtractConfig
from moee.errors import ConfigError
from moee.export.verify import is_gguf_file
from moee.extraction.cluster import check_min_samples
from moee.util.batches import Batch, model_inputs

# Export options and the formats they apply to (elsewhere they would be ignored).
FORMAT_OPTIONS = {"quantize": ("onnx",), "graph": ("onnx",), "dtype": ("mixtral",),
                  "gguf_type": ("gguf",), "gguf_metadata": ("gguf",)}
# Clustering algorithms that make a fixed number of clusters (cluster.n_clusters).
FIXED_COUNT = ("kmeans", "birch", "random")
# The options naming a dense model, by command.
DENSE_OPTIONS = {"extract": "model", "finetune": "teacher", "evaluate": "dense"}


def check_before_work(args: argparse.Namespace) -> None:
    """Every check that needs no model: run before anything loads."""
    check_device(getattr(args, "device", None))
    seed = getattr(args, "seed", None)
    if isinstance(seed, int) and not 0 <= seed <= SEED_MAX:  # moee-lab's commands too
        raise ConfigError(f"seed: must be in [0, {SEED_MAX}], got {seed}")
    check_json_out(getattr(args, "json", None))
    if args.command == "export":
        check_export_options(args)
    option = DENSE_OPTIONS.get(args.command)
    if option is not None:
        refuse_moe_checkpoint(option, getattr(args, option, None))
    if args.command == "extract":
        config = extract_config(args)
        check_top_k(config)
        if config.carve is None:  # at most --tokens are recorded: refused before recording
            c = config.cluster
            check_min_samples(c, min(config.record.n_tokens, c.max_tokens or 2**62))


def check_device(spec: str | None) -> None:
    """Refuse a --device torch cannot use here ('auto' is moee-lab's: whatever is there)."""
    if spec is None or spec in ("cpu", "auto"):
        return
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"device: {spec!r} is not a device ({e})") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is None and n > 0 or device.index is not None and device.index < n:
            return
        raise ConfigError(f"device: {spec}, but torch sees {n} CUDA device(s) here (torch "
                          f"{torch.__version__}); give --device cpu")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"device: torch cannot use {spec!r} here ({why}); give --device "
                          "cpu") from None


def check_json_out(path: str | None) -> None:
    """Refuse a --json file that could not be written after the work: '', a folder, or a
    file in a folder that does not exist or may not be written."""
    if path is None:
        return
    target = Path(path).expanduser()
    if not path.strip() or target.is_dir():
        raise ConfigError(f"json: {path!r} is not a file name: give the file to write")
    folder = target.parent
    if not folder.is_dir():
        raise ConfigError(f"json: the folder {folder} does not exist: create it or choose "
                          "another --json")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"json: cannot write into {folder} (permission denied)")


def check_export_options(args: argparse.Namespace) -> None:
    """Refuse an option of another format than --to, and a --gguf-metadata that is not a
    GGUF file."""
    for name, formats in FORMAT_OPTIONS.items():
        if getattr(args, name, None) is not None and args.to not in formats:
            hint = "; gguf's weights' type is --gguf-type" if name == "dtype" else ""
            raise ConfigError(f"--{name.replace('_', '-')} applies to --to "
                              f"{' / '.join(formats)}, not --to {args.to}{hint}")
    path = getattr(args, "gguf_metadata", None)
    if path is None:
        return
    file = Path(path).expanduser()
    if not file.exists():
        raise ConfigError(f"gguf-metadata: {path} does not exist")
    if not file.is_file():
        raise ConfigError(f"gguf-metadata: {path} is not a file; give a GGUF of the source model")
    if not is_gguf_file(file):
        raise ConfigError(f"gguf-metadata: {path} is not a GGUF file (it does not start with "
                          "the GGUF magic)")


def refuse_moe_checkpoint(option: str, spec: str | None) -> None:
    """Refuse a moee checkpoint where a dense model is expected: transformers would load it
    with freshly initialised MLPs."""
    if not spec or not (Path(spec).expanduser() / CONFIG_NAME).is_file():
        return
    source = recorded(Path(spec).expanduser()).get("model")
    dense = f"the dense model it came from ({source})" if isinstance(source, str) \
        else "the dense model it came from"
    further = f", or `moee finetune {spec}` to train it further" if option == "model" else ""
    raise ConfigError(f"{option}: {spec} is a moee checkpoint ({CONFIG_NAME}), not a dense "
                      f"model: give {dense}{further}")


def check_top_k(config: ExtractConfig) -> None:
    """Refuse --top-k at or above the experts a layer can end with (--max-experts, or the
    fixed cluster count of k-means, BIRCH, random and static): every token would compute
    every expert, routing nothing."""
    c, k = config.cluster, config.router.top_k
    caps = [(c.max_clusters, "--max-experts")] if c.max_clusters else []
    if c.algorithm in FIXED_COUNT:
        caps.append((c.n_clusters, f"{c.algorithm} clustering makes {c.n_clusters}"))
    if config.carve is not None or k <= 1 or not caps:
        return
    cap, why = min(caps)
    if k >= cap:
        raise ConfigError(f"top-k: {k}, but a layer keeps at most {cap} experts ({why}): "
                          "every token would compute every expert; give a smaller --top-k")


def warn_top_k(config: ExtractConfig, layers: list[dict]) -> None:
    """Name the MoE layers that ended with no more experts than --top-k: their tokens all
    compute the same union (a static pruning)."""
    k = config.router.top_k
    if config.carve is not None or k <= 1:
        return
    few = [r["site"] for r in layers if r.get("p") is not None and 0 < r["experts"] <= k]
    if few:
        print(f"moee: warning: --top-k {k} reaches every expert of {', '.join(few)}: those "
              "layers route nothing (every token computes all their experts)", file=sys.stderr)


def check_perplexity_rows(args: argparse.Namespace, dense: nn.Module) -> None:
    """Refuse text rows of one token for a causal LM: perplexity needs a next token."""
    name = type(dense).__name__
    text = getattr(args, "data", None) and not Path(args.data[0]).is_dir()
    if text and args.seq_len < 2 and name.endswith(("ForCausalLM", "LMHeadModel")):
        raise ConfigError(f"seq-len: {args.seq_len} token a row, but perplexity needs at "
                          "least 2 (a token and the next one); give --seq-len 2 or more")


def note_short_batch(asked: int, batch: Batch) -> None:
    """Say so when the data gave fewer rows than --batch: the timing is at that batch size."""
    inputs = model_inputs(batch)
    first = next(iter(inputs.values()), None) if isinstance(inputs, dict) else inputs
    rows = first.shape[0] if isinstance(first, torch.Tensor) and first.ndim else None
    if rows is not None and rows < asked:
        print(f"moee: note: --batch {asked}, but the data holds {rows} rows: the executions "
              f"were timed at batch {rows}", file=sys.stderr)
