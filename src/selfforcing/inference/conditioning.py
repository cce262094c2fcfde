"""The text a stream is conditioned on, switchable between chunks (prompt switching mid-stream).

The paper streams one prompt. A live stream is steered by changing the prompt while it
runs; two published ways to do it without restarting are offered per switch:

* ``"recache"`` (LongLive, Yang et al. 2025): the frames the KV cache holds are re-encoded
  under the new prompt before the next chunk. Their self-attention keys were computed with
  the old prompt's cross-attention mixed in; re-encoding them removes that pull toward the
  old prompt, so the change takes hold within a chunk while the scene stays continuous.
* ``"blend"`` (Krea realtime): the cross-attention conditioning moves linearly from the old
  prompt to the new one over ``blend_chunks`` chunks, a softer transition. Cross-attention
  K/V are linear in the projected text, so blending the projected text blends them.

A switch asked for while a chunk is generated takes effect at the next chunk boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfforcing.errors import SelfForcingError
from selfforcing.models.wan import TextContext

SWITCH_MODES = ("recache", "blend")


@dataclass
class _Blend:
    source: TextContext
    target: TextContext
    done: int  # chunks generated since the switch
    total: int


class Conditioning:
    """Holds the current prompt's ``TextContext`` and any switch in progress."""

    def __init__(self, text: TextContext):
        self.text = text
        self._pending: tuple[TextContext, str, int] | None = None
        self._blend: _Blend | None = None

    def switch(self, text: TextContext, mode: str = "recache", blend_chunks: int = 3) -> None:
        """Condition the chunks after the current one on ``text``."""
        if mode not in SWITCH_MODES:
            raise SelfForcingError(f"switch mode must be one of {SWITCH_MODES}, got {mode!r}")
        if isinstance(blend_chunks, bool) or not isinstance(blend_chunks, int) or blend_chunks < 1:
            raise SelfForcingError(f"blend_chunks must be a positive integer, got {blend_chunks!r}")
        if text.text.shape != self.text.text.shape:
            raise SelfForcingError(
                f"new prompt embedding {tuple(text.text.shape)} does not match the stream's {tuple(self.text.text.shape)}"
            )
        self._pending = (text, mode, blend_chunks)

    def next_chunk(self) -> tuple[TextContext, bool]:
        """The text for the next chunk, and whether the cache must be re-encoded under it first."""
        pending, self._pending = self._pending, None
        if pending is not None:
            target, mode, blend_chunks = pending
            if mode == "recache":
                self.text, self._blend = target, None
                return target, True
            self._blend = _Blend(self.text, target, 0, blend_chunks)
        if self._blend is not None:
            b = self._blend
            b.done += 1
            if b.done >= b.total:
                self.text, self._blend = b.target, None
            else:
                self.text = TextContext(torch.lerp(b.source.text, b.target.text, b.done / b.total))
        return self.text, False
