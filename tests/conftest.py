"""Shared fixtures: the real embedded Whisper runner, loaded once per test session."""

from __future__ import annotations

import pytest

from server.config import RunnerConfig
from server.runners import create_runner


@pytest.fixture(scope="session")
def whisper_runner():
    runner = create_runner(RunnerConfig(name="whisper", model="embedded", device="cpu"))
    runner.load()
    return runner
