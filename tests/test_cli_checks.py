"""Nothing lost, second step: a dense model replaced at the recorded path is noticed by its
weights' digest; a moee checkpoint is refused where a dense model is expected; options that
cannot work (a device torch cannot use, a seed beyond 32 bits, --json into a missing folder,
--data that is not a file, --gguf-metadata that is not a GGUF) or would have no effect
(--top-k over every expert, --dtype for gguf, one-token rows for perplexity) are refused
before any work, in one line (exit code 2); a calibration batch shorter than --batch is
noted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import llm_moe_checkpoint, tiny_moe_model
from transformers import LlamaConfig, LlamaForCausalLM

from moee.cli import main
from moee.cli.checks import warn_top_k
from moee.cli.provenance import record_source
from moee.config import ExtractConfig, RouterConfig
from moee.util.fingerprint import model_fingerprint

TEXT = ["--seq-len", "16"]


def _error(capsys, command: str, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # after transformers' progress bars, if it loaded a model
    assert "Traceback" not in err and last.startswith(f"moee {command}: error:"), err
    assert all(w in last for w in words), last
    return last


def _replace_llm(folder: Path, seed: int = 1) -> None:
    """Another LLaMA of the same shape saved over the one in `folder` (its tokenizer kept)."""
    torch.manual_seed(seed)
    config = LlamaConfig.from_pretrained(folder)
    LlamaForCausalLM(config).save_pretrained(folder)


@pytest.fixture
def llm_ckpt(tiny_llm, tmp_path) -> tuple[Path, Path, Path]:
    """(dense folder, text file, a moee checkpoint of it recording its source and digest)."""
    folder, text = tiny_llm
    ckpt = llm_moe_checkpoint(folder, tmp_path / "moe")
    record_source(ckpt, str(folder), model_fingerprint(LlamaForCausalLM.from_pretrained(folder)))
    return folder, text, ckpt


def test_extract_records_the_digest_and_a_replaced_source_is_refused(tiny_llm, tmp_path,
                                                                     capsys):
    folder, text = tiny_llm
    data = ["--data", str(text), *TEXT]
    assert main(["extract", "--model", str(folder), "--out", str(tmp_path / "x"), *data,
                 "--tokens", "120", "--algorithm", "kmeans", "--reduce-dims", "8",
                 "--no-stability"]) == 0
    recorded = json.loads((tmp_path / "x" / "moee_source.json").read_text())
    old = model_fingerprint(LlamaForCausalLM.from_pretrained(folder))
    assert recorded == {"model": str(folder.resolve()), "fingerprint": old}
    _replace_llm(folder)
    new = model_fingerprint(LlamaForCausalLM.from_pretrained(folder))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "x"), *data, "--max-batches", "1"]) == 2
    _error(capsys, "evaluate", str(folder.resolve()), old[:12], new[:12], "--dense")
    assert main(["finetune", str(tmp_path / "x"), *data, "--out", str(tmp_path / "y")]) == 2
    _error(capsys, "finetune", str(folder.resolve()), old[:12], new[:12], "--teacher")
    assert not (tmp_path / "y").exists()
    # Given by name, another model is the user's choice: a warning naming both digests.
    assert main(["evaluate", str(tmp_path / "x"), *data, "--max-batches", "1",
                 "--dense", str(folder)]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and old[:12] in err and new[:12] in err


def test_a_moee_checkpoint_is_not_a_dense_model(llm_ckpt, tmp_path, capsys):
    folder, text, ckpt = llm_ckpt
    assert main(["extract", "--model", str(ckpt), "--data", str(text), *TEXT,
                 "--out", str(tmp_path / "x")]) == 2
    _error(capsys, "extract", str(ckpt), "moee checkpoint", str(folder), "moee finetune")
    assert main(["finetune", str(ckpt), "--teacher", str(ckpt), "--data", str(text), *TEXT,
                 "--out", str(tmp_path / "y")]) == 2
    _error(capsys, "finetune", "teacher", "moee checkpoint")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("device", ["cuda:99", "nonsense", "xpu:3"])
def test_a_device_torch_cannot_use_is_refused_before_loading(llm_ckpt, tmp_path, capsys,
                                                             monkeypatch, device):
    import moee.cli.commands

    _, text, ckpt = llm_ckpt
    monkeypatch.setattr(moee.cli.commands, "load_dense", lambda *a: pytest.fail("loaded"))
    assert main(["finetune", str(ckpt), "--device", device, "--data", str(text), *TEXT,
                 "--out", str(tmp_path / "y")]) == 2
    _error(capsys, "finetune", "device", device)


@pytest.mark.parametrize("command", [["extract"], ["finetune", "CKPT"]])
def test_a_seed_beyond_32_bits_is_refused_at_parse_time(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--seed", str(2**32), "--out", "/tmp/never-written"])
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err.strip().splitlines()[-1]


def test_json_into_a_missing_folder_is_refused_before_evaluating(llm_ckpt, tmp_path, capsys,
                                                                 monkeypatch):
    import moee.cli.commands

    _, text, ckpt = llm_ckpt
    monkeypatch.setattr(moee.cli.commands, "load_dense", lambda *a: pytest.fail("loaded"))
    where = tmp_path / "missing" / "r.json"
    assert main(["evaluate", str(ckpt), "--data", str(text), *TEXT, "--json", str(where)]) == 2
    _error(capsys, "evaluate", "json", str(where.parent))
    assert main(["evaluate", str(ckpt), "--data", str(text), *TEXT, "--json", str(tmp_path)]) == 2
    _error(capsys, "evaluate", "json", "not a file name")


def test_data_that_is_not_a_file_or_folder_is_refused(llm_ckpt, tmp_path, capsys):
    folder, _, _ = llm_ckpt
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would block until a writer comes
    for data in (fifo, Path("/dev/zero")):
        assert main(["extract", "--model", str(folder), "--data", str(data), *TEXT,
                     "--out", str(tmp_path / "x")]) == 2
        _error(capsys, "extract", str(data), "not a regular file or folder")


def test_gguf_metadata_must_be_a_gguf_file(llm_ckpt, tmp_path, capsys):
    _, text, ckpt = llm_ckpt
    notes = tmp_path / "notes.gguf"
    notes.write_bytes(b"my notes")
    (tmp_path / "folder").mkdir()
    cases = [(tmp_path / "missing.gguf", "does not exist"), (tmp_path / "folder", "not a file"),
             (notes, "not a GGUF file")]
    for path, why in cases:
        assert main(["export", str(ckpt), "--to", "gguf", "--gguf-metadata", str(path),
                     "--out", str(tmp_path / "m.gguf")]) == 2
        _error(capsys, "export", "gguf-metadata", str(path), why)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("option, to, words", [
    (["--dtype", "float16"], "gguf", ["--dtype", "--gguf-type"]),
    (["--dtype", "float16"], "onnx", ["--dtype", "mixtral"]),
    (["--gguf-type", "q8_0"], "mixtral", ["--gguf-type", "gguf"]),
    (["--quantize", "int8"], "mixtral", ["--quantize", "onnx"])])
def test_export_options_of_another_format_are_refused(tmp_path, capsys, option, to, words):
    ckpt = tiny_moe_model().save_pretrained(tmp_path / "moe")
    assert main(["export", str(ckpt), "--to", to, *option, "--out", str(tmp_path / "o")]) == 2
    _error(capsys, "export", *words)


@pytest.mark.parametrize("options, why", [(["--top-k", "3", "--max-experts", "3"],
                                           "--max-experts"),
                                          (["--top-k", "8", "--algorithm", "kmeans"], "kmeans"),
                                          (["--top-k", "2", "--method", "static"], "most 1")])
def test_top_k_over_every_expert_is_refused(llm_ckpt, tmp_path, capsys, options, why):
    folder, text, _ = llm_ckpt
    assert main(["extract", "--model", str(folder), "--data", str(text), *TEXT, *options,
                 "--out", str(tmp_path / "x")]) == 2
    _error(capsys, "extract", "top-k", why)


def test_layers_left_with_top_k_experts_or_fewer_are_named(capsys):
    config = ExtractConfig(router=RouterConfig(top_k=2))
    rows = [{"site": "a", "p": 0.9, "experts": 2}, {"site": "b", "p": 0.9, "experts": 5},
            {"site": "c", "p": None, "experts": 1}]
    warn_top_k(config, rows)
    err = capsys.readouterr().err
    assert "--top-k 2" in err and "every expert of a:" in err
    warn_top_k(ExtractConfig(), rows)  # top-1: nothing to say
    assert capsys.readouterr().err == ""


def test_one_token_rows_cannot_give_a_perplexity(llm_ckpt, capsys):
    _, text, ckpt = llm_ckpt
    assert main(["evaluate", str(ckpt), "--data", str(text), "--seq-len", "1"]) == 2
    _error(capsys, "evaluate", "seq-len", "perplexity")


def test_calibrating_on_fewer_rows_than_the_batch_says_so(llm_ckpt, tmp_path, capsys):
    _, text, ckpt = llm_ckpt
    assert main(["calibrate", str(ckpt), "--data", str(text), *TEXT, "--batch", "1000",
                 "--out", str(tmp_path / "c")]) == 0
    err = capsys.readouterr().err
    assert "--batch 1000" in err and "timed at batch" in err
