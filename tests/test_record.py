import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moee.adapters import find_mlp_sites
from moee.config import RecordConfig
from moee.extraction.record import EmptyDataError, record_activations


def test_store_holds_inputs_and_post_activation_hidden(vit, images, tmp_path):
    sites = find_mlp_sites(vit)
    batches = [images[i : i + 16] for i in range(0, 64, 16)]  # 5 tokens per image
    store = record_activations(vit, sites, batches, RecordConfig(n_tokens=100, dtype="float32"),
                               tmp_path, progress=False)
    assert store.n_tokens == 100
    x, h = store.inputs(1), store.hidden(1)
    assert x.shape == (100, 16) and h.shape == (100, 48)
    fc1 = vit.vit.layers[1].mlp.fc1
    expected = F.gelu(torch.from_numpy(np.array(x)) @ fc1.weight.T + fc1.bias)
    np.testing.assert_allclose(h, expected.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_fewer_tokens_than_asked_is_recorded_honestly(vit, images, tmp_path):
    store = record_activations(vit, find_mlp_sites(vit), [images[:4]], RecordConfig(n_tokens=999),
                               tmp_path, progress=False)
    assert store.n_tokens == 20


def test_no_data_is_a_clear_error(vit, tmp_path):
    with pytest.raises(EmptyDataError, match="no tokens"):
        record_activations(vit, find_mlp_sites(vit), [], RecordConfig(), tmp_path, progress=False)


def test_a_failed_recording_leaks_no_descriptor_and_no_file(vit, images, tmp_path):
    import os

    from moee.errors import NonFiniteError

    bad = images[:16].clone()
    bad[0, 0, 0, 0] = float("nan")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(NonFiniteError):
            record_activations(vit, find_mlp_sites(vit), [images[:16], bad],
                               RecordConfig(n_tokens=1000), tmp_path, progress=False)
    assert len(os.listdir("/proc/self/fd")) == before
    assert not list(tmp_path.glob("*.npy"))
