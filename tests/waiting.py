"""Waiting for a condition with a deadline, instead of sleeping and hoping it holds."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll ``condition`` until it returns something true, and return that; fail the test
    with ``what`` (or the condition's name) once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout} s: {what or getattr(condition, '__name__', condition)}"
                                 f" (last value {value!r})")
        time.sleep(interval)


async def async_wait_until(condition: Callable[[], T | Awaitable[T]], timeout: float = 10.0, interval: float = 0.02,
                           what: str = "") -> T:
    """``wait_until`` for a coroutine: the condition may be a plain or an async callable."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout} s: {what or getattr(condition, '__name__', condition)}"
                                 f" (last value {value!r})")
        await asyncio.sleep(interval)
