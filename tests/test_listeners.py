"""Every listener's port, taken by another program: the server does not start, says which
listener and which flag to change, and leaves none of the listeners it had opened behind.

One test per listener (was three copies in test_api.py, test_audiosocket.py and test_funasr.py;
the main WebSocket port had none and raised a bare OSError)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from server.app import ChorusServer
from server.config import ConfigError
from tests.ports import free_port
from tests.serverharness import make_config

# listener -> (its config key, what the error must say)
LISTENERS = {
    "main": ("server.port", r"the WebSocket listener cannot open port \d+ .*--port N"),
    "funasr": ("funasr.port", r"the FunASR-compatible listener cannot open port \d+ .*--funasr-port N, or turn it off with --funasr-port 0"),
    "audiosocket": ("audiosocket.port", r"the AudioSocket listener cannot open port \d+ .*--audiosocket-port N"),
    "api": ("api.port", r"the HTTP API cannot open port \d+ .*--api-port N, or turn it off with --api-port 0"),
}


@pytest.mark.parametrize("listener", list(LISTENERS))
def test_a_taken_port_is_a_config_error_that_names_the_flag(whisper_runner, listener):
    key, message = LISTENERS[listener]
    ports = {k: free_port() for k in ("server.port", "funasr.port", "audiosocket.port", "api.port")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[key]))
        taken.listen()
        app = ChorusServer(make_config(**ports), runner=whisper_runner, preloaded=True)

        async def main():
            with pytest.raises(ConfigError, match=message):
                await app.start()
            opened = [s for s in (app._server, app._funasr_server, app._audiosocket_server) if s is not None]
            for s in opened:
                await asyncio.wait_for(s.wait_closed(), 10)
                assert not s.is_serving()
            return opened

        opened = asyncio.run(main())
        # They open in this order; those before the taken one were open, and are closed again.
        assert len(opened) == list(LISTENERS).index(listener)
    # Every port the failed start had opened is free again.
    for k, port in ports.items():
        if k != key:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
