"""Save/load round trips and the clear errors of bad checkpoints (layouts: test_layouts)."""

import json

import numpy as np
import pytest
import torch
from conftest import TimmStyleNet, tiny_bert, tiny_vit
from torch import nn

import moee
from moee.adapters import find_mlp_sites
from moee.errors import CheckpointError, NoMLPBlocksError
from moee.moe_build import LayerPlan, apply_plans
from moee.moe_model import MoEModel


def tiny_deit():
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(0)
    return DeiTForImageClassification(DeiTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        image_size=8, patch_size=4, num_channels=1, attn_implementation="eager")).eval()


MODELS = {
    "hf-vit": (tiny_vit, lambda: torch.randn(2, 1, 8, 8), "fc1-act-fc2"),
    "hf-deit": (tiny_deit, lambda: torch.randn(2, 1, 8, 8), "fc1-act-fc2"),
    "hf-bert": (tiny_bert, lambda: torch.randint(0, 50, (2, 7)), "intermediate-output"),
    "timm-style": (TimmStyleNet, lambda: torch.randn(2, 5, 16), "fc1-act-fc2"),
}


def _out(model, x):
    out = model(x)
    return getattr(out, "logits", getattr(out, "last_hidden_state", out))


def full_expert_plans(sites, k=1):
    """k experts that all hold every neuron: the MoE must equal the dense model."""
    return [LayerPlan(s.name, [np.arange(s.weights().hidden_size)] * k,
                      np.random.default_rng(0).normal(size=(k, s.weights().d_in)))
            for s in sites]


def test_model_without_mlp_blocks_is_a_clear_error():
    with pytest.raises(NoMLPBlocksError, match="No MLP blocks found in Sequential"):
        find_mlp_sites(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def _small_moe(seed=0):
    model = tiny_vit()
    sites = find_mlp_sites(model)
    rng = np.random.default_rng(seed)
    plans = [LayerPlan(s.name, [rng.choice(48, 10, replace=False) for _ in range(3)],
                       rng.normal(size=(3, 16))) for s in sites]
    apply_plans(sites, plans)
    return MoEModel(model, {"note": "test"}, None), plans


def test_pruning_keeps_every_neuron_any_expert_uses():
    model, plans = _small_moe()
    for plan, moe_layer in zip(plans, model.moe_layers().values(), strict=True):
        kept = moe_layer.kept_neurons.tolist()
        assert set(kept) == set(np.concatenate(plan.experts).tolist())
        for e, neurons in enumerate(plan.experts):  # each expert maps back to its own neurons
            assert sorted(moe_layer.kept_neurons[moe_layer.expert_index(e)].tolist()) == \
                sorted(neurons.tolist())


def test_save_load_reproduces_outputs_exactly(tmp_path):
    model, _ = _small_moe()
    x = torch.randn(4, 1, 8, 8)
    model.save_pretrained(tmp_path)
    again = moee.MoEModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(_out(model, x), _out(again, x))
    for saved, loaded in zip(model.moe_layers().values(), again.moe_layers().values(),
                             strict=True):
        assert torch.equal(loaded.router_centres, saved.router_centres)
        assert loaded.dense_experts() == saved.dense_experts() and loaded.site == saved.site
    assert not again.training and not any(m.training for m in again.modules())
    assert all(t.device.type == "cpu" for t in again.state_dict().values())
    assert json.loads((tmp_path / "moee_config.json").read_text())["extract_config"] == {
        "note": "test"}


def test_corrupt_and_truncated_weights_are_clear_errors(tmp_path):
    _small_moe()[0].save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="does not match the digest"):
        moee.load(tmp_path)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        moee.load(tmp_path, verify=False)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        moee.load(tmp_path, verify=False)


def test_mismatched_checkpoint_names_the_tensor(tmp_path):
    _small_moe(seed=0)[0].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "moee_config.json").read_text())
    config["layers"][0]["experts"][0] = list(range(20))  # union grows: fc1 shape disagrees
    (tmp_path / "moee_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="was edited after it was saved"):
        moee.load(tmp_path)
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*layers\.0\.mlp"):
        moee.load(tmp_path, verify=False)


def test_bad_config_json_is_a_clear_error(tmp_path):
    _small_moe()[0].save_pretrained(tmp_path)
    (tmp_path / "moee_config.json").write_text("{ truncated")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        moee.load(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        moee.load(tmp_path / "nope")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("execution", "fast", "mlp: execution: must be one of"),
    ("small_batch_tokens", -3, "small_batch_tokens: must be a non-negative integer"),
    ("small_batch_tokens", 2.5, "small_batch_tokens: must be a non-negative integer"),
    ("experts", [], "'experts' must be a non-empty list"),
    ("experts", [[0, 99]], r"expert 0 has neuron ids outside 0\.\.47"),
])
def test_bad_execution_settings_in_config_are_clear_errors(tmp_path, field, value, message):
    _small_moe()[0].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "moee_config.json").read_text())
    config["layers"][0][field] = value
    (tmp_path / "moee_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        moee.load(tmp_path, verify=False)


@pytest.mark.parametrize("family", ["hf-vit", "hf-bert"])
def test_execution_set_on_the_modules_is_what_gets_saved(tmp_path, family):
    make, inputs, _ = MODELS[family]
    model = make()
    sites = find_mlp_sites(model)
    plans = full_expert_plans(sites, k=2)
    apply_plans(sites, plans)
    moe_model = MoEModel(model)
    layers = list(moe_model.moe_layers().values())  # BERT: inside the site, at .intermediate
    layers[0].configure(execution="masked", presliced=False)
    layers[1].configure(small_batch_tokens=5, width_multiple=8)
    moe_model.save_pretrained(tmp_path)
    again = list(moee.load(tmp_path).moe_layers().values())
    assert [m.execution_config for m in again] == [m.execution_config for m in layers]
    assert [m.site for m in again] == [s.name for s in sites]


def test_loading_and_running_a_checkpoint_needs_no_clustering_libraries(tmp_path):
    """A GPU or serving machine may have torch and transformers only: `moee.load`, inference and
    the benchmark modules must import without scikit-learn, fast_hdbscan or matplotlib."""
    import subprocess
    import sys

    model, _ = _small_moe()
    model.save_pretrained(tmp_path)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = _out(model, x)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys\n"
        "for m in ('sklearn', 'fast_hdbscan', 'matplotlib', 'numba'): sys.modules[m] = None\n"
        "import torch, moee, moee.cli, moee_lab.bench.suite\n"
        f"m = moee.load({str(tmp_path)!r}).eval()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "with torch.no_grad():\n"
        "    out = m(x)\n"
        f"torch.save(getattr(out, 'logits', out), {str(tmp_path / 'y.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_loading_builds_the_base_on_the_meta_device(tmp_path, monkeypatch):
    """The base is rebuilt with its parameters on the meta device (nothing initialised only to
    be overwritten); the loaded model has none left there."""
    import moee.checkpoint.io

    model, _ = _small_moe()
    model.save_pretrained(tmp_path)
    built = []
    real = moee.checkpoint.io._rebuild_base
    monkeypatch.setattr(moee.checkpoint.io, "_rebuild_base",
                        lambda spec: built.append(real(spec)) or built[0])
    seen_meta = []
    real_apply = moee.checkpoint.io.apply_plans
    monkeypatch.setattr(moee.checkpoint.io, "apply_plans", lambda sites, plans: seen_meta.append(
        all(p.is_meta for p in built[0].parameters())) or real_apply(sites, plans))
    again = moee.load(tmp_path)
    assert seen_meta == [True]
    assert not any(p.is_meta for p in again.parameters())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(_out(model, x), _out(again, x))


def test_bert_reload_keeps_non_persistent_buffers(tmp_path):
    model = tiny_bert()
    sites = find_mlp_sites(model)
    apply_plans(sites, full_expert_plans(sites, k=2))
    moe_model = MoEModel(model).eval()
    moe_model.save_pretrained(tmp_path)
    again = moee.load(tmp_path)
    x = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(_out(moe_model, x), _out(again, x))
    assert all(not b.is_meta for b in again.buffers())


def test_the_inner_save_guard_takes_trainers_keywords_and_holds_no_cycle(tmp_path):
    import copy
    import gc
    import weakref

    model, _ = _small_moe()
    x = torch.randn(2, 1, 8, 8)
    # transformers.Trainer saves its checkpoints this way
    model.model.save_pretrained(tmp_path / "trainer", state_dict=model.model.state_dict(),
                                safe_serialization=True)
    with torch.no_grad():
        torch.testing.assert_close(moee.load(tmp_path / "trainer")(x).logits, model(x).logits)
    model.model.save_pretrained(tmp_path / "other-rank", is_main_process=False)
    assert not (tmp_path / "other-rank").exists()
    twin = copy.deepcopy(model)  # the copy's guard saves the copy
    twin.model.save_pretrained(tmp_path / "twin")
    assert (tmp_path / "twin" / "model.safetensors").is_file()
    inner = weakref.ref(model.model)
    gc.disable()
    try:
        del model
        assert inner() is None  # freed at once, not by the cyclic collector
    finally:
        gc.enable()


def test_loading_leaves_other_threads_modules_alone(tmp_path):
    import threading

    _small_moe()[0].save_pretrained(tmp_path)
    stop, on_meta, built = threading.Event(), [], [0]

    def build_layers():
        while not stop.is_set():
            layer = nn.Linear(4, 4)
            built[0] += 1
            if layer.weight.is_meta:
                on_meta.append(layer)

    worker = threading.Thread(target=build_layers)
    worker.start()
    try:
        for _ in range(5):
            moee.load(tmp_path)
    finally:
        stop.set()
        worker.join()
    assert built[0] > 0 and on_meta == []
    assert moee.load(tmp_path).model.vit.layers[0].attention.q_proj.weight.device.type == "cpu"
