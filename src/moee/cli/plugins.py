"""What other installed distributions add to the `moee` command, found through entry points
so that the core never imports them: commands (group `moee.commands`: a function adding
subparsers) and the embedded default model with its Fashion-MNIST data (group
`moee.embedded_default`: a module). moee-lab (`lab/` in the repository) provides both."""

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


def embedded_default() -> ModuleType:
    """The module behind the embedded default: `load_model()`, `preprocess_images(images)`,
    `calibration_data(args)`, `training_data(args)`, `calibration_batch(args, moe_model)` and
    `evaluate(args, moe_model, dense)`. Raises ConfigError saying how to get it."""
    found = sorted(entry_points(group=DEFAULT_GROUP), key=lambda e: e.name)
    if not found:
        raise ConfigError("the embedded default model and its Fashion-MNIST data are not "
                          f"installed: {LAB_HINT}; or give a model (--model / --dense / "
                          "--teacher) and --data")
    return found[0].load()
