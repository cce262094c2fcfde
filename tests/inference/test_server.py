"""The live server over a real WebSocket: protocol, busy refusal, disconnects, load and fuzz."""

import asyncio
import json
import os
import random
import socket
import threading
import time
import urllib.request

import psutil
import pytest
import websockets
from factories import shrink_rope
from live_server import frames_in, is_event, live_server, receive_until

from selfforcing.cli import DEFAULT_MODEL
from selfforcing.inference.pipeline import StreamingPipeline
from selfforcing.inference.protocol import MAX_PROMPT_CHARS, ProtocolError, Start, Switch, parse_message
from selfforcing.inference.server import MAX_MESSAGE_BYTES, Outbox, ServerOptions, is_loopback

PROMPT = "a yellow square bouncing on a dark blue background"
FAST = 120  # frames per second asked by the tests: pacing never holds them back for long


@pytest.fixture(scope="module")
def shared_server():
    with live_server(max_streams=2) as s:
        yield s


@pytest.fixture
def server(shared_server):
    """The module's server, once the previous test's connections have been cleaned up."""
    app = shared_server[1]
    deadline = time.monotonic() + 20
    while app.state.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    return shared_server


def connect(address):
    return websockets.connect(f"ws://{address}/ws", max_size=2**20)


def stream_threads() -> int:
    return sum(t.name == "selfforcing-stream" and t.is_alive() for t in threading.enumerate())


async def wait_until(condition, timeout=20.0):
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def test_start_frames_in_order_switch_stop_and_reset(server):
    address, _ = server

    async def session():
        async with connect(address) as ws:
            ready = json.loads(await ws.recv())
            assert ready["type"] == "ready" and (ready["width"], ready["height"]) == (32, 32)
            await ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 3, "fps": FAST}))
            got = await receive_until(ws, lambda item: len(frames_in([item])) and item[0] >= 8)
            assert got[0] == {"type": "started", "prompt": PROMPT, "seed": 3}
            assert frames_in(got) == list(range(9))  # every frame, in order, indices from 0
            chunks = [item[1] for item in got if isinstance(item, tuple)]
            assert chunks == sorted(chunks) and chunks[:3] == [0, 0, 0]
            assert all(item[2][:2] == b"\xff\xd8" for item in got if isinstance(item, tuple))  # JPEG

            await ws.send(json.dumps({"type": "switch", "prompt": "a green square bouncing on a dark blue background",
                                      "mode": "blend", "blend_chunks": 2}))
            got = await receive_until(ws, is_event("switched"))
            switched = got[-1]
            assert switched["mode"] == "blend" and switched["from_frame"] % 3 == 0
            got = await receive_until(ws, lambda item: isinstance(item, tuple) and item[0] >= switched["from_frame"] + 3)
            frames = frames_in(got)
            assert frames == list(range(frames[0], frames[-1] + 1))  # the stream goes on without a gap

            await ws.send(json.dumps({"type": "stop"}))
            await receive_until(ws, is_event("stopped"))
            with pytest.raises(TimeoutError):  # nothing more arrives once stopped
                await receive_until(ws, lambda item: isinstance(item, tuple), timeout=0.6)

            await ws.send(json.dumps({"type": "reset"}))
            got = await receive_until(ws, lambda item: isinstance(item, tuple) and item[0] >= 2)
            assert got[0]["type"] == "started" and got[0]["seed"] == 3
            assert frames_in(got) == [0, 1, 2]  # from frame 0 again, same prompt and seed

    asyncio.run(session())


def test_same_seed_streams_the_same_frames(server):
    address, _ = server

    async def first_frames():
        async with connect(address) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 7, "fps": FAST}))
            got = await receive_until(ws, lambda item: isinstance(item, tuple) and item[0] == 5)
            return [item[2] for item in got if isinstance(item, tuple)]

    assert asyncio.run(first_frames()) == asyncio.run(first_frames())


def test_the_client_over_max_streams_is_told_busy_and_a_freed_slot_is_reused(server):
    address, app = server

    async def session():
        async with connect(address) as a, connect(address) as b:
            for ws in (a, b):
                assert json.loads(await ws.recv())["type"] == "ready"
            async with connect(address) as c:
                busy = json.loads(await c.recv())
                assert busy["type"] == "busy" and "busy" in busy["message"]
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await c.recv()
                assert closed.value.rcvd.code == 1013
            await a.send(json.dumps({"type": "start", "prompt": PROMPT, "fps": FAST}))
            await receive_until(a, lambda item: isinstance(item, tuple))
        await wait_until(lambda: not app.state.sessions)  # both slots free again
        async with connect(address) as d:
            assert json.loads(await d.recv())["type"] == "ready"

    asyncio.run(session())


def test_a_disconnect_mid_stream_frees_the_stream_at_once(server):
    address, app = server

    async def session():
        ws = await connect(address)
        await ws.recv()
        await ws.send(json.dumps({"type": "start", "prompt": PROMPT, "fps": FAST}))
        await receive_until(ws, lambda item: isinstance(item, tuple) and item[0] >= 3)
        assert stream_threads() == 1
        await ws.close()
        start = time.perf_counter()
        await wait_until(lambda: not app.state.sessions and stream_threads() == 0, timeout=5)
        return time.perf_counter() - start

    assert asyncio.run(session()) < 2.0  # one chunk boundary at most


def test_max_streams_clients_all_stream_while_memory_stays_flat(server):
    address, app = server
    rss = psutil.Process(os.getpid()).memory_info

    async def client(counts, i, seconds):
        async with connect(address) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": i, "fps": FAST}))
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                if isinstance(await ws.recv(), bytes):
                    counts[i] += 1

    async def load(seconds):
        counts = [0, 0]
        await asyncio.gather(*(client(counts, i, seconds) for i in range(2)))
        await wait_until(lambda: not app.state.sessions)
        return counts

    asyncio.run(load(2))  # warm-up: allocator pools, JPEG encoder, thread pool
    before = rss().rss
    counts = [asyncio.run(load(2)) for _ in range(3)]
    growth_mb = (rss().rss - before) / 2**20
    assert all(min(c) >= 6 for c in counts), counts
    assert growth_mb < 40, f"memory grew by {growth_mb:.1f} MB over three rounds of load"


HOSTILE = [
    "", "{", "[]", "null", "42", '"start"', "{}", '{"type": 5}', '{"type": "launch"}', '{"type": null}',
    '{"type": "start"}', '{"type": "start", "prompt": ""}', '{"type": "start", "prompt": "   "}',
    '{"type": "start", "prompt": 42}', '{"type": "start", "prompt": ["a"]}', '{"type": "start", "prompt": null}',
    '{"type": "start", "prompt": "a red circle", "seed": -1}', '{"type": "start", "prompt": "a", "seed": 1e30}',
    '{"type": "start", "prompt": "a", "seed": "7"}', '{"type": "start", "prompt": "a", "seed": true}',
    '{"type": "start", "prompt": "a", "seed": 2147483648}', '{"type": "start", "prompt": "a", "fps": 0}',
    '{"type": "start", "prompt": "a", "fps": -3}', '{"type": "start", "prompt": "a", "fps": 1e9}',
    '{"type": "start", "prompt": "a", "fps": NaN}', '{"type": "start", "prompt": "a", "fps": Infinity}',
    '{"type": "start", "prompt": "a", "path": "/etc/passwd"}', '{"type": "start", "prompt": "a", "model": "../x"}',
    '{"type": "switch", "prompt": "a"}', '{"type": "switch", "prompt": "a", "mode": "fade"}',
    '{"type": "switch", "prompt": "a", "blend_chunks": 0}', '{"type": "switch", "prompt": "a", "blend_chunks": 1000}',
    '{"type": "stop", "now": true}', '{"type": "reset"}', '{"type": "STOP"}', "[" * 5000 + "]" * 5000,
    '{"type": "start", "prompt": "' + "x" * (MAX_PROMPT_CHARS + 1) + '"}',
    '{"type": "start", "prompt": "' + "\\u0000" * 10 + '"}', "\x00\x01\x02", '{"type": "start", "prompt": "\\udfff"}',
    '{"type": "start", "prompt": "a red circle\\n\\u001b[2J"}',
]


def hostile_messages(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    messages = list(HOSTILE)
    while len(messages) < n:
        kind = rng.randrange(4)
        if kind == 0:  # binary junk
            messages.append(rng.randbytes(rng.randrange(1, 2048)))
        elif kind == 1:  # a valid message, mangled
            text = json.dumps({"type": "switch", "prompt": "a red circle", "blend_chunks": 2})
            cut = rng.randrange(len(text))
            messages.append(text[:cut] + chr(rng.randrange(32, 0x2FFF)) + text[cut + 1:])
        elif kind == 2:  # random values of the wrong type or range
            value = rng.choice([None, True, -1, 10**20, 1.5, "x" * rng.randrange(600, 20000), [], {}, "\ud800"])
            messages.append(json.dumps({"type": rng.choice(["start", "switch"]), "prompt": value, "seed": value}))
        else:  # random printable text
            messages.append("".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(1, 200))))
    return messages


def test_fuzz_every_hostile_message_gets_an_error_reply_and_other_clients_keep_streaming(server):
    address, _ = server
    messages = hostile_messages(1200)

    async def watcher(stop: asyncio.Event, counts: list[int]):
        async with connect(address) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "start", "prompt": PROMPT, "fps": FAST}))
            while not stop.is_set():
                if isinstance(await ws.recv(), bytes):
                    counts[0] += 1

    async def attacker():
        async with connect(address) as ws:
            await ws.recv()
            errors = 0
            for message in messages:
                await ws.send(message)
                reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
                errors += reply["type"] == "error" and bool(reply["message"])
            # Still serving this client too: a valid start works after the barrage.
            await ws.send(json.dumps({"type": "start", "prompt": PROMPT, "fps": FAST}))
            got = await receive_until(ws, lambda item: isinstance(item, tuple))
            return errors, got[0]["type"]

    async def run():
        stop, counts = asyncio.Event(), [0]
        watching = asyncio.create_task(watcher(stop, counts))
        await asyncio.sleep(0.5)
        before = counts[0]
        result = await attacker()
        after = counts[0]
        stop.set()
        await asyncio.wait_for(watching, 20)
        return result, after - before

    (errors, first_reply), watched = asyncio.run(run())
    assert errors == len(messages) >= 1000
    assert first_reply == "started"
    assert watched > 0  # the other client kept receiving frames throughout


def test_a_message_over_the_size_limit_closes_only_that_connection(server):
    address, _ = server

    async def session():
        async with connect(address) as ws:
            await ws.recv()
            await ws.send("x" * (MAX_MESSAGE_BYTES + 1))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 1009  # "message too big"
        async with connect(address) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"

    asyncio.run(session())


def test_outbox_drops_the_stalest_frames_for_a_slow_client_and_never_grows():
    async def run():
        box = Outbox(max_frames=4)
        for i in range(100):
            box.put_frame(bytes([i]))
        box.put_event({"type": "stats"})
        assert len(box.frames) == 4 and box.dropped == 96
        assert json.loads(await box.get()) == {"type": "stats"}  # events go first
        return [await box.get() for _ in range(4)]

    assert asyncio.run(run()) == [bytes([i]) for i in range(96, 100)]  # the newest frames survive


def test_parse_message_defaults_and_clear_errors():
    assert parse_message('{"type": "start", "prompt": "a red circle"}') == Start(type="start", prompt="a red circle")
    switch = parse_message('{"type": "switch", "prompt": "p"}')
    assert isinstance(switch, Switch) and (switch.mode, switch.blend_chunks) == ("recache", 3)
    for raw, reason in [(b"\x00", "binary"), ("{", "not valid JSON"), ("[1]", "JSON object"),
                        ('{"type": "go"}', "unknown message type"), ('{"type": "start"}', "start: prompt"),
                        ('{"type": "start", "prompt": "a", "seed": "1"}', "start: seed"),
                        ('{"type": "start", "prompt": "a", "file": "/etc/passwd"}', "file")]:
        with pytest.raises(ProtocolError, match=reason):
            parse_message(raw)


def test_only_loopback_counts_as_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")


def test_a_silent_client_is_closed_after_the_idle_timeout_and_the_next_one_streams():
    """With one slot, a connection that never starts a stream (or asks for one too slow to ever
    deliver) would lock every other user out: it is closed after the idle timeout."""

    def health(address):
        with urllib.request.urlopen(f"http://{address}/health", timeout=10) as response:
            return json.loads(response.read())

    async def session(address, app):
        silent = await connect(address)
        assert json.loads(await silent.recv())["type"] == "ready"
        await silent.send(json.dumps({"type": "start", "prompt": PROMPT, "fps": 1e-9}))
        refused = json.loads(await silent.recv())
        assert refused["type"] == "error" and "fps must be at least 1" in refused["message"]
        async with connect(address) as other:  # the only slot is taken
            assert json.loads(await other.recv())["type"] == "busy"
        slots = (await asyncio.to_thread(health, address))["slots"]
        assert len(slots) == 1 and not slots[0]["generating"] and 0 <= slots[0]["age_s"] < 5

        idle = json.loads(await asyncio.wait_for(silent.recv(), 10))
        assert idle["type"] == "idle" and "reconnect" in idle["message"]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await silent.recv()
        assert closed.value.rcvd.code == 1000
        await wait_until(lambda: not app.state.sessions)

        async with connect(address) as next_client:  # the freed slot streams
            assert json.loads(await next_client.recv())["type"] == "ready"
            await next_client.send(json.dumps({"type": "start", "prompt": PROMPT, "fps": FAST}))
            got = await receive_until(next_client, lambda item: isinstance(item, tuple) and item[0] >= 2)
            assert frames_in(got)[:3] == [0, 1, 2]
            assert (await asyncio.to_thread(health, address))["slots"][0]["generating"]
            await next_client.send(json.dumps({"type": "stop"}))  # stopped, then silent: closed in turn
            await receive_until(next_client, is_event("idle"), timeout=10)

    with live_server(max_streams=1, idle_timeout_s=1.0) as (address, app):
        asyncio.run(session(address, app))


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_refuses_bad_options_before_loading_anything(tmp_path, capsys):
    from selfforcing.cli import main

    assert main(["serve", "--max-streams", "0"]) == 2
    assert "--max-streams" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_hands_the_first_frame_over_early_with_the_kernel_asked_for(monkeypatch):
    """The live page shows the first frame as soon as it is decoded, not after its whole chunk;
    --attention-backend and --compile-scope reach the model, and --compile warms it up first."""
    from selfforcing.cli import main
    from selfforcing.inference import server
    from selfforcing.inference.pipeline import StreamingPipeline

    served, warmed = [], []
    monkeypatch.setattr(server, "serve", lambda pipe, sock, options: served.append(pipe))
    monkeypatch.setattr(StreamingPipeline, "warm_up", lambda pipe: warmed.append(pipe.early_first_frame) or 0.0)
    port = free_port()
    assert main(["serve", "--port", str(port), "--attention-backend", "cudnn", "--compile", "--compile-scope",
                 "blocks"]) == 0
    assert served[0].early_first_frame and served[0].model.attention_backend == "cudnn"
    assert all("run_block" in step.keywords for step in served[0].model._compiled_steps)  # one block compiled for all
    assert warmed == [True]  # compiled (and captured) before the first viewer, as that viewer streams


def test_a_stream_whose_event_loop_is_gone_stops_quietly():
    """At server shutdown a generator thread may outlive the loop: it must stop, not raise."""
    from collections import deque

    from selfforcing.cli import DEFAULT_MODEL
    from selfforcing.inference.pipeline import StreamingPipeline
    from selfforcing.inference.server import ServerOptions, StreamSession

    loop = asyncio.new_event_loop()
    loop.close()
    session = StreamSession(StreamingPipeline.from_pretrained(DEFAULT_MODEL), loop, ServerOptions())
    stop = session._stop
    session._generate(Start(type="start", prompt=PROMPT), stop, deque())  # returns instead of streaming for ever
    assert stop.is_set()


@pytest.mark.parametrize("flags, device, compiles", [
    ([], "cpu", False), ([], "cuda", True), ([], "cuda:1", True),
    (["--no-compile"], "cuda", False), (["--compile"], "cpu", True),
])
def test_serve_compiles_by_default_on_cuda_only(flags, device, compiles):
    """On CUDA compiling made the 1.3B stream real-time (docs/PERFORMANCE.md); the toy on the
    CPU is faster than real time without it. An explicit flag wins either way."""
    from selfforcing.cli import _serve_compiles, build_parser

    args = build_parser().parse_args(["serve", "--device", device, *flags])
    assert _serve_compiles(args) is compiles


def test_serve_names_a_failing_compiler_and_the_way_around_it(monkeypatch, capsys):
    """Asked to compile, serve stops with one line; compiling by default (CUDA), it serves
    uncompiled after a warning."""
    import torch._dynamo.exc

    from selfforcing.cli import DEFAULT_MODEL, _warm_up_compiled, main
    from selfforcing.inference import server
    from selfforcing.inference.pipeline import StreamingPipeline

    def fail(pipe):
        raise torch._dynamo.exc.TorchDynamoException("Cannot find a working triton installation\nmore")

    monkeypatch.setattr(StreamingPipeline, "warm_up", fail)
    monkeypatch.setattr(server, "serve", lambda pipe, sock, options: pytest.fail("served"))
    assert main(["serve", "--port", str(free_port()), "--compile"]) == 2
    err = capsys.readouterr().err
    assert ("compiling the chunk step failed on cpu (TorchDynamoException: Cannot find a working triton "
            "installation); serve with --no-compile") in err and "Traceback" not in err

    pipe = StreamingPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.compile()
    _warm_up_compiled(pipe, fall_back=True)
    assert pipe.compile_scope is None and pipe.model._compiled_steps is None
    assert "warning: compiling the chunk step failed on cpu (TorchDynamoException: Cannot find a working " \
           "triton installation); serving it uncompiled" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hostile clients (issue 30)


def test_a_client_that_queues_a_thousand_starts_then_leaves_frees_its_slot_at_once(server):
    """Each start stops the stream before it at a chunk boundary: handled one by one after the
    client left, a thousand of them held the only slot for minutes."""
    address, app = server

    async def session():
        ws = await websockets.connect(f"ws://{address}/ws", close_timeout=0.5)  # it reads nothing: no close reply
        await ws.recv()
        start = json.dumps({"type": "start", "prompt": PROMPT, "fps": FAST})
        for _ in range(1000):
            await ws.send(start)
        left = time.perf_counter()
        await ws.close()
        await wait_until(lambda: not app.state.sessions and stream_threads() == 0, timeout=10)
        return time.perf_counter() - left

    assert asyncio.run(session()) < 3.0  # one chunk boundary, not a thousand


def test_queued_messages_past_the_limit_are_dropped_with_an_error(server):
    address, _ = server

    async def session():
        async with connect(address) as ws:
            await ws.recv()
            for _ in range(200):
                await ws.send(json.dumps({"type": "start", "prompt": PROMPT, "fps": FAST}))
            got = await receive_until(ws, lambda item: isinstance(item, dict) and "are waiting" in item.get("message", ""))
            assert "more than 64 messages" in got[-1]["message"]

    asyncio.run(session())


def handshake(address: str, origin: str | None, host: str | None = None) -> str:
    """The status line answering a WebSocket opening handshake sent with these headers (a raw
    socket: a client library fills Host from the address)."""
    headers = ["GET /ws HTTP/1.1", f"Host: {host or address}", "Upgrade: websocket", "Connection: Upgrade",
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    if origin is not None:
        headers.append(f"Origin: {origin}")
    ip, port = address.split(":")
    with socket.create_connection((ip, int(port)), timeout=10) as sock:
        sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())
        return sock.recv(4096).split(b"\r\n")[0].decode()


def test_a_page_of_another_origin_cannot_open_a_stream():
    """Any web page in the user's browser may open a WebSocket to a loopback server: the browser
    names the page in Origin, and only the server's own page (or --allow-origin) is let in."""
    with live_server(max_streams=4, allow_origins=("https://app.example.org",)) as (address, app):
        port = address.split(":")[1]
        accepted = "HTTP/1.1 101 Switching Protocols"
        assert handshake(address, None) == accepted  # not a browser: scripts send no Origin
        assert handshake(address, f"http://{address}") == accepted  # the server's own page
        assert handshake(address, f"http://localhost:{port}", host=f"localhost:{port}") == accepted
        assert handshake(address, "https://app.example.org") == accepted  # allowed for a deployment
        for origin, host in [("http://evil.example", None), ("null", None), (f"http://127.0.0.1:{int(port) + 1}", None),
                             (f"http://evil.example:{port}", f"evil.example:{port}"),  # DNS rebinding to 127.0.0.1
                             ("https://app.example.org.evil.example", None)]:
            assert handshake(address, origin, host).startswith("HTTP/1.1 403"), origin
    with pytest.raises(Exception, match="not a web origin"):
        ServerOptions(allow_origins=("app.example.org",))


def test_health_answers_throughout_a_slowloris_and_slow_headers_are_timed_out():
    """Connections that never finish their headers: each is closed after the header timeout, and
    past max_connections the oldest goes for the newcomer, so /health always gets through."""
    cap = 20
    with live_server(max_streams=1, max_connections=cap, header_timeout_s=2.0) as (address, app):
        ip, port = address.split(":")
        attackers, answered = [], []
        try:
            for i in range(400):
                sock = socket.create_connection((ip, int(port)))
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
                attackers.append(sock)
                if i % 50 == 49:
                    with urllib.request.urlopen(f"http://{address}/health", timeout=5) as response:
                        answered.append(response.status)
            assert answered == [200] * 8
            open_now = sum(1 for c in psutil.Process().net_connections("tcp")
                           if c.laddr and c.laddr.port == int(port) and c.status == psutil.CONN_ESTABLISHED)
            assert open_now <= cap + 2  # the server's side of the attackers' connections
            lone = attackers[-1]
            lone.settimeout(10)
            started = time.perf_counter()
            assert lone.recv(1024) == b""  # closed by the server after the header timeout
            assert time.perf_counter() - started < 4
        finally:
            for sock in attackers:
                sock.close()


def test_a_stream_runs_past_twice_the_rope_table():
    """`serve` streams until the viewer stops: with the shipped default's table cut to 16 frames,
    a stream goes on 2.5x past it (absolute positions ended it with an error at the table's end)."""
    pipe = shrink_rope(StreamingPipeline.from_pretrained(DEFAULT_MODEL), 16)

    async def session(address):
        async with connect(address) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "start", "prompt": PROMPT, "fps": FAST}))
            got = await receive_until(ws, lambda item: isinstance(item, tuple) and item[0] >= 40, timeout=60)
            assert not [item for item in got if isinstance(item, dict) and item["type"] == "error"]

    with live_server(max_streams=1, pipe=pipe) as (address, _):
        asyncio.run(session(address))
