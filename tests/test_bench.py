"""`selfforcing bench` and the prepared GPU check, run on the CPU at the toy shape: the tables
they print and write, and their refusals. (Figures are not asserted: speed belongs to docs.)"""

import subprocess
import sys
from pathlib import Path

import pytest

from selfforcing.cli import main

ROOT = Path(__file__).resolve().parents[1]


def tables(text: str) -> list[list[list[str]]]:
    """The cells of the body rows (header and rule left out) of every markdown table in ``text``."""
    found, lines = [], text.splitlines() + [""]
    start = None
    for i, line in enumerate(lines):
        if line.startswith("|") and start is None:
            start = i
        elif not line.startswith("|") and start is not None:
            found.append([[cell.strip() for cell in row.strip("|").split("|")] for row in lines[start + 2:i]])
            start = None
    return found


def test_bench_compares_engines_and_appends_its_table(tmp_path, capsys):
    out = tmp_path / "PERF.md"
    out.write_text("# earlier figures\n")
    assert main(["bench", "--preset", "toy", "--engines", "eager", "fast", "--frames-per-chunk", "3",
                 "--latent-frames", "6", "--repeats", "1", "--append", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# earlier figures\n") and "Command: `selfforcing bench --preset toy" in text
    [rows] = tables(text)
    assert [row[:4] for row in rows] == [["toy", "eager", "3", "6"], ["toy", "fast", "3", "6"]]
    assert rows[0][5] == "1.00x" and all(float(row[4]) > 0 and float(row[6]) > 0 for row in rows)
    assert tables(capsys.readouterr().out) == [rows]


@pytest.mark.slow
def test_bench_compiles_once_per_scope_and_labels_the_rows(capsys):
    assert main(["bench", "--preset", "toy", "--engines", "fast", "fast+compile", "--compile-scope", "step", "blocks",
                 "--frames-per-chunk", "3", "--latent-frames", "6", "--repeats", "1"]) == 0
    [rows] = tables(capsys.readouterr().out)
    assert [row[1] for row in rows] == ["fast", "fast+compile", "fast+compile (blocks)"]
    assert all(float(row[4]) > 0 for row in rows)


def test_bench_streams_with_sampling_changes(tmp_path, capsys):
    """A long-video option's cost: every row streams with the --sampling changes, and the table's
    command line names them."""
    out = tmp_path / "PERF.md"
    assert main(["bench", "--preset", "toy", "--frames-per-chunk", "3", "--latent-frames", "12", "--repeats", "1",
                 "--sampling", "rolling_window=true", "--sampling", "sink_frames=3", "--append", str(out)]) == 0
    [rows] = tables(capsys.readouterr().out)
    assert [row[:4] for row in rows] == [["toy", "fast", "3", "12"]] and float(rows[0][4]) > 0
    assert "--sampling rolling_window=true --sampling sink_frames=3" in out.read_text()
    assert main(["bench", "--repeats", "1", "--sampling", "sink_frames=30"]) == 2
    assert "kv_cache_frames (21) minus sink_frames (30)" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "no benchmark preset 'huge'"),
    (["--latent-frames", "7", "--frames-per-chunk", "3"], "not a multiple of frames per chunk 3"),
])
def test_bench_refuses_bad_arguments_by_name(args, message, capsys):
    assert main(["bench", "--repeats", "1", *args]) == 2
    assert message in capsys.readouterr().err


def test_gpu_check_dry_runs_on_the_cpu():
    """The device check's one command must work when a device session starts: its CPU dry run
    at the toy shape checks the engines against eager and prints a row per engine and chunk size."""
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--preset", "toy",
                          "--engines", "eager", "fast", "fast + CUDA graphs", "--compile-scope", "step", "blocks",
                          "--latent-frames", "6", "--frames-per-chunk", "3", "1", "--repeats", "1", "--profile"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    tiny, attention, engines, profiles = tables(run.stdout)
    assert [row[0] for row in tiny] == ["3", "1"] and all(float(v) > 0 for row in tiny for v in row[1:3])  # TAEHV
    # Attended lengths in a 6-frame stream (the cache holds 21): chunk-wise 3 and 6, frame-wise 1 to 6.
    assert [row[:4] for row in attention] == [["3", "192 x 384", "2", "contiguous"], ["3", "192 x 384", "2", "engine's"],
                                              ["1", "64 x 384", "6", "contiguous"], ["1", "64 x 384", "6", "engine's"]]
    flash = [row[4].replace(";", " ").split() for row in attention]  # the CPU has the flash backend
    assert all(float(mean) > 0 and float(first) > 0 for mean, _, first in flash)
    graphs = [["fast + CUDA graphs", "n/a: CUDA only"], ["fast + CUDA graphs (blocks)", "n/a: CUDA only"]]
    assert [row[:2] for row in engines] == [["eager", "3"], ["fast", "3"], *[[g[0], "3"] for g in graphs],
                                            ["eager", "1"], ["fast", "1"], *[[g[0], "1"] for g in graphs]]
    assert [[row[0], row[2]] for row in engines if len(row) == 3] == graphs * 2  # a row per compile scope
    measured = [row for row in engines if len(row) > 3]
    assert all(float(row[4]) > 0 and float(row[8]) < 1e-5 for row in measured)  # DiT FPS; latents vs eager
    # --profile: each measured row's time split into attention / matmul / conv / other, summing to 100 %.
    assert [row[:2] for row in profiles] == [row[:2] for row in measured]
    assert all(abs(sum(float(cell.rstrip(" %")) for cell in row[2:6]) - 100) <= 2 for row in profiles)
    assert all(float(row[2].rstrip(" %")) > 0 and "attention" in row[6] for row in profiles)


def import_gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu_check


def test_gpu_check_plain_call_is_the_first_call_of_a_device_session():
    """`bash scripts/gpu_check.sh` without options runs the eager reference (for the latents
    column) and the fastest engine measured, both chunk sizes, both decoders, the Wan VAE
    decoding as the product does on CUDA (WanVAE.tune_convs: channels-last weights, cuDNN
    timing its algorithms, a latent frame per decoder call); timing every VAE setting alone
    is asked for by name."""
    gpu_check = import_gpu_check()
    args = gpu_check.build_parser().parse_args([])
    assert args.engines == ["eager", "fast + CUDA graphs"] and args.frames_per_chunk == [3, 1]
    assert args.decoders == ["wan", "taehv"] and args.vae == "last" and args.preset == "wan2.1-1.3b"
    assert gpu_check.VAE_VARIANTS[args.vae_variant] == (True, True, False)
    assert gpu_check.build_parser().parse_args(["--vae-variant", "all"]).vae_variant == "all"


def test_gpu_check_saves_compiled_code_for_a_fresh_machine(tmp_path, capsys):
    """--save-compile-cache writes what this process compiled (whole, compressed) and
    --load-compile-cache reads it back; a missing or damaged file means compiling from scratch."""
    gpu_check = import_gpu_check()
    import torch

    torch.compile(lambda x: (x.sin() + 1).relu(), fullgraph=True)(torch.randn(8))
    saved = tmp_path / "cache" / "compiled.bin"
    gpu_check.save_compile_cache(saved)
    assert saved.is_file() and list(saved.parent.iterdir()) == [saved]
    gpu_check.load_compile_cache(saved)
    gpu_check.load_compile_cache(tmp_path / "missing.bin")
    (tmp_path / "damaged.bin").write_bytes(saved.read_bytes()[:100])
    gpu_check.load_compile_cache(tmp_path / "damaged.bin")
    out = capsys.readouterr().out
    assert int(out.split("compile cache: ")[1].split()[0]) >= 1 and "no compile cache at" in out
    assert "damaged.bin unreadable (error: " in out and "compiling from scratch" in out
