"""`selfforcing experiment PLAN --preset P`: the paper's comparison, end to end, in one command.

A plan (``configs/experiments/*.yaml``) names the shared stages (teacher, ODE pairs, ODE
init), the methods (one training config each, trained for every seed), the evaluation, and
presets that scale it to the machine (``micro`` for tests, ``cpu``, ``gpu``). The runner
rewrites every config's paths so that each stage starts from the outputs it depends on,
skips stages whose model or evaluation already exists (re-running resumes the table),
evaluates every (method, seed) at the training length and at the extrapolation length
(rolling KV cache), and writes ``table.md``, ``summary.json``, per-frame plots and sample
strips. With ``jobs`` > 1 independent stages (another seed, another row, an evaluation) run
side by side in worker processes, the threads split between them (on 2 cores, two 1-thread
stages do about 7 % more work than one 2-thread stage: docs/RESULTS.md, Table 2's v5 run).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable

import yaml

from selfforcing.errors import SelfForcingError
from selfforcing.eval.report import RESULTS_FILE
from selfforcing.files import load_json, load_yaml
from selfforcing.utils import atomic_path
from selfforcing.training.config import config_from_dict, merge_overrides

SAMPLE_PROMPTS = 2  # held-out prompts in the sample strips
SUMMARY = ("total", "semantic_accuracy", "fd", "color_fidelity", "temporal_consistency")


@dataclass
class Preset:
    steps_scale: float = 1.0
    # The shared stages (teacher, ODE init) are trained once, the methods once per seed, so a
    # small machine can afford a larger share for them: every method starts from them.
    shared_steps_scale: float | None = None  # default: steps_scale
    steps: int | None = None  # fixed step count instead of scaling
    set: dict = field(default_factory=dict)  # overrides merged into every training config
    eval: dict = field(default_factory=dict)  # overrides of the plan's eval section
    seeds: list[int] | None = None
    prompts: int | None = None  # number of ODE-pair prompts
    euler_steps: int | None = None  # teacher sampler steps for the ODE pairs
    shared: dict = field(default_factory=dict)  # shared stages replaced (e.g. retrain the shipped teacher)
    # Rows run by this preset (default: all of the plan's); shared stages no row needs are skipped.
    methods: list[str] | None = None
    references: list[str] | None = None
    jobs: int = 1  # stages run side by side (worker processes sharing the machine's threads)

    def __post_init__(self):
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise SelfForcingError(f"jobs must be a positive integer, got {self.jobs!r}")


@dataclass
class Plan:
    name: str
    output_dir: str
    shared: dict
    methods: dict
    eval: dict
    seeds: list[int]
    prompts: dict
    presets: dict
    references: list[str] = field(default_factory=list)  # shared stages scored as reference rows
    base: Path = field(default=Path(), init=False)  # where the plan's relative paths start (see ``resolve``)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise SelfForcingError(f"experiment plan {path} does not exist")
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise SelfForcingError(f"experiment plan {path} must hold a mapping of keys to values")
        unknown = sorted(set(data) - {f.name for f in fields(cls) if f.init})
        if unknown:
            raise SelfForcingError(f"unknown keys in experiment plan {path}: {', '.join(unknown)}")
        try:
            plan = cls(**data)
        except TypeError as e:
            raise SelfForcingError(f"experiment plan {path}: {e}") from None
        # The shipped plans name files from the repository's root: the plan's nearest ancestor holding configs/
        plan.base = next((d for d in path.resolve().parents if (d / "configs").is_dir()), path.resolve().parent)
        trained = {name for name, spec in plan.shared.items() if not spec.get("ode_pairs")}
        stray = sorted(set(plan.references) - trained)
        if stray:
            raise SelfForcingError(f"experiment plan {path}: references {', '.join(stray)} are not shared stages "
                                   f"with a model ({', '.join(sorted(trained))})")
        for name, spec in plan.methods.items():
            of = spec.get("of")
            if of is not None and (of not in plan.methods or "of" in plan.methods[of] or set(spec) - {"of", "sampling"}):
                raise SelfForcingError(f"experiment plan {path}: method {name} is another method's models streamed "
                                       f"otherwise, so it takes only `of` (a trained method) and `sampling`")
        return plan

    def resolve(self, value: str) -> Path:
        """A path the plan names: as given where it exists (absolute, or from the current
        directory), else from the plan's base, so a plan runs from any directory."""
        path = Path(value)
        return path if path.is_absolute() or path.exists() else self.base / path

    def preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise SelfForcingError(f"unknown preset {name!r}; the plan has {', '.join(self.presets)}")
        try:
            return Preset(**self.presets[name])
        except (TypeError, SelfForcingError) as e:
            raise SelfForcingError(f"preset {name}: {e}") from None


class Runner:
    def __init__(self, plan: Plan, preset_name: str, root: Path | None = None, jobs: int | None = None):
        self.plan, self.preset = plan, plan.preset(preset_name)
        self.jobs = self.preset.jobs if jobs is None else jobs
        if self.jobs < 1:
            raise SelfForcingError(f"--jobs must be at least 1, got {self.jobs}")
        self.shared = {**plan.shared, **self.preset.shared}
        for name, spec in self.shared.items():
            _teacher_sampling(spec.get("sampler"))  # a bad sampler fails before hours of training
            if "path" in spec and not (plan.resolve(spec["path"]) / "selfforcing.json").is_file():
                raise SelfForcingError(f"shared stage {name}: no model at {spec['path']} (selfforcing.json not found)")
        self.root = Path(root or plan.output_dir) / preset_name
        self.seeds = self.preset.seeds or plan.seeds
        self.methods = self._chosen("methods", self.preset.methods, list(plan.methods))
        self.references = self._chosen("references", self.preset.references, plan.references)

    def _chosen(self, kind: str, chosen: list[str] | None, available: list[str]) -> list[str]:
        if chosen is None:
            return list(available)
        unknown = sorted(set(chosen) - set(available))
        if unknown:
            raise SelfForcingError(f"preset {kind} {', '.join(unknown)} are not in the plan's {kind} "
                                   f"({', '.join(available)})")
        return list(chosen)

    def starts_from(self, spec: dict) -> list[str]:
        """The shared stages a stage starts from: its model, teacher and critic, and the ODE
        pairs when it trains on pairs."""
        names = [spec[role] for role in ("model", "teacher", "critic") if spec.get(role) in self.shared]
        if spec.get("pairs"):
            names += [name for name, s in self.shared.items() if s.get("ode_pairs")]
        return list(dict.fromkeys(names))

    def needed_shared_stages(self, methods: list[str]) -> list[str]:
        """The shared stages the chosen rows start from, directly or through another shared
        stage (in the plan's order)."""
        needed, todo = set(), [self.plan.methods[self.trained(m)] for m in methods] + [{"model": r}
                                                                                    for r in self.references]
        while todo:
            for stage in self.starts_from(todo.pop()):
                if stage not in needed:
                    needed.add(stage)
                    todo.append(self.shared[stage])
        return [name for name in self.shared if name in needed]

    # ---- stages -------------------------------------------------------------
    def model_dir(self, stage: str, seed: int | None = None) -> Path:
        """Where a stage's model is: a shared stage given by ``path`` (a shipped model) is used
        as it is, every other stage is trained under the run's root."""
        if seed is None and "path" in self.shared.get(stage, {}):
            return self.plan.resolve(self.shared[stage]["path"])
        return self.root / (stage if seed is None else f"{stage}-seed{seed}") / "model"

    def stage_config(self, spec: dict, output: Path, seed: int, shared: bool = False) -> dict:
        """A training config with this run's paths, seed, preset overrides and step count."""
        cfg = load_yaml(self.plan.resolve(spec["config"]))
        cfg = merge_overrides(cfg, {"output_dir": str(output), "seed": seed})
        cfg = merge_overrides(cfg, spec.get("set", {}))
        cfg = merge_overrides(cfg, self.preset.set)
        if "model" in spec:  # start from an earlier stage's model: its architecture comes with it
            cfg["model"] = {"path": str(self.model_dir(spec["model"])), "preset": None}
        if "teacher" in spec:
            cfg["teacher"] = {"path": str(self.model_dir(spec["teacher"]))}
        if "critic" in spec:  # the fake score's starting point, when it is not the teacher
            cfg["critic"] = {"path": str(self.model_dir(spec["critic"]))}
        if spec.get("pairs"):
            cfg["data"] = {**cfg["data"], "path": str(self.root / "ode_pairs.safetensors")}
        scale = self.preset.steps_scale
        if shared and self.preset.shared_steps_scale is not None:
            scale = self.preset.shared_steps_scale
        cfg["steps"] = self.preset.steps or max(1, math.ceil(cfg["steps"] * scale))
        cfg.setdefault("logging", {})["progress"] = False
        return cfg

    def train(self, name: str, spec: dict, seed: int, per_seed: bool) -> str | None:
        """Train one stage unless its model is on disk; the log line of its wall time."""
        from selfforcing.training.trainer import Trainer

        out = self.root / (f"{name}-seed{seed}" if per_seed else name)
        if (out / "model" / "selfforcing.json").is_file():
            return None
        cfg = config_from_dict(self.stage_config(spec, out, seed, shared=not per_seed))
        start = time.perf_counter()
        trainer = Trainer(cfg)
        trainer.train(resume=(out / "checkpoints" / "latest").is_file())
        trainer.export(out / "model")
        return f"{out.name}: {cfg.steps} steps in {time.perf_counter() - start:.0f} s"

    def ode_pairs(self, spec: dict) -> str | None:
        from selfforcing.data.toy_world import toy_prompts
        from selfforcing.training.paradigms.ode import make_ode_pairs

        pairs = self.root / "ode_pairs.safetensors"
        if pairs.is_file():
            return None
        n = self.preset.prompts or self.plan.prompts["n"]
        prompts = self.root / "prompts.txt"
        with atomic_path(prompts) as tmp:
            tmp.write_text("\n".join(toy_prompts(n, self.plan.prompts["seed"])) + "\n")
        config = self.root / "ode_pairs.yaml"
        config.write_text(yaml.safe_dump(self.stage_config(spec, self.root / "ode_pairs", self.seeds[0])))
        start = time.perf_counter()
        make_ode_pairs(config, prompts, pairs, num_steps=self.preset.euler_steps or spec.get("euler_steps", 48))
        return f"ode pairs: {n} prompts in {time.perf_counter() - start:.0f} s"

    # ---- the table ------------------------------------------------------------
    def rows(self, methods: list[str]) -> list[tuple[str, str, bool]]:
        """(row name, stage, trained per seed) of every row: the methods, then the references."""
        return [(name, name, True) for name in methods] + [(f"{name} (reference)", name, False)
                                                           for name in self.references]

    def sampler(self, stage: str, per_seed: bool) -> dict | None:
        """The many-step sampler a reference row is scored with (None: the model's own rollout)."""
        return None if per_seed else self.shared[stage].get("sampler")

    def sampling(self, stage: str, per_seed: bool) -> dict | None:
        """Changes to the sampling config a reference row streams with (``eval --sampling``): a
        training-free option scored on a given model (sink, window, KV recomputation, ...)."""
        return (self.plan.methods if per_seed else self.shared)[stage].get("sampling")

    def trained(self, method: str) -> str:
        """The method whose models a row streams: a variant's (``of``), else its own."""
        return self.plan.methods[method].get("of", method)

    def row_model(self, stage: str, per_seed: bool, seed: int) -> tuple[str, int | None]:
        """(stage, seed) of the model a row streams at ``seed``: a method's (or its variant's
        trained method's) of that seed, a shared stage's one model."""
        return (self.trained(stage), seed) if per_seed else (stage, None)

    def tasks(self, methods: list[str], lengths: dict[str, int], ev: dict) -> dict[tuple, Task]:
        """Every stage to train and every evaluation, each after the stages it starts from, in the
        order a single job runs them: the shared stages (the critical path) first, evaluations last."""
        tasks: dict[tuple, Task] = {}

        def after(spec: dict) -> tuple:
            return tuple(key for key in (("train", name, None) for name in self.starts_from(spec)) if key in tasks)

        for name in self.needed_shared_stages(methods):
            spec = self.shared[name]
            if spec.get("ode_pairs"):
                tasks[("train", name, None)] = Task(after(spec), partial(self.ode_pairs, spec))
            elif "path" not in spec:  # a shipped stage is used as given
                tasks[("train", name, None)] = Task(after(spec), partial(self.train, name, spec, self.seeds[0], False))
        for name in dict.fromkeys(self.trained(m) for m in methods):
            spec = self.plan.methods[name]
            for seed in self.seeds:
                tasks[("train", name, seed)] = Task(after(spec), partial(self.train, name, spec, seed, True))
        training_length = next(iter(lengths), None)
        for _, stage, per_seed in self.rows(methods):
            sampler, sampling = self.sampler(stage, per_seed), self.sampling(stage, per_seed)
            for seed in self.seeds:
                model = ("train", *self.row_model(stage, per_seed, seed))
                for length, frames in lengths.items():
                    if sampler is not None and length != training_length:
                        continue  # a bidirectional teacher makes clips of its training length; it has no rollout
                    tasks[("eval", length, stage, seed)] = Task(
                        (model,) if model in tasks else (),
                        partial(self.evaluate, self.model_dir(*model[1:]), self.root / "eval" / length /
                                f"{stage}-seed{seed}", frames, seed, ev, sampler, sampling))
        return tasks

    def run(self, only: list[str] | None = None) -> dict:
        from selfforcing.eval.report import write_report

        start = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        methods = [name for name in self.methods if not only or name in only]
        ev = {**self.plan.eval, **self.preset.eval}
        lengths = _lengths(ev)
        tasks = self.tasks(methods, lengths, ev)
        done = run_tasks(tasks, self.jobs)
        trained = [line for key, line in done.items() if key[0] == "train" and line]  # with their wall times
        eval_seconds = sum(done[key][1] for key in done if key[0] == "eval")
        results: dict[str, dict] = {length: {} for length in lengths}
        samples: dict[str, tuple] = {}  # row -> model, sampler and sampling of its strip (first seed)
        for row, stage, per_seed in self.rows(methods):
            samples[row] = (self.model_dir(*self.row_model(stage, per_seed, self.seeds[0])),
                            self.sampler(stage, per_seed), self.sampling(stage, per_seed))
            for length in lengths:
                runs = [done[key][0] for key in (("eval", length, stage, seed) for seed in self.seeds) if key in done]
                if runs:
                    results[length][row] = runs
        summary = {length: {row: summarize(runs) for row, runs in by_row.items()}
                   for length, by_row in results.items()}
        for length, by_row in results.items():
            write_report({row: runs[0] for row, runs in by_row.items()}, self.root / "plots" / length)
            self.write_samples({row: samples[row] for row in by_row}, lengths[length],
                               self.root / "plots" / length / "samples.png")
        jobs = f" ({self.jobs} jobs: stage times overlap)" if self.jobs > 1 else ""
        log = trained + [f"evaluation: {eval_seconds:.0f} s", f"run: {time.perf_counter() - start:.0f} s{jobs}"]
        with atomic_path(self.root / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        with atomic_path(self.root / "table.md") as tmp:
            skipped = not trained and any(key[0] == "train" for key in tasks)
            tmp.write_text(markdown_table(summary, self.seeds, log, note="All stages were already trained." if skipped
                                          else None))
        return summary

    def evaluate(self, model: Path, out: Path, frames: int, seed: int, ev: dict,
                 sampler: dict | None, sampling: dict | None = None) -> tuple[dict, float]:
        """Score one model at one length, reusing an evaluation that is already on disk (0 s). A
        ``sampler`` ({steps, guidance}) scores a bidirectional teacher with its many-step sampler."""
        from selfforcing.eval.run import evaluate_model

        if (out / RESULTS_FILE).is_file():
            return load_json(out / RESULTS_FILE), 0.0
        start = time.perf_counter()
        result = evaluate_model(model, out, n=ev["n"], num_frames=frames, seed=seed, window=ev.get("window", 3),
                                sampling=sampling, **_teacher_sampling(sampler))
        return result, time.perf_counter() - start

    def write_samples(self, models: dict[str, tuple], num_frames: int, path: Path) -> None:
        """Sample strips of every row (first seed) for a few held-out prompts."""
        from selfforcing.data.toy_world import toy_prompts
        from selfforcing.eval.report import write_sample_strips
        from selfforcing.eval.run import EVAL_SEED, generate_videos
        from selfforcing.inference.pipeline import StreamingPipeline

        prompts = toy_prompts(SAMPLE_PROMPTS, EVAL_SEED)  # the first held-out evaluation prompts
        videos = {}
        for row, (model, sampler, sampling) in models.items():
            pipe = StreamingPipeline.from_pretrained(model)
            pipe.sampling = pipe.sampling.updated(sampling or {})
            videos[row] = generate_videos(pipe, prompts, num_frames, len(prompts), seed=0,
                                          **_teacher_sampling(sampler))[0]
        write_sample_strips(videos, prompts, path, every=max(1, num_frames // 12))


@dataclass(frozen=True)
class Task:
    after: tuple  # keys of the tasks that must finish first
    call: Callable[[], Any]


def run_tasks(tasks: dict[Any, Task], jobs: int) -> dict[Any, Any]:
    """Run every task after the ones it depends on and return each result by key. One job runs
    them in their order in this process; more run the first ready ones (in order, so the critical
    path goes first) in worker processes that split this process's threads between them."""
    if jobs == 1:
        return {key: task.call() for key, task in tasks.items()}
    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    done: dict[Any, Any] = {}
    waiting, running = dict(tasks), {}  # running: future -> key
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_set_threads, initargs=(threads,))
    try:
        while waiting or running:
            ready = [key for key, task in waiting.items() if all(k in done for k in task.after)]
            for key in ready[:jobs - len(running)]:
                running[pool.submit(waiting.pop(key).call)] = key
            if not running:
                raise SelfForcingError(f"tasks wait on tasks that never run: {', '.join(map(str, waiting))}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                done[running.pop(future)] = future.result()
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure, the stages already running finish first
    return done


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _lengths(ev: dict) -> dict[str, int]:
    """The eval section's ``lengths``, {name: video frames}, the training length first (a
    bidirectional teacher is scored there only)."""
    lengths = ev.get("lengths")
    if not isinstance(lengths, dict) or not lengths or not all(
            isinstance(name, str) and isinstance(frames, int) and not isinstance(frames, bool) and frames > 0
            for name, frames in lengths.items()):
        raise SelfForcingError(f"eval.lengths must map names to video frames, the training length first, e.g. "
                               f"{{train: 12, long: 48}}; got {lengths!r}")
    unknown = sorted(set(ev) - {"n", "lengths", "window"})
    if unknown:
        raise SelfForcingError(f"unknown eval keys: {', '.join(unknown)} (the eval section takes n, lengths, window)")
    return lengths


def _teacher_sampling(sampler: dict | None) -> dict:
    """A shared stage's ``sampler`` ({steps, guidance}) as evaluate_model / generate_videos arguments."""
    if sampler is None:
        return {}
    unknown = sorted(set(sampler) - {"steps", "guidance"})
    if unknown or "steps" not in sampler:
        raise SelfForcingError(f"a stage's sampler takes steps (required) and guidance; got {', '.join(sampler)}")
    return {"teacher_steps": sampler["steps"], "guidance_scale": sampler.get("guidance", 3.0)}


def summarize(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of the headline scalars, plus early-vs-late drift."""
    out = {}
    for key in SUMMARY:
        values = [r["scalars"][key] for r in runs if r["scalars"].get(key) is not None]
        out[key] = {"mean": statistics.fmean(values) if values else None,
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    late = [r["early_late"]["semantic_accuracy"] for r in runs]
    out["semantic_early"] = statistics.fmean(x["early"] for x in late)
    out["semantic_late"] = statistics.fmean(x["late"] for x in late)
    out["fps"] = statistics.fmean(r["stream"]["fps"] for r in runs)
    return out


def markdown_table(summary: dict, seeds: list[int], log: list[str], note: str | None = None) -> str:
    lines = []
    for length, methods in summary.items():
        lines += [f"### {length} length (mean ± std over seeds {seeds})", "",
                  "| method | total | semantic | FD | colour fidelity | temporal | semantic early → late | FPS |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, s in methods.items():
            cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" if s[k]["mean"] is not None else "n/a"
                     for k in SUMMARY]
            lines.append(f"| {name} | " + " | ".join(cells)
                         + f" | {s['semantic_early']:.3f} → {s['semantic_late']:.3f} | {s['fps']:.1f} |")
        lines.append("")
    first, *longer = summary
    if longer:  # how much each row loses as the videos grow past the training length
        lines += [f"### drift: total at each length minus at {first}", "",
                  "| method | " + " | ".join(longer) + " |", "|---|" + "---|" * len(longer)]
        for name, s in summary[first].items():
            cells = [f"{summary[length][name]['total']['mean'] - s['total']['mean']:+.1f}"
                     if name in summary[length] else "n/a" for length in longer]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if note:
        lines.append(note)
    return "\n".join(lines + ["Wall times: " + "; ".join(log)]) + "\n"
