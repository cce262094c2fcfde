"""Command line: ``selfforcing generate | serve | train | eval | data | ...``.

Every problem with the input is found before any work starts and reported as one line
naming the value and the fix (exit 2), as is a full disk; SIGINT and SIGTERM stop a command
with the same cleanup, leaving no partial output (exit 130 / 143); a reader that closes the
command's output pipe early (``| head``) ends it quietly, as SIGPIPE ends other tools (exit
141); anything else is a bug, reported in one line (exit 1) with the traceback under ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import re
import signal
import sys
import threading
import traceback
from dataclasses import replace
from pathlib import Path

from selfforcing import threads
from selfforcing.errors import SelfForcingError, describe
from selfforcing.schema import AT_LEAST_ONE, POSITIVE, SEED, Range
from selfforcing.utils import check_writable, progress_bar
from selfforcing.utils import torch_device as _device

# The shipped Self Forcing + DMD toy-world model (see docs/RESULTS.md for how it was trained).
DEFAULT_MODEL = Path(__file__).parent / "assets" / "toy-sf-dmd"


def _number(kind: type, valid: Range):
    """An argparse type: an int or float (``kind``) in ``valid``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or value not in valid:
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text}")
        return value

    return parse


_positive_int = _number(int, AT_LEAST_ONE)
_seed = _number(int, SEED)
_port = _number(int, Range(1, 65535))
_positive_float = _number(float, POSITIVE)


def _lora(text: str) -> tuple[Path, float]:
    """An argparse type: ``FILE[:SCALE]``, an existing LoRA file and a finite weight (default 1)."""
    path, colon, scale = text.rpartition(":")
    if colon and not Path(text).exists():  # a file name may itself hold a colon
        try:
            weight = float(scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{scale!r} in {text!r} is not a scale; write FILE or FILE:SCALE, "
                                             f"e.g. {path}:0.8") from None
        if not math.isfinite(weight):
            raise argparse.ArgumentTypeError(f"the scale of {text!r} must be a finite number, got {scale}")
    else:
        path, weight = text, 1.0
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"LoRA file {path} {'is not a file' if Path(path).exists() else 'does not exist'}")
    return Path(path), weight


def _existing_path(text: str) -> Path:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return Path(text)


def _add_lora_arguments(parser: argparse.ArgumentParser, unfused: bool = True) -> None:
    parser.add_argument("--lora", type=_lora, action="append", default=[], metavar="FILE[:SCALE]",
                        help="apply a Wan LoRA (diffusers, original Wan / ComfyUI or musubi layout), weighted by "
                             "SCALE (default 1); repeatable. Fused into the weights: base-model speed")
    if unfused:
        parser.add_argument("--lora-unfused", action="store_true",
                            help="keep the LoRAs as separate adapters instead of fusing them (slower; for comparison)")


# models.wan.ATTENTION_BACKENDS, named here so that building the parser imports no torch (a test keeps them equal).
ATTENTION_BACKEND_NAMES = ("flash", "efficient", "cudnn", "math")
COMPILE_SCOPE_NAMES = ("step", "blocks")  # inference.pipeline.COMPILE_SCOPES, likewise


def _add_compile_scope_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile-scope", choices=COMPILE_SCOPE_NAMES, default=None,
                        help="what --compile compiles: the whole chunk step (the default on CUDA), or one "
                             "transformer block for all of them (the default on the CPU: as fast there, 5-10x "
                             "less compile time; no fusion across blocks)")


def _add_attention_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attention-backend", choices=ATTENTION_BACKEND_NAMES, default=None,
                        help="put this exact SDPA kernel first (default: torch's order, flash first on CUDA); "
                             "on an H100 cudnn ran the stream's largest self-attention, timed alone, 1.7x faster "
                             "than flash")


DEVICE_HELP = "where the model runs: cpu, cuda or cuda:N (default cpu)"


def _add_model_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``_load_pipeline`` reads besides the model: device, precision, decoder."""
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="weights' precision; auto: bfloat16 on CUDA (as the paper's inference), float32 elsewhere")
    parser.add_argument("--text-encoder-device", default=None,
                        help="run the text encoder here, e.g. cpu to save GPU memory")
    parser.add_argument("--tiny-vae", type=_existing_path, default=None, metavar="FILE",
                        help="decode with this TAEHV tiny autoencoder (e.g. taew2_1.pth for Wan 2.1; the released "
                             "demo's --use_taehv) instead of the model's VAE: much faster, somewhat coarser")
    _add_sampling_argument(parser)


def _add_sampling_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sampling", action="append", default=[], metavar="KEY=VALUE",
                        help="change one key of the model's sampling config for this run, e.g. sink_frames=3, "
                             "kv_cache_frames=9, context_noise=50 (keys as in its selfforcing.json); repeat for more")


def _weights_dtype(name: str, device):
    """``--dtype``: ``auto`` is bfloat16 on CUDA, as the released code infers, float32 elsewhere."""
    import torch

    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return getattr(torch, name)


def _load_pipeline(args: argparse.Namespace, model: Path):
    """The pipeline of ``generate`` and ``serve`` (``_add_model_loading_arguments``, --checkpoint)."""
    from selfforcing.inference.pipeline import StreamingPipeline

    device = _device(args.device)
    text_device = None if args.text_encoder_device is None else _device(args.text_encoder_device)
    pipe = StreamingPipeline.from_pretrained(model, device=device, dtype=_weights_dtype(args.dtype, device),
                                             checkpoint=args.checkpoint, text_encoder_device=text_device,
                                             tiny_vae=args.tiny_vae)
    pipe.sampling = pipe.sampling.updated(_overrides(args.sampling, "--sampling"))
    pipe.load_loras(args.lora, fuse=not args.lora_unfused)  # before compile(): it may freeze the weights
    pipe.model.set_attention_backend(args.attention_backend)  # before compile(): a compiled step keeps its kernel
    if args.cuda_graphs and not args.compile:
        raise SelfForcingError("--cuda-graphs replays the compiled step: pass --compile too")
    if args.compile_scope is not None and not args.compile:
        raise SelfForcingError("--compile-scope says what --compile compiles: pass --compile too")
    if args.compile:
        pipe.compile(cuda_graphs=args.cuda_graphs, scope=args.compile_scope or "default-for-device")
    return pipe


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from selfforcing.inference.pipeline import to_uint8
    from selfforcing.inference.video import check_mp4_output, fit_image, load_image, mp4_writer, read_mp4
    from selfforcing.models.text_encoders import validate_prompts

    validate_prompts([args.prompt])
    check_mp4_output(args.output)
    if args.extend is not None and args.image is not None:
        raise SelfForcingError("--extend and --image both give the stream's start: pass one")
    if args.extend is not None and Path(args.extend).resolve() == Path(args.output).resolve():
        raise SelfForcingError(f"-o {args.output} is the video to extend: the continuation alone would replace it; "
                               "write it to another file")
    if args.strip is not None:
        check_writable(args.strip)
    video = None if args.extend is None else read_mp4(args.extend)  # both before the model loads
    image = None if args.image is None else load_image(args.image)  # (fitted to the video once it is known)
    model = args.model
    if model is None:
        model = DEFAULT_MODEL
        if not args.lora:  # a LoRA may teach the toy model new words
            _explain_unknown_words(args.prompt)
    pipe = _load_pipeline(args, model)
    # The measured-earliest first frame, the same video (docs/PERFORMANCE.md, H100: 0.177 s
    # against 0.232 s chunk-wise, throughput equal): the first latent frame is decoded and
    # written alone, and on CUDA each chunk decodes beside the next chunk's DiT work.
    pipe.early_first_frame, pipe.overlap_decode = True, pipe.device.type == "cuda"
    if args.height or args.width:
        pipe.sampling = replace(pipe.sampling, height=args.height or pipe.sampling.height,
                                width=args.width or pipe.sampling.width)
    if args.image is not None:  # (after --height / --width: the image is fitted to the video)
        video = fit_image(image, pipe.sampling.height, pipe.sampling.width)
    initial = None if video is None else pipe.encode_video(torch.from_numpy(video)[None])
    prefix = 0 if initial is None else initial.shape[2]
    num_frames = args.frames or pipe.video_frames(21, prefix)
    pipe.latent_frames(num_frames, prefix)  # validate before creating any output
    frames = []
    with mp4_writer(args.output, pipe.sampling.fps) as writer, progress_bar(
        total=num_frames, unit="frame", desc="generating", quiet=args.quiet
    ) as bar:
        if args.image is not None:  # the video opens with the image, as the VAE gives it back
            with torch.no_grad():
                first = to_uint8(pipe.vae.decode(initial))[0]
            writer.write(first)
            frames.append(first)
        for chunk in pipe.stream([args.prompt], num_frames, seed=args.seed, initial_latents=initial):
            writer.write(chunk.frames[0])
            bar.update(chunk.frames.shape[1])
            if args.strip is not None:
                frames.append(chunk.frames[0])
    if args.strip is not None:
        from selfforcing.eval.report import write_sample_strips

        write_sample_strips({Path(model).name: torch.cat(frames)[None].numpy()}, [args.prompt], args.strip)
    stats = pipe.stats
    print(f"wrote {args.output}: {stats.frames + (args.image is not None)} frames; first frame after "
          f"{stats.first_frame_s:.3f} s; "
          f"{stats.fps:.1f} FPS")


def _explain_unknown_words(prompt: str) -> None:
    """The default model only knows the toy world's grammar: say so, and what it knows."""
    from selfforcing.data.toy_world import BACKGROUND_COLORS, OBJECT_COLORS, SHAPES, unknown_words

    unknown = unknown_words(prompt)
    if unknown:
        print(
            f"note: the default toy model does not know {', '.join(repr(w) for w in unknown)}; it knows shapes "
            f"({', '.join(SHAPES)}), colours ({', '.join(OBJECT_COLORS)}), backgrounds ({', '.join(BACKGROUND_COLORS)}) "
            "and motions (moving left/right/up/down, bouncing, resting), e.g. "
            "\"a red circle bouncing on a dark blue background\"",
            file=sys.stderr,
        )


def cmd_serve(args: argparse.Namespace) -> None:
    from selfforcing.inference.server import ServerOptions, check_open_files, is_loopback, listen, serve

    options = ServerOptions(max_streams=args.max_streams, idle_timeout_s=args.idle_timeout, min_fps=args.min_fps,
                            allow_origins=tuple(args.allow_origin), max_connections=args.max_connections)
    check_open_files(options.max_connections)  # both before the model loads
    with listen(args.host, args.port) as sock:  # a taken port fails now, not after loading the model
        if not is_loopback(args.host):
            print(f"warning: serving on {args.host}, reachable from other machines; the server has no authentication",
                  file=sys.stderr)
        asked_to_compile = args.compile
        args.compile = _serve_compiles(args)
        pipe = _load_pipeline(args, args.model or DEFAULT_MODEL)
        pipe.early_first_frame = True  # a live viewer sees the first frame after one latent frame's decode
        if args.compile:  # compile and capture now, not in the first viewer's stream
            _warm_up_compiled(pipe, fall_back=asked_to_compile is None)
        serve(pipe, sock, options=options)


def _warm_up_compiled(pipe, fall_back: bool) -> None:
    """Compile (and capture) the chunk step in one unseen stream. A compiler that fails here
    (no Triton for this GPU, say) is named: with ``fall_back`` (compiling was only the
    default) the server goes on uncompiled, otherwise it stops and says how to go on."""
    import torch._dynamo.exc

    print("compiling the chunk step before serving...", file=sys.stderr, flush=True)
    try:
        seconds = pipe.warm_up()
    except torch._dynamo.exc.TorchDynamoException as error:
        cause = getattr(error, "inner_exception", None) or error  # inductor's own error, if it wrapped one
        reason = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
        if not fall_back:
            raise SelfForcingError(f"compiling the chunk step failed on {pipe.device} ({reason}); "
                                   "serve with --no-compile") from error
        print(f"warning: compiling the chunk step failed on {pipe.device} ({reason}); serving it uncompiled",
              file=sys.stderr, flush=True)
        pipe.uncompile()
        return
    print(f"compiled and warmed up in {seconds:.1f} s", file=sys.stderr, flush=True)


def _serve_compiles(args: argparse.Namespace) -> bool:
    """``serve --compile / --no-compile``; by default on CUDA, where compiling made the 1.3B
    model's DiT 1.5x faster on an H100 (38.75 against 25.73 FPS, and 19.5 against 15.4 FPS
    with the VAE: over 16 FPS, the video's own rate, instead of under it; docs/PERFORMANCE.md)
    for a few minutes of compiling once, before the server takes its first stream. Not on the
    CPU, where the shipped toy model streams faster than its 16 FPS without it."""
    if args.compile is not None:
        return args.compile
    return args.device.split(":")[0] == "cuda"  # checked when the model loads


def cmd_bench(args: argparse.Namespace) -> None:
    from selfforcing.bench import run_bench, run_train_bench

    if args.append is not None:
        check_writable(args.append)  # before minutes of measuring
    if args.training:
        run_train_bench(args.preset, _device(args.device), args.repeats, args.append, args.command_line)
        return
    run_bench(preset=args.preset, device=_device(args.device), frames_per_chunk=args.frames_per_chunk,
              latent_frames=args.latent_frames, repeats=args.repeats, output=args.append, engines=args.engines,
              command=args.command_line, attention_backend=args.attention_backend,
              compile_scopes=args.compile_scope or ["default-for-device"],
              sampling_changes=_overrides(args.sampling, "--sampling"))


def cmd_train(args: argparse.Namespace) -> None:
    import logging

    from selfforcing.training import distributed
    from selfforcing.training.config import check_model_paths, load_config
    from selfforcing.training.trainer import Trainer

    if args.world_size is not None and not args.dry_run:
        raise SelfForcingError(f"--world-size {args.world_size} only applies to --dry-run (torchrun sets the "
                               "processes of a real run): add --dry-run or drop --world-size")
    if args.dry_run:
        from selfforcing.training.memory import format_plan, plan_memory

        cfg = load_config(args.config, overrides=_overrides(args.set))
        print(format_plan(plan_memory(cfg, args.world_size or 1)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, overrides=_overrides(args.set))
    check_model_paths(cfg, args.config)
    trainer = Trainer(cfg)
    try:
        history = trainer.train(resume=args.resume)
        written = trainer.export(Path(cfg.output_dir) / "model")
    finally:
        distributed.shutdown(trainer.env)
    if trainer.env.is_main and history:
        last = {k: round(v, 5) for k, v in history[-1].items() if k.endswith("loss")}
        print(f"trained {cfg.name} to step {trainer.step} ({trainer.skipped} skipped); last losses {last}; "
              f"wrote {', '.join(map(str, written))}")
    distributed.exit_worker(trainer.env)


def cmd_dmd_probe(args: argparse.Namespace) -> None:
    from selfforcing.eval.dmd_probe import probe_dmd
    from selfforcing.training.config import check_model_paths, load_config
    from selfforcing.training.trainer import Trainer

    cfg = load_config(args.config, overrides=_overrides(args.set))
    if cfg.loss.name != "dmd":
        raise SelfForcingError(f"{args.config}: dmd-probe needs a DMD config; its loss is {cfg.loss.name!r}")
    check_model_paths(cfg, args.config)
    trainer = Trainer(cfg)
    if args.resume:
        trainer.resume()
    figures = probe_dmd(trainer, args.videos, args.draws, args.seed)
    state = f"step {trainer.step} of {cfg.output_dir}" if args.resume else "initialisation"
    overall = {k: v for k, v in figures.items() if "/" not in k}
    print(f"{cfg.name} at {state}: " + ", ".join(f"{k} {v:.3f}" for k, v in overall.items()))
    bands = sorted({k.rsplit("/", 1)[1] for k in figures if "/" in k}, key=lambda band: int(band.split("-")[0]))
    if bands:  # object_push per band of score timesteps: > 0 fades objects into the background
        print("object_push (> 0: towards the background) by score timestep: " + "; ".join(
            f"t {band}: " + ", ".join(f"{part} {figures[f'object_push/{part}/{band}']:+.3f}"
                                      for part in ("update", "guidance", "learned")
                                      if f"object_push/{part}/{band}" in figures) for band in bands))


def _overrides(pairs: list[str], flag: str = "--set") -> dict:
    """``--set data.batch_size=4`` (or ``--sampling sink_frames=3``) -> nested dict (values parsed as YAML)."""
    from selfforcing.files import parse_yaml

    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SelfForcingError(f"{flag} expects KEY=VALUE, got {pair!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SelfForcingError(f"{flag} {pair!r} sets a key inside {part}, which another {flag} gave a value")
        try:
            node[leaf] = parse_yaml(value, f"{flag} {pair!r}")
        except SelfForcingError as e:
            raise SelfForcingError(f"{e}; quote the value if it is text") from None
    return out


def cmd_ode_pairs(args: argparse.Namespace) -> None:
    from selfforcing.training.paradigms.ode import make_ode_pairs

    path = make_ode_pairs(args.config, args.prompts, args.output, num_steps=args.steps, batch_size=args.batch_size,
                          overrides=_overrides(args.set))
    print(f"wrote ODE pairs to {path}")


def _scene_options(args: argparse.Namespace) -> dict:
    """--shapes / --colors of ``data toy`` and ``eval``, for ``sample_scene`` (unset: its defaults)."""
    return {key: tuple(value) for key in ("shapes", "colors") if (value := getattr(args, key)) is not None}


def cmd_data_toy(args: argparse.Namespace) -> None:
    from selfforcing.data.toy_world import write_dataset

    path = write_dataset(args.out, args.n, num_frames=args.frames, height=args.size, width=args.size, seed=args.seed,
                         **_scene_options(args))
    print(f"wrote {args.n} toy-world videos to {path}")


def cmd_data_toy_prompts(args: argparse.Namespace) -> None:
    from selfforcing.data.toy_world import toy_prompts
    from selfforcing.utils import atomic_path

    prompts = toy_prompts(args.n, args.seed, **_scene_options(args))
    with atomic_path(args.out) as tmp:
        tmp.write_text("\n".join(prompts) + "\n")
    print(f"wrote {args.n} toy-world prompts to {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from selfforcing.eval.run import evaluate_model

    check_writable(args.output / "results.json")
    results = evaluate_model(args.model or DEFAULT_MODEL, args.output, n=args.n, num_frames=args.frames,
                             seed=args.seed, batch_size=args.batch_size, device=str(_device(args.device)),
                             window=args.window, loras=args.lora, scene_options=_scene_options(args),
                             teacher_steps=args.teacher_steps, guidance_scale=args.guidance, checkpoint=args.checkpoint,
                             context=args.context, sampling=_overrides(args.sampling, "--sampling"))
    s = results["scalars"]
    print(f"{results['num_videos']} videos x {results['num_frames']} frames: total {s['total']:.1f}, "
          f"semantic {s['semantic_accuracy']:.3f} (objects present {s['object_presence']:.2f}, of the prompted "
          f"shape {s['shape_match']:.2f}, background {s['background_match']:.2f}), FD {s['fd']:.3f}; "
          f"report in {args.output}")


def cmd_experiment(args: argparse.Namespace) -> None:
    import logging

    from selfforcing.eval.experiment import Plan, Runner

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    runner = Runner(Plan.load(args.plan), args.preset, root=args.output, jobs=args.jobs)
    runner.run(only=args.only)
    print((runner.root / "table.md").read_text())
    print(f"results in {runner.root}")


def cmd_data_encode(args: argparse.Namespace) -> None:
    from selfforcing.data.video_folder import encode_video_folder
    from selfforcing.models.vae import PixelCodec, WanVAE

    check_writable(args.out / "index.json")
    device = _device(args.device)
    vae = WanVAE.from_pretrained(args.wan_vae, device=device) if args.wan_vae else PixelCodec(args.pixel_patch)
    index = encode_video_folder(args.folder, vae, args.out, args.frames, args.height, args.width, device=device,
                                overwrite=args.overwrite)
    print(f"encoded {index['num_items']} videos to {args.out}")


def cmd_data_encode_prompts(args: argparse.Namespace) -> None:
    """Run UMT5 once over a prompt file so training looks embeddings up instead of holding UMT5."""
    import torch

    from selfforcing.data.prompts import read_prompts
    from selfforcing.models.text_encoders import (WAN_NEGATIVE_PROMPT, CachedTextEncoder, UMT5TextEncoder,
                                                  write_text_cache)

    prompts = read_prompts(args.prompts)  # before loading gigabytes of weights
    negative = WAN_NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
    if args.output.is_dir():
        raise SelfForcingError(f"-o {args.output} is a directory; give the cache file, "
                               f"e.g. {args.output / 'prompts.safetensors'}")
    if not (args.model / "text_encoder").is_dir():
        raise SelfForcingError(f"{args.model} has no text_encoder/ directory; --model takes a diffusers-layout Wan "
                               "directory (text_encoder/ and tokenizer/)")
    encoder = UMT5TextEncoder.from_pretrained(args.model / "text_encoder", args.model / "tokenizer",
                                              device=_device(args.device), max_length=args.max_length)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    path = write_text_cache(args.output, prompts + [negative], encoder, batch_size=args.batch_size, dtype=dtype)
    size = path.stat().st_size
    shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
    print(f"cached {len(CachedTextEncoder(path).prompts)} prompt embeddings in {path} ({shown})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="selfforcing", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a video from a text prompt into an mp4")
    g.add_argument("prompt", help="what the video shows, e.g. \"a red circle bouncing on a dark blue background\"")
    g.add_argument("-o", "--output", type=Path, default=Path("out.mp4"),
                   help="the mp4 to write, replaced only once complete (default out.mp4)")
    g.add_argument("--strip", type=Path, default=None, metavar="PNG",
                   help="also write every frame side by side into this image (the whole clip at a glance)")
    g.add_argument("--frames", type=_positive_int, default=None,
                   help="video frames (default: 21 latent frames); with --extend or --image, the frames added")
    g.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped toy model)")
    g.add_argument("--checkpoint", type=Path, default=None, help="transformer weights to load on top (.safetensors/.pt)")
    g.add_argument("--height", type=_positive_int, default=None, help="video height in pixels (default: the model's)")
    g.add_argument("--width", type=_positive_int, default=None, help="video width in pixels (default: the model's)")
    g.add_argument("--extend", type=Path, default=None, help="continue this mp4 (its frames fill the KV cache)")
    g.add_argument("--image", type=Path, default=None,
                   help="image-to-video: the image (centre-cropped and resized to the video) is the first frame, "
                        "encoded alone as the first latent frame, and the stream continues from it")
    g.add_argument("--seed", type=_seed, default=0, help="noise seed: the same seed gives the same video (default 0)")
    _add_model_loading_arguments(g)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--compile", action="store_true",
                   help="compile the chunk step; the first chunk pays the compile time")
    g.add_argument("--cuda-graphs", action="store_true", help="with --compile on CUDA: replay the step as CUDA graphs")
    _add_compile_scope_argument(g)
    _add_attention_backend_argument(g)
    _add_lora_arguments(g)
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("serve", help="serve a web page that streams video live and switches prompts mid-stream")
    v.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped toy model)")
    v.add_argument("--checkpoint", type=Path, default=None, help="transformer weights to load on top (.safetensors/.pt)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    v.add_argument("--port", type=_port, default=8000, help="TCP port to listen on (default 8000)")
    v.add_argument("--max-streams", type=_positive_int, default=1, help="concurrent streams; more clients are told busy")
    v.add_argument("--idle-timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                   help="close a connection that streams nothing for this long, freeing its slot (default 60)")
    v.add_argument("--min-fps", type=_positive_float, default=1.0,
                   help="slowest frame rate a client may ask for (a slower stream would hold its slot for ever)")
    v.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (https://app.example.org) whose pages may open streams, besides the server's "
                        "own page; repeat for more. Browsers send it: a page of any other site is refused")
    v.add_argument("--max-connections", type=_positive_int, default=100,
                   help="open connections at most; past it the one slowest to send its request is closed (default 100)")
    _add_model_loading_arguments(v)
    v.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the chunk step, before the server takes its first stream (default: on CUDA, "
                        "where it made the 1.3B stream 1.5x faster on an H100; not on the CPU)")
    v.add_argument("--cuda-graphs", action="store_true", help="with --compile on CUDA: replay the step as CUDA graphs")
    _add_compile_scope_argument(v)
    _add_attention_backend_argument(v)
    _add_lora_arguments(v)
    v.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="measure streaming throughput, first-frame latency and peak memory")
    b.add_argument("--preset", default="toy",
                   help="toy | mid | wan2.1-1.3b, built with random weights (speed does not depend on weight values)")
    b.add_argument("--engines", nargs="+", default=["fast"], choices=["eager", "fast", "fast+compile", "fast+graphs"],
                   help="streaming engines to compare in one run (eager: the reference loop; fast+graphs: CUDA only)")
    b.add_argument("--device", default="cpu", help=DEVICE_HELP)
    _add_attention_backend_argument(b)
    b.add_argument("--compile-scope", nargs="+", choices=COMPILE_SCOPE_NAMES, default=None,
                   help="what the compiled engines compile, a row each: the whole chunk step, one block for all "
                        "(default: the device's default, as --compile in generate)")
    b.add_argument("--frames-per-chunk", type=_positive_int, nargs="+", default=[3, 1],
                   help="latent frames per chunk, a row each (default 3 1: chunk-wise and frame-wise)")
    b.add_argument("--latent-frames", type=_positive_int, default=21, help="latent frames per stream (default 21)")
    b.add_argument("--repeats", type=_positive_int, default=3,
                   help="timed streams (or training iterations) per row; the median is shown (default 3)")
    b.add_argument("--training", action="store_true",
                   help="time training iterations of Self Forcing vs Teacher / Diffusion Forcing (+ DMD) instead")
    b.add_argument("--append", type=Path, default=None, help="append the result table to this markdown file")
    _add_sampling_argument(b)
    b.set_defaults(func=cmd_bench)
    t = sub.add_parser("train", help="train from a YAML experiment config (use torchrun for several processes)")
    t.add_argument("config", type=Path, help="experiment config, e.g. configs/toy/sf_dmd.yaml")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set steps=10 (repeatable)")
    t.add_argument("--dry-run", action="store_true",
                   help="build the models on the meta device and print the per-GPU memory plan; train nothing")
    t.add_argument("--world-size", type=_positive_int, default=None, metavar="N",
                   help="GPUs the --dry-run plan shards over (default 1)")
    t.set_defaults(func=cmd_train)

    p = sub.add_parser("dmd-probe", help="split a DMD run's generator gradient into critic and guidance parts "
                                         "and measure its noise, on the run's own samples")
    p.add_argument("config", type=Path, help="the run's training config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for train")
    p.add_argument("--resume", action="store_true",
                   help="probe the latest checkpoint in the config's output_dir (default: the starting point)")
    p.add_argument("--videos", type=_positive_int, default=16, help="student videos to probe")
    p.add_argument("--draws", type=_positive_int, default=8, help="score draws (timestep, noise) per video")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the probed videos and draws (default 0)")
    p.set_defaults(func=cmd_dmd_probe)

    o = sub.add_parser("ode-pairs", help="sample the teacher with CFG and store its states at the few-step timesteps")
    o.add_argument("config", type=Path, help="the ODE-init training config (teacher, sizes, few-step list)")
    o.add_argument("--prompts", type=Path, required=True, help="text file, one prompt per line")
    o.add_argument("-o", "--output", type=Path, default=None, help="output .safetensors file (default: data.path)")
    o.add_argument("--steps", type=_positive_int, default=None,
                   help="Euler steps of the teacher sampler (default: loss.ode_sampling_steps, else 48)")
    o.add_argument("--batch-size", type=_positive_int, default=8, help="prompts sampled at once (default 8)")
    o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for train")
    o.set_defaults(func=cmd_ode_pairs)

    e = sub.add_parser("eval", help="score a model on held-out toy-world prompts, frame by frame")
    e.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped toy model)")
    e.add_argument("-o", "--output", type=Path, required=True, help="directory for results.json and plots")
    e.add_argument("--n", type=_number(int, Range(2, name="at least 2 (FD needs covariances)")), default=32,
                   help="number of videos")
    e.add_argument("--frames", type=_positive_int, default=None,
                   help="video frames (default: as many as the model's KV cache holds)")
    e.add_argument("--seed", type=_seed, default=0, help="noise seed of the generated videos (default 0)")
    e.add_argument("--window", type=_positive_int, default=4, help="frames per window of the windowed metrics (FD)")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="videos generated at once (default 8)")
    e.add_argument("--device", default="cpu", help=DEVICE_HELP)
    _add_sampling_argument(e)
    e.add_argument("--shapes", nargs="+", default=None,
                   help="shapes of the held-out scenes (default: circle square triangle, the trained ones; "
                        "ring: a shape the shipped models never saw)")
    e.add_argument("--colors", nargs="+", default=None,
                   help="object colours of the held-out scenes (default: the 7 trained ones; cyan: the LoRA demo's "
                        "new colour)")
    e.add_argument("--checkpoint", type=Path, default=None,
                   help="transformer weights to load on top, e.g. a training checkpoint's ema.safetensors")
    e.add_argument("--teacher-steps", type=_positive_int, default=None,
                   help="score a bidirectional teacher as it samples: every frame at once, this many Euler steps "
                        "with CFG (default: stream, as a causal student does)")
    e.add_argument("--guidance", type=_number(float, Range(1.0, name="at least 1")), default=3.0,
                   help="CFG scale of --teacher-steps (default 3, the toy ODE pairs' scale)")
    e.add_argument("--context", choices=["own", "real"], default="own",
                   help="what each chunk continues: own (default) the model's earlier chunks, as it streams; real "
                        "the real clip's earlier frames (the KV cache filled with ground truth: the exposure-bias check)")
    _add_lora_arguments(e, unfused=False)
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("experiment", help="train and evaluate every method of an experiment plan (the paper's table)")
    x.add_argument("plan", type=Path, help="experiment plan, e.g. configs/experiments/toy_table2.yaml")
    x.add_argument("--preset", default="cpu", help="scale of the run, as the plan defines (micro, cpu, gpu)")
    x.add_argument("--only", nargs="+", default=None, help="run only these methods (and the shared stages they start from)")
    x.add_argument("-o", "--output", type=Path, default=None, help="root directory (default: the plan's)")
    x.add_argument("--jobs", type=int, default=None,
                   help="stages run side by side, splitting the threads (default: the preset's, else 1)")
    x.set_defaults(func=cmd_experiment)

    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    toy = dsub.add_parser("toy", help="write a procedurally generated toy-world dataset")
    toy.add_argument("--out", type=Path, required=True, help="directory to write the videos and captions to")
    toy.add_argument("--n", type=_positive_int, required=True, help="number of videos")
    toy.add_argument("--frames", type=_positive_int, default=16, help="frames per video (default 16)")
    toy.add_argument("--size", type=_positive_int, default=32, help="height and width in pixels (default 32)")
    toy.add_argument("--seed", type=_seed, default=0, help="scene seed (default 0, the training data's)")
    toy.add_argument("--shapes", nargs="+", default=None,
                     help="shapes to draw (default: circle square triangle; ring: a shape the shipped models "
                          "never saw)")
    toy.add_argument("--colors", nargs="+", default=None,
                     help="object colours to draw (default: the 7 trained ones; cyan: a colour the shipped models "
                          "never saw)")
    toy.set_defaults(func=cmd_data_toy)
    enc = dsub.add_parser("encode", help="encode a folder of captioned videos to a latent cache (data.source: latents)")
    enc.add_argument("folder", type=Path, help="folder of videos, each captioned by NAME.txt beside it or a captions.jsonl")
    enc.add_argument("--out", type=Path, required=True, help="directory of the latent cache to write")
    enc.add_argument("--frames", type=_positive_int, required=True, help="video frames per clip")
    enc.add_argument("--height", type=_positive_int, required=True, help="pixels; clips are centre-cropped and resized to it")
    enc.add_argument("--width", type=_positive_int, required=True, help="pixels; clips are centre-cropped and resized to it")
    enc.add_argument("--wan-vae", type=Path, default=None, help="a diffusers Wan VAE directory (default: pixel codec)")
    enc.add_argument("--pixel-patch", type=_positive_int, default=2, help="pixel codec space-to-depth factor")
    enc.add_argument("--device", default="cpu", help=DEVICE_HELP)
    enc.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    enc.set_defaults(func=cmd_data_encode)
    tp = dsub.add_parser("toy-prompts", help="write toy-world captions, one per line (for ode-pairs / prompt data)")
    tp.add_argument("--out", type=Path, required=True, help="text file to write")
    tp.add_argument("--n", type=_positive_int, required=True, help="number of prompts")
    tp.add_argument("--seed", type=_seed, default=1, help="scene seed (training data uses 0)")
    tp.add_argument("--shapes", nargs="+", default=None, help="shapes of the scenes (as data toy)")
    tp.add_argument("--colors", nargs="+", default=None, help="object colours of the scenes (as data toy)")
    tp.set_defaults(func=cmd_data_toy_prompts)
    ep = dsub.add_parser("encode-prompts", help="embed a prompt file with UMT5 once (text_encoder type: cache)")
    ep.add_argument("prompts", type=Path, help="text file, one prompt per line")
    ep.add_argument("--model", type=Path, required=True,
                    help="diffusers-layout Wan directory (text_encoder/, tokenizer/)")
    ep.add_argument("-o", "--output", type=Path, required=True, help="cache file to write (.safetensors)")
    ep.add_argument("--negative-prompt", default=None,
                    help="also cached, for CFG (default: Wan2.1's standard negative prompt; \"\" for none)")
    ep.add_argument("--batch-size", type=_positive_int, default=16, help="prompts encoded at once (default 16)")
    ep.add_argument("--device", default="cpu", help=DEVICE_HELP)
    ep.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="storage type of the embeddings")
    ep.add_argument("--max-length", type=_positive_int, default=512, help="UMT5 tokens per prompt (Wan: 512)")
    ep.set_defaults(func=cmd_data_encode_prompts)
    return parser


class _Parser(argparse.ArgumentParser):
    """Every (sub)command takes ``--debug`` and ``--threads``; a usage error is one line, like every other user error."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="on an internal error, print the traceback")
        self.add_argument("--threads", type=_positive_int, default=argparse.SUPPRESS, metavar="N",
                          help="CPU threads of torch's operators (default: OMP_NUM_THREADS if set, else the "
                               "cores that other programs leave free, re-read as the command runs)")

    def error(self, message: str):
        raise SelfForcingError(f"{self.prog}: {message} (see {self.prog} --help)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, a job scheduler), raised like Ctrl-C so that the same
    cleanup runs: temporary files removed, checkpoints and outputs whole or untouched."""


@contextlib.contextmanager
def _stop_signals(exiting: bool):
    """SIGINT (Ctrl-C) stops a command as KeyboardInterrupt, SIGTERM (``timeout``, ``docker stop``,
    a job scheduler) as ``Terminated``, so that the same cleanup runs. Once one has, more of
    either are ignored: a second must not cut the cleanup short, and where the process ends
    after this command (``exiting``), not until it has (a second Ctrl-C 50 ms after the first
    printed a traceback from torch's exit handlers)."""
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield
        return
    stopped = []

    def stop(signum, frame):
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        stopped.append(signum)
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        if not (stopped and exiting):
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status (see the module docstring)."""
    debug = False
    with _stop_signals(exiting=argv is None):
        try:
            args = build_parser().parse_args(argv)
            args.command_line = ["selfforcing", *(sys.argv[1:] if argv is None else argv)]  # for reports
            debug = getattr(args, "debug", False)
            with threads.policy(getattr(args, "threads", None)):
                args.func(args)
        except SelfForcingError as e:
            return _fail(2, f"error: {e}", debug)
        except Terminated:
            return _fail(143, "terminated")
        except KeyboardInterrupt:
            return _fail(130, "interrupted")
        except BrokenPipeError:
            _quiet_stdout()
            return 141
        except Exception as e:
            number = _machine_errno(e)
            if number is None:
                return _fail(1, f"internal error: {type(e).__name__}: {describe(e)} (rerun with --debug for the "
                                "traceback; please report it)", debug)
            problem, fix = _MACHINE_ERRORS[number]
            where = f" (writing {e.filename})" if getattr(e, "filename", None) else ""
            return _fail(2, f"error: {problem}{where}: {fix}", debug)
    return 0


# Failures of the machine, not of the program: named, exit 2, as a bad input is.
_MACHINE_ERRORS = {errno.ENOSPC: ("the disk is full", "free some space or choose another place"),
                   errno.EDQUOT: ("the disk quota is used up", "free some space or choose another place"),
                   errno.EROFS: ("the file system is read-only", "choose another place")}


def _quiet_stdout() -> None:
    """Point standard output at /dev/null: its reader is gone, and the flush at exit would
    otherwise fail again ("Exception ignored ... BrokenPipeError")."""
    with contextlib.suppress(OSError, ValueError):  # (no descriptor: a caller's stream in tests)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _machine_errno(error: Exception) -> int | None:
    """The errno of ``error`` if it is one of ``_MACHINE_ERRORS``, as an ``OSError`` carries it or
    a writer's message does: safetensors' Rust "(os error 28)"; a short write, which only a full
    disk makes: numpy's "N requested and M written", torch's "file write failed" or "unexpected
    pos N vs M"."""
    number = getattr(error, "errno", None)
    if number is None:
        text = str(error)
        found = re.search(r"\(os error (\d+)\)", text)
        if found:
            number = int(found.group(1))
        elif re.search(r"\d+ requested and \d+ written|file write failed|unexpected pos \d+ vs \d+", text):
            number = errno.ENOSPC
    return number if number in _MACHINE_ERRORS else None


def _fail(code: int, message: str, debug: bool = False) -> int:
    """One line on stderr (and the traceback above it under --debug); the exit status."""
    if debug:
        traceback.print_exc()
    print(" ".join(message.split()), file=sys.stderr)
    return code
