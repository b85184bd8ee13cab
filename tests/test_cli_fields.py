"""The CLI's plumbing: options mapped onto config fields from one table, the library's log
records shown as "moee: ..." lines, and a core CLI that knows nothing of the lab's data."""

import logging
from pathlib import Path

import pytest

import moee.cli.plugins as plugins
from moee.cli import build_parser, log_to_stderr, main
from moee.cli.fields import field_value
from moee.cli.options import EXTRACT_OPTIONS, KD_OPTIONS, distill_config, extract_config
from moee.config import DistillConfig, ExtractConfig


@pytest.mark.parametrize(("rows", "config", "command", "build"), [
    (EXTRACT_OPTIONS, ExtractConfig(), ["extract", "--out", "o"], extract_config),
    (KD_OPTIONS, DistillConfig(), ["finetune", "c", "--out", "o"], distill_config)])
def test_every_row_names_a_config_field_and_the_defaults_build_the_config(rows, config,
                                                                          command, build):
    for row in rows:
        if row.path is not None:
            field_value(config, row.path)  # an AttributeError names a row without a field
    assert build(build_parser().parse_args(command)) == config  # the defaults: the config's


def test_library_records_print_as_moee_lines_once(capsys):
    log_to_stderr()
    log_to_stderr()  # main runs it each call: still one handler
    logging.getLogger("moee.training.training_state").info("resuming distillation at step 3")
    assert capsys.readouterr().err == "moee: resuming distillation at step 3\n"


def test_the_core_cli_knows_nothing_of_fashion_mnist(monkeypatch, capsys):
    cli = Path(plugins.__file__).parent
    assert [p.name for p in cli.glob("*.py")
            if "fashion" in p.read_text().lower() or "mnist" in p.read_text().lower()] == []
    monkeypatch.setattr(plugins, "entry_points", lambda group: [])  # without moee-lab
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    assert "--data-dir" not in capsys.readouterr().out
