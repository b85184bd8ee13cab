"""Digests of every exported tensor, written into each export and checked by `moee verify`.

A flipped byte in a tensor still parses in every format, so each export records, where its
loaders ignore it, a JSON object of tensor name -> SHA-256 of the tensor's bytes as written:
the safetensors metadata of a Mixtral export, a GGUF string key, ONNX `metadata_props`, all
under `DIGEST_KEY`. A moee checkpoint is checked by the digests it records itself
(`moee.checkpoint.integrity`, the check `moee.load` runs).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from moee.checkpoint.integrity import DIGESTS, verify_digests
from moee.checkpoint.io import CONFIG_NAME, WEIGHTS_NAME
from moee.errors import CheckpointError, ConfigError

DIGEST_KEY = "moee.tensor_sha256"
OK, MISMATCH, UNKNOWN = 0, 1, 2  # `moee verify`'s exit codes
KINDS = ("a moee checkpoint folder, a Mixtral export folder (.safetensors), a GGUF file or an "
         "ONNX file (.onnx)")


@dataclass
class Verdict:
    """What verifying one artefact found: `status` OK, MISMATCH or UNKNOWN, and one line."""

    status: int
    message: str
    tensors: int = 0  # how many were verified


def sha256(data: Any) -> str:
    """SHA-256 of a contiguous buffer (bytes, numpy array, memory map slice)."""
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Digest of a tensor's bytes as safetensors writes them (row-major, native order)."""
    return sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def safetensors_metadata(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The `metadata` for `save_file(tensors, ...)`: the format and every tensor's digest."""
    digests = {name: tensor_sha256(t) for name, t in tensors.items()}
    return {"format": "pt", DIGEST_KEY: json.dumps(digests, sort_keys=True)}


def compare(recorded: Mapping[str, str], actual: Mapping[str, str]) -> Verdict:
    """Recorded against recomputed digests, naming the first tensors that differ."""
    differ = sorted(k for k in actual if k in recorded and recorded[k] != actual[k])
    problems = [(differ, "differs from its recorded digest"),
                (sorted(set(recorded) - set(actual)), "is recorded but absent"),
                (sorted(set(actual) - set(recorded)), "has no recorded digest")]
    for names, what in problems:
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            return Verdict(MISMATCH, f"MISMATCH: tensor {names[0]} {what}{more}")
    return Verdict(OK, f"ok: {len(actual)} tensors verified", len(actual))


def _parse_recorded(text: Any, where: str) -> dict[str, str] | Verdict:
    if text is None:
        return Verdict(MISMATCH, f"cannot verify: {where} records no tensor digests "
                       f"({DIGEST_KEY}); it was not written by this moee, or they were removed")
    try:
        recorded = json.loads(text)
    except (TypeError, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        return Verdict(MISMATCH, f"MISMATCH: {where}'s {DIGEST_KEY} is not a JSON object")
    return recorded


def _range_sha256(f: BinaryIO, start: int, length: int, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    f.seek(start)
    while length > 0:
        block = f.read(min(chunk, length))
        if not block:
            break  # a truncated file: the short digest will not match
        h.update(block)
        length -= len(block)
    return h.hexdigest()


def _safetensors_header(f: BinaryIO, path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts."""
    size = int.from_bytes(f.read(8), "little")
    try:
        header = json.loads(f.read(size))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is corrupt ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + size


def verify_safetensors(path: Path) -> Verdict:
    """Each tensor's bytes in a safetensors file against the digests in its metadata."""
    with open(path, "rb") as f:
        try:
            header, start = _safetensors_header(f, path)
            spans = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
        except (CheckpointError, KeyError, TypeError) as e:
            return Verdict(MISMATCH, f"MISMATCH: {path}: the safetensors header is corrupt ({e})")
        recorded = _parse_recorded((header.get("__metadata__") or {}).get(DIGEST_KEY), str(path))
        if isinstance(recorded, Verdict):
            return recorded
        actual = {name: _range_sha256(f, start + a, b - a) for name, (a, b) in spans.items()}
    return compare(recorded, actual)


def verify_checkpoint(folder: Path) -> Verdict:
    """A moee checkpoint: its weights file and config against the digests the config records."""
    config_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        return Verdict(MISMATCH, f"MISMATCH: {config_path} cannot be read as JSON ({e})")
    if not isinstance(config, dict) or config.get(DIGESTS) is None:
        return Verdict(MISMATCH, f"cannot verify: {config_path} records no digests (a format-1 "
                       "checkpoint: load and save it again to add them)")
    if not weights.is_file():
        return Verdict(MISMATCH, f"MISMATCH: {weights} is missing")
    try:
        verify_digests(config, config_path, weights)
        with open(weights, "rb") as f:
            count = sum(1 for k in _safetensors_header(f, weights)[0] if k != "__metadata__")
    except CheckpointError as e:
        return Verdict(MISMATCH, f"MISMATCH: {e}")
    return Verdict(OK, f"ok: {count} tensors verified (weights and config digests match)",
                   count)


def _verify_files(files: list[Path]) -> Verdict:
    """Several safetensors files (a Mixtral export folder): the first problem, else the count."""
    total = 0
    for file in files:
        verdict = verify_safetensors(file)
        if verdict.status != OK:
            return verdict
        total += verdict.tensors
    return Verdict(OK, f"ok: {total} tensors verified", total)


def stamp_gguf(path: Path, digests: Mapping[str, str]) -> None:
    """Write `digests` over the same-length placeholder `gguf_placeholder` left in the file."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path), "r+")
    field = reader.fields[DIGEST_KEY]
    part = field.parts[field.data[0]]
    value = np.frombuffer(json.dumps(dict(digests), sort_keys=True).encode(), np.uint8)
    if value.size != part.size:
        raise RuntimeError(f"{path}: the digests ({value.size} bytes) do not fit the "
                           f"placeholder ({part.size} bytes)")
    part[:] = value
    reader.data.flush()
    del reader


def gguf_placeholder(names: list[str]) -> str:
    """A JSON object as long as the digests of `names` will be (hex digests have one length)."""
    return json.dumps({name: "0" * 64 for name in names}, sort_keys=True)


def is_gguf_file(path: Path) -> bool:
    """Whether `path` is a file starting with the GGUF magic (llama.cpp's files do)."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _package(name: str, what: str) -> Any:
    """The optional package `name`, or a clear error saying verifying `what` needs it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(f"verifying {what} needs the `{name}` package (pip install {name})"
                          ) from e


def verify_gguf(path: Path) -> Verdict:
    """Each tensor's bytes in a GGUF file against the digests in its `DIGEST_KEY` key."""
    gguf = _package("gguf", "a GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        return Verdict(MISMATCH, f"MISMATCH: {path} does not parse as GGUF ({e})")
    field = reader.fields.get(DIGEST_KEY)
    recorded = _parse_recorded(None if field is None else field.contents(), str(path))
    if isinstance(recorded, Verdict):
        return recorded
    actual = {t.name: sha256(reader.data[t.data_offset:t.data_offset + t.n_bytes])
              for t in reader.tensors}
    return compare(recorded, actual)


def onnx_digests(model: Any) -> dict[str, str]:
    """Digests of an onnx.ModelProto's initializers, as stored (raw bytes, else their values)."""
    from onnx import numpy_helper

    return {t.name: sha256(t.raw_data if t.HasField("raw_data")
                           else numpy_helper.to_array(t).tobytes())
            for t in model.graph.initializer}


def stamp_onnx(path: Path) -> None:
    """Record the digests of the ONNX file's initializers in its `metadata_props`."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != DIGEST_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=DIGEST_KEY, value=json.dumps(onnx_digests(model),
                                                              sort_keys=True))
    onnx.save(model, str(path))


def verify_onnx(path: Path) -> Verdict:
    """Each initializer of an ONNX file against the digests in its `metadata_props`."""
    onnx = _package("onnx", "an ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and onnx's own errors alike
        return Verdict(MISMATCH, f"MISMATCH: {path} does not parse as ONNX ({e})")
    props = {p.key: p.value for p in model.metadata_props}
    recorded = _parse_recorded(props.get(DIGEST_KEY), str(path))
    if isinstance(recorded, Verdict):
        return recorded
    return compare(recorded, onnx_digests(model))


def verify_path(path: str | Path) -> Verdict:
    """Verify whatever artefact `path` is (see `KINDS`); UNKNOWN for anything else."""
    path = Path(path)
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return verify_checkpoint(path)
        files = sorted(path.glob("*.safetensors"))
        if files:
            return _verify_files(files)
        return Verdict(UNKNOWN, f"not a known artefact: the folder has no {CONFIG_NAME} and "
                       f"no .safetensors files; give {KINDS}")
    if not path.is_file():
        return Verdict(UNKNOWN, f"not a known artefact: no such file or folder; give {KINDS}")
    if is_gguf_file(path):
        return verify_gguf(path)
    if path.suffix == ".onnx":
        return verify_onnx(path)
    if path.suffix == ".safetensors":
        return verify_safetensors(path)
    return Verdict(UNKNOWN, f"not a known artefact; give {KINDS}")
