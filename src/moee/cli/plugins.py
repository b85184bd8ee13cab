"""What other installed distributions add to the `moee` command, found through entry points
so that the core never imports them: commands (group `moee.commands`: a function adding
subparsers) and the embedded default model with its data (group `moee.embedded_default`: a
module, which also adds the options saying where its data is). moee-lab (`lab/` in the
repository) provides both."""

from __future__ import annotations

import argparse
from importlib.metadata import entry_points
from types import ModuleType

from moee.errors import ConfigError

COMMANDS_GROUP = "moee.commands"
DEFAULT_GROUP = "moee.embedded_default"
# The commands moee-lab adds: named when it is missing, instead of argparse's "invalid choice".
LAB_COMMANDS = ("demo", "study", "train-base", "analyze", "bench")
LAB_HINT = ("it comes with moee-lab: `pip install ./lab` in moee's repository (setup.sh "
            "installs it)")


def add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Let every installed distribution registered under `moee.commands` add its commands."""
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        entry.load()(sub)


def commands_installed() -> bool:
    """Whether any distribution adds commands (moee-lab does)."""
    return bool(entry_points(group=COMMANDS_GROUP))


def _default_entries() -> list:
    return sorted(entry_points(group=DEFAULT_GROUP), key=lambda e: e.name)


def embedded_default() -> ModuleType:
    """The module behind the embedded default: `load_model()`, `preprocess_images(images)`,
    `calibration_data(args)`, `training_data(args)`, `calibration_batch(args, moe_model)`,
    `evaluate(args, moe_model, dense)` and `add_data_args(parser)`. Raises ConfigError saying
    how to get it."""
    found = _default_entries()
    if not found:
        raise ConfigError("the embedded default model and its data are not installed: "
                          f"{LAB_HINT}; or give a model (--model / --dense / --teacher) and "
                          "--data")
    return found[0].load()


def add_default_data_args(p: argparse.ArgumentParser) -> None:
    """Let the embedded default, when installed, add the options saying where its data is to
    a command that falls back to it without --data. Such options check themselves: the
    module may `p.set_defaults(check_default_data=f)`, and `f(args)` runs before any model
    loads (moee.cli.sources.check_data)."""
    found = _default_entries()
    if found:
        found[0].load().add_data_args(p)
