"""Several `chorus serve` processes behind Debian's HAProxy on loopback, for the fleet tests
(tests/test_haproxy.py, tests/test_deploy.py) and bench/fleet_bench.py.

The balancer runs deploy/haproxy/haproxy.cfg as shipped: its addresses come from the
environment (the file reads ``${NAME-default}``), so what is tested is what operators run.
Every process started here is stopped by its owner's ``close()`` (fixtures call it in a
finalizer), and every wait is bounded.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.ports import free_port
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
CHORUS = Path(sys.executable).parent / "chorus"


def haproxy_binary() -> str | None:
    """Debian installs haproxy in /usr/sbin, which is not on every user's PATH."""
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None)


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, Any]:
    """Status and JSON body (or text) of GET http://127.0.0.1:port/path."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        return status, json.loads(body or b"{}")
    except ValueError:
        return status, body.decode(errors="replace")


class Replica:
    """One `chorus serve` process with its own ports (main, FunASR, API, AudioSocket)."""

    def __init__(self, name: str, *sets: str, argv: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port, self.funasr_port, self.api_port, self.audiosocket_port = (free_port() for _ in range(4))
        self.sets = sets
        self._argv = argv
        self._env = env
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(mode="w+", prefix=f"chorus-{name}-", suffix=".log", delete=False)

    def command(self) -> list[str]:
        if self._argv is not None:
            return self._argv
        argv = [str(CHORUS), "serve", "--config", str(ROOT / "configs" / "default.yaml"), "--port", str(self.port),
                "--funasr-port", str(self.funasr_port), "--api-port", str(self.api_port),
                "--audiosocket-port", str(self.audiosocket_port)]
        for s in self.sets:
            argv += ["--set", s]
        return argv

    def start(self) -> "Replica":
        # The log goes to a file: an unread pipe would fill and block the server's event loop.
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(self._env or {})})
        return self

    def wait_ready(self, timeout: float = 120) -> "Replica":
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited {self.proc.returncode}: {self.tail()}")
            try:
                return http_get(self.port, "/healthz", 2)[0] == 200
            except OSError:
                return False

        try:
            wait_until(ready, timeout, 0.2, f"replica {self.name} answers /healthz 200")
        except AssertionError as e:
            raise RuntimeError(f"{e}: {self.tail()}") from None
        return self

    def health(self) -> dict:
        return http_get(self.port, "/healthz")[1]

    def sessions(self) -> int:
        return int(self.health()["sessions"])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def close(self) -> None:
        """SIGTERM, then SIGKILL after 20 s: never leave a process behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        _discard(self.log)


class HAProxy:
    """Debian's haproxy running deploy/haproxy/haproxy.cfg in front of replicas ``a`` and ``b``."""

    def __init__(self, a: Replica, b: Replica) -> None:
        self.port, self.funasr_port, self.api_port, self.audiosocket_port, self.stats_port = (free_port() for _ in range(5))
        self.env = {
            "CHORUS_LB_HOST": "127.0.0.1", "CHORUS_LB_PORT": str(self.port), "CHORUS_LB_FUNASR_PORT": str(self.funasr_port),
            "CHORUS_LB_API_PORT": str(self.api_port), "CHORUS_LB_AUDIOSOCKET_PORT": str(self.audiosocket_port),
            "CHORUS_LB_STATS_PORT": str(self.stats_port),
        }
        for key, r in (("A", a), ("B", b)):
            self.env.update({f"CHORUS_{key}_HOST": "127.0.0.1", f"CHORUS_{key}_PORT": str(r.port),
                             f"CHORUS_{key}_FUNASR_PORT": str(r.funasr_port), f"CHORUS_{key}_API_PORT": str(r.api_port),
                             f"CHORUS_{key}_AUDIOSOCKET_PORT": str(r.audiosocket_port)})
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(mode="w+", prefix="haproxy-", suffix=".log", delete=False)

    def start(self, binary: str) -> "HAProxy":
        env = {**os.environ, **self.env}
        check = subprocess.run([binary, "-c", "-q", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c rejected {HAPROXY_CFG}: {check.stdout}{check.stderr}")
        # -db: stay in the foreground (no daemon), so close() stops exactly this process.
        self.proc = subprocess.Popen([binary, "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def servers(self) -> dict[tuple[str, str], dict[str, str]]:
        """(backend, server) -> its row of HAProxy's stats CSV (status, scur, ...)."""
        status, text = http_get(self.stats_port, "/;csv", 5)
        assert status == 200, text
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {(r["pxname"], r["svname"]): r for r in rows if r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_up(self, backend: str, names: set[str], timeout: float = 60) -> None:
        """Until exactly ``names`` of ``backend``'s servers are UP (the others not)."""
        up: set[str] = set()

        def as_wanted() -> bool:
            nonlocal up
            assert self.proc is not None and self.proc.poll() is None, self.tail()
            try:
                up = {s for (b, s), row in self.servers().items() if b == backend and row["status"].startswith("UP")}
            except OSError:
                up = set()
            return up == names

        try:
            wait_until(as_wanted, timeout, 0.1)
        except AssertionError:
            raise AssertionError(f"{backend}: UP {sorted(up)}, wanted {sorted(names)}: {self.tail()}") from None

    def tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        _discard(self.log)


def _discard(log) -> None:
    """The process's log file: read by tail() for failure messages, removed once it is stopped."""
    log.close()
    Path(log.name).unlink(missing_ok=True)
