"""Ports for servers a test starts on a fixed port (subprocesses, and listeners whose 0 means
"off").

Binding port 0, reading the port back and closing the socket races: the kernel may hand the
same ephemeral port to any other socket (an outgoing connection included) before the server
binds it. These ports come from a range below the kernel's ephemeral range, which it never
hands out by itself, each at most once per test process, and each checked to be free when
handed out. Each worker of a run has its own block, and a run picks its blocks from its own id,
so two runs at once on one machine seldom draw from the same block.
"""

from __future__ import annotations

import itertools
import os
import zlib
import socket
import threading

_BLOCK = 500  # ports per test process
_FIRST = 20000  # below the kernel's ephemeral range (32768 by default; checked below)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_index() -> int:
    # pytest-xdist names its workers gw0, gw1, ...
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker[2:].isdigit() else 0


def _block() -> int:
    blocks = (_ephemeral_low() - _FIRST) // _BLOCK
    if blocks < 2:
        raise RuntimeError("tests/ports.py: the kernel's ephemeral port range starts too low for these tests")
    # tests/conftest.py names one directory per run, inherited by the run's workers.
    run = zlib.crc32(os.environ.get("CHORUS_TEST_RUN_LOCKS", str(os.getpid())).encode())
    return (run + _worker_index()) % blocks


_start = _FIRST + _block() * _BLOCK
_next = itertools.count(_start)
_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no other caller in this test run gets and that the kernel
    does not hand out on its own."""
    with _lock:
        for port in _next:
            if port >= _start + _BLOCK:
                break
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue  # taken by something outside this run
                return port
    raise RuntimeError("tests/ports.py: this test process used its whole block of ports")
