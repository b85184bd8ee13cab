"""`moee` command line: extract, finetune, evaluate, calibrate, export, verify (and, with
moee-lab installed, demo, study, train-base, analyze, bench).

Thin over the Python API; every default comes from the config dataclasses. moee's own errors
print as one line (exit code 2); anything else shows its traceback. The library's progress
notes and warnings (the `moee` loggers) print to stderr as "moee: ..." lines.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys

from moee.cli.checks import check_before_work
from moee.cli.options import extract_config
from moee.cli.outputs import check_outputs
from moee.cli.parser import make_parser
from moee.cli.plugins import LAB_COMMANDS, LAB_HINT, commands_installed
from moee.cli.sources import check_data
from moee.errors import MoeeError
from moee.util.modes import Terminated

__all__ = ["build_parser", "extract_config", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `moee` command (moee.cli.parser)."""
    return make_parser(__doc__.splitlines()[0])


def _join_torchrun() -> None:
    """Under torchrun (WORLD_SIZE > 1) join its process group: NCCL on GPUs, gloo on CPUs."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record comes (not when made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_to_stderr() -> None:
    """Show the library's notes (INFO and above of the `moee` loggers) as "moee: ..." lines on
    stderr; once per process, however often `main` runs."""
    logger = logging.getLogger("moee")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("moee: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


# A write that fails for want of room or rights: reported in one line, not a traceback.
WRITE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM,
                errno.EROFS}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    log_to_stderr()
    parser = build_parser()
    if argv[:1] and argv[0] in LAB_COMMANDS and not commands_installed():
        print(f"moee {argv[0]}: error: {LAB_HINT}", file=sys.stderr)
        return 2
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest  # a command with its own parser (moee-lab's bench) reads the rest
    _join_torchrun()
    try:
        check_data(args)  # a missing file or folder is reported before any model loads
        check_outputs(args)  # and an --out that cannot or must not be written
        check_before_work(args)  # the device, --json, options without effect, ...
        return args.func(args)
    except MoeeError as e:
        print(f"moee {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as e:  # after every `finally`: temporary files gone
        code = e.code if isinstance(e, Terminated) else 128 + signal.SIGINT
        print(f"moee {args.command}: stopped by {signal.Signals(code - 128).name}; temporary "
              "files were removed (a --work-dir keeps what was done, and resumes)",
              file=sys.stderr)
        return code
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"moee {args.command}: error: cannot write{where}: {e.strerror}. Free space or "
              "choose another --out / --work-dir; with --work-dir, what was computed is kept "
              "and the same command resumes", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
