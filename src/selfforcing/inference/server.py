"""`selfforcing serve`: watch and steer a stream live in the browser.

One FastAPI app: ``/`` is the page, ``/ws`` the WebSocket, ``/health`` a JSON status. Each
WebSocket connection owns at most one ``StreamSession``: a generator thread running the
pipeline's rolling-cache stream (unbounded: it runs until the client stops it), with its own
KV cache and ``Conditioning`` so the prompt can be switched between chunks.

Back-pressure: the thread encodes frames to JPEG and offers them to a bounded queue that
drops the oldest frame when full, so a slow client sees a live picture with skipped frames
and the server's memory stays flat. Generation is paced to the stream's frame rate (at most
one chunk ahead of real time) so no compute goes to frames nobody can watch. A disconnect
stops the thread at the next chunk boundary and frees its cache.

No client holds a slot without streaming: a connection with no stream running (never
started, stopped, or failed) for ``idle_timeout_s`` is told so and closed, a client that
leaves frees its slot at once whatever it left queued, and a stream slower than ``min_fps``
is refused (it would produce nothing for ages while "running").

Hostile clients: a WebSocket opened by another site's page (the browser names it in
``Origin``) is refused unless ``allow_origins`` lists it, so a web page cannot drive a server
on the user's own machine; and connections that never finish a request are timed out and,
past ``max_connections``, closed to make room (``_guarded_http``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
import math
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image

from selfforcing.errors import SelfForcingError
from selfforcing.inference.conditioning import SWITCH_MODES, Conditioning
from selfforcing.inference.pipeline import StreamingPipeline
from selfforcing.inference.protocol import (
    MAX_BLEND_CHUNKS, MAX_FPS, MAX_PROMPT_CHARS, ProtocolError, Reset, Start, Stop, Switch, frame_message,
    parse_message,
)

MAX_MESSAGE_BYTES = 64 * 1024  # uvicorn closes the connection on larger client messages


@dataclass(frozen=True)
class ServerOptions:
    max_streams: int = 1
    queue_frames: int = 8  # frames buffered per client before the oldest are dropped
    jpeg_quality: int = 90
    idle_timeout_s: float = 60.0  # a connection streaming nothing this long is closed
    min_fps: float = 1.0  # slowest stream a client may ask for
    allow_origins: tuple[str, ...] = ()  # web origins, besides the page's own, whose pages may open a stream
    max_connections: int = 100  # open connections; past it, the one waiting longest for its headers goes
    header_timeout_s: float = 10.0  # a request whose headers take longer is closed
    max_queued_messages: int = 64  # a client's control messages waiting to be handled

    def __post_init__(self) -> None:
        counts = (self.max_streams, self.queue_frames, self.max_connections, self.max_queued_messages)
        if min(counts) < 1 or not 1 <= self.jpeg_quality <= 100:
            raise SelfForcingError("max_streams, queue_frames, max_connections and max_queued_messages must be >= 1, "
                                   "jpeg_quality in [1, 100]")
        for name, value in (("idle", self.idle_timeout_s), ("header", self.header_timeout_s)):
            if not (math.isfinite(value) and value > 0):
                raise SelfForcingError(f"the {name} timeout must be a positive number of seconds, got {value}")
        for origin in self.allow_origins:
            if _origin(origin) is None:
                raise SelfForcingError(f"allowed origin {origin!r} is not a web origin such as https://example.org:8443")
        if not 0 < self.min_fps <= MAX_FPS:
            raise SelfForcingError(f"the minimum frame rate must be in (0, {MAX_FPS}], got {self.min_fps}")


def encode_jpeg(frame: torch.Tensor, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame.numpy()).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class Outbox:
    """What waits to be sent to one client, touched only on the event loop: control events
    (a bounded backlog) and frames (at most ``max_frames``; the stalest is dropped first)."""

    def __init__(self, max_frames: int, max_events: int = 256):
        self.events: deque[dict] = deque(maxlen=max_events)
        self.frames: deque[bytes] = deque()
        self.max_frames = max_frames
        self.dropped = 0
        self._ready = asyncio.Event()

    def put_event(self, event: dict) -> None:
        self.events.append(event)
        self._ready.set()

    def put_frame(self, message: bytes) -> None:
        if len(self.frames) >= self.max_frames:
            self.frames.popleft()
            self.dropped += 1
        self.frames.append(message)
        self._ready.set()

    def clear_frames(self) -> None:
        self.frames.clear()

    async def get(self) -> str | bytes:
        """The next message, events first (so an error is never stuck behind frames)."""
        while not (self.events or self.frames):
            self._ready.clear()
            await self._ready.wait()
        return json.dumps(self.events.popleft()) if self.events else self.frames.popleft()


class StreamSession:
    """One client's stream: a generator thread feeding the client's outbox."""

    def __init__(self, pipeline: StreamingPipeline, loop: asyncio.AbstractEventLoop, options: ServerOptions):
        self.pipeline, self.loop, self.options = pipeline, loop, options
        self.outbox = Outbox(options.queue_frames)
        self.request: Start | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._switches: deque[Switch] = deque()  # handed to the thread; deque append/popleft are atomic
        self.connected_at = time.monotonic()
        self._idle_from: float | None = self.connected_at

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def idle_for(self, now: float) -> float:
        """Seconds without a stream running (0 while one runs); a stream that ended on its own
        counts from the first call that finds it ended."""
        if self.running:
            self._idle_from = None
            return 0.0
        if self._idle_from is None:
            self._idle_from = now
        return now - self._idle_from

    async def start(self, request: Start) -> None:
        await self.stop()
        self.request = request
        self._stop, self._switches = threading.Event(), deque()
        self._thread = threading.Thread(target=self._generate, args=(request, self._stop, self._switches),
                                        daemon=True, name="selfforcing-stream")
        self._thread.start()

    def switch(self, request: Switch) -> None:
        if not self.running:
            raise ProtocolError("no stream is running: send start first")
        self._switches.append(request)

    async def stop(self) -> None:
        """Stop the thread (at its next chunk boundary) and wait for it, off the event loop."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self.outbox.clear_frames()

    # ---- the generator thread ---------------------------------------------
    def _generate(self, request: Start, stop: threading.Event, switches: deque) -> None:
        pipe = self.pipeline
        fps = request.fps or pipe.sampling.fps
        try:
            start = time.perf_counter()
            conditioning = Conditioning(pipe.encode_prompts([request.prompt]))
            frame_index, first_frame_s = 0, None
            for chunk in pipe.stream(conditioning, None, seed=request.seed):
                if stop.is_set():
                    break
                first_frame_s = first_frame_s or time.perf_counter() - start
                video = chunk.frames[0]
                for frame in video:
                    message = frame_message(frame_index, chunk.index, time.perf_counter() - start,
                                            encode_jpeg(frame, self.options.jpeg_quality), video.shape[2], video.shape[1])
                    self._post(self.outbox.put_frame, message)
                    frame_index += 1
                self._emit({"type": "stats", "chunk": chunk.index, "frames": frame_index, "dropped": self.outbox.dropped,
                            "fps": frame_index / (time.perf_counter() - start), "first_frame_s": first_frame_s})
                while switches:
                    switch = switches.popleft()
                    conditioning.switch(pipe.encode_prompts([switch.prompt]), switch.mode, switch.blend_chunks)
                    self._emit({"type": "switched", "prompt": switch.prompt, "mode": switch.mode,
                                "from_frame": frame_index})
                # Pace to the playback clock: stay at most one chunk ahead of real time.
                ahead = (frame_index - video.shape[0]) / fps - (time.perf_counter() - start)
                if ahead > 0 and stop.wait(ahead):
                    break
        except Exception as e:  # a failing stream must reach its client, not kill the server
            self._emit({"type": "error", "message": f"generation failed: {e}"})

    def _emit(self, event: dict) -> None:
        self._post(self.outbox.put_event, event)

    def _post(self, method, item) -> None:
        """Hand ``item`` to the event loop; if the loop is gone (server shutting down), stop."""
        try:
            self.loop.call_soon_threadsafe(method, item)
        except RuntimeError:
            self._stop.set()


def create_app(pipeline: StreamingPipeline, options: ServerOptions = ServerOptions()) -> FastAPI:
    app = FastAPI(title="selfforcing live", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sessions, app.state.options = set(), options
    page = resources.files("selfforcing.inference").joinpath("static/index.html").read_text()
    s = pipeline.sampling
    ready = {"type": "ready", "width": s.width, "height": s.height, "fps": s.fps, "modes": list(SWITCH_MODES),
             "max_prompt_chars": MAX_PROMPT_CHARS, "max_fps": MAX_FPS, "max_blend_chunks": MAX_BLEND_CHUNKS}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> JSONResponse:
        now = time.monotonic()
        slots = [{"age_s": round(now - x.connected_at, 1), "generating": x.running, "idle_s": round(x.idle_for(now), 1)}
                 for x in sorted(app.state.sessions, key=lambda x: x.connected_at)]
        return JSONResponse({"streams": len(app.state.sessions), "max_streams": options.max_streams,
                             "generating": sum(x.running for x in app.state.sessions), "slots": slots})

    @app.websocket("/ws")
    async def websocket(ws: WebSocket) -> None:
        if not _origin_allowed(ws, options.allow_origins):  # another site's page, in the user's browser
            await ws.close(code=1008)  # before accepting: the handshake is answered 403
            return
        await ws.accept()
        if len(app.state.sessions) >= options.max_streams:
            await ws.send_json({"type": "busy", "message": f"the server is busy: all {options.max_streams} "
                                "stream slots are taken, try again later"})
            await ws.close(code=1013)  # "try again later"
            return
        session = StreamSession(pipeline, asyncio.get_running_loop(), options)
        app.state.sessions.add(session)
        try:
            session.outbox.put_event(ready)
            await _serve(ws, session)
        finally:
            await session.stop()
            app.state.sessions.discard(session)

    return app


async def _serve(ws: WebSocket, session: StreamSession) -> None:
    """Receive control messages while one task handles them and another sends the outbox, until
    the client leaves (noticed at once, whatever it left queued) or streams nothing for the idle
    timeout (then it is told why and closed, freeing its slot)."""
    inbox: asyncio.Queue = asyncio.Queue(session.options.max_queued_messages)

    async def receive() -> None:  # returns when the client leaves
        while (message := await ws.receive())["type"] != "websocket.disconnect":
            raw = message.get("text")
            try:
                inbox.put_nowait(parse_message(raw if raw is not None else message.get("bytes")))
            except ProtocolError as e:
                session.outbox.put_event({"type": "error", "message": str(e)})
            except asyncio.QueueFull:
                session.outbox.put_event({"type": "error", "message": f"more than {inbox.maxsize} messages are "
                                          "waiting to be handled: this one is dropped; wait for the replies"})

    async def handle() -> None:
        while True:
            try:
                await _handle(await inbox.get(), session)
            except ProtocolError as e:
                session.outbox.put_event({"type": "error", "message": str(e)})

    async def send_outbox() -> None:
        while True:
            message = await session.outbox.get()
            await (ws.send_text(message) if isinstance(message, str) else ws.send_bytes(message))

    tasks = [asyncio.create_task(work()) for work in (receive, handle, send_outbox)]
    timeout = session.options.idle_timeout_s
    try:
        while (idle := session.idle_for(time.monotonic())) < timeout:
            done, _ = await asyncio.wait(tasks, timeout=timeout - idle, return_when=asyncio.FIRST_COMPLETED)
            for task in done:  # the client left, or its socket failed
                if not isinstance(task.exception(), (WebSocketDisconnect, RuntimeError, type(None))):
                    raise task.exception()
                return
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the client may be gone already
        await ws.send_json({"type": "idle", "message": f"nothing streamed for {timeout:g} s: "
                            "the connection is closed to free its slot; reconnect to stream again"})
        await ws.close(code=1000)


async def _handle(message, session: StreamSession) -> None:
    if isinstance(message, Reset):  # a restart from frame 0 with the last start's prompt, seed and fps
        if session.request is None:
            raise ProtocolError("nothing to reset: send start first")
        message = session.request
    if isinstance(message, Start):
        if message.fps is not None and message.fps < session.options.min_fps:
            raise ProtocolError(f"start: fps must be at least {session.options.min_fps:g} on this server, "
                                f"got {message.fps:g}")
        await session.start(message)
        session.outbox.put_event({"type": "started", "prompt": message.prompt, "seed": message.seed})
    elif isinstance(message, Switch):
        session.switch(message)
    elif isinstance(message, Stop):
        await session.stop()
        session.outbox.put_event({"type": "stopped"})


def _origin(text: str) -> tuple[str, str, int] | None:
    """A web origin's (scheme, host, port), or None for anything else (a path, "null", no host)."""
    try:
        parts = urlsplit(text)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        return None
    return parts.scheme, parts.hostname, port


def _origin_allowed(ws: WebSocket, allowed: tuple[str, ...]) -> bool:
    """A browser names the page that opens a WebSocket in ``Origin`` (other clients send none). The
    page's own origin is this server as the browser reached it (the Host header); served on
    loopback, that must be a loopback name too, or a site could rebind its own name to 127.0.0.1."""
    origin = ws.headers.get("origin")
    if origin is None:
        return True
    asked = _origin(origin)
    if asked is None:
        return False
    if asked in {_origin(a) for a in allowed}:
        return True
    host = ws.headers.get("host", "")
    own = _origin(f"{asked[0]}://{host}")
    server = ws.scope.get("server") or ("", None)
    return asked == own and (is_loopback(asked[1]) or not is_loopback(server[0]))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, made before the model loads: a taken port or an
    address this machine does not have is reported at once, in one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as e:
        raise SelfForcingError(f"cannot listen on {host}:{port}: {e.strerror or e}; check --host") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen()
    except OSError as e:
        sock.close()
        raise SelfForcingError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port "
                               "or --host") from None
    return sock


def uvicorn_config(app: FastAPI, options: ServerOptions, log_level: str = "info"):
    """uvicorn's settings for ``app``: message size, and its HTTP protocol with the guards of
    :func:`_guarded_http`."""
    import uvicorn

    return uvicorn.Config(app, ws_max_size=MAX_MESSAGE_BYTES, http=_guarded_http(options), log_level=log_level)


def _guarded_http(options: ServerOptions) -> type:
    """uvicorn's HTTP/1.1 protocol with the two guards it lacks against clients that connect and
    never finish a request (slowloris): a request's headers must arrive within
    ``header_timeout_s``, and past ``max_connections`` the connection that has waited longest
    for its headers is closed to make room, so that a real request (``/health``, the page, a
    stream) always gets through while the open files stay bounded."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    waiting: dict[HttpToolsProtocol, asyncio.TimerHandle] = {}  # headers still due, oldest first

    class GuardedHttp(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._expect_headers()
            if len(self.connections) > options.max_connections:
                _close(next(iter(waiting)))  # the oldest: this one itself if no other is waiting

        def on_message_begin(self) -> None:  # each request of a kept-alive connection too
            super().on_message_begin()
            self._expect_headers()

        def on_headers_complete(self) -> None:
            _forget(self)
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            _forget(self)
            super().connection_lost(exc)

        def _expect_headers(self) -> None:
            _forget(self)
            waiting[self] = self.loop.call_later(options.header_timeout_s, _close, self)

    def _forget(connection) -> None:
        timer = waiting.pop(connection, None)
        if timer is not None:
            timer.cancel()

    def _close(connection) -> None:
        _forget(connection)
        connection.transport.close()

    return GuardedHttp


def check_open_files(max_connections: int) -> None:
    """Raise the open-file limit to what ``max_connections`` needs (the hard limit allowing), or
    name the problem before the model loads: past the limit, accepting fails for everyone."""
    import resource

    needed = max_connections + 64  # the model's files, the listening socket, logs
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    except (ValueError, OSError):  # over the hard limit, or over what the kernel allows any process
        raise SelfForcingError(f"--max-connections {max_connections} needs {needed} open files, and this process "
                               f"may open {soft} (ulimit -n): lower --max-connections") from None


def serve(pipeline: StreamingPipeline, sock: socket.socket, options: ServerOptions = ServerOptions()) -> None:
    """Serve on ``sock`` (from :func:`listen`) until SIGINT or SIGTERM."""
    import uvicorn

    config = uvicorn_config(create_app(pipeline, options), options)
    host, port = sock.getsockname()[:2]
    print(f"serving on http://{f'[{host}]' if ':' in host else host}:{port}/ (Ctrl-C to stop)", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
