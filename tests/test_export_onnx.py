"""Export to ONNX: the file, run in ONNX Runtime and OpenVINO (in a process where moee cannot be
imported), computes moee's own forward with the routing inside the graph, at any batch size and
with padding; plain `torch.onnx.export` / `torch.export` of a MoE model are exact too; int8
keeps the routers in fp32."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers as tf

import moee
from moee.adapters import find_mlp_sites
from moee.export.onnx import TOLERANCE, ExportError, example_inputs, export_onnx
from moee.moe_build import LayerPlan, apply_plans

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
D, H = 16, 48
VISION = dict(image_size=8, patch_size=4, num_channels=1, hidden_size=D, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=H, num_labels=3,
              attn_implementation="eager")


def with_experts(model, sizes_per_layer, seed=0):
    """Random experts (per layer: a list of sizes; one size = a static layer) on `model`."""
    sites = find_mlp_sites(model)
    rng = np.random.default_rng(seed)
    plans = [LayerPlan(site.name, [np.sort(rng.choice(H, s, replace=False)) for s in sizes],
                       rng.standard_normal((len(sizes), D)))
             for site, sizes in zip(sites, sizes_per_layer, strict=True)]
    apply_plans(sites, plans)
    return moee.MoEModel(model).eval()


def vit():
    torch.manual_seed(0)
    return with_experts(tf.ViTForImageClassification(tf.ViTConfig(**VISION)), [[9, 20, 14], [30]])


def deit():
    torch.manual_seed(0)
    model = tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**VISION))
    return with_experts(model, [[12, 12], [8, 16, 24, 10]])


def bert():
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=50, hidden_size=D, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=H, max_position_embeddings=32,
                           attn_implementation="eager")
    return with_experts(tf.BertModel(config), [[10, 20], [6, 30, 12]])


def llama():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=50, hidden_size=D, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, intermediate_size=H,
                            max_position_embeddings=32, attn_implementation="eager")
    return with_experts(tf.LlamaForCausalLM(config), [[10, 20, 30], [12, 24]])


MODELS = {"vit": vit, "deit": deit, "bert": bert, "llama": llama}
# DeiT is ViT's layout plus a second head: CI runs it, the default run leaves its exports out
FAMILIES = [pytest.param(n, marks=pytest.mark.slow) if n == "deit" else n for n in MODELS]


class Exports(dict):
    """Each tiny MoE model and its ONNX file, exported the first time a test asks for it."""

    def __init__(self, folder) -> None:
        super().__init__()
        self.folder = folder

    def __missing__(self, name):
        model = MODELS[name]()
        report = export_onnx(model, self.folder / f"{name}.onnx")
        assert report.max_error is not None and report.max_error <= TOLERANCE
        assert report.moe_layers == 2
        self[name] = (model, self.folder / f"{name}.onnx")
        return self[name]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """The exports, shared by the session (CI's global random order would tear a module's
    fixture down and build it again many times)."""
    return Exports(tmp_path_factory.mktemp("onnx"))


def inputs_at(model, batch):
    """Inputs of `batch` rows; text rows padded at three different lengths."""
    inputs = example_inputs(model.model, batch=batch, seq_len=12, seed=batch)
    if "attention_mask" in inputs:
        for i in range(batch):
            inputs["attention_mask"][i, 12 - (i % 3) * 4 :] = 0
    return inputs


def reference(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return [out[k].numpy() for k in ("logits", "last_hidden_state", "pooler_output") if k in out]


def close(ref, got, inputs):
    """Largest difference, padded positions of hidden states left out."""
    worst = 0.0
    mask = inputs.get("attention_mask")
    for r, g in zip(ref, got, strict=True):
        diff = np.abs(r - g)
        if mask is not None and diff.ndim == 3:
            diff = diff[mask.numpy().astype(bool)]
        worst = max(worst, float(diff.max()))
    return worst


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_onnxruntime_runs_moees_forward(exported, name, batch):
    model, path = exported[name]
    inputs = inputs_at(model, batch)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    assert close(reference(model, inputs), got, inputs) <= TOLERANCE
    # the batch really routes tokens to more than one expert
    layer = next(iter(model.moe_layers().values()))
    with model.track_routing():
        model(**inputs)
    assert batch == 1 or int((layer.load_counts > 0).sum()) > 1


@pytest.mark.parametrize("name", FAMILIES)
def test_openvino_reads_the_same_file(exported, name):
    ov = pytest.importorskip("openvino")
    model, path = exported[name]
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for batch in (1, 8, 64):
        inputs = inputs_at(model, batch)
        result = compiled({k: v.numpy() for k, v in inputs.items()})
        got = [result[compiled.output(i)] for i in range(len(compiled.outputs))]
        assert close(reference(model, inputs), got, inputs) <= TOLERANCE


def test_the_file_runs_where_moee_cannot_be_imported(exported, tmp_path):
    model, path = exported["bert"]
    inputs = inputs_at(model, 5)
    np.savez(tmp_path / "in.npz", **{k: v.numpy() for k, v in inputs.items()})
    script = textwrap.dedent(f"""
        import sys, json
        sys.modules["moee"] = None  # import moee fails
        try:
            import moee
            raise SystemExit("moee importable")
        except ImportError:
            pass
        import numpy as np, onnxruntime
        feed = dict(np.load({str(tmp_path / "in.npz")!r}))
        s = onnxruntime.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        print(json.dumps([o.tolist() for o in s.run(None, feed)]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    got = [np.array(o, dtype=np.float32) for o in json.loads(done.stdout)]
    assert close(reference(model, inputs), got, inputs) <= TOLERANCE


def test_a_static_layer_is_a_plain_thin_mlp(exported):
    graph = onnx.load(str(exported["vit"][1])).graph
    # layer 0 has 3 experts (one router, one ArgMax); layer 1 one expert (no routing)
    assert sum(n.op_type == "ArgMax" for n in graph.node) == 1


@pytest.mark.parametrize("graph_form", ["masked", "union"])
def test_other_graph_forms_follow_the_layers_execution(tmp_path, graph_form):
    model = vit()
    model.configure(execution=graph_form)
    report = export_onnx(model, tmp_path / "m.onnx")  # checked against the model inside
    assert report.max_error <= TOLERANCE
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert ("ArgMax" in ops) == (graph_form == "masked")


def test_plain_torch_exports_of_a_moe_model_are_exact(tmp_path):
    model = vit()
    x = torch.randn(4, 1, 8, 8)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model.model, (x,), dynamic_shapes=({0: batch},))
    path = tmp_path / "legacy.onnx"
    torch.onnx.export(model.model, (x,), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "b"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 7, 33):
        x = torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref = model(x).logits
        assert (program.module()(x).logits - ref).abs().max() <= TOLERANCE
        assert np.abs(session.run(None, {"x": x.numpy()})[0] - ref.numpy()).max() <= TOLERANCE


def test_int8_keeps_routers_fp32_and_stays_close(exported, tmp_path):
    from moee.export.onnx_int8 import quantize_int8

    model, path = exported["vit"]
    routers = quantize_int8(path, tmp_path / "int8.onnx")
    assert len(routers) == 1
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    kinds = {n.name: n.op_type for n in graph.node}
    assert kinds[routers[0]] in ("MatMul", "Gemm")  # the router: not MatMulInteger
    # every other matmul against a stored weight (experts and attention) is int8
    weights = {i.name for i in graph.initializer}
    fp32 = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm")
            and n.input[1] in weights]
    assert fp32 == routers
    assert "MatMulInteger" in kinds.values()
    inputs = inputs_at(model, 16)
    s = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    got = s.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    ref = reference(model, inputs)[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_bad_targets_are_refused(tmp_path):
    model = vit()
    with pytest.raises(moee.MoeeError, match="directory"):
        export_onnx(model, tmp_path)
    model.train()
    with pytest.raises(moee.MoeeError, match="training mode"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_file_that_differs_from_the_model_is_refused(tmp_path, monkeypatch):
    import moee.export.onnx as onnx_export

    model = vit()
    monkeypatch.setattr(onnx_export, "run_onnxruntime",
                        lambda path, inputs: [torch.zeros(len(next(iter(inputs.values()))), 3)])
    with pytest.raises(ExportError, match="differs"):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
