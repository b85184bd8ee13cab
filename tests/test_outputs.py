"""Outputs never destroy what the command did not make: `--out` is never '', an input or a
folder holding one; an existing --out of another kind needs --overwrite; a replaced output is
swapped in whole, so a crash leaves the earlier one loadable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import llm_moe_checkpoint, tiny_moe_model

import moee
import moee.util.atomic
from moee.cli import build_parser, main
from moee.cli.outputs import check_outputs
from moee.errors import OutputError

FORCE = ["--force", "masked"]  # calibrate without timing: a checkpoint written in a blink


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return tiny_moe_model().save_pretrained(tmp_path / "moe")


def _refused(capsys, command: str, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"moee {command}: error: --out"), err
    assert all(w in err for w in words), err
    return err


def _argv(command: str, ckpt: Path, out: str) -> list[str]:
    return {"extract": ["extract", "--model", str(ckpt.parent / "dense"), "--out", out],
            "finetune": ["finetune", str(ckpt), "--teacher", "default", "--out", out],
            "calibrate": ["calibrate", str(ckpt), *FORCE, "--out", out],
            "export": ["export", str(ckpt), "--to", "mixtral", "--out", out]}[command]


@pytest.mark.parametrize("command", ["extract", "finetune", "calibrate", "export"])
def test_an_empty_out_is_refused(ckpt, capsys, command):
    assert main(_argv(command, ckpt, "")) == 2
    _refused(capsys, command, "empty")


@pytest.mark.parametrize("command", ["finetune", "calibrate", "export"])
@pytest.mark.parametrize("where", ["itself", "inside", "above"])
def test_an_out_on_the_checkpoint_is_refused_and_it_stays(ckpt, capsys, command, where):
    out = {"itself": ckpt, "inside": ckpt / "sub", "above": ckpt.parent}[where]
    assert main(_argv(command, ckpt, str(out))) == 2
    _refused(capsys, command, str(out), "checkpoint")
    assert len(moee.load(ckpt).moe_layers()) == 2


def test_an_out_on_the_model_teacher_or_data_is_refused(tiny_llm, tmp_path, capsys):
    folder, text = tiny_llm
    ckpt = llm_moe_checkpoint(folder, tmp_path / "moe")
    capsys.readouterr()
    assert main(["extract", "--model", str(folder), "--out", str(folder)]) == 2
    _refused(capsys, "extract", "--model")
    assert main(["finetune", str(ckpt), "--teacher", str(folder), "--data", str(text),
                 "--out", str(folder / "kd")]) == 2
    _refused(capsys, "finetune", "inside --teacher")
    assert main(["extract", "--model", str(folder), "--data", str(text),
                 "--out", str(text)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert main(["calibrate", str(ckpt), "--data", str(text), "--out", str(tmp_path)]) == 2
    _refused(capsys, "calibrate", "holds the checkpoint")
    assert (folder / "config.json").is_file() and text.is_file()


@pytest.mark.parametrize("command", ["calibrate", "export"])
def test_a_users_folder_needs_overwrite(ckpt, tmp_path, capsys, command):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(_argv(command, ckpt, str(mine))) == 2
    _refused(capsys, command, str(mine), "--overwrite", "notes.txt")
    assert (mine / "notes.txt").read_text() == "mine"
    if command == "calibrate":
        assert main([*_argv(command, ckpt, str(mine)), "--overwrite"]) == 0
        assert len(moee.load(mine).moe_layers()) == 2 and not (mine / "notes.txt").exists()


def test_an_earlier_output_is_replaced_whole(ckpt, tmp_path):
    out = tmp_path / "out"
    assert main(["calibrate", str(ckpt), "--force", "union", "--out", str(out)]) == 0
    (out / "stale.txt").write_text("from the first run")  # what the second run does not write
    assert main(["calibrate", str(ckpt), *FORCE, "--out", str(out)]) == 0
    layers = moee.load(out).moe_layers().values()
    assert {m.execution_config.execution for m in layers} == {"masked"}
    assert not (out / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["moe", "out"]  # nothing left beside it


def test_a_crash_while_replacing_leaves_the_earlier_output_loadable(ckpt, tmp_path,
                                                                     monkeypatch):
    import moee.moe_model

    out = tmp_path / "out"
    assert main(["calibrate", str(ckpt), "--force", "union", "--out", str(out)]) == 0

    def half_written(self, directory):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(moee.moe_model.MoEModel, "save_pretrained", half_written)
    # Ctrl-C mid-write: the CLI reports it and exits 130, the earlier output left whole
    assert main(["calibrate", str(ckpt), *FORCE, "--out", str(out)]) == 130
    layers = moee.load(out).moe_layers().values()
    assert {m.execution_config.execution for m in layers} == {"union"}
    assert sorted(os.listdir(tmp_path)) == ["moe", "out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replace_dir_swaps_in_the_new_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(moee.util.atomic, "_exchange", lambda a, b: False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    with moee.util.atomic.replacing_dir(tmp_path / "out") as new:
        (new / "new").write_text("new")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["new"]


def test_a_mixtral_export_replaces_an_earlier_export_only(tiny_llm, tmp_path, capsys):
    folder, _ = tiny_llm
    ckpt = llm_moe_checkpoint(folder, tmp_path / "moe")
    (ckpt / "moee_source.json").write_text(json.dumps({"model": str(folder)}))
    out = tmp_path / "mixtral"
    for _ in range(2):  # the second run finds the first's export and replaces it
        assert main(["export", str(ckpt), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["export", str(ckpt), "--out", str(folder)]) == 2  # where the LLaMA came from
    _refused(capsys, "export", "the dense model recorded beside the checkpoint")
    assert main(["export", str(ckpt), "--out", str(ckpt / "moe")]) == 2


@pytest.mark.parametrize("to, head, ok", [("gguf", b"GGUF\x03\x00", True),
                                          ("gguf", b"my notes", False),
                                          ("onnx", b"\x08\x08\x12\x07pytorch", True),
                                          ("onnx", b"my notes", False)])
def test_a_file_export_replaces_only_a_file_of_its_format(ckpt, tmp_path, to, head, ok):
    path = tmp_path / f"m.{to}"
    path.write_bytes(head)
    args = build_parser().parse_args(["export", str(ckpt), "--to", to, "--out", str(path)])
    if ok:
        check_outputs(args)
    else:
        with pytest.raises(OutputError, match=f"not an? {to.upper()} file.*--overwrite"):
            check_outputs(args)
        args.overwrite = True
        check_outputs(args)
    (tmp_path / "d.onnx").mkdir()
    args = build_parser().parse_args(["export", str(ckpt), "--to", "onnx", "--overwrite",
                                      "--out", str(tmp_path / "d.onnx")])
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        check_outputs(args)
