"""Checkpoints are verified on load: any flipped byte, any edit of the config that changes the
model, and any inconsistency between the declared experts and the stored indices is refused
with a CheckpointError naming what is wrong; saves are atomic."""

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_vit
from safetensors.torch import load_file, save_file

import moee
import moee.checkpoint.io
from moee.adapters import find_mlp_sites
from moee.errors import CheckpointError
from moee.moe_build import LayerPlan, apply_plans
from moee.moe_model import MoEModel


def _saved(tmp_path, seed=0):
    model = tiny_vit()
    sites = find_mlp_sites(model)
    rng = np.random.default_rng(seed)
    apply_plans(sites, [LayerPlan(s.name, [rng.choice(48, 10, replace=False) for _ in range(3)],
                                  rng.normal(size=(3, 16))) for s in sites])
    moe_model = MoEModel(model, {"note": "test"}, None)
    return moe_model, moe_model.save_pretrained(tmp_path / "ckpt")


def _edit_config(path, edit):
    config = json.loads((path / "moee_config.json").read_text())
    edit(config)
    (path / "moee_config.json").write_text(json.dumps(config))


def test_untouched_checkpoint_verifies_and_no_partial_files_remain(tmp_path):
    moe_model, path = _saved(tmp_path)
    again = moee.load(path)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(again(x).logits, moe_model(x).logits)
    # moee's checkpoint, plus what lets transformers run it alone (trust_remote_code)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors",
                                                       "modeling_moee.py", "moee_config.json"]
    digests = json.loads((path / "moee_config.json").read_text())["digests"]
    assert set(digests) == {"weights_sha256", "config_sha256"}


def test_every_single_byte_flip_of_the_weights_is_detected(tmp_path):
    _, path = _saved(tmp_path)
    weights = path / "model.safetensors"
    original = weights.read_bytes()
    rng = np.random.default_rng(0)
    # header, its end, the first and last tensor bytes, and random positions in between
    positions = {0, 8, 100, len(original) - 1, *rng.integers(0, len(original), 60).tolist()}
    for pos in sorted(positions):
        flipped = bytearray(original)
        flipped[pos] ^= 1 << int(rng.integers(0, 8))
        weights.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError):
            moee.load(path)
    weights.write_bytes(original)
    moee.load(path)


@pytest.mark.parametrize(("name", "edit"), [
    ("swapped experts", lambda c: c["layers"][0].__setitem__(
        "experts", c["layers"][0]["experts"][::-1])),
    ("intermediate_size", lambda c: c["base_model"]["config"].__setitem__(
        "intermediate_size", 64)),
    ("float ids", lambda c: c["layers"][0]["experts"][0].__setitem__(0, 0.5)),
    ("format as text", lambda c: c.__setitem__("format_version", "1")),
    ("execution", lambda c: c["layers"][1].__setitem__("execution", "masked")),
    ("metric", lambda c: c["layers"][0].__setitem__("metric", "euclidean")),
])
def test_any_edit_of_the_config_is_refused(tmp_path, name, edit):
    _, path = _saved(tmp_path)
    _edit_config(path, edit)
    with pytest.raises(CheckpointError, match="was edited after it was saved|format_version"):
        moee.load(path)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["layers"][0].__setitem__("experts", c["layers"][0]["experts"][::-1]),
     "differ from those in moee_config.json"),
    (lambda c: c["layers"][0]["experts"][0].__setitem__(0, 0.5), "integer neuron ids"),
    (lambda c: c["layers"][0]["experts"][0].reverse(), "differ from those in"),
    (lambda c: c["layers"][0]["experts"][0].__setitem__(1, c["layers"][0]["experts"][0][0]),
     "more than once"),
    (lambda c: c.__setitem__("format_version", "1"), "format_version must be a positive int"),
    (lambda c: c.__setitem__("format_version", 99), "upgrade moee"),
    (lambda c: c.__setitem__("layers", {"a": 1}), "'layers' must be a list"),
    (lambda c: c["layers"][0].__setitem__("site", "vit.nowhere"), "names no MLP block"),
])
def test_structural_checks_hold_without_digests(tmp_path, edit, message):
    """verify=False skips the digests, never the checks that keep a wrong model from loading."""
    _, path = _saved(tmp_path)
    _edit_config(path, edit)
    with pytest.raises(CheckpointError, match=message):
        moee.load(path, verify=False)


@pytest.mark.parametrize(("tensor", "value", "message"), [
    ("expert_indices", 10_000, "point outside the"),
    ("expert_indices", -1, "point outside the"),
    ("kept_neurons", 47, "differ from those in moee_config.json"),
    ("expert_offsets", 7, "expert_offsets disagree"),
])
def test_corrupt_index_tensors_are_named(tmp_path, tensor, value, message):
    _, path = _saved(tmp_path)
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith(tensor))
    tensors[key][1] = value
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="does not match the digest"):
        moee.load(path)
    with pytest.raises(CheckpointError, match=message):
        moee.load(path, verify=False)


def test_format_1_checkpoint_without_digests_loads_with_a_warning(tmp_path):
    moe_model, path = _saved(tmp_path)

    def downgrade(c):
        c.pop("digests")
        c["format_version"] = 1
    _edit_config(path, downgrade)
    with pytest.warns(UserWarning, match="cannot be verified"):
        again = moee.load(path)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(again(x).logits, moe_model(x).logits)
    _edit_config(path, lambda c: c.__setitem__("format_version", 2))
    with pytest.raises(CheckpointError, match="no valid digests"):
        moee.load(path)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    moe_model, path = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the weights are written

    monkeypatch.setattr(moee.checkpoint.io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        moe_model.save_pretrained(path)
    after = {p.name: p.read_bytes() for p in path.iterdir() if not p.name.endswith(".partial")}
    assert after == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moee.load(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_loading_on_cuda_without_cuda_says_so(tmp_path):
    from conftest import tiny_moe_model

    tiny_moe_model().save_pretrained(tmp_path)
    with pytest.raises(moee.ConfigError, match="no CUDA device"):
        moee.load(tmp_path, map_location="cuda")
