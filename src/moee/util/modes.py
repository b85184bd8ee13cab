"""Train/eval flags: switch a model to eval mode for a while, then give each module its own
flag back (a model whose parts disagree keeps them disagreeing)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every module's own flag restored on exit, errors included."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class Terminated(SystemExit):
    """SIGTERM received inside `cleanup_on_terminate` (exit status 128 + 15)."""


@contextlib.contextmanager
def cleanup_on_terminate() -> Iterator[None]:
    """Inside the block SIGTERM raises `Terminated`, so `finally` and `with` blocks run (a
    temporary activation store is removed) instead of the process dying where it stands.
    Only where the handler is still the default and this is the main thread: a program's own
    handler is left alone."""
    import signal
    import threading

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def terminate(signum, frame) -> None:
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
