"""Every MLP layout moee knows, on a tiny random-config model of each: found automatically,
checked on a probe, equal to dense with every neuron kept, extracted with fewer MACs, saved and
reloaded exactly; wrong matches refused with a clear error."""

import numpy as np
import pytest
import torch
from conftest import text_batches, tiny_bert
from tiny_models import FAMILIES, V, output

import moee
from moee.adapters import MLPSite, linear_weights
from moee.adapters.registry import _ADAPTERS
from moee.build import LayerPlan, apply_plans
from moee.config import RecordConfig
from moee.record import record_activations


def batches(family: str, n: int = 12) -> list[torch.Tensor]:
    example = FAMILIES[family][1]()
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        if example.dtype == torch.long:
            out.append(torch.randint(1, V, (4, 8), generator=g))
        else:
            out.append(torch.randn(4, *example.shape[1:], generator=g))
    return out


def test_every_registered_adapter_has_a_tiny_model():
    assert set(moee.list_adapters()) == {adapter for _, _, adapter, _ in FAMILIES.values()}


@pytest.mark.parametrize("family", FAMILIES)
def test_found_automatically_and_full_experts_equal_dense(family):
    make, inputs, adapter, blocks = FAMILIES[family]
    dense, model = make(), make()
    x = inputs()
    sites = moee.find_mlp_sites(model)
    assert len(sites) == blocks
    assert [s.name for s in moee.find_mlp_sites(make(), adapter)] == [s.name for s in sites]
    rng = np.random.default_rng(0)
    plans = [LayerPlan(s.name, [np.arange(s.weights().hidden_size)] * 3,
                       rng.normal(size=(3, s.weights().d_in))) for s in sites]
    apply_plans(sites, plans)
    moe_model = moee.MoEModel(model).eval()
    assert len(moe_model.moe_layers()) == blocks
    with torch.no_grad():
        diff = (output(moe_model, x) - output(dense, x)).abs().max()
    assert diff <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_extraction_cuts_macs_and_reloads_exactly(family, tmp_path):
    make, inputs, _, blocks = FAMILIES[family]
    dense = make()
    config = moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=300),
        cluster=moee.ClusterConfig(algorithm="kmeans", n_clusters=2, reduce_dims=8,
                                   stability=False),
        select=moee.SelectConfig(p=0.8), progress=False)
    moe_model, report = moee.extract(dense, batches(family), config)
    assert len(moe_model.moe_layers()) == blocks
    x = inputs()
    assert moee.count_macs(moe_model, x) < moee.count_macs(dense, x)
    moe_model.save_pretrained(tmp_path)
    is_hf = hasattr(dense, "config")
    again = moee.MoEModel.from_pretrained(tmp_path, base_model=None if is_hf else make())
    with torch.no_grad():
        assert torch.equal(output(moe_model, x), output(again, x))


@pytest.fixture
def wrong_adapter():
    """A user adapter that reads a LLaMA MLP as plain up -> act -> down, ignoring the gate."""
    def finder(model):
        return [MLPSite(n, linear_weights(m.up_proj, m.down_proj), m.act_fn, m,
                        lambda module: None, m)
                for n, m in model.named_modules() if hasattr(m, "gate_proj")]

    moee.register_adapter("llama-without-gate")(finder)
    yield "llama-without-gate"
    del _ADAPTERS["llama-without-gate"]


def test_a_wrong_user_adapter_is_refused_naming_the_block(wrong_adapter):
    model = FAMILIES["hf-llama"][0]()
    with pytest.raises(moee.AdapterMismatchError, match=r"model\.layers\.0\.mlp .*differs"):
        moee.find_mlp_sites(model, wrong_adapter)
    assert [s.name for s in moee.find_mlp_sites(model)][0] == "model.layers.0.mlp"


def test_a_layer_that_only_looks_like_an_mlp_is_refused():
    """A block with fc1/act/fc2 attributes whose forward does something else."""
    from torch import nn

    class LooksLikeMlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x))) + x  # a residual inside: not the MLP

    with pytest.raises(moee.AdapterMismatchError, match="differs"):
        moee.find_mlp_sites(nn.Sequential(LooksLikeMlp()))


def test_padding_tokens_never_reach_the_activation_store(tmp_path):
    model = tiny_bert(dropout=0.0)
    data = text_batches(n=2)
    sites = moee.find_mlp_sites(model)
    seen = []
    sites[0].entry.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    store = record_activations(model, sites, data, RecordConfig(n_tokens=10_000,
                                                                dtype="float32"),
                               tmp_path, progress=False)
    real = [x[b["attention_mask"].bool()] for x, b in zip(seen, data, strict=True)]
    assert store.n_tokens == sum(int(b["attention_mask"].sum()) for b in data) == 160
    np.testing.assert_array_equal(store.inputs(0), torch.cat(real).numpy())
