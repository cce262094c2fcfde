"""Where a frame-wise ``mid`` stream spends its time, per engine, and what exact attention costs.

1. ``torch.profiler`` over one 9-frame frame-wise stream of the ``mid`` preset (after a
   warm-up stream), eager and fast engines: the share of self CPU time of the top ops.
2. The CPU flash SDPA against matmul-softmax-matmul and inductor's compiled FlexAttention at
   the shapes of a ``mid`` chunk (6 heads of 64; frame-wise 390 queries over 3900 keys,
   chunk-wise 1170 over 4680).

Run: ``python benchmarks/profile_engines.py`` (figures in docs/PERFORMANCE.md).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from torch.profiler import ProfilerActivity, profile

from selfforcing.bench import random_pipeline

OPS = ["aten::_scaled_dot_product_flash_attention_for_cpu", "aten::addmm", "aten::cat", "aten::mul", "aten::gelu",
       "aten::copy_"]


def op_shares(engine: str) -> dict[str, float]:
    pipe = random_pipeline("mid", 1, torch.device("cpu"), engine)
    for _ in pipe.stream(["warm-up"], 9):
        pass
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in pipe.stream(["profile"], 9):
            pass
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return {op: 100 * sum(e.self_cpu_time_total for e in events if e.key == op) / total for op in OPS}


def milliseconds(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def attention_times(queries: int, keys: int) -> tuple[float, float, float]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, n, 64, generator=g) for n in (queries, keys, keys))
    flex = torch.compile(flex_attention, dynamic=False)
    torch.testing.assert_close(flex(q, k, v), F.scaled_dot_product_attention(q, k, v))

    def matmul_softmax():
        return torch.matmul((torch.matmul(q, k.transpose(-1, -2)) * 64**-0.5).softmax(-1), v)

    return (milliseconds(lambda: F.scaled_dot_product_attention(q, k, v)), milliseconds(matmul_softmax),
            milliseconds(lambda: flex(q, k, v)))


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| engine | " + " | ".join(op.removeprefix("aten::") for op in OPS) + " | everything else |")
    print("|---" * (len(OPS) + 2) + "|")
    for engine in ("eager", "fast"):
        shares = op_shares(engine)
        print(f"| {engine} | " + " | ".join(f"{v:.1f} %" for v in shares.values())
              + f" | {100 - sum(shares.values()):.1f} % |")
    print("\n| queries x keys | flash SDPA (ms) | matmul-softmax-matmul (ms) | compiled FlexAttention (ms) |\n"
          "|---|---|---|---|")
    for queries, keys in ((390, 3900), (1170, 4680)):
        flash, math, flex = attention_times(queries, keys)
        print(f"| {queries} x {keys} | {flash:.1f} | {math:.1f} ({math / flash:.1f}x) | {flex:.1f} ({flex / flash:.1f}x) |")


if __name__ == "__main__":
    main()
