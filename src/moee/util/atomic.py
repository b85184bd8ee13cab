"""Files written atomically: under a temporary name, then renamed, so an interrupted run never
leaves a half-written file under the real name (a rename is atomic on POSIX filesystems)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def write_json(path: Path, obj: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(obj, indent=1))
    os.replace(partial, path)


def save_npy(path: Path, array: np.ndarray) -> None:
    partial = path.with_name(path.name + ".partial.npy")  # np.save would append .npy
    np.save(partial, array)
    os.replace(partial, path)
