"""Where a command may write (`--out`), checked before any work: never '', never an input or a
folder holding one, and never over something the command did not make unless `--overwrite`
is given. A replaced output is swapped atomically (moee.util.atomic.replacing_dir)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from moee.checkpoint.io import CONFIG_NAME
from moee.errors import ConfigError, OutputError
from moee.export.verify import is_gguf_file

STATE_DIR = "distill_state"  # `moee finetune` keeps its resume state here, inside --out
SOURCE_FILE = "moee_source.json"  # extract and finetune record the dense model's name in it
# What an earlier output of each kind is, as the errors name it.
KINDS = {"checkpoint": "a moee checkpoint", "mixtral": "an earlier Mixtral export",
         "onnx": "an ONNX file", "gguf": "a GGUF file"}
FILE_KINDS = ("onnx", "gguf")
# The options naming what a command reads; --work-dir may hold the output, not be it.
INPUTS = (("checkpoint", "the checkpoint"), ("model", "--model"), ("teacher", "--teacher"),
          ("tokenizer", "--tokenizer"), ("gguf_metadata", "--gguf-metadata"),
          ("data_dir", "--data-dir"), ("work_dir", "--work-dir"))


def add_out_args(p: argparse.ArgumentParser, kind: str, help: str | None = None) -> None:
    """--out and --overwrite; `kind`: what the command writes ("checkpoint", or "export":
    the kind --to names)."""
    p.add_argument("--out", required=True, help=help)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out even when it is not an earlier output of "
                   "this command (what it holds is deleted)")
    p.set_defaults(out_kind=kind)


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, an --out (and --work-dir) that cannot or must not be written;
    --out is made absolute. Nothing is created here."""
    check_writable("work-dir", getattr(args, "work_dir", None))
    out = getattr(args, "out", None)
    if out is None:
        return
    if not out.strip():
        raise OutputError("--out is '' (empty): name the folder or file to write")
    kind = getattr(args, "out_kind", None)
    if kind == "export":
        kind = args.to
    check_writable("out", str(Path(out).expanduser().parent) if kind in FILE_KINDS else out)
    if kind is None:  # moee-lab's commands check their own outputs
        return
    target = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if cwd == target or cwd.is_relative_to(target):
        raise OutputError(f"--out {out} is the working folder or holds it: choose a new folder")
    for role, path in _inputs(args):
        _refuse_overlap(out, target, role, path)
    if os.path.lexists(target) and not _earlier_output(kind, target):
        _refuse_existing(out, target, kind, args.overwrite)
    args.out = str(target)


def _inputs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(option, resolved path) of every input on disk the command reads, the dense model
    recorded beside the checkpoint included."""
    named = [(role, getattr(args, name, None)) for name, role in INPUTS]
    named += [("--data", p) for p in getattr(args, "data", None) or []]
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint:
        try:
            recorded = json.loads((Path(checkpoint) / SOURCE_FILE).read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            recorded = None
        named.append(("the dense model recorded beside the checkpoint", recorded))
    return [(role, Path(p).expanduser().resolve()) for role, p in named
            if isinstance(p, str) and p and p != "default" and Path(p).expanduser().exists()]


def _refuse_overlap(out: str, target: Path, role: str, path: Path) -> None:
    if target == path:
        raise OutputError(f"--out {out} is {role}: writing there would destroy what the "
                          "command reads; choose another --out")
    if role != "--work-dir" and target.is_relative_to(path):
        raise OutputError(f"--out {out} is inside {role} {path}: choose a folder outside it")
    if path.is_relative_to(target):
        raise OutputError(f"--out {out} holds {role} {path}: replacing it would delete what "
                          "the command reads; choose another --out")


def _earlier_output(kind: str, path: Path) -> bool:
    """Whether `path` is what this command writes, so replacing it loses nothing it did not
    make: an empty folder, or an earlier output of `kind`."""
    if kind == "gguf":
        return is_gguf_file(path)
    if kind in FILE_KINDS:
        if not path.is_file():
            return False
        with open(path, "rb") as f:  # ONNX files start with ir_version (protobuf field 1)
            return f.read(1) == b"\x08"
    if not path.is_dir():
        return False
    entries = set(os.listdir(path))
    if not entries:
        return True
    if kind == "checkpoint":  # a checkpoint, or an interrupted `moee finetune`'s state
        return CONFIG_NAME in entries or STATE_DIR in entries
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "mixtral"


def _refuse_existing(out: str, target: Path, kind: str, overwrite: bool) -> None:
    if kind in FILE_KINDS and target.is_dir():
        raise OutputError(f"--out {out} is a folder; give a file name (e.g. model.{kind})")
    if overwrite:
        return
    what = "file" if target.is_file() else "folder"
    held = sorted(os.listdir(target))[:3] if target.is_dir() else []
    holds = f" (it holds {', '.join(held[:2])}{', ...' if len(held) > 2 else ''})" if held else ""
    raise OutputError(f"--out {out} is an existing {what} that is not {KINDS[kind]}{holds}: "
                      "give --overwrite to replace it, or choose another --out")


def check_writable(option: str, path: str | None) -> None:
    """Refuse an output path that cannot be written: an existing file, or a folder (or its
    nearest existing parent) this process may not write into."""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{option}: {target} exists and is not a directory")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option}: {existing} is a file, so {target} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}: cannot write into {existing} (permission denied)")
