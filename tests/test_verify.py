"""`moee verify`: every export records its tensors' digests where engines ignore them, and one
flipped byte in a checkpoint, a Mixtral export, a GGUF file or an ONNX file is found and named;
exit 0 when all match, 1 on a mismatch, 2 on a path that is no known artefact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_moe_model
from test_export import tiny, with_experts

from moee.cli import main
from moee.export import export
from moee.export.verify import DIGEST_KEY, MISMATCH, OK, UNKNOWN, verify_path


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def safetensors_offset(path: Path, name: str) -> int:
    """Where the bytes of tensor `name` start in a safetensors file."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return 8 + size + json.loads(raw[8:8 + size])[name]["data_offsets"][0]


def run(capsys, *paths) -> tuple[int, list[str]]:
    code = main(["verify", *map(str, paths)])
    return code, capsys.readouterr().out.strip().splitlines()


@pytest.fixture
def mixtral(tmp_path) -> Path:
    model = with_experts(tiny("llama", 2), [((10, 20, 5), "cosine"), None])
    export(model, tmp_path / "mixtral")
    return tmp_path / "mixtral"


def test_a_flipped_byte_in_a_checkpoint_is_found(tmp_path, capsys):
    tiny_moe_model().save_pretrained(tmp_path / "ckpt")
    code, lines = run(capsys, tmp_path / "ckpt")
    assert code == 0 and lines[0].endswith("tensors verified (weights and config digests match)")
    weights = tmp_path / "ckpt" / "model.safetensors"
    name = "vit.layers.0.mlp.fc1.weight"
    flip(weights, safetensors_offset(weights, name) + 5)
    code, lines = run(capsys, tmp_path / "ckpt")
    assert code == 1 and "MISMATCH" in lines[0] and "corrupt or was modified" in lines[0]


def test_an_edited_checkpoint_config_is_found(tmp_path):
    tiny_moe_model().save_pretrained(tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "moee_config.json"
    config = json.loads(config_file.read_text())
    config["layers"][0]["metric"] = "dot"
    config_file.write_text(json.dumps(config))
    verdict = verify_path(tmp_path / "ckpt")
    assert verdict.status == MISMATCH and "was edited" in verdict.message


def test_mixtral_export_records_every_tensors_digest(mixtral, capsys):
    from safetensors import safe_open

    with safe_open(str(mixtral / "model.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()[DIGEST_KEY])
        assert set(recorded) == set(f.keys()) and f.metadata()["format"] == "pt"
    code, lines = run(capsys, mixtral)
    assert code == 0 and lines == [f"{mixtral}: ok: {len(recorded)} tensors verified"]


def test_a_flipped_byte_in_a_mixtral_export_names_the_tensor(mixtral, capsys):
    weights = mixtral / "model.safetensors"
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    flip(weights, safetensors_offset(weights, name) + 3)
    code, lines = run(capsys, mixtral)
    assert code == 1
    assert lines == [f"{mixtral}: MISMATCH: tensor {name} differs from its recorded digest"]


def test_unknown_paths_exit_2_and_each_artefact_gets_a_line(mixtral, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "notes.txt", tmp_path / "empty", tmp_path / "missing"):
        verdict = verify_path(path)
        assert verdict.status == UNKNOWN and "not a known artefact" in verdict.message
    code, lines = run(capsys, mixtral, tmp_path / "notes.txt")
    assert code == 2 and len(lines) == 2 and "ok:" in lines[0]


def test_an_export_without_digests_cannot_pass(tmp_path):
    from safetensors.torch import save_file

    tmp_path.joinpath("m").mkdir()
    save_file({"a": torch.ones(3)}, str(tmp_path / "m" / "model.safetensors"))
    verdict = verify_path(tmp_path / "m")
    assert verdict.status == MISMATCH and "records no tensor digests" in verdict.message


def test_a_flipped_byte_in_a_gguf_export_names_the_tensor(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    G = pytest.importorskip("moee.export.gguf")
    from test_export_gguf import small_vocab_source, tiny_llama

    from moee.export import to_mixtral

    source = small_vocab_source(tmp_path / "source.gguf", 64)
    out = G.write_gguf(to_mixtral(tiny_llama(64), torch.float32), tmp_path / "m.gguf", source,
                       file_type="q8_0")
    reader = gguf.GGUFReader(str(out))  # gguf-py still reads the file, the key a JSON string
    recorded = json.loads(reader.fields[DIGEST_KEY].contents())
    assert set(recorded) == {t.name for t in reader.tensors}
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up_exps.weight")
    offset = tensor.data_offset + 7
    del reader
    code, lines = run(capsys, out)
    assert code == 0 and lines == [f"{out}: ok: {len(recorded)} tensors verified"]
    flip(out, offset)
    verdict = verify_path(out)
    assert verdict.status == MISMATCH
    assert verdict.message == ("MISMATCH: tensor blk.0.ffn_up_exps.weight differs from its "
                               "recorded digest")


def test_a_flipped_byte_in_an_onnx_export_names_the_tensor(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from moee.export.onnx import export_onnx

    out = tmp_path / "m.onnx"
    export_onnx(tiny_moe_model(), out, check=False)
    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    assert set(json.loads(props[DIGEST_KEY])) == {t.name for t in model.graph.initializer}
    assert verify_path(out).status == OK
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = out.read_bytes()
    assert raw.count(tensor.raw_data) == 1
    flip(out, raw.find(tensor.raw_data) + len(tensor.raw_data) // 2)
    code, lines = run(capsys, out)
    assert code == 1
    assert lines == [f"{out}: MISMATCH: tensor {tensor.name} differs from its recorded digest"]


def test_int8_onnx_records_its_own_weights_digests(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from moee.export.onnx import export_onnx
    from moee.export.onnx_int8 import quantize_int8

    export_onnx(tiny_moe_model(), tmp_path / "m.onnx", check=False)
    quantize_int8(tmp_path / "m.onnx", tmp_path / "int8.onnx")
    verdict = verify_path(tmp_path / "int8.onnx")
    assert verdict.status == OK and verdict.tensors > verify_path(tmp_path / "m.onnx").tensors
