"""Live call subscriptions: WebSocket `/v1/calls?call_id=ID` (or `*`) on the main port.

A subscriber receives ``{"type": "subscribed", "call_id": ...}``, then the call's events
as JSON text, exactly as the webhook gets them: for one call, what was said so far (every
event but partials) and then the call live, and the connection closes with 1000 after
``call_ended``; with ``*``, every call's events from now on, until the subscriber leaves.
A subscriber may connect before its call starts. If the call's history (bounded, see
server/calls/hub.py) has dropped events, ``subscribed`` carries ``history_dropped``: how
many. Subscribers use no model capacity and never slow a call: one that falls behind by
`server.max_outgoing_messages` live events (or `server.max_outgoing_bytes`) is disconnected
with 1008 (see server/calls/hub.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from server.calls.hub import Subscription
from server.transport.connection import (
    CLOSE_INTERNAL, CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TRY_AGAIN, SLOW_CONSUMER, close_or_abort,
)

if TYPE_CHECKING:
    from server.app import ChorusServer

log = logging.getLogger(__name__)

PATH = "/v1/calls"


async def _write(ws: ServerConnection, sub: Subscription) -> None:
    while True:
        body = await sub.get()
        if body is None:
            return
        await ws.send(body, text=True)  # already UTF-8 JSON: sent as a text frame without a copy


async def _read(ws: ServerConnection) -> None:
    """Subscribers have nothing to say; their messages are read (so pongs and the close
    handshake are seen) and dropped."""
    async for _ in ws:
        pass


async def _keepalive(ws: ServerConnection, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        pong = await ws.ping()
        try:
            async with asyncio.timeout(interval):
                await pong
        except TimeoutError:
            return


async def handle(app: "ChorusServer", ws: ServerConnection) -> None:
    """websockets' handler for /v1/calls; process_request already checked access and call_id."""
    call_id = dict(parse_qsl(urlsplit(ws.request.path).query, keep_blank_values=True)).get("call_id", "")
    sub = app.calls.subscribe(call_id)
    if sub is None:  # the last slot went to a concurrent handshake, or the server began stopping
        await close_or_abort(ws, CLOSE_TRY_AGAIN, "too many subscribers")
        return
    finished = asyncio.get_running_loop().create_future()
    app.subscriptions.add(finished)
    tasks: list[asyncio.Task] = []
    try:
        await sub.ready()  # a call on another replica: its history comes from Redis first
        subscribed: dict = {"type": "subscribed", "call_id": call_id}
        if sub.history_dropped:
            # Events of this call that its bounded history no longer holds (their `seq`s are missing).
            subscribed["history_dropped"] = sub.history_dropped
        await ws.send(json.dumps(subscribed))
        writer = asyncio.create_task(_write(ws, sub))
        overflow = asyncio.create_task(sub.overflowed_event.wait())
        reader = asyncio.create_task(_read(ws))
        tasks = [writer, overflow, reader]
        interval = app.config.server.ping_interval_s
        keepalive = asyncio.create_task(_keepalive(ws, interval)) if interval > 0 else None
        if keepalive is not None:
            tasks.append(keepalive)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if overflow.done():
            await close_or_abort(ws, CLOSE_POLICY, SLOW_CONSUMER)
        elif writer.done() and writer.exception() is None:
            # The call ended (1000), or the server is stopping after every call drained.
            if app.calls.closed:
                await close_or_abort(ws, app.config.server.shutdown_close_code, "server shutting down")
            else:
                await close_or_abort(ws, CLOSE_NORMAL, "call ended")
        elif keepalive is not None and keepalive.done() and keepalive.exception() is None:
            log.info("a /v1/calls subscriber sent no pong in %g s; closing 1011", interval)
            await close_or_abort(ws, CLOSE_INTERNAL, "keepalive ping timeout")
    except ConnectionClosed:
        pass
    finally:
        for task in tasks:
            task.cancel()
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a closed socket's error is expected here
        app.calls.unsubscribe(sub)
        app.subscriptions.discard(finished)
        finished.set_result(None)


__all__ = ["PATH", "handle"]
