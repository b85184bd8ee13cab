"""Files and folders written atomically: under a temporary name, then renamed, so an
interrupted run never leaves a half-written file under the real name (a rename is atomic on
POSIX filesystems), and a folder that replaces an earlier one never leaves neither."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from moee.errors import MoeeError, WriteError


def _reason(e: BaseException) -> str:
    """A write error's cause in a few words, on one line."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    return " ".join(text.split())


@contextmanager
def naming_write_errors(path: str | Path, remove: Iterable[Path] = ()) -> Iterator[None]:
    """Inside the block a failed write (an OSError, or safetensors' own error, from whichever
    library wrote) becomes a one-line `WriteError` naming `path`, once the partial files or
    folders `remove` are deleted: nothing half-written stays behind."""
    from safetensors import SafetensorError

    try:
        yield
    except MoeeError:
        raise
    except (OSError, SafetensorError) as e:
        for p in remove:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {_reason(e)}; free space (or raise the file size "
                         "limit) or write elsewhere") from e


def write_json(path: Path, obj: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    with naming_write_errors(path, [partial]):
        partial.write_text(json.dumps(obj, indent=1))
        os.replace(partial, path)


def save_npy(path: Path, array: np.ndarray) -> None:
    partial = path.with_name(path.name + ".partial.npy")  # np.save would append .npy
    with naming_write_errors(path, [partial]):
        np.save(partial, array)
        os.replace(partial, path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or the filesystem cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    at_cwd, exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0


def replace_dir(new: Path, target: Path) -> None:
    """Put the folder `new` (a sibling of `target`) at `target`, then delete what was there.
    The swap is one atomic step where the system allows; elsewhere the old output is first
    renamed to `<target>.old-<pid>`, so a crash at any point leaves it whole on disk."""
    new, target = Path(new), Path(target)
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    if _exchange(new, target):
        old = new  # after the swap, the new folder's name holds the old output
    else:
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
    # The new output is in place: a leftover of the old one is not worth failing for.
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


@contextmanager
def replacing_dir(target: str | Path) -> Iterator[Path]:
    """A fresh folder beside `target` to write an output into; when the block ends without
    an exception it replaces `target` (`replace_dir`), else it is removed and `target` is
    left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{secrets.token_hex(4)}")
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    replace_dir(partial, target)
