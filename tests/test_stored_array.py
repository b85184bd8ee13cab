"""The file-backed store arrays read exactly what np.load reads, without memory maps."""

import numpy as np
import pytest

from moee.util import stored_array
from moee.util.stored_array import RowWriter, StoredArray


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_rows_written_and_read_back_equal_numpy(tmp_path, dtype, monkeypatch):
    monkeypatch.setattr(stored_array, "CHUNK_BYTES", 64)  # many small blocks
    data = np.random.default_rng(0).normal(size=(50, 7)).astype(dtype)
    path = tmp_path / "a.npy"
    writer = RowWriter(path, np.dtype(dtype), (60, 7))  # 10 rows never written
    writer.write(0, data[:20])
    writer.write(20, data[20:])
    writer.close()
    assert np.array_equal(np.load(path)[:50], data)  # an ordinary .npy file
    a = StoredArray(path, 50)
    assert a.shape == (50, 7) and len(a) == 50 and a.dtype == np.dtype(dtype)
    assert np.array_equal(a[3:17], data[3:17]) and np.array_equal(a[45:99], data[45:])
    index = np.random.default_rng(1).permutation(50)[:23]
    assert np.array_equal(a[index], data[index])
    assert np.array_equal(a[np.array([0, 49, 0, 3])], data[[0, 49, 0, 3]])
    assert np.array_equal(np.asarray(a, dtype=np.float64), data.astype(np.float64))
    with pytest.raises(IndexError):
        a[np.array([50])]
    # np.save's format-1 header reads as well
    np.save(tmp_path / "b.npy", data)
    assert np.array_equal(StoredArray(tmp_path / "b.npy")[np.arange(50)], data)
