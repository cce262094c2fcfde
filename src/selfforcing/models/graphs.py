"""The fast engine's chunk step as CUDA-graph replays.

A captured graph replays fixed kernels on fixed addresses, so every input the step reads must
live at the same address at every replay. Most already do: the cache buffers are allocated
once per stream (``StaticKVCache``) and a chunk's attended prefix is a view that starts at
the buffer's start, and the prompt's cross-attention K/V sit in fixed buffers
(``StaticKVCache.load_text``). What changes per call (the latents, the timesteps, the
chunk's RoPE) is copied into static buffers before a replay. One graph per attended-prefix
length (the cache filling, then full) and per cache/text buffer set (a new stream shape, a
new cache).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch


class CapturedStep:
    """Wraps ``step(x, t, text, sa)`` (a ``StaticAttnInputs`` forward without a mask): the
    first call for a key captures it, later calls copy their inputs in and replay. Outputs
    are cloned, since the next replay overwrites the graph's output buffer."""

    def __init__(self, step: Callable):
        self.step = step
        self._graphs: dict[tuple, tuple[Callable[[], None], tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text, sa) -> torch.Tensor:
        # Every buffer a replay reads or writes in place, by address: a graph whose buffers
        # were freed may only replay where new ones took all of its addresses again.
        buffers = (*sa.keys, *sa.values, *(tensor for kv in text.kv for tensor in kv))
        key = (tuple(x.shape), sa.keys[0].shape[1], *(buffer.data_ptr() for buffer in buffers))
        if key not in self._graphs:
            static = (x.clone(), t.clone(), *(r.clone() for r in sa.rope))
            static_sa = replace(sa, rope=static[2:])
            replay, out = self._capture(lambda: self.step(static[0], static[1], text, static_sa))
            self._graphs[key] = (replay, static, out)
        replay, static, out = self._graphs[key]
        for buffer, value in zip(static, (x, t, *sa.rope)):
            buffer.copy_(value)
        replay()
        return out.clone()

    def _capture(self, run: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Capture ``run`` as one CUDA graph in its own memory pool, after a warm-up on a side
        stream (as ``torch.cuda.graphs`` asks: lazy inits and autotuning stay out of the
        capture). Warm-up and capture write the chunk's K/V from the same static inputs that
        the first replay then writes again, so the cache ends as one eager call leaves it."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other streams may use the GPU from their threads meanwhile.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = run()
        return graph.replay, out
