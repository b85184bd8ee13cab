"""Export to Mixtral: the exported checkpoint, loaded by transformers in a process where moee
cannot be imported, gives moee's logits and greedy tokens; what Mixtral cannot run is refused."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers as tf
from tiny_models import TEXT

import moee
from moee.adapters import find_mlp_sites
from moee.export import export
from moee.moe_build import LayerPlan, apply_plans

H, D = TEXT["intermediate_size"], TEXT["hidden_size"]
MAKERS = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}
CLASSES = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM,
           "qwen2": tf.Qwen2ForCausalLM}


def tiny(kind: str, layers: int = 3):
    torch.manual_seed(0)
    config = MAKERS[kind](num_key_value_heads=1, **{**TEXT, "num_hidden_layers": layers})
    return CLASSES[kind](config).eval()


def with_experts(model, plans_spec):
    """Install hand-made experts: per layer None (stays dense) or (sizes, metric)."""
    sites = find_mlp_sites(model)
    rng = np.random.default_rng(0)
    plans = [LayerPlan(sites[i].name, [np.sort(rng.choice(H, s, replace=False)) for s in sizes],
                       rng.standard_normal((len(sizes), D)), metric)
             for i, spec in enumerate(plans_spec) if spec is not None for sizes, metric in [spec]]
    apply_plans(sites, plans)
    return model.eval()


def batch():
    ids = torch.randint(1, TEXT["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return ids, mask


RUN_WITHOUT_MOEE = textwrap.dedent("""
    import sys
    sys.modules["moee"] = None  # any import of moee fails: transformers alone runs it
    import torch, transformers
    directory, out = sys.argv[1], sys.argv[2]
    saved = torch.load(out + ".in")
    model = transformers.MixtralForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        logits = model(input_ids=saved["ids"], attention_mask=saved["mask"]).logits
    tokens = model.generate(saved["ids"][:1], max_new_tokens=8, do_sample=False)
    torch.save({"logits": logits, "tokens": tokens}, out)
""")


def run_in_transformers(directory, ids, mask, tmp_path) -> dict:
    out = str(tmp_path / "out.pt")
    torch.save({"ids": ids, "mask": mask}, out + ".in")
    subprocess.run([sys.executable, "-c", RUN_WITHOUT_MOEE, str(directory), out], check=True,
                   cwd=tmp_path)
    return torch.load(out)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_mixtral_export_gives_moees_logits_and_tokens_without_moee(kind, tmp_path):
    # Unequal sizes, a dense layer and fewer experts in one layer: all padded exactly.
    model = with_experts(tiny(kind), [((10, 20, 5), "cosine"), None, ((12, 30), "dot")])
    result = export(model, tmp_path / "mixtral")
    assert result.config.num_local_experts == 3 and result.width == H  # the dense layer's
    assert json.loads((tmp_path / "mixtral" / "config.json").read_text())["architectures"] == [
        "MixtralForCausalLM"]
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    got = run_in_transformers(tmp_path / "mixtral", ids, mask, tmp_path)
    real = mask.bool()  # padded positions are masked out of attention: their logits are noise
    assert (got["logits"][real] - expected[real]).abs().max() <= 1e-5
    assert torch.equal(got["tokens"], model.generate(ids[:1], max_new_tokens=8, do_sample=False))


def test_export_keeps_the_experts_width_when_every_layer_is_moe(tmp_path):
    model = with_experts(tiny("llama", 2), [((16, 16), "cosine"), ((16, 16, 16), "cosine")])
    told = []
    result = export(model, tmp_path / "m", announce=lambda line: told.append(
        (line, (tmp_path / "m").exists())))
    assert result.width == 16 and result.config.num_local_experts == 3
    assert "adds 0.0% MLP MACs" in result.padding_summary()
    # the size is told before anything is written, and it is what the weights file takes
    (line, existed), = told
    weights = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert not existed and f"{weights / 2**20:,.1f} MiB" in line
    mixtral = tf.MixtralForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids, mask = batch()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = mixtral(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-5


def test_export_refuses_what_mixtral_cannot_run(tmp_path):
    model = with_experts(tiny("llama", 2), [((10, 20), "euclidean"), None])
    with pytest.raises(moee.ConfigError, match="euclidean"):
        export(model, tmp_path / "a")
    model = with_experts(tiny("llama", 2), [((10, 20), "cosine"), None])
    layer = next(iter(moee.moe_model.moe_layers(model).values()))
    layer.expert_bias[1, 0] = 0.5
    with pytest.raises(moee.ConfigError, match="offsets.*--export-ready"):
        export(model, tmp_path / "b")
    qwen = tiny("qwen2", 1)
    with torch.no_grad():
        qwen.model.layers[0].self_attn.q_proj.bias[0] = 0.1
    with pytest.raises(moee.ConfigError, match="non-zero bias"):
        export(qwen, tmp_path / "c")
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(moee.ConfigError, match="not 'gpt2'"):
        export(gpt2, tmp_path / "d")
    with pytest.raises(moee.ConfigError, match="format"):
        export(model, tmp_path / "e", to="onnx")
    assert not any((tmp_path / n).exists() for n in "abcde")  # nothing half-written


def test_export_ready_extraction_exports_without_padding_from_the_cli(tiny_llm, tmp_path):
    """`extract --export-ready` then `export`: every layer MoE, experts of one width, no
    offsets; the export pays no padding, ships the tokenizer and reproduces moee's logits."""
    from moee.cli import main

    folder, text = tiny_llm
    assert main(["extract", "--model", str(folder), "--out", str(tmp_path / "x"),
                 "--data", str(text), "--seq-len", "16", "--tokens", "120", "--algorithm",
                 "kmeans", "--reduce-dims", "8", "--no-stability", "--export-ready", "0.5"]) == 0
    moe_model = moee.load(tmp_path / "x")
    layers = list(moe_model.moe_layers().values())
    assert len(layers) == 2 and {s for m in layers for s in m.expert_sizes()} == {24}
    assert all(not m.expert_bias.any() for m in layers)
    assert main(["export", str(tmp_path / "x"), "--out", str(tmp_path / "mixtral")]) == 0
    out = tmp_path / "mixtral"
    assert (out / "tokenizer.json").is_file()
    mixtral = tf.MixtralForCausalLM.from_pretrained(out).eval()
    assert mixtral.config.intermediate_size == 24
    ids = tf.AutoTokenizer.from_pretrained(out)(text.read_text()[:200], return_tensors="pt")
    with torch.no_grad():
        a = moe_model(**ids).logits
        b = mixtral(**ids).logits
    assert (a - b).abs().max() <= 1e-5


def test_export_ready_gives_a_layer_without_clusters_one_expert(tiny_llm, tmp_path):
    from moee.cli import main

    folder, text = tiny_llm
    assert main(["extract", "--model", str(folder), "--out", str(tmp_path / "x"),
                 "--data", str(text), "--seq-len", "16", "--tokens", "120", "--reduce-dims", "8",
                 "--no-stability", "--min-cluster-fraction", "0.6",
                 "--export-ready", "0.25"]) == 0  # no two clusters of 60%: HDBSCAN finds none
    layers = list(moee.load(tmp_path / "x").moe_layers().values())
    assert [m.expert_sizes() for m in layers] == [[12], [12]]


def test_expert_width_is_padded_to_a_multiple_of_8_neurons(tmp_path):
    """transformers' grouped-matmul experts refuse rows that are not a multiple of 16 bytes."""
    model = with_experts(tiny("llama", 2), [((13, 13), "cosine"), ((13, 13), "cosine")])
    result = export(model, tmp_path / "m")
    assert result.width == 16 and "adds 23.1% MLP MACs" in result.padding_summary()
    mixtral = tf.MixtralForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids, _ = batch()
    with torch.no_grad():
        assert (model(input_ids=ids).logits - mixtral(input_ids=ids).logits).abs().max() <= 1e-5
