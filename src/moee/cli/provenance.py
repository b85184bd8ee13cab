"""Which dense model a checkpoint came from: its name and a digest of its weights, written
beside the checkpoint (moee_source.json), so a model replaced at that path is noticed before
a command compares with it or distils from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from torch import nn

from moee.cli.outputs import SOURCE_FILE
from moee.errors import ConfigError
from moee.util.fingerprint import model_fingerprint

SHORT = 12  # hex digits of a digest shown in messages


def record_source(checkpoint: Path, model: str, fingerprint: str | None = None) -> None:
    """Write down which dense model `checkpoint` came from (a path made absolute) and the
    digest of its weights (`moee.util.fingerprint.model_fingerprint`)."""
    model = str(Path(model).resolve()) if Path(model).exists() else model
    body: dict[str, Any] = {"model": model}
    if fingerprint is not None:
        body["fingerprint"] = fingerprint
    (checkpoint / SOURCE_FILE).write_text(json.dumps(body) + "\n")


def recorded(checkpoint: str | Path) -> dict[str, Any]:
    """What `record_source` wrote beside `checkpoint` ({} when nothing readable is there)."""
    try:
        body = json.loads((Path(checkpoint) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def recorded_source(checkpoint: str, given: str | None) -> str:
    """The dense model to compare with or distil from: `given`, else the one `moee extract`
    recorded beside the checkpoint, else the embedded default; says which when not given."""
    if given is not None:
        return given
    source = recorded(checkpoint).get("model")
    if not isinstance(source, str):
        print("moee: no dense model recorded beside the checkpoint: the embedded default "
              "(choose with --dense / --teacher)")
        return "default"
    print(f"moee: dense model {source!r}, as moee extract recorded it")
    return source


def check_source(checkpoint: str, option: str, given: str | None, source: str,
                 dense: nn.Module) -> str:
    """The digest of `dense`, loaded from `source`. Refused when it was loaded from the
    recorded source but its weights are not the ones recorded (the model there was replaced);
    a model given with --`option` may differ, with a warning. Checkpoints recorded without a
    digest are not checked."""
    digest = model_fingerprint(dense)
    expected = recorded(checkpoint).get("fingerprint")
    if not isinstance(expected, str) or expected == digest:
        return digest
    digests = f"weights digest {digest[:SHORT]}, recorded {expected[:SHORT]}"
    if given is None:
        raise ConfigError(f"{option}: the dense model at {source} is not the one {checkpoint} "
                          f"came from ({digests}): it was replaced; restore it, or give "
                          f"--{option} to use this one anyway")
    print(f"moee: warning: --{option} {given} is not the model the checkpoint came from "
          f"({digests})", file=sys.stderr)
    return digest
