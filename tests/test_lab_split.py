"""The library and its harness are two distributions: the core wheel holds no demo weights,
study, bench or report code, and the `moee` command says how to get them when moee-lab is not
installed (its commands and the embedded default come through entry points)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import moee.cli.plugins as plugins
from moee.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_the_core_wheel_holds_none_of_the_harness(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(ROOT), "-w", str(tmp_path)], check=True)
    names = zipfile.ZipFile(next(tmp_path.glob("moee-*.whl"))).namelist()
    assert "moee/api.py" in names and "moee/engine/cost_model.json" in names
    harness = [n for n in names if n.startswith("moee_lab") or n.endswith(".safetensors")
               or n.split("/")[1:2] in (["demo"], ["study"], ["bench"], ["analysis"])]
    assert harness == []


@pytest.fixture
def without_lab(monkeypatch):
    """As if moee-lab were not installed: no distribution answers its entry points."""
    monkeypatch.setattr(plugins, "entry_points", lambda group: [])


@pytest.mark.parametrize("command", ["demo", "study", "bench", "analyze", "train-base"])
def test_a_lab_command_without_the_lab_says_how_to_get_it(without_lab, command, capsys):
    assert main([command]) == 2
    assert "moee-lab" in capsys.readouterr().err


def test_the_embedded_default_without_the_lab_says_how_to_get_it(without_lab, tmp_path, capsys):
    assert main(["extract", "--out", str(tmp_path / "moe")]) == 2
    err = capsys.readouterr().err
    assert "moee-lab" in err and "--data" in err
    assert not (tmp_path / "moe").exists()


def test_the_core_commands_stay_without_the_lab(without_lab, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    listed = capsys.readouterr().out
    assert "{extract,finetune,evaluate,calibrate,export,verify}" in listed


def test_bench_reads_every_option_after_it(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--help"])
    assert stop.value.code == 0
    assert "--block-batches" in capsys.readouterr().out  # bench's own parser answered


def test_unknown_options_of_a_core_command_are_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export", "ckpt", "--out", "x", "--no-such-option"])
    assert stop.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err
