"""A saved MoE model runs in transformers alone: `AutoModel….from_pretrained(dir,
trust_remote_code=True)` in a process where moee cannot be imported gives moee's outputs."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_bert
from tiny_models import FAMILIES

from moee import MoEModel
from moee.adapters import find_mlp_sites
from moee.moe_build import LayerPlan, apply_plans
from moee_lab.demo import load_default_model

RUN_WITHOUT_MOEE = textwrap.dedent("""
    import sys
    sys.modules["moee"] = None  # any import of moee fails: transformers alone runs it
    import torch, transformers
    directory, auto, out = sys.argv[1], sys.argv[2], sys.argv[3]
    x = torch.load(out + ".in")
    model = getattr(transformers, auto).from_pretrained(directory, trust_remote_code=True)
    with torch.no_grad():
        y = model.eval()(x)
    y = getattr(y, "logits", getattr(y, "last_hidden_state", y))
    torch.save({"y": y, "class": type(model).__name__}, out)
""")


def with_experts(model, metric="cosine", width=None):
    sites = find_mlp_sites(model)
    rng = np.random.default_rng(0)
    h = sites[0].weights().hidden_size
    plans = [LayerPlan(s.name, [rng.choice(h, n, replace=False) for n in (h // 4, h // 2, h // 3)],
                       rng.normal(size=(3, s.weights().d_in)), metric) for s in sites]
    plans[0].expert_bias = rng.normal(size=(3, sites[0].weights().d_out)).astype(np.float32)
    apply_plans(sites, plans)
    return MoEModel(model.eval(), {}, None)


def run_without_moee(directory, auto, x, tmp_path) -> dict:
    out = str(tmp_path / "out.pt")
    torch.save(x, out + ".in")
    subprocess.run([sys.executable, "-c", RUN_WITHOUT_MOEE, str(directory), auto, out],
                   check=True, cwd=tmp_path)
    return torch.load(out)


CASES = {
    "embedded-default": (lambda: load_default_model(), lambda: torch.randn(2, 1, 28, 28),
                         "cosine", "AutoModelForImageClassification"),
    "bert": (lambda: tiny_bert(dropout=0.0), lambda: torch.randint(0, 50, (2, 7)), "euclidean",
             "AutoModel"),
    "opt": (FAMILIES["hf-opt"][0], FAMILIES["hf-opt"][1], "dot", "AutoModelForCausalLM"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_saved_moe_runs_in_transformers_without_moee(name, tmp_path):
    make, inputs, metric, auto = CASES[name]
    moe_model = with_experts(make(), metric)
    moe_model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert auto in config["auto_map"]
    assert len(config["moee_layers"]["layers"]) == len(moe_model.moe_layers())
    x = inputs()
    with torch.no_grad():
        out = moe_model(x)
    expected = getattr(out, "logits", getattr(out, "last_hidden_state", out))
    got = run_without_moee(tmp_path / "ckpt", auto, x, tmp_path)
    assert got["class"].startswith("MoEE")
    assert (got["y"] - expected).abs().max() <= 1e-5


def saved_bert(tmp_path):
    moe_model = with_experts(tiny_bert(dropout=0.0), "euclidean")
    moe_model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def load_remote(directory, **kwargs):
    import transformers

    return transformers.AutoModel.from_pretrained(directory, trust_remote_code=True, **kwargs)


def edit_json(path, change) -> None:
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_remote_code_refuses_a_flipped_weight_byte(tmp_path):
    directory = saved_bert(tmp_path)
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10  # inside the last tensor's values: safetensors still parses it
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors does not match the digest"):
        load_remote(directory)
    assert load_remote(directory, moee_verify=False) is not None  # the way out, at one's risk


@pytest.mark.parametrize("where", ["moee_config.json", "config.json"])
def test_remote_code_refuses_an_edited_routing_metric(where, tmp_path):
    directory = saved_bert(tmp_path)

    def to_dot(config):
        layers = config["layers"] if where == "moee_config.json" else config["moee_layers"][
            "layers"]
        layers[0]["metric"] = "dot"

    edit_json(directory / where, to_dot)
    message = "was edited after it was saved" if where == "moee_config.json" else (
        "routes encoder.layer.0.intermediate by 'dot', .*moee_config.json by 'euclidean'")
    with pytest.raises(ValueError, match=message):
        load_remote(directory)


def test_remote_code_computes_moees_digests():
    from moee.checkpoint import integrity, modeling_moee

    config = {"b": [1, {"z": 2.5, "a": None}], "a": "é", "digests": {"x": 1}}
    assert modeling_moee.config_sha256(config) == integrity.config_sha256(config)
