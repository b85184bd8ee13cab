"""Wall-clock timing: fast callables are timed in blocks of their own consecutive calls (each
timed call follows one of its own, as in serving); slow ones alternate call by call."""

import time

import torch

from moee.engine.timing import BLOCK_SECONDS, time_interleaved


def recorder(calls, name, seconds=0.0):
    def fn():
        calls.append(name)
        if seconds:
            time.sleep(seconds)
    return fn


def test_fast_callables_run_in_blocks_with_an_untimed_first_call():
    calls: list[str] = []
    out = time_interleaved({"a": recorder(calls, "a"), "b": recorder(calls, "b")},
                           torch.device("cpu"), repeats=3, min_seconds=0)
    assert set(out) == {"a", "b"} and all(v < BLOCK_SECONDS for v in out.values())
    turns = [calls[0]]
    for c in calls[1:]:
        if c != turns[-1]:
            turns.append(c)
    # two calls each to estimate, then a block each, which holds the 3 timed calls asked for
    assert turns == ["a", "b"] * 2
    assert calls.count("a") > 2 + 1 + 3


def test_slow_callables_alternate_call_by_call():
    calls: list[str] = []
    slow = 1.5 * BLOCK_SECONDS
    out = time_interleaved({"a": recorder(calls, "a", slow), "b": recorder(calls, "b", slow)},
                           torch.device("cpu"), repeats=3, min_seconds=0)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert all(v >= slow for v in out.values())


def test_nothing_to_time_gives_nothing():
    assert time_interleaved({}, torch.device("cpu")) == {}
