"""Rolling self-attention KV cache for streaming generation (paper Algorithm 2).

The cache holds the keys and values of up to ``capacity`` past latent frames for every
block, in buffers preallocated once so that every chunk step sees the same shapes.
Storage is a ring of frame *slots*: when the cache is full, the next frames overwrite the
slots of the oldest frames (O(1) bookkeeping, no copies), except for ``sink_frames`` first
frames that are never evicted. Attention is permutation-invariant over keys, so slot order
does not matter; each slot remembers its frame's position for RoPE instead.

Keys are stored *before* RoPE. Positions are applied at read time, either the absolute
frame index (``rope_positions="absolute"``, exact equivalence with a parallel forward) or
renumbered from the start of the window (``"relative"``), so that generation can run for
ever without positions passing the end of the RoPE table.

A forward that stores a chunk follows ``evict`` -> ``append`` (once per layer) -> ``commit``:
every layer must still read the old window while the chunk is being written.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from selfforcing.errors import SelfForcingError

ROPE_MODES = ("absolute", "relative")


def check_sink_ema(sink_ema: float, sink_frames: int) -> None:
    """An EMA-Sink decay in [0, 1), and one only where there are sinks to fuse into."""
    if not 0 <= sink_ema < 1 or sink_ema and not sink_frames:
        raise SelfForcingError(f"sink_ema must be in [0, 1), and > 0 only with sink_frames; got {sink_ema} "
                               f"with {sink_frames} sink frames")


class KVCache:
    def __init__(self, num_layers: int, capacity: int, sink_frames: int = 0, rope_positions: str = "absolute",
                 sink_ema: float = 0.0, attended_frames: int | None = None):
        """``sink_ema`` > 0 makes the sinks an EMA-Sink (Reward Forcing): each frame the ring evicts
        is fused into sink ``frame % sink_frames`` as ``sink = sink_ema * sink + (1 - sink_ema) *
        evicted``, keys and values alike, once the forward that evicts it is done.

        ``attended_frames`` (< ``capacity``) makes attention see what a cache of that capacity
        would hold (the sinks and the most recent other frames, at the positions they would
        have there) while older frames stay in their slots, hidden, until the ring needs them:
        a training rollout whose checkpointed forwards re-read their window in the backward can
        then stream through a rolling cache, since a frame is only overwritten once no forward
        sees it (``overwrites`` counts only those that were still seen)."""
        if capacity < 0 or sink_frames < 0:
            raise SelfForcingError(f"cache capacity and sink frames must be >= 0, got {capacity}, {sink_frames}")
        check_sink_ema(sink_ema, sink_frames)
        self.sink_ema = sink_ema
        if sink_frames > capacity:
            raise SelfForcingError(f"sink_frames ({sink_frames}) cannot exceed the cache capacity ({capacity})")
        if rope_positions not in ROPE_MODES:
            raise SelfForcingError(f"rope_positions must be one of {ROPE_MODES}, got {rope_positions!r}")
        if attended_frames is not None and not sink_frames < attended_frames <= capacity:
            raise SelfForcingError(f"attended_frames ({attended_frames}) must exceed sink_frames ({sink_frames}) and "
                                   f"not exceed the capacity ({capacity})")
        self.num_layers = num_layers
        self.capacity = capacity
        self.attended_frames = attended_frames
        self.sink_frames = sink_frames
        self.rope_positions = rope_positions
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        # Bumped whenever held K/V may be overwritten (eviction, reset): a forward recomputed
        # later (gradient checkpointing) reads the window in place and checks it is unchanged.
        self.overwrites = 0
        self.reset()

    # ---- state -----------------------------------------------------------
    def reset(self) -> None:
        """Forget every frame (buffers stay allocated for the next stream)."""
        self.slot_frame = torch.full((self.capacity,), -1, dtype=torch.long)  # frame index held by each slot
        self.num_valid = 0  # slots [0, num_valid) hold frames
        self.frames_seen = 0  # frames ever appended: the absolute index of the next frame
        self.tokens_per_frame: int | None = None
        self.hidden_before = 0  # frames with an index below this stay cached but are not attended
        self.overwrites += 1
        self._evicted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> K/V a chunk evicts (sink_ema)

    def skip_to(self, frame: int) -> None:
        """Number the next appended frame ``frame``: after a ``reset``, re-filling held frames at
        their original stream positions (re-encoding them under a new prompt) needs the gaps
        that eviction left between the sinks and the recent frames."""
        if frame < self.frames_seen:
            raise SelfForcingError(f"cannot skip back to frame {frame}: frame {self.frames_seen} is next")
        self.frames_seen = frame

    def held_frames(self) -> list[int]:
        """Stream indices of the frames held, oldest first."""
        return sorted(self.slot_frame[: self.num_valid].tolist())

    def __len__(self) -> int:
        """Number of frames currently held."""
        return self.num_valid

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v)

    # ---- reading ---------------------------------------------------------
    static = False  # see StaticKVCache

    def window(self, layer: int, frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached (B, frames*tokens, H, D) keys (pre-RoPE) and values of ``layer`` (a view of the
        first ``frames`` slots, default all held); None if empty."""
        frames = self.num_valid if frames is None else frames
        if frames == 0:
            return None
        n = frames * self.tokens_per_frame
        return self._k[layer][:, :n], self._v[layer][:, :n]

    def hide_frames_before(self, frame: int) -> None:
        """Stop attending to frames ``< frame`` without evicting them (paper §3.4: the last training
        chunk may not see the first, as after eviction at extrapolation time)."""
        self.hidden_before = frame

    def _seen(self) -> torch.Tensor:
        """(held,) bool: the held frames attention sees (all but those ``attended_frames`` hides)."""
        held = self.slot_frame[: self.num_valid]
        if self.attended_frames is None:
            return torch.ones_like(held, dtype=torch.bool)
        return (held < self.sink_frames) | (held >= self.frames_seen - (self.attended_frames - self.sink_frames))

    def _num_seen(self) -> int:
        """How many held frames attention sees (counted without tensors where it sees them all:
        the fast engine asks before every forward)."""
        return self.num_valid if self.attended_frames is None else int(self._seen().sum())

    def key_mask(self) -> torch.Tensor | None:
        """(frames*tokens,) bool over the window, False for hidden frames; None if nothing is hidden."""
        keep = (self.slot_frame[: self.num_valid] >= self.hidden_before) & self._seen()
        if keep.all():
            return None
        return keep.repeat_interleave(self.tokens_per_frame)

    def positions(self) -> torch.Tensor:
        """RoPE frame positions of the held frames, in slot order."""
        held = self.slot_frame[: self.num_valid]
        if self.rope_positions == "absolute":
            return held
        # Relative: sinks keep 0..S-1, the rest are numbered by age right after them (frames hidden
        # by ``attended_frames`` count for nothing: their positions are never read).
        seen = self._seen()
        rank = torch.zeros_like(held)
        rank[seen.nonzero().flatten()[held[seen].argsort()]] = torch.arange(int(seen.sum()))
        return rank

    def next_positions(self, num_frames: int) -> torch.Tensor:
        """RoPE positions for the next ``num_frames`` frames of the stream."""
        start = self.frames_seen if self.rope_positions == "absolute" else self._num_seen()
        return torch.arange(start, start + num_frames)

    # ---- writing ---------------------------------------------------------
    def evict(self, num_frames: int) -> torch.Tensor:
        """Choose the slots the next ``num_frames`` frames will occupy, evicting the oldest
        non-sink frames if the cache is full. Nothing changes until ``commit``."""
        if num_frames > self.capacity - self.sink_frames:
            raise SelfForcingError(
                f"a chunk of {num_frames} frames does not fit a KV cache of {self.capacity} frames "
                f"with {self.sink_frames} sink frames"
            )
        free = list(range(self.num_valid, min(self.capacity, self.num_valid + num_frames)))
        need = num_frames - len(free)
        held = self.slot_frame[: self.num_valid]
        evictable = (held >= self.sink_frames).nonzero().flatten()
        oldest = evictable[held[evictable].argsort()[:need]]
        return torch.cat([torch.tensor(free, dtype=torch.long), oldest])

    def append(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write a chunk's pre-RoPE keys and values (B, frames*tokens, H, D) for one layer."""
        if self.tokens_per_frame is None:
            self._allocate(k, len(slots))
        tpf = self.tokens_per_frame
        if k.shape[1] != len(slots) * tpf or k.shape[0] != self._k[layer].shape[0]:
            raise SelfForcingError(
                f"chunk K/V of shape {tuple(k.shape)} does not match the cache ({tpf} tokens per frame, "
                f"batch {self._k[layer].shape[0]}); call reset() before changing resolution or batch"
            )
        index = (slots[:, None] * tpf + torch.arange(tpf)).flatten().to(k.device)
        if self.sink_ema and bool((slots < self.num_valid).any()):  # what this chunk evicts, fused into the sinks at commit
            self._evicted[layer] = (self._k[layer].index_select(1, index), self._v[layer].index_select(1, index))
        self._k[layer].index_copy_(1, index, k.detach())  # the cache never holds an autograd graph
        self._v[layer].index_copy_(1, index, v.detach())

    def commit(self, slots: torch.Tensor) -> int:
        """Mark ``slots`` as holding the next frames of the stream; returns how many held frames
        they evicted."""
        if self.sink_ema and self._evicted:
            for layer, (k, v) in self._evicted.items():
                self._fuse_into_sinks(layer, slots, k, v)
            self._evicted = {}
        n = len(slots)
        overwritten = slots[slots < self.num_valid]
        evicted = len(overwritten)
        if evicted and (self.sink_ema or self._seen()[overwritten].any()):  # (a hidden frame: no forward reads it)
            self.overwrites += 1
        self.slot_frame[slots] = torch.arange(self.frames_seen, self.frames_seen + n)
        self.frames_seen += n
        self.num_valid = min(self.capacity, self.num_valid + n)
        return evicted

    def _fuse_into_sinks(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shift=None) -> None:
        """EMA-Sink: fuse the K/V ``k``, ``v`` (B, len(slots)*tokens, H, D) that ``slots`` held
        before this chunk into the sinks, in stream order. ``shift(frames)`` (rotated keys, the
        static cache) moves an evicted key to its sink's position first."""
        tpf, a = self.tokens_per_frame, self.sink_ema
        held = self.slot_frame[slots]
        positions = None if shift is None else self.positions()  # (pre-RoPE keys need no move)
        for i in held.argsort().tolist():
            if slots[i] >= self.num_valid:
                continue  # a free slot: nothing evicted there
            sink = int(held[i]) % self.sink_frames
            sink_slot = int((self.slot_frame[: self.num_valid] == sink).nonzero()[0])
            ek, ev = k[:, i * tpf:(i + 1) * tpf], v[:, i * tpf:(i + 1) * tpf]
            if shift is not None:
                ek = shift(ek, int(positions[sink_slot]) - int(positions[slots[i]]))
            span = slice(sink_slot * tpf, (sink_slot + 1) * tpf)
            self._k[layer][:, span].mul_(a).add_(ek, alpha=1 - a)
            self._v[layer][:, span].mul_(a).add_(ev, alpha=1 - a)

    def _allocate(self, k: torch.Tensor, frames: int) -> None:
        """Size the buffers on the first append of a stream; reuse them if the shape is unchanged."""
        batch, tokens, heads, head_dim = k.shape
        self.tokens_per_frame = tokens // frames
        shape = (batch, self.capacity * self.tokens_per_frame, heads, head_dim)
        if self._k and self._k[0].shape == shape and self._k[0].dtype == k.dtype and self._k[0].device == k.device:
            return
        self._k = [k.new_zeros(shape) for _ in range(self.num_layers)]
        self._v = [k.new_zeros(shape) for _ in range(self.num_layers)]


class StaticKVCache(KVCache):
    """The same rolling cache, laid out for the fast engine's chunk step.

    Per layer one buffer of ``capacity + chunk_frames`` frame slots, allocated once. A chunk
    writes its K/V in place right after the held frames (into the free slots it will occupy,
    or, once the ring is full, into the scratch slots past it) and attends to the prefix of
    the buffer that ends with itself: no ``torch.cat`` of the window and the chunk, and no
    attention to empty slots. Keys are stored *rotated*: a chunk rotates its keys once, at
    its own positions, as it writes them. With relative positions every non-sink frame moves
    down by the number of frames evicted, so on eviction (once per chunk, not once per
    forward) the non-sink keys are rotated back by that many frames; sinks keep their
    positions. The bookkeeping (slots, eviction, positions) is ``KVCache``'s.

    The attended prefix grows while the cache fills, then stays at the whole buffer: a
    compiled step marks that one length dynamic and so compiles once.

    ``fill_frames`` (default ``chunk_frames``) is a second step size, for a rolling window: its
    forwards are windows of ``chunk_frames`` but its cache fills are one chunk of ``fill_frames``,
    which would otherwise be padded to a whole window. A piece is padded to the smaller size
    that holds it.
    """

    static = True

    def __init__(self, num_layers: int, capacity: int, sink_frames: int = 0, rope_positions: str = "absolute",
                 chunk_frames: int = 3, sink_ema: float = 0.0, fill_frames: int | None = None):
        fill_frames = chunk_frames if fill_frames is None else fill_frames
        if not 1 <= fill_frames <= chunk_frames:
            raise SelfForcingError(f"chunk_frames must be >= 1 and fill_frames in [1, chunk_frames], got "
                                   f"{chunk_frames}, {fill_frames}")
        self.chunk_frames, self.fill_frames = chunk_frames, fill_frames
        self._text = self._text_source = None  # the prompt's cross-attention K/V in fixed buffers
        self._rope: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        super().__init__(num_layers, capacity, sink_frames, rope_positions, sink_ema)

    def allocate(self, batch: int, tokens_per_frame: int, heads: int, head_dim: int, dtype, device) -> None:
        """Size the buffers for a stream (no-op when they already fit; a new shape needs ``reset``)."""
        shape = (batch, self._slots * tokens_per_frame, heads, head_dim)
        if self._k and self._k[0].shape == shape and self._k[0].dtype == dtype and self._k[0].device == device:
            return
        if self.tokens_per_frame is not None:
            raise SelfForcingError(f"this stream's cache holds {tuple(self._k[0].shape)} K/V, the forward needs "
                                   f"{shape}; call reset() before changing resolution or batch")
        self.tokens_per_frame = tokens_per_frame
        self._k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self._v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        _mark_static([*self._k, *self._v])

    def reset(self) -> None:
        super().reset()
        if self._k:  # keep the buffers (same addresses: a captured graph stays valid)
            self.tokens_per_frame = self._k[0].shape[1] // self._slots

    @property
    def _slots(self) -> int:
        """The ring, the scratch slots past it, and one slot never used: the attended prefix is
        then never the whole buffer, so its memory layout (a strided view) never changes and a
        compiled step keeps one graph."""
        return self.capacity + self.chunk_frames + 1

    def load_text(self, text, blocks):
        """``text`` (a ``TextContext``) with its cross-attention K/V in buffers that stay put
        for the whole stream: copied in when the prompt changes (a switch, each chunk of a
        blend), so the step reads the same tensors for every prompt."""
        if text is self._text_source:
            return self._text
        text.fill_kv(blocks)
        if self._text is None or [k.shape for k, _ in self._text.kv] != [k.shape for k, _ in text.kv]:
            self._text = replace(text, kv=[(k.clone(), v.clone()) for k, v in text.kv])
            _mark_static([t for kv in self._text.kv for t in kv])
        else:
            for (k, v), (src_k, src_v) in zip(self._text.kv, text.kv):
                k.copy_(src_k)
                v.copy_(src_v)
        self._text_source = text
        return self._text

    def chunk_rope(self, rope, positions: torch.Tensor, height: int, width: int):
        """``rope(positions, height, width)``, recomputed only when the positions change: the
        denoising steps and the cache fill of one chunk share them."""
        key = (tuple(positions.tolist()), height, width)
        if self._rope is None or self._rope[0] != key:
            self._rope = (key, rope(positions, height, width))
        return self._rope[1]

    # ---- one forward -----------------------------------------------------
    def step_frames(self, frames: int) -> int:
        """The step size a piece of ``frames`` frames runs at (padded up to it)."""
        return self.fill_frames if frames <= self.fill_frames else self.chunk_frames

    def attended(self, layer: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the buffer prefix the next piece attends to: the held frames, then its own
        ``step`` slots, where it writes its K/V (the last ``step`` frames)."""
        n = (self.num_valid + step) * self.tokens_per_frame
        return self._k[layer][:, :n], self._v[layer][:, :n]

    def attention_mask(self, frames: int, step: int) -> torch.Tensor | None:
        """None when the piece attends to everything in its prefix (the compiled path); else a
        (1, 1, 1, prefix) bool mask hiding frames below ``hidden_before`` and the padding of a
        piece of only ``frames`` frames in a step of ``step``."""
        hidden = self.slot_frame[: self.num_valid] < self.hidden_before
        if frames == step and not hidden.any():
            return None
        keep = torch.cat([~hidden, torch.arange(step) < frames])
        return keep.repeat_interleave(self.tokens_per_frame).to(self._k[0].device, non_blocking=True)[None, None, None]

    def commit_chunk(self, slots: torch.Tensor, shift=None) -> int:
        """Record the chunk just written after the held frames as held in ``slots``, moving the
        frames that landed elsewhere (in the scratch slots, once the ring is full); returns how
        many held frames were evicted (with relative positions the others all move down by it).
        ``shift(keys, frames)`` rotates keys along time: the EMA-Sink needs it, keys being stored
        rotated here."""
        tpf, n = self.tokens_per_frame, len(slots)
        if self.sink_ema and bool((slots < self.num_valid).any()):  # (nothing to fuse while the ring fills)
            index = (slots[:, None] * tpf + torch.arange(tpf)).flatten().to(self._k[0].device, non_blocking=True)
            for layer in range(self.num_layers):
                self._fuse_into_sinks(layer, slots, self._k[layer].index_select(1, index),
                                      self._v[layer].index_select(1, index), shift)
        written = torch.arange(self.num_valid, self.num_valid + n)
        moved = written != slots
        if moved.any():
            def tokens(frames):
                return (frames[:, None] * tpf + torch.arange(tpf)).flatten().to(self._k[0].device, non_blocking=True)

            src, dst = tokens(written[moved]), tokens(slots[moved])
            for buf in self._k + self._v:
                buf.index_copy_(1, dst, buf.index_select(1, src))
        return self.commit(slots)

    def rotate_non_sinks(self, cos: torch.Tensor, sin: torch.Tensor, rotate) -> None:
        """Rotate the keys of every non-sink ring slot by (cos, sin) in place (relative positions)."""
        lo, hi = self.sink_frames * self.tokens_per_frame, self.capacity * self.tokens_per_frame
        for k in self._k:
            k[:, lo:hi] = rotate(k[:, lo:hi], cos, sin)


def _mark_static(tensors: list[torch.Tensor]) -> None:
    """Tell torch.compile these buffers keep their address, so a CUDA-graph capture of the
    step may write and read them in place on every replay."""
    if tensors and tensors[0].is_cuda:
        for t in tensors:
            torch._dynamo.mark_static_address(t)
