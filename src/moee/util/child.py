"""Run a long native computation (HDBSCAN, scikit-learn) in a child process the parent can stop.

Python runs a signal handler only between bytecodes, so SIGTERM or Ctrl-C reaching a process
inside minutes of native clustering waits for it to finish. The parent here only waits, in
short intervals: a signal interrupts the wait, the child is terminated, and the exception
goes on to the `finally` and `with` blocks that clean up (a temporary activation store).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from moee.errors import WorkerDiedError
from moee.util.modes import cleanup_on_terminate

T = TypeVar("T")
POLL_SECONDS = 0.2


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this child when its parent dies (even by SIGKILL), so no orphan
    clusters on for minutes; a native loop could not notice by itself."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _child(conn, parent: int, threads: int | None, fn: Callable, args: tuple) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if threads is not None:  # the parent's thread count: the same arithmetic, the same result
        import torch

        torch.set_num_threads(threads)
    try:
        result: tuple[bool, Any] = (True, fn(*args))
    except BaseException as e:  # sent to the parent, raised there
        result = (False, e)
    conn.send(result)
    conn.close()


def run_in_child(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a spawned child process (`fn` and `args` are pickled: pass file paths
    rather than big arrays). SIGTERM or SIGINT while waiting terminates the child and raises
    in the parent; an exception in the child is raised again here."""
    ctx = multiprocessing.get_context("spawn")  # fork after torch/OpenMP threads can hang
    receive, send = ctx.Pipe(duplex=False)
    threads = None
    if "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    proc = ctx.Process(target=_child, args=(send, os.getpid(), threads, fn, args), daemon=True)
    with cleanup_on_terminate():
        proc.start()
        send.close()
        try:
            while not receive.poll(POLL_SECONDS):
                if not proc.is_alive() and not receive.poll(0):
                    raise WorkerDiedError(
                        f"the process running {fn.__name__} ended with exit code "
                        f"{proc.exitcode} and no result (killed, or out of memory?)")
            ok, value = receive.recv()
        finally:
            _stop(proc)
            receive.close()
    if not ok:
        raise value
    return value


def _stop(proc) -> None:
    """Terminate the child if it still runs, then reap it."""
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    proc.join()
