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
from moee.config import RecordConfig
from moee.extraction.record import record_activations
from moee.moe_build import LayerPlan, apply_plans


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


@pytest.fixture
def self_confirming_adapter():
    """A user adapter that ignores a LLaMA MLP's gate and whose `reference` repeats that very
    formula, so the per-block probe compares the adapter with itself and passes."""
    def finder(model):
        sites = []
        for n, m in model.named_modules():
            if hasattr(m, "gate_proj"):
                w = linear_weights(m.up_proj, m.down_proj)
                sites.append(MLPSite(n, w, m.act_fn, m, _replace_at(model, n),
                                     lambda x, w=w, act=m.act_fn: w().forward(x, act)))
        return sites

    moee.register_adapter("self-confirming")(finder)
    yield "self-confirming"
    del _ADAPTERS["self-confirming"]


def _replace_at(model, name):
    parent, _, attr = name.rpartition(".")
    return lambda module: setattr(model.get_submodule(parent), attr, module)


def test_a_user_adapter_is_checked_against_the_models_own_output(self_confirming_adapter,
                                                                  tmp_path):
    model = FAMILIES["hf-llama"][0]()
    assert moee.find_mlp_sites(model, self_confirming_adapter)  # the block probe is fooled
    config = moee.ExtractConfig(record=moee.RecordConfig(n_tokens=64), work_dir=str(tmp_path),
                                progress=False)
    with pytest.raises(moee.AdapterMismatchError, match="p = 1.*changes"):
        moee.extract(model, batches("hf-llama"), config, adapter=self_confirming_adapter)


def test_an_adapter_whose_blocks_never_run_is_told_so(tmp_path):
    """Sites on modules the forward never calls: not 'no tokens', but which blocks."""
    from torch import nn

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(8, 8)
            self.spare = nn.ModuleDict({"mlp": nn.Sequential()})
            self.spare.mlp.fc1, self.spare.mlp.act, self.spare.mlp.fc2 = (
                nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

        def forward(self, x):
            return self.used(x)

    def finder(model):
        m = model.spare.mlp
        return [MLPSite("spare.mlp", linear_weights(m.fc1, m.fc2), m.act, m.fc1,
                        lambda module: None, lambda x, m=m: m.fc2(m.act(m.fc1(x))))]

    moee.register_adapter("never-runs")(finder)
    try:
        config = moee.ExtractConfig(record=moee.RecordConfig(n_tokens=64),
                                    work_dir=str(tmp_path), progress=False)
        with pytest.raises(moee.AdapterMismatchError, match="never ran.*spare.mlp"):
            moee.extract(Unused(), [torch.randn(4, 8, 8)], config, adapter="never-runs")
    finally:
        del _ADAPTERS["never-runs"]
