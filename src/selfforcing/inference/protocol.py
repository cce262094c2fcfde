"""The live server's wire protocol: JSON control messages in, JSON events and binary frames out.

Client -> server (text, JSON objects; anything else is answered with an ``error`` event):

* ``{"type": "start", "prompt": str, "seed": int?, "fps": number?}``: start (or restart) a stream.
* ``{"type": "switch", "prompt": str, "mode": "recache" | "blend"?, "blend_chunks": int?}``:
  change the prompt of the running stream from the next chunk on.
* ``{"type": "stop"}``: stop generating. ``{"type": "reset"}``: restart from frame 0 with
  the current prompt and seed.

Server -> client: JSON events (``ready``, ``started``, ``switched``, ``stopped``, ``stats``,
``error``, ``busy``, and ``idle`` just before the server closes a connection that has streamed
nothing for its idle timeout) and one binary message per video frame: ``FRAME_HEADER``
followed by JPEG bytes. Nothing on the wire is ever unpickled, and no message names a file.
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError

from selfforcing.inference.conditioning import SWITCH_MODES

MAX_PROMPT_CHARS = 500
MAX_SEED = 2**31 - 1
MAX_FPS = 120
MAX_BLEND_CHUNKS = 16

# magic, frame index, chunk index, width, height, seconds since the stream started
FRAME_HEADER = struct.Struct("<4sIIHHf")
FRAME_MAGIC = b"SFv1"



def _check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("prompt is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in prompt):
        raise ValueError("prompt contains control characters")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("prompt is not valid Unicode text") from None
    return prompt


Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_check_prompt)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Start(_Message):
    type: Literal["start"]
    prompt: Prompt
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    fps: float | None = Field(None, gt=0, le=MAX_FPS)


class Switch(_Message):
    type: Literal["switch"]
    prompt: Prompt
    mode: Literal[SWITCH_MODES] = "recache"
    blend_chunks: StrictInt = Field(3, ge=1, le=MAX_BLEND_CHUNKS)


class Stop(_Message):
    type: Literal["stop"]


class Reset(_Message):
    type: Literal["reset"]


Message = Annotated[Union[Start, Switch, Stop, Reset], Field(discriminator="type")]
_MESSAGE = TypeAdapter(Message)


class ProtocolError(ValueError):
    """A client message the server refuses; the text is sent back to the client."""


def parse_message(raw: str | bytes | None) -> Start | Switch | Stop | Reset:
    """Validate one client message or raise ``ProtocolError`` with a short reason."""
    if not isinstance(raw, str):
        raise ProtocolError("binary messages are not accepted: send JSON text")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ProtocolError("message is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("message must be a JSON object with a \"type\"")
    kind = data.get("type")
    if kind not in ("start", "switch", "stop", "reset"):
        raise ProtocolError(f"unknown message type {str(kind)[:40]!r}: expected start, switch, stop or reset")
    try:
        return _MESSAGE.validate_python(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"][1:]) or "message"
        raise ProtocolError(f"{kind}: {where}: {err['msg']}") from None


def frame_message(frame_index: int, chunk_index: int, seconds: float, jpeg: bytes, width: int, height: int) -> bytes:
    return FRAME_HEADER.pack(FRAME_MAGIC, frame_index, chunk_index, width, height, seconds) + jpeg
