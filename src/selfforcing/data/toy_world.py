"""A procedural toy world of short captioned videos.

Coloured shapes slide across a plain background and bounce elastically off the walls.
The world is small enough that a tiny video diffusion model learns it on a laptop CPU,
and every video keeps its ground truth (:class:`Scene`), so evaluation can check a
generated video against the prompt it came from.

Three properties matter to the rest of the package:

* **Deterministic by seed.** :func:`sample_scene` draws everything from
  ``numpy.random.default_rng(seed)``; no global RNG is touched.
* **Resolution- and length-independent.** A scene lives in the unit square and its
  motion has a closed form, so frame ``k`` is the same whether 8 or 800 frames are
  rendered (extrapolation tests compare long rollouts with short ground truth), and
  a 64x64 render shows the same scene as a 32x32 one.
* **Captions are exact.** :func:`caption` writes the ground truth in a tiny grammar and
  :func:`parse_caption` reads it back, e.g.
  ``"a red circle moving left and an orange square bouncing on a dark blue background"``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from selfforcing.errors import SelfForcingError
from selfforcing.memory import check_fits
from selfforcing.utils import temporary_beside

# Saturated object colours, far from each other and from every background, so the
# colour of a pixel names its object unambiguously.
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (255, 225, 25),
    "green": (40, 200, 40),
    "blue": (40, 100, 255),
    "purple": (160, 50, 220),
    "white": (245, 245, 245),
}
# Drawn and read only when asked for, like NEW_SHAPES: a colour the shipped models never saw
# (the LoRA demo), as far from the others (>= 128 apart) and from the backgrounds.
NEW_COLORS: dict[str, tuple[int, int, int]] = {"cyan": (0, 215, 215)}
ALL_COLORS = {**OBJECT_COLORS, **NEW_COLORS}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "dark blue": (15, 25, 80),
    "dark green": (15, 60, 25),
    "gray": (110, 110, 110),
}
SHAPES = ("circle", "square", "triangle")  # drawn by default: the shipped model's training data
# Drawn and read only when asked for: a concept the shipped model never saw (the LoRA demo).
NEW_SHAPES = ("ring",)
ALL_SHAPES = SHAPES + NEW_SHAPES
MOTIONS = ("horizontal", "vertical", "diagonal", "static")
MOTION_PHRASES = ("moving left", "moving right", "moving up", "moving down", "bouncing", "resting")

_GRAMMAR_WORDS = ("a", "an", "and", "on", "background")
VOCABULARY: frozenset[str] = frozenset(
    word
    for phrase in (*_GRAMMAR_WORDS, *OBJECT_COLORS, *BACKGROUND_COLORS, *SHAPES, *MOTION_PHRASES)
    for word in phrase.split()
)

MIN_SIDE = 8  # smaller frames cannot show a shape at all
_WORD = re.compile(r"[a-z0-9]+")  # the same word split as the hash text encoder


@dataclass(frozen=True)
class ToyObject:
    """One moving shape. Coordinates are fractions of the frame: x right, y down.

    ``size`` is the half-extent (radius of a circle, half the side of a square, half the
    base of a triangle); ``position`` is the centre of the bounding box at frame 0 and
    ``velocity`` its displacement per frame before any bounce.
    """

    shape: str
    color: str
    size: float
    position: tuple[float, float]
    velocity: tuple[float, float]

    @property
    def motion(self) -> str:
        """The caption's motion phrase; for straight motion it names the initial direction."""
        vx, vy = self.velocity
        if vx == 0 and vy == 0:
            return "resting"
        if vy == 0:
            return "moving left" if vx < 0 else "moving right"
        if vx == 0:
            return "moving up" if vy < 0 else "moving down"
        return "bouncing"


@dataclass(frozen=True)
class Scene:
    """Ground truth of one video: background name and objects, drawn in list order."""

    background: str
    objects: tuple[ToyObject, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` inverts it exactly."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        objects = tuple(
            ToyObject(o["shape"], o["color"], float(o["size"]), tuple(o["position"]), tuple(o["velocity"]))
            for o in d["objects"]
        )
        return cls(d["background"], objects)


# ----------------------------------------------------------------------------- sampling


def sample_scene(
    seed: int,
    *,
    max_objects: int = 2,
    min_objects: int = 1,
    motions: tuple[str, ...] = MOTIONS,
    size_range: tuple[float, float] = (0.12, 0.22),
    speed_range: tuple[float, float] = (0.02, 0.06),
    shapes: tuple[str, ...] = SHAPES,
    colors: tuple[str, ...] = tuple(OBJECT_COLORS),
) -> Scene:
    """Draw a scene from ``numpy.random.default_rng(seed)``.

    Objects in one scene get distinct colours, so a colour identifies an object in both
    the caption and the pixels. ``motions`` picks the allowed classes from
    :data:`MOTIONS`, ``shapes`` from :data:`ALL_SHAPES` and ``colors`` from :data:`ALL_COLORS`
    (a scene has at most as many objects as colours); sizes and speeds are fractions of the
    frame (speeds per frame).
    """
    _check_scene_options(max_objects, min_objects, motions, size_range, speed_range, shapes, colors)
    rng = np.random.default_rng(seed)
    background = str(rng.choice(list(BACKGROUND_COLORS)))
    count = int(rng.integers(min_objects, min(max_objects, len(colors)) + 1))
    colors = rng.choice(list(colors), size=count, replace=False)
    drawn = rng.choice(shapes, size=count)
    sizes = [float(size) for size in rng.uniform(*size_range, size=count)]
    objects = []
    for color, shape, size, position in zip(colors, drawn, sizes, _free_positions(rng, sizes)):
        velocity = _velocity(rng, str(rng.choice(motions)), float(rng.uniform(*speed_range)), position)
        objects.append(ToyObject(str(shape), str(color), size, position, velocity))
    return Scene(background, tuple(objects))


def _check_scene_options(max_objects, min_objects, motions, size_range, speed_range, shapes, colors) -> None:
    """Reject options that would fail deep inside numpy or silently draw odd scenes."""
    if _not_int(min_objects) or _not_int(max_objects) or not 1 <= min_objects <= max_objects <= len(OBJECT_COLORS):
        raise SelfForcingError(
            f"need 1 <= min_objects <= max_objects <= {len(OBJECT_COLORS)} (one colour per object), "
            f"got min_objects={min_objects}, max_objects={max_objects}"
        )
    unknown = [m for m in motions if m not in MOTIONS]
    if not motions or unknown:
        raise SelfForcingError(f"motions must be a non-empty subset of {MOTIONS}, got {tuple(motions)}")
    if not shapes or any(s not in ALL_SHAPES for s in shapes):
        raise SelfForcingError(f"shapes must be a non-empty subset of {ALL_SHAPES}, got {tuple(shapes)}")
    if any(c not in ALL_COLORS for c in colors) or len(set(colors)) != len(colors) or len(colors) < min_objects:
        raise SelfForcingError(f"colors must be distinct colours of {tuple(ALL_COLORS)}, at least min_objects "
                               f"({min_objects}) of them, got {tuple(colors)}")
    if not 0 < size_range[0] <= size_range[1] < 0.5:
        raise SelfForcingError(f"size_range must satisfy 0 < low <= high < 0.5, got {size_range}")
    if not 0 <= speed_range[0] <= speed_range[1]:
        raise SelfForcingError(f"speed_range must satisfy 0 <= low <= high, got {speed_range}")


def _free_positions(rng: np.random.Generator, sizes: list[float]) -> list[tuple[float, float]]:
    """Start positions inside the frame whose bounding boxes do not overlap.

    Objects pass through each other later, but a clear first frame lets evaluation read
    every object's colour at its centre. All positions are redrawn together (a large
    central object can leave no room for a second one); after 100 tries, as with
    crowded options, the last draw is kept rather than loop forever.
    """
    for _ in range(100):
        positions = [(float(x), float(y)) for x, y in (rng.uniform(s, 1 - s, size=2) for s in sizes)]
        if all(
            max(abs(p[0] - q[0]), abs(p[1] - q[1])) > sp + sq
            for (p, sp), (q, sq) in itertools.combinations(zip(positions, sizes), 2)
        ):
            break
    return positions


def _velocity(
    rng: np.random.Generator, motion: str, speed: float, position: tuple[float, float]
) -> tuple[float, float]:
    """A velocity of the given class.

    Straight motion heads for the farther wall, so an object captioned "moving left"
    crosses at least half the free width leftwards before its first bounce. Diagonals
    keep 20 degrees off the axes so they read as diagonal.
    """
    toward_far_wall = [1.0 if p < 0.5 else -1.0 for p in position]
    if motion == "static":
        return 0.0, 0.0
    if motion == "horizontal":
        return toward_far_wall[0] * speed, 0.0
    if motion == "vertical":
        return 0.0, toward_far_wall[1] * speed
    angle = math.radians(rng.uniform(20, 70) + 90 * int(rng.integers(4)))
    return speed * math.cos(angle), speed * math.sin(angle)


# ---------------------------------------------------------------------------- rendering


def trajectory(scene: Scene, num_frames: int, start_frame: int = 0) -> np.ndarray:
    """Object centres, shape (objects, num_frames, 2) as (x, y) fractions of the frame.

    Closed form (a triangle wave folds the straight path back between the walls), so
    any frame is computed without stepping through the earlier ones and is identical
    whatever range it is rendered in.
    """
    t = np.arange(start_frame, start_frame + num_frames, dtype=np.float64)
    centres = np.empty((len(scene.objects), num_frames, 2))
    for i, obj in enumerate(scene.objects):
        for axis in range(2):
            straight = obj.position[axis] + obj.velocity[axis] * t
            centres[i, :, axis] = _fold(straight, obj.size, 1 - obj.size)
    return centres


def _fold(u: np.ndarray, low: float, high: float) -> np.ndarray:
    """Reflect ``u`` into [low, high] as an elastic bounce does."""
    span = high - low
    m = np.mod(u - low, 2 * span)
    return low + np.minimum(m, 2 * span - m)


def render(
    scene: Scene, num_frames: int, height: int = 32, width: int = 32, *, antialias: bool = True, start_frame: int = 0
) -> torch.Tensor:
    """Frames ``start_frame .. start_frame + num_frames - 1`` as uint8 (T, H, W, 3).

    All frames are drawn at once with array ops. Anti-aliasing covers each pixel in
    proportion to its distance from the shape's edge, which keeps small shapes from
    flickering as they move by fractions of a pixel.
    """
    _check_video_size(num_frames, height, width)
    ys = ((np.arange(height) + 0.5) / height)[None, :, None]
    xs = ((np.arange(width) + 0.5) / width)[None, None, :]
    pixel = 1.0 / min(height, width)
    frames = np.empty((num_frames, height, width, 3), dtype=np.float32)
    frames[:] = BACKGROUND_COLORS[scene.background]
    for obj, centres in zip(scene.objects, trajectory(scene, num_frames, start_frame)):
        cx, cy = centres[:, 0, None, None], centres[:, 1, None, None]
        distance = _signed_distance(obj.shape, xs - cx, ys - cy, obj.size)
        alpha = np.clip(0.5 - distance / pixel, 0, 1) if antialias else distance <= 0
        color = np.asarray(ALL_COLORS[obj.color], dtype=np.float32)
        frames += alpha[..., None].astype(np.float32) * (color - frames)
    return torch.from_numpy(np.rint(frames).astype(np.uint8))


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Distance from the shape's edge (negative inside), offsets from the bounding-box centre."""
    if shape == "circle":
        return np.hypot(dx, dy) - size
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - size
    if shape == "triangle":  # apex up, base along the bottom of the bounding box
        slanted = (2 * np.abs(dx) - dy - size) / math.sqrt(5)
        return np.maximum(slanted, dy - size)
    if shape == "ring":  # a circle of radius ``size`` with a hole of half that radius
        return np.abs(np.hypot(dx, dy) - 0.75 * size) - 0.25 * size
    raise SelfForcingError(f"unknown shape {shape!r}; known shapes: {', '.join(ALL_SHAPES)}")


def to_float_video(video: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) frames -> float32 (3, T, H, W) in [-1, 1], the model's layout."""
    return video.permute(3, 0, 1, 2).float().div(127.5).sub(1)


def _check_video_size(num_frames: int, height: int, width: int) -> None:
    if _not_int(num_frames) or num_frames < 1:
        raise SelfForcingError(f"num_frames must be a positive integer, got {num_frames!r}")
    for name, side in (("height", height), ("width", width)):
        if _not_int(side) or side < MIN_SIDE:
            raise SelfForcingError(f"{name} must be an integer >= {MIN_SIDE}, got {side!r}")


def _not_int(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


# ----------------------------------------------------------------------------- captions


def caption(scene: Scene) -> str:
    """The scene in the caption grammar: object phrases joined by "and", then the background."""
    phrases = [f"{_article(o.color)} {o.color} {o.shape} {o.motion}" for o in scene.objects]
    return f"{' and '.join(phrases)} on {_article(scene.background)} {scene.background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(scene: Scene) -> dict[str, Any]:
    """The ground truth in the same form that :func:`parse_caption` returns."""
    return _description([(o.color, o.shape, o.motion) for o in scene.objects], scene.background)


def parse_caption(text: str) -> dict[str, Any]:
    """Read a caption of the grammar back into its parts (the inverse of :func:`caption`).

    Returns ``count``, ``background``, ``objects`` (dicts of color/shape/motion) and the
    per-object lists ``colors``, ``shapes``, ``motions``. Raises :class:`SelfForcingError`
    naming the problem when the text is not in the grammar.
    """
    words = _WORD.findall(text.lower())
    if "on" not in words:
        raise SelfForcingError(f"caption {text!r} has no 'on a ... background' part")
    split = len(words) - 1 - words[::-1].index("on")
    objects_part, background_part = words[:split], words[split + 1:]
    background = " ".join(background_part[1:-1])
    if background_part[:1] not in (["a"], ["an"]) or background_part[-1:] != ["background"] \
            or background not in BACKGROUND_COLORS:
        raise SelfForcingError(
            f"caption {text!r} must end with 'on a <background> background', "
            f"background one of: {', '.join(BACKGROUND_COLORS)}"
        )
    objects = [_parse_object(phrase, text) for phrase in _split_on(objects_part, "and")]
    return _description(objects, background)


def _split_on(words: list[str], separator: str) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    for word in words:
        if word == separator:
            groups.append([])
        else:
            groups[-1].append(word)
    return groups


def _parse_object(words: list[str], text: str) -> tuple[str, str, str]:
    """One '<a|an> <colour> <shape> <motion phrase>' group."""
    if len(words) < 4 or words[0] not in ("a", "an") or words[1] not in ALL_COLORS or words[2] not in ALL_SHAPES \
            or " ".join(words[3:]) not in MOTION_PHRASES:
        raise SelfForcingError(
            f"caption {text!r}: cannot read {' '.join(words)!r} as 'a <colour> <shape> <motion>' "
            f"(colours: {', '.join(ALL_COLORS)}; shapes: {', '.join(ALL_SHAPES)}; "
            f"motions: {', '.join(MOTION_PHRASES)})"
        )
    return words[1], words[2], " ".join(words[3:])


def _description(objects: list[tuple[str, str, str]], background: str) -> dict[str, Any]:
    return {
        "count": len(objects),
        "background": background,
        "objects": [{"color": c, "shape": s, "motion": m} for c, s, m in objects],
        "colors": [c for c, _, _ in objects],
        "shapes": [s for _, s, _ in objects],
        "motions": [m for _, _, m in objects],
    }


def unknown_words(prompt: str) -> list[str]:
    """Words of ``prompt`` outside :data:`VOCABULARY`, each once, in order of appearance.

    A model trained only on the toy world has never seen these, so a CLI can warn that
    they will be ignored or misread.
    """
    return list(dict.fromkeys(w for w in _WORD.findall(prompt.lower()) if w not in VOCABULARY))


# ----------------------------------------------------------------------------- datasets


def toy_prompts(n: int, seed: int, **scene_options: Any) -> list[str]:
    """Captions of the first ``n`` scenes of the dataset with this seed (prompt files, evaluation);
    ``scene_options`` go to :func:`sample_scene`."""
    return [caption(sample_scene(video_seed(seed, i), **scene_options)) for i in range(n)]


def video_seed(seed: int, index: int) -> int:
    """The scene seed of video ``index`` in a dataset seeded ``seed``.

    Mixed by ``SeedSequence`` rather than ``seed + index`` so that datasets with nearby
    seeds do not share most of their videos.
    """
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class ToyWorldDataset(IterableDataset):
    """Toy-world videos generated on the fly; item ``i`` is the same on every call and machine.

    Items are ``dict(video=float32 (3, T, H, W) in [-1, 1], caption=str, index=i)``.
    Indexable (``ds[i]``) and iterable; ``num_videos=None`` iterates forever and has no
    ``len``. Iteration splits the indices between DataLoader workers so no video repeats.
    """

    def __init__(
        self,
        num_videos: int | None = None,
        num_frames: int = 16,
        height: int = 32,
        width: int = 32,
        seed: int = 0,
        *,
        antialias: bool = True,
        **scene_options: Any,
    ):
        if num_videos is not None and (_not_int(num_videos) or num_videos < 1):
            raise SelfForcingError(f"num_videos must be a positive integer or None, got {num_videos!r}")
        _check_video_size(num_frames, height, width)
        # render() draws a video in float32, with a per-frame mask and the uint8 result beside it
        check_fits(num_frames * height * width * (3 * 4 + 4 + 3), f"a {num_frames}-frame {width}x{height} toy video",
                   "cpu", "lower the size or the frames")
        sample_scene(seed, **scene_options)  # rejects bad options now, not in a worker later
        self.num_videos, self.num_frames, self.height, self.width = num_videos, num_frames, height, width
        self.seed, self.antialias, self.scene_options = seed, antialias, scene_options

    def __len__(self) -> int:
        if self.num_videos is None:
            raise TypeError("an infinite ToyWorldDataset has no length")
        return self.num_videos

    def scene(self, index: int) -> Scene:
        """Ground truth of item ``index``."""
        if index < 0 or (self.num_videos is not None and index >= self.num_videos):
            raise IndexError(f"index {index} out of range for {self.num_videos} videos")
        return sample_scene(video_seed(self.seed, index), **self.scene_options)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scene(index)
        frames = render(scene, self.num_frames, self.height, self.width, antialias=self.antialias)
        return {"video": to_float_video(frames), "caption": caption(scene), "index": index}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        index, step = (worker.id, worker.num_workers) if worker else (0, 1)
        while self.num_videos is None or index < self.num_videos:
            yield self[index]
            index += step


CAPTIONS_FILE = "captions.jsonl"


def write_dataset(
    out_dir: str | Path,
    n: int,
    num_frames: int = 16,
    height: int = 32,
    width: int = 32,
    seed: int = 0,
    **scene_options: Any,
) -> Path:
    """Write items 0..n-1 of ``ToyWorldDataset(n, ..., seed)`` to ``out_dir`` and return it.

    Each video is a lossless uint8 (T, H, W, 3) ``.npy``; ``captions.jsonl`` holds one
    ``{"file", "caption", "scene", "seed"}`` line per video, where ``sample_scene(seed)``
    redraws the scene. Everything is written to a temporary directory beside
    ``out_dir`` and renamed into place, so an interrupted run leaves nothing behind.
    Refuses to replace a non-empty ``out_dir``.
    """
    out_dir = Path(out_dir)
    dataset = ToyWorldDataset(n, num_frames, height, width, seed, **scene_options)  # validates
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SelfForcingError(f"{out_dir} already exists and is not an empty directory; choose a new path")
    with temporary_beside(out_dir, directory=True) as tmp:
        with open(tmp / CAPTIONS_FILE, "w") as captions:
            for index in range(n):
                scene = dataset.scene(index)
                name = f"{index:06d}.npy"
                np.save(tmp / name, render(scene, num_frames, height, width).numpy())
                record = {"file": name, "caption": caption(scene), "scene": scene.to_dict(),
                          "seed": video_seed(seed, index)}
                captions.write(json.dumps(record) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above; rename cannot replace it on every OS
        os.replace(tmp, out_dir)
    return out_dir


class ToyWorldFolder(Dataset):
    """A directory written by :func:`write_dataset`, with the same items as :class:`ToyWorldDataset`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        captions = self.root / CAPTIONS_FILE
        if not captions.is_file():
            raise SelfForcingError(f"{self.root} is not a toy-world dataset (no {CAPTIONS_FILE})")
        self.records = [json.loads(line) for line in captions.read_text().splitlines() if line]

    def __len__(self) -> int:
        return len(self.records)

    def scene(self, index: int) -> Scene:
        return Scene.from_dict(self.records[index]["scene"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        frames = torch.from_numpy(np.load(self.root / record["file"]))
        return {"video": to_float_video(frames), "caption": record["caption"], "index": index}
