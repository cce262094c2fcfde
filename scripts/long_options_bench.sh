#!/usr/bin/env bash
# Issue 31's device item: the per-chunk cost of each long-video sampling option at the
# Wan2.1-T2V-1.3B shape (random weights, bf16, the fast engine, DiT and VAE), one `bench` row
# each, every table appended to $OUT/long_options.md (or ./long_options.md). Needs only the
# machine's torch and this repository, like scripts/gpu_check.sh (carry .whl/ for the VAE).
#   bash scripts/long_options_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/device_env.sh
out="${OUT:-.}/long_options.md"
bench() { python3 -m selfforcing bench --preset wan2.1-1.3b --device cuda --engines fast --frames-per-chunk 3 \
    --latent-frames 42 --repeats 2 --append "$out" "$@"; }
bench                                                            # released: a 21-frame window
bench --sampling sink_frames=3 --sampling kv_cache_frames=9      # sink 3 + window 6
bench --sampling kv_recompute=true                               # Krea's KV recomputation
bench --sampling sink_frames=3 --sampling sink_ema=0.9           # Reward Forcing's EMA-Sink
bench --sampling rolling_window=true                             # Rolling Forcing's joint window
