"""A real uvicorn server on a loopback port, in a background thread, for the server tests."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from contextlib import contextmanager

import uvicorn

from selfforcing.cli import DEFAULT_MODEL
from selfforcing.inference.pipeline import StreamingPipeline
from selfforcing.inference.server import ServerOptions, create_app, uvicorn_config

HEADER = struct.Struct("<4sIIHHf")


@contextmanager
def live_server(max_streams: int = 2, pipe: StreamingPipeline | None = None, **options):
    """Yield (base_url, app) of ``pipe`` (default: the shipped toy model) served on a free loopback port."""
    pipe = pipe or StreamingPipeline.from_pretrained(DEFAULT_MODEL)
    app = create_app(pipe, ServerOptions(max_streams=max_streams, **options))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, app.state.options, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


async def receive_until(ws, predicate, timeout: float = 20.0):
    """Receive messages until ``predicate(event_or_frame)`` is true; return everything received.
    Events come back as dicts, frames as (frame_index, chunk_index, jpeg_bytes)."""
    received = []
    async with asyncio.timeout(timeout):
        while True:
            raw = await ws.recv()
            if isinstance(raw, bytes):
                magic, frame, chunk, _, _, _ = HEADER.unpack(raw[: HEADER.size])
                assert magic == b"SFv1"
                item = (frame, chunk, raw[HEADER.size:])
            else:
                item = json.loads(raw)
            received.append(item)
            if predicate(item):
                return received


def is_event(kind: str):
    return lambda item: isinstance(item, dict) and item["type"] == kind


def frames_in(received) -> list[int]:
    return [item[0] for item in received if isinstance(item, tuple)]
