"""Shared fixtures (the real embedded Whisper runner, loaded once per test process) and the
rule that lets the suite run in two processes without weakening its claims about time.

The suite runs in two pytest-xdist workers. Many tests spend part of their time waiting on
sockets and timers (one process running four of the server test files used 1.3 of the 2 cores),
so a second worker fills the idle core; a test whose claim is about time (partials
while someone speaks at real time, a latency or wall-clock bound) must not share the CPU with
another test's model calls. Such tests are marked ``timing``: each runs its whole protocol
(setup, call, teardown) holding a machine-wide exclusive lock, while every other test holds the
same lock shared. A turnstile keeps a waiting ``timing`` test from being starved by the other
worker's stream of shared holders.

Two workers each running torch with one intra-op thread per core oversubscribe the cores:
measured here, two Whisper test files side by side took
150 s with two threads each and 100 s with one. So in a worker torch runs with one thread, in
the test's own thread and (`runner.num_threads` 1) in the batcher threads of the servers on the
shared Whisper runner. A ``timing`` test has the machine to itself but keeps that one thread:
its claims hold with less compute than a served model has, not more.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from server.config import RunnerConfig
from server.runners import create_runner

# One pair of lock files per test run: the controller's environment is inherited by the workers.
_RUN = os.environ.setdefault("CHORUS_TEST_RUN_LOCKS", tempfile.mkdtemp(prefix="chorus-test-locks-"))


@contextmanager
def _flock(name: str, mode: int):
    with open(Path(_RUN) / name, "a+") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if _WORKER:
    torch.set_num_threads(1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("timing"):
        with _flock("turnstile", fcntl.LOCK_EX), _flock("cpu", fcntl.LOCK_EX):
            yield
    else:
        with _flock("turnstile", fcntl.LOCK_EX):
            pass  # wait here while a timing test waits for, or holds, the CPU
        with _flock("cpu", fcntl.LOCK_SH):
            yield


# The longest test files first (seconds in one two-worker run on the 2-core machine, 2026-12-07):
# each file runs whole on one worker, and a long file dealt out last would keep one worker
# busy while the other has nothing left to do. The rest follow in their usual order.
LONGEST_FIRST = (
    "test_api.py",  # 119
    "test_server.py",  # 102
    "test_funasr.py",  # 100
    "test_whisper_runner.py",  # 99
    "test_reliability.py",  # 89
    "test_twilio.py",  # 65
    "test_transcribe_cli.py",  # 56
    "test_haproxy.py",  # 52
    "test_beam_search.py",  # 49
    "test_realtime.py",  # 44
    "test_file_bounds.py",  # 42
    "test_audiosocket.py",  # 40
    "test_device_path.py",  # 39
    "test_slow_client.py",  # 35
    "test_browser.py",  # 33
    "test_qwen3asr_runner.py",  # 33
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


@pytest.fixture(scope="session")
def whisper_runner():
    runner = create_runner(RunnerConfig(name="whisper", model="embedded", device="cpu", num_threads=1 if _WORKER else 0))
    runner.load()
    return runner
