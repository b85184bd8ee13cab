"""Row-major .npy files read and written with plain file I/O, never memory-mapped.

Pages of a memory map stay resident, and counted in the process's memory, until the kernel
needs them back: streaming a million-token store through a map made the resident set grow
with the store. Reading and writing rows at their offsets keeps it at one chunk; the files
stay ordinary .npy files (np.load reads them).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from moee.errors import WriteError

CHUNK_BYTES = 1 << 25  # rows read per pread for index lookups: 32 MiB at most


def create(path: Path, dtype: np.dtype, shape: tuple[int, int]) -> int:
    """Write an .npy header for a (rows, cols) array and size the file; the data offset."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                "shape": shape})
        offset = f.tell()
        f.truncate(offset + shape[0] * shape[1] * np.dtype(dtype).itemsize)
    return offset


class RowWriter:
    """Writes rows of an .npy file made by `create` at their positions."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, int]) -> None:
        self.path, self.fd = path, -1
        with self._naming_errors():
            self.offset = create(path, dtype, shape)
            self.fd = os.open(path, os.O_WRONLY)
        self.row_bytes = shape[1] * np.dtype(dtype).itemsize
        self.dtype = np.dtype(dtype)

    @contextlib.contextmanager
    def _naming_errors(self) -> Iterator[None]:
        """A failed write (disk full, file-size limit) closes and deletes the file: no store
        array is left half-written; the `WriteError` names it."""
        try:
            yield
        except OSError as e:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            self.path.unlink(missing_ok=True)
            raise WriteError(f"cannot write {self.path}: {e.strerror or e}; free space (or "
                             "raise the file size limit) or write elsewhere") from e

    def write(self, start: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        with self._naming_errors():
            os.pwrite(self.fd, data, self.offset + start * self.row_bytes)

    def close(self) -> None:
        with self._naming_errors():
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def discard(self) -> None:
        """Close without syncing and delete the file (a recording that failed): neither the
        descriptor nor the disk space outlives the error."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


class StoredArray:
    """The first `n_rows` rows of a 2-D .npy file, read on indexing: `a[i:j]` (contiguous
    slices) and `a[index_array]` (any integer indices) return in-memory arrays."""

    def __init__(self, path: Path, n_rows: int | None = None) -> None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"{path}: not a row-major 2-D array")
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.shape = (shape[0] if n_rows is None else min(n_rows, shape[0]), shape[1])
        self.row_bytes = shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, fd: int, start: int, stop: int) -> np.ndarray:
        data = os.pread(fd, (stop - start) * self.row_bytes, self.offset + start * self.row_bytes)
        return np.frombuffer(data, self.dtype).reshape(stop - start, self.shape[1])

    def __getitem__(self, key) -> np.ndarray:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if isinstance(key, slice):
                start, stop, step = key.indices(len(self))
                if step != 1:
                    raise IndexError("StoredArray slices take step 1")
                return self._read(fd, start, max(start, stop)).copy()
            index = np.asarray(key, dtype=np.int64)
            if index.size and (index.min() < 0 or index.max() >= len(self)):
                raise IndexError(f"row index out of range 0..{len(self) - 1}")
            out = np.empty((len(index), self.shape[1]), self.dtype)
            order = np.argsort(index, kind="stable")
            rows = max(1, CHUNK_BYTES // self.row_bytes)
            for block in range(0, len(order), rows):  # sorted, so each read is one span
                pick = order[block : block + rows]
                lo, hi = int(index[pick[0]]), int(index[pick[-1]]) + 1
                if (hi - lo) * self.row_bytes <= 4 * CHUNK_BYTES:
                    out[pick] = self._read(fd, lo, hi)[index[pick] - lo]
                else:
                    for p in pick:
                        out[p] = self._read(fd, int(index[p]), int(index[p]) + 1)[0]
            return out
        finally:
            os.close(fd)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[0 : len(self)]
        return whole if dtype is None else whole.astype(dtype)
