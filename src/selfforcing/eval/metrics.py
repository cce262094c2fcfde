"""Per-frame metrics for generated toy-world videos.

Self Forcing is about *error accumulation*: an autoregressive video model conditions on
its own earlier frames, so small mistakes can compound over time. Every metric here is
therefore computed per frame index (or per window of frame indices), so drift shows up
as a curve that falls (or rises) along the video rather than being averaged away.

Videos are uint8 ``(N, T, H, W, 3)`` arrays or tensors (a single ``(T, H, W, 3)`` video
is also accepted), each with one caption in the toy-world grammar
(:func:`selfforcing.data.toy_world.parse_caption`). The toy world's palette is known
exactly, so an analytic detector (:func:`detect`) reads every frame: it labels each
pixel with the nearest palette colour (object colours, then backgrounds) when it lies
within :data:`COLOR_THRESHOLD` of it, and measures each object colour's area, centroid
and the fill ratio of its bounding box, from which it guesses the shape.

Metric families (see each function for the exact formula):

* **Semantic accuracy** (:func:`semantic_accuracy`): the fraction of the prompt's
  attributes visible in a frame, in [0, 1]; its parts (:func:`semantic_parts`): objects
  present, of the right shape, no stray colour, the right background.
* **Quality** (:func:`frame_features`, :func:`frechet_distance`, :func:`windowed_fd`):
  a Frechet distance between Gaussian fits of deterministic per-frame features of the
  generated and real frames, per window of frame indices.
* **Colour drift** (:func:`color_statistics`, :func:`color_drift`): mean saturation,
  brightness and palette histogram per frame index, against the real frames.
* **Temporal consistency** (:func:`persistence`, :func:`motion_agreement`,
  :func:`speed`, :func:`jerk`): do prompted objects stay, move as prompted, at the real
  speed, along smooth paths?

The real frames are pooled over all frame indices as the reference of every per-frame
comparison: the toy world is stationary in time (objects keep sliding and bouncing, the
frame distribution does not depend on the frame index), so the pool is a less noisy
reference than the real frames at the same index, and it also serves generated
rollouts longer than the real clips. The pool is *background-matched*
(:func:`reference_weights`): the background covers most of every frame, so with a few
dozen videos the mix of backgrounds in the prompts would otherwise dominate every colour
statistic (eight real clips against eight others: 0.24 apart in mean saturation
unmatched, 0.01 matched). Motion statistics (speed, jerk) are not weighted.

:func:`evaluate_videos` gathers everything and an overall score in [0, 100] in the
spirit of VBench's *Total*::

    total = 100 * (0.4 * S + 0.2 * Q + 0.2 * C + 0.2 * M)

    S = mean semantic accuracy over videos and frames
    Q = exp(-FD / FD_SCALE)             FD over all frames; FD_SCALE = 0.3: eight real
                                        16-frame 32x32 clips are 0.03-0.15 from 32 other
                                        ones (mostly small-sample bias), so real data
                                        scores Q = 0.6-0.9, while colour-shifted, faded
                                        or noisy clips (FD > 1) score under 0.05
    C = 1 - mean_t (|dsat_t| + |dbright_t| + palette_tv_t) / 3       (colour fidelity)
    M = (persistence + motion agreement + smoothness + speed score) / 4   (temporal)
        smoothness  = min(1, jerk_real / jerk_generated)   smoother than real is no fault
        speed score = min(v_gen, v_real) / max(v_gen, v_real)   catches frozen videos
        (persistence, motion agreement, jerk and speed v: means over frame indices)

Semantics weigh most because a toy-world prompt is fully checkable; each term lies in
[0, 1], and a term that is undefined (e.g. no object was ever detected, so nothing can
persist) counts as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from selfforcing.data.toy_world import ALL_COLORS, BACKGROUND_COLORS, SHAPES, parse_caption
from selfforcing.errors import SelfForcingError

OBJECT_NAMES: tuple[str, ...] = tuple(ALL_COLORS)  # the LoRA demo's new colour too
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUND_COLORS)
# Palette label order: object colours, then backgrounds; label len(PALETTE) means "other".
PALETTE = np.array([*ALL_COLORS.values(), *BACKGROUND_COLORS.values()], dtype=np.float32)
OTHER = len(PALETTE)

# RGB distance within which a pixel counts as a palette colour: under half the closest
# pair of object colours (orange-yellow, 88 apart), so the match is unambiguous, and
# tight enough that anti-aliased edge pixels (blends with the background) drop out.
COLOR_THRESHOLD = 40.0
# The border's median colour must lie this close to the prompted background.
BACKGROUND_THRESHOLD = 40.0
# Plausible object areas as fractions of the frame. The smallest toy-world object
# covers about 3% of the frame, so 0.5% still counts a mostly occluded one, while
# stray pixels of a colour do not; no object covers 20%, so 40% is a colour flood.
MIN_AREA = 0.005
MAX_AREA = 0.4
# Fill ratio of the bounding box of each shape (area of the shape / area of its box).
SHAPE_FILL: dict[str, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
# Centroid displacement per frame (fraction of the frame) above which an object moves.
# The slowest toy-world motion is 0.02, a detected resting object moves 0.
MOTION_EPS = 0.005
FD_SCALE = 0.3
WEIGHTS: dict[str, float] = {"semantic": 0.4, "quality": 0.2, "color": 0.2, "temporal": 0.2}

FEATURE_NAMES: tuple[str, ...] = (
    *(f"palette_{name}" for name in (*OBJECT_NAMES, *BACKGROUND_NAMES, "other")),
    "saturation", "brightness",
    "mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b",
    "edge_energy", "object_count", "object_fill",
)


# ------------------------------------------------------------------------------ input


def as_videos(videos: Any) -> np.ndarray:
    """uint8 ``(N, T, H, W, 3)`` numpy view of a batch (or of one ``(T, H, W, 3)`` video).

    Metrics read pixel colours against the exact palette, so only uint8 RGB is accepted:
    a float video in [-1, 1] would silently match nothing.
    """
    array = videos.detach().cpu().numpy() if isinstance(videos, torch.Tensor) else np.asarray(videos)
    if array.ndim == 4:
        array = array[None]
    if array.ndim != 5 or array.shape[-1] != 3 or array.dtype != np.uint8 or array.shape[0] == 0:
        raise SelfForcingError(
            f"videos must be uint8 (N, T, H, W, 3) RGB frames, got dtype {array.dtype} and shape {array.shape}"
        )
    return array


# --------------------------------------------------------------------------- detector


def palette_labels(videos: Any, threshold: float = COLOR_THRESHOLD) -> np.ndarray:
    """Per-pixel palette label ``(N, T, H, W)``: nearest :data:`PALETTE` index, or :data:`OTHER`.

    One palette colour at a time keeps memory at a few arrays the size of the video,
    whatever the batch size; channel planes avoid slow reductions over a length-3 axis.
    """
    channels = _channels(as_videos(videos))
    best = np.full(channels[0].shape, np.inf, dtype=np.float32)
    labels = np.full(channels[0].shape, OTHER, dtype=np.int8)
    for index, color in enumerate(PALETTE):
        squared = sum((plane - value) ** 2 for plane, value in zip(channels, color))
        closer = squared < best
        best[closer], labels[closer] = squared[closer], index
    labels[best > threshold**2] = OTHER
    return labels


def _channels(videos: np.ndarray) -> list[np.ndarray]:
    """The R, G and B planes ``(N, T, H, W)`` as contiguous float32 arrays in 0..255."""
    return [np.ascontiguousarray(videos[..., c], dtype=np.float32) for c in range(3)]


def estimate_background(videos: Any) -> tuple[np.ndarray, np.ndarray]:
    """Background index into :data:`BACKGROUND_NAMES` and its RGB distance, each ``(N, T)``.

    The per-channel median of the frame's one-pixel border: objects stay inside the frame
    and cover well under half of its border, so the median is the background even when
    an object touches a wall, and it shrugs off pixel noise.
    """
    frames = as_videos(videos).astype(np.float32)
    border = np.concatenate(
        [frames[:, :, 0], frames[:, :, -1], frames[:, :, 1:-1, 0], frames[:, :, 1:-1, -1]], axis=2
    )
    median = np.median(border, axis=2)  # (N, T, 3)
    backgrounds = np.array(list(BACKGROUND_COLORS.values()), dtype=np.float32)
    distance = np.linalg.norm(median[..., None, :] - backgrounds, axis=-1)
    return distance.argmin(-1), distance.min(-1)


def shape_from_fill(fill: np.ndarray) -> np.ndarray:
    """Index into :data:`SHAPES` of the shape whose :data:`SHAPE_FILL` is nearest; -1 where NaN.

    On rendered toy-world frames this is right for over 99% of unoccluded objects at 32x32
    (squares fill 1.0, circles 0.69-0.90, triangles 0.50-0.67).
    """
    fill = np.asarray(fill, dtype=np.float64)
    targets = np.array([SHAPE_FILL[shape] for shape in SHAPES])
    guess = np.abs(np.nan_to_num(fill, nan=-10.0)[..., None] - targets).argmin(-1)
    return np.where(np.isnan(fill), -1, guess)


@dataclass(frozen=True)
class Detections:
    """What :func:`detect` sees in every frame; object-colour axes follow :data:`OBJECT_NAMES`.

    ``palette_fraction`` (N, T, len(PALETTE) + 1): share of the frame per palette label.
    ``area`` (N, T, C): share of the frame of each object colour.
    ``present`` (N, T, C): area within [MIN_AREA, MAX_AREA], i.e. a plausible object.
    ``centroid`` (N, T, C, 2): (x, y) mask centroid in fractions of the frame, NaN if absent.
    ``fill`` (N, T, C): mask area / bounding-box area, NaN if absent.
    ``shape`` (N, T, C): index into SHAPES guessed from ``fill``, -1 if absent.
    ``hollow`` (N, T, C): present, and the pixel at the centroid is not the object's colour
    (a ring, the toy world's one shape with a hole).
    ``background`` (N, T): index into BACKGROUND_NAMES; ``background_distance`` its distance.
    """

    palette_fraction: np.ndarray
    present: np.ndarray
    centroid: np.ndarray
    fill: np.ndarray
    shape: np.ndarray
    hollow: np.ndarray
    background: np.ndarray
    background_distance: np.ndarray

    @property
    def area(self) -> np.ndarray:
        return self.palette_fraction[..., : len(OBJECT_NAMES)]


def detect(videos: Any, threshold: float = COLOR_THRESHOLD) -> Detections:
    """Run the analytic detector on every frame (see :class:`Detections`).

    Objects in one toy-world scene have distinct colours, so each object colour's mask is
    one object; anti-aliased edges fall outside the threshold and shrink it by about half
    a pixel all round, which leaves the fill ratios of the three shapes well apart.
    """
    videos = as_videos(videos)
    height, width = videos.shape[2:4]
    labels = palette_labels(videos, threshold)
    frame = np.arange(labels.shape[0] * labels.shape[1]).reshape(labels.shape[:2])[..., None, None]
    counts = np.bincount((frame * (OTHER + 1) + labels).ravel(), minlength=frame.size * (OTHER + 1))
    fraction = counts.reshape(*labels.shape[:2], OTHER + 1) / (height * width)
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    centroids, fills = [], []
    for k in range(len(OBJECT_NAMES)):
        mask = labels == k
        per_column, per_row = mask.sum(-2), mask.sum(-1)  # pixel counts (N, T, W) and (N, T, H)
        count = per_row.sum(-1).astype(np.float64)
        safe = np.where(count > 0, count, np.nan)
        centroids.append(np.stack([per_column @ xs / safe, per_row @ ys / safe], axis=-1))
        fills.append(count / (_extent(per_row > 0) * _extent(per_column > 0)))  # NaN for an empty mask
    fill = np.stack(fills, axis=-1)
    area = fraction[..., : len(OBJECT_NAMES)]
    present = (area >= MIN_AREA) & (area <= MAX_AREA)
    absent = ~present
    centroid = np.stack(centroids, axis=-2)
    centroid[absent] = np.nan
    fill[absent] = np.nan
    background, background_distance = estimate_background(videos)
    return Detections(fraction, present, centroid, fill, shape_from_fill(fill), _hollow(labels, centroid),
                      background, background_distance)


def _hollow(labels: np.ndarray, centroid: np.ndarray) -> np.ndarray:
    """(N, T, C): the label at each present object's centroid pixel is not its own colour."""
    n, t, height, width = labels.shape
    present = ~np.isnan(centroid[..., 0])
    column = np.clip(np.nan_to_num(centroid[..., 0]) * width, 0, width - 1).astype(int)
    row = np.clip(np.nan_to_num(centroid[..., 1]) * height, 0, height - 1).astype(int)
    video, frame = np.indices((n, t))
    at_centre = labels[video[..., None], frame[..., None], row, column]
    return present & (at_centre != np.arange(centroid.shape[2]))


def _extent(occupied: np.ndarray) -> np.ndarray:
    """Length of the span from the first to the last True along the last axis; NaN if none."""
    size = occupied.shape[-1]
    first = occupied.argmax(-1)
    last = size - 1 - occupied[..., ::-1].argmax(-1)
    return np.where(occupied.any(-1), last - first + 1, np.nan)


# -------------------------------------------------------------------------- semantics


def _parse_prompts(prompts: Sequence[str], count: int) -> list[dict[str, Any]]:
    """Parse one caption per video; a bare string is refused, not read as a list of letters."""
    if isinstance(prompts, str) or len(prompts) != count:
        got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise SelfForcingError(f"need one prompt per video: {count} videos, got {got}")
    return [parse_caption(prompt) for prompt in prompts]


SEMANTIC_PARTS = ("object_presence", "shape_match", "no_stray_colour", "background_match")


def semantic_parts(videos: Any, prompts: Sequence[str], detections: Detections | None = None) -> dict[str, np.ndarray]:
    """The attributes :func:`semantic_accuracy` counts, apart, each ``(N, T)`` in [0, 1]:

    ``object_presence``  fraction of the prompted objects present (colour k covers MIN_AREA..MAX_AREA)
    ``shape_match``      fraction of the prompted objects present *and* of the prompted shape
                         (fill-ratio guess; a ring by its hole)
    ``no_stray_colour``  1 where no unprompted object colour is present
    ``background_match`` 1 where the border's nearest background colour is the prompted one,
                         within BACKGROUND_THRESHOLD

    Apart they tell *how* a model misses a prompt: a distillation loss can, say, clean the
    background and erase the objects at once, which the combined score hides.
    """
    if detections is None:
        detections = detect(videos)
    parsed = _parse_prompts(prompts, detections.present.shape[0])
    parts = {name: np.empty(detections.present.shape[:2]) for name in SEMANTIC_PARTS}
    for n, prompt in enumerate(parsed):
        colors = [OBJECT_NAMES.index(c) for c in prompt["colors"]]
        present = detections.present[n][:, colors]  # (T, K)
        shape_ok = present & np.stack([_shape_seen(detections, n, c, s) for c, s in zip(colors, prompt["shapes"])], -1)
        parts["object_presence"][n] = present.mean(-1)
        parts["shape_match"][n] = shape_ok.mean(-1)
        parts["no_stray_colour"][n] = ~np.delete(detections.present[n], colors, axis=-1).any(-1)
        parts["background_match"][n] = (detections.background[n] == BACKGROUND_NAMES.index(prompt["background"])) & (
            detections.background_distance[n] <= BACKGROUND_THRESHOLD
        )
    return parts


def semantic_accuracy(videos: Any, prompts: Sequence[str], detections: Detections | None = None) -> np.ndarray:
    """Per-frame fraction of the prompt visible, ``(N, T)`` in [0, 1].

    For a prompt with K objects, a frame earns up to 2K + 2 points::

        score = ( sum_k present_k                      # colour k covers MIN_AREA..MAX_AREA
                + sum_k present_k and shape_k correct  # fill-ratio guess matches the prompt (a ring: hollow)
                + [no unprompted object colour is present]
                + [background matches the prompt] ) / (2K + 2)

    (the four terms, apart: :func:`semantic_parts`). The background matches when the border's
    nearest background colour is the prompted one and lies within BACKGROUND_THRESHOLD of it.
    Every attribute is checked in every frame, so a model that forgets an object, morphs its
    shape, invents a colour or lets the background drift loses points from that frame on.
    Rendered toy-world clips score about 0.95 at 32x32, not 1: where objects overlap, the one
    behind loses its shape. Pass ``detections`` (from :func:`detect` on ``videos``) to skip
    re-running the detector.
    """
    return _semantic_score(semantic_parts(videos, prompts, detections), prompts)


def _semantic_score(parts: dict[str, np.ndarray], prompts: Sequence[str]) -> np.ndarray:
    """:func:`semantic_accuracy` from its parts (K objects: 2K + 2 points per frame)."""
    objects = np.array([len(p["colors"]) for p in _parse_prompts(prompts, len(parts["object_presence"]))])[:, None]
    points = objects * (parts["object_presence"] + parts["shape_match"]) + parts["no_stray_colour"] \
        + parts["background_match"]
    return points / (2 * objects + 2)


def _shape_seen(detections: Detections, video: int, color: int, shape: str) -> np.ndarray:
    """(T,) the object of ``color`` looks like ``shape``: a ring by its hole, the rest by fill ratio."""
    if shape == "ring":
        return detections.hollow[video][:, color]
    return detections.shape[video][:, color] == SHAPES.index(shape)


# ---------------------------------------------------------------------------- quality


def saturation_brightness(videos: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean HSV saturation and mean luma per frame, each ``(N, T)`` in [0, 1].

    Saturation ``(max - min) / max`` (0 for black) is what fades first when a model's
    colours wash out; luma (Rec. 601 weights) tracks darkening or brightening.
    """
    r, g, b = _channels(as_videos(videos))
    high, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    saturation = (high - low) / np.maximum(high, 1)  # integer levels: max is 0 or >= 1, and 0 gives 0
    luma = (0.299 * r + 0.587 * g + 0.114 * b) / 255
    return saturation.mean((-1, -2)), luma.mean((-1, -2))


def frame_features(videos: Any, detections: Detections | None = None) -> np.ndarray:
    """Deterministic per-frame feature vectors ``(N, T, D)``, named by :data:`FEATURE_NAMES`.

    Toy-world frames are too small and too simple for a pretrained image network, so the
    features are hand-made, all on a [0, 1]-like scale so none dominates the distance:
    the palette histogram (12: each object colour, each background, "other"), mean
    saturation and luma (2), per-channel RGB mean and standard deviation / 255 (6), edge
    energy (mean absolute difference of neighbouring pixels / 255: noise raises it, blur
    lowers it), the number of plausible objects / 2 (the toy world draws at most two) and
    their mean fill ratio (0 when none).
    """
    videos = as_videos(videos)
    if detections is None:
        detections = detect(videos)
    planes = np.stack(_channels(videos), axis=2) / 255  # (N, T, 3, H, W)
    saturation, brightness = saturation_brightness(videos)
    edges = sum(np.abs(np.diff(planes, axis=axis)).mean((2, 3, 4)) for axis in (-1, -2)) / 2
    count = detections.present.sum(-1)
    fill = np.where(count > 0, np.nansum(detections.fill, -1) / np.maximum(count, 1), 0.0)
    return np.concatenate(
        [
            detections.palette_fraction,
            saturation[..., None], brightness[..., None],
            planes.mean((-1, -2)), planes.std((-1, -2)),
            edges[..., None], count[..., None] / 2, fill[..., None],
        ],
        axis=-1,
    )


def frechet_distance(features_a: Any, features_b: Any, weights_b: Any = None) -> float:
    """Frechet distance between Gaussian fits of two feature sets (rows are samples; leading axes flattened).

    ``weights_b``, broadcastable to ``features_b.shape[:-1]``, weigh the samples of the
    second set (its mean and covariance), e.g. a background-matched real reference.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``. The last trace is
    computed without scipy and without an unstable non-symmetric square root: ``S_a S_b``
    has the eigenvalues of the symmetric PSD matrix ``S_a^(1/2) S_b S_a^(1/2)``, so the
    trace is the sum of the square roots of its (clipped non-negative) eigenvalues. Works
    for singular covariances (fewer samples than features).
    """
    a, b = (np.asarray(f, dtype=np.float64) for f in (features_a, features_b))
    weights = np.ones(b.shape[:-1]) if weights_b is None else np.broadcast_to(weights_b, b.shape[:-1])
    a, b, weights = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), weights.reshape(-1)
    if a.shape[1] != b.shape[1] or len(a) < 2 or np.count_nonzero(weights) < 2:
        raise SelfForcingError(
            f"frechet_distance needs two sets of >= 2 samples of equal dimension, got {a.shape} and {b.shape}"
        )
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False, aweights=weights))
    root_a = _psd_sqrt(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    mean_gap = a.mean(0) - np.average(b, axis=0, weights=weights)
    distance = (mean_gap**2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
    return float(max(distance, 0.0))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance matrix (tiny negative eigenvalues from rounding clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def windowed_fd(
    generated: Any, real: Any, window: int, real_weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """FD of each window of generated frame indices against all real frames.

    ``generated`` and ``real`` are feature arrays ``(N, T, D)`` from :func:`frame_features`;
    ``real_weights`` (N_real,) optionally weigh the real videos (:func:`reference_weights`).
    Window ``w`` pools frames ``w*window .. (w+1)*window - 1`` of every generated video
    (``N * window`` samples); trailing frames that do not fill a window are left out.
    Returns ``(starts, fd)``: each window's first frame index and its FD.
    """
    generated, real = np.asarray(generated), np.asarray(real)
    frames = generated.shape[1]
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= frames:
        raise SelfForcingError(f"window must be an integer in 1..{frames} (the video length), got {window!r}")
    starts = np.arange(0, frames - window + 1, window)
    weights = None if real_weights is None else np.asarray(real_weights)[:, None]
    return starts, np.array([frechet_distance(generated[:, s : s + window], real, weights) for s in starts])


# ------------------------------------------------------------------------ colour drift


def _video_backgrounds(detections: Detections) -> np.ndarray:
    """Each video's background index (N,): the one the detector reads in most of its frames."""
    votes = np.stack([(detections.background == b).sum(1) for b in range(len(BACKGROUND_NAMES))], axis=-1)
    return votes.argmax(-1)


def _prompt_backgrounds(prompts: Sequence[str]) -> np.ndarray:
    return np.array([BACKGROUND_NAMES.index(p["background"]) for p in _parse_prompts(prompts, len(prompts))])


def reference_weights(real_detections: Detections, prompts: Sequence[str]) -> np.ndarray:
    """Weights (N_real,) summing to 1 that give the real videos the prompts' background mix.

    A real video with background b gets ``share of prompts with b / real videos with b``.
    Backgrounds no real video shows cannot be matched and drop out (see
    :func:`reference_coverage`); when no background is shared at all, the real videos
    are weighed equally.
    """
    real = _video_backgrounds(real_detections)
    prompt_share = np.bincount(_prompt_backgrounds(prompts), minlength=len(BACKGROUND_NAMES)) / len(prompts)
    weights = prompt_share[real] / np.bincount(real, minlength=len(BACKGROUND_NAMES))[real]
    if weights.sum() == 0:
        return np.full(len(real), 1 / len(real))
    return weights / weights.sum()


def reference_coverage(real_detections: Detections, prompts: Sequence[str]) -> float:
    """Fraction of prompts whose background some real video shows; below 1 the reference is biased.

    A few dozen real clips cover all four backgrounds almost surely; eight often do not.
    """
    return float(np.isin(_prompt_backgrounds(prompts), _video_backgrounds(real_detections)).mean())


def color_statistics(
    videos: Any, detections: Detections | None = None, weights: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-frame-index means over the videos: ``saturation`` and ``brightness`` (T,), ``palette`` (T, 12).

    ``weights`` (N,), e.g. from :func:`reference_weights`, weigh the videos; equal by default.
    """
    if detections is None:
        detections = detect(videos)
    saturation, brightness = saturation_brightness(videos)
    return {
        "saturation": np.average(saturation, axis=0, weights=weights),
        "brightness": np.average(brightness, axis=0, weights=weights),
        "palette": np.average(detections.palette_fraction, axis=0, weights=weights),
    }


def color_drift(generated: dict[str, np.ndarray], real: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-frame gap between generated and real colour statistics (from :func:`color_statistics`).

    ``saturation_drift[t] = |sat_gen[t] - mean_t' sat_real[t']|`` and likewise for
    ``brightness_drift``; these miss a pure hue change (it keeps saturation and luma), so
    ``palette_drift[t]`` is the total-variation distance ``0.5 * sum |h_gen[t] - h_real|``
    between the palette histograms, in [0, 1]: it sees colours turning into other colours.
    """
    return {
        "saturation_drift": np.abs(generated["saturation"] - real["saturation"].mean()),
        "brightness_drift": np.abs(generated["brightness"] - real["brightness"].mean()),
        "palette_drift": 0.5 * np.abs(generated["palette"] - real["palette"].mean(0)).sum(-1),
    }


# ---------------------------------------------------------------- temporal consistency


def _prompted(detections: Detections, parsed: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompted objects' ``present`` (N, T, K), ``centroid`` (N, T, K, 2) and ``moving`` (N, K).

    K is the largest object count among the prompts; shorter prompts are padded with
    never-present slots, which every temporal metric skips.
    """
    n, t = detections.present.shape[:2]
    k = max(p["count"] for p in parsed)
    present = np.zeros((n, t, k), dtype=bool)
    centroid = np.full((n, t, k, 2), np.nan)
    moving = np.zeros((n, k), dtype=bool)
    for i, prompt in enumerate(parsed):
        colors = [OBJECT_NAMES.index(c) for c in prompt["colors"]]
        present[i, :, : len(colors)] = detections.present[i][:, colors]
        centroid[i, :, : len(colors)] = detections.centroid[i][:, colors]
        moving[i, : len(colors)] = [m != "resting" for m in prompt["motions"]]
    return present, centroid, moving


def _mean_where(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Mean over every axis but the frame axis (1) of ``values`` where ``valid``; NaN where none is."""
    axes = tuple(a for a in range(values.ndim) if a != 1)
    count = valid.sum(axes)
    total = np.where(valid, values, 0).sum(axes)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def persistence(detections: Detections, prompts: Sequence[str]) -> np.ndarray:
    """``(T-1,)``: of the prompted objects present in frame t, the fraction still present in t+1.

    NaN where no prompted object is present in frame t. Catches objects that vanish
    (or shrink into a few pixels) as the rollout goes on.
    """
    present, _, _ = _prompted(detections, _parse_prompts(prompts, detections.present.shape[0]))
    return _mean_where(present[:, 1:].astype(float), present[:, :-1])


def _displacement(centroid: np.ndarray) -> np.ndarray:
    """``|c[t+1] - c[t]|`` per frame pair along axis 1 (NaN where either is missing)."""
    return np.linalg.norm(np.diff(centroid, axis=1), axis=-1)


def motion_agreement(detections: Detections, prompts: Sequence[str]) -> np.ndarray:
    """``(T-1,)``: fraction of prompted objects seen in frames t and t+1 that move as prompted.

    An object moves when its centroid shifts by more than MOTION_EPS; it should for every
    motion phrase except "resting". A frozen rollout fails every moving object; a
    jittering one fails every resting object. NaN where no prompted object is tracked.
    """
    present, centroid, moving = _prompted(detections, _parse_prompts(prompts, detections.present.shape[0]))
    step = _displacement(centroid)
    agrees = (np.nan_to_num(step) > MOTION_EPS) == moving[:, None, :]
    return _mean_where(agrees.astype(float), present[:, 1:] & present[:, :-1])


def speed(detections: Detections) -> np.ndarray:
    """``(T-1,)``: mean centroid displacement per frame of every object colour present in t and t+1.

    Every detected colour counts, prompted or not, so real clips need no prompts. A
    frozen model scores 0, a jumpy one too much; compare with the real clips.
    """
    present = detections.present
    return _mean_where(np.nan_to_num(_displacement(detections.centroid)), present[:, 1:] & present[:, :-1])


def jerk(detections: Detections) -> np.ndarray:
    """``(T-2,)``: mean ``|c[t+1] - 2 c[t] + c[t-1]|`` over object colours present in all three frames.

    Index i is centred on frame i+1. Straight toy-world motion has zero second
    difference except at wall bounces, so shuffled or jittering frames raise it far above
    the real clips'. A frozen video has zero jerk too, which is why :func:`speed` is
    reported beside it.
    """
    c, present = detections.centroid, detections.present
    second = np.linalg.norm(c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2], axis=-1)
    return _mean_where(np.nan_to_num(second), present[:, 2:] & present[:, 1:-1] & present[:, :-2])


# -------------------------------------------------------------------------- summaries


def _nanmean(values: np.ndarray) -> float:
    """Mean of the finite entries; NaN (not a warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    return float(values[finite].mean()) if finite.any() else math.nan


def _ratio_score(generated: float, real: float) -> float:
    """min/max of two non-negative rates: 1 when equal, toward 0 as they part; 1 if both are 0."""
    low, high = sorted((generated, real))
    if math.isnan(low) or math.isnan(high):
        return math.nan
    return 1.0 if high == 0 else low / high


def _smoothness(generated_jerk: float, real_jerk: float) -> float:
    """1 while generated paths are as smooth as real ones or smoother, ``real / generated`` beyond.

    Smoother than real is not penalised here: a frozen video is caught by the speed score.
    """
    if math.isnan(generated_jerk) or math.isnan(real_jerk):
        return math.nan
    return 1.0 if generated_jerk <= real_jerk else real_jerk / generated_jerk


def early_late(curve: np.ndarray) -> dict[str, float | None]:
    """Mean of the first and last third of a per-frame curve and their difference (late - early)."""
    third = max(1, len(curve) // 3)
    early, late = _nanmean(curve[:third]), _nanmean(curve[-third:])
    return {"early": _json_float(early), "late": _json_float(late), "change": _json_float(late - early)}


def _json_float(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def _json_list(values: np.ndarray) -> list[float | None]:
    return [_json_float(float(v)) for v in np.asarray(values, dtype=np.float64)]


def total_score(
    semantic: float, fd: float, color_fidelity: float, temporal: float, fd_scale: float = FD_SCALE
) -> float:
    """The overall score in [0, 100] (formula in the module docstring); NaN terms count as 0."""
    terms = {"semantic": semantic, "quality": math.exp(-fd / fd_scale), "color": color_fidelity, "temporal": temporal}
    return 100 * sum(WEIGHTS[name] * (0.0 if math.isnan(v) else v) for name, v in terms.items())


def evaluate_videos(
    videos: Any, prompts: Sequence[str], real_videos: Any, window: int = 4, *, fd_scale: float = FD_SCALE
) -> dict[str, Any]:
    """All metrics of generated ``videos`` (one prompt each) against ``real_videos``; JSON-ready.

    ``real_videos`` should come from the same prompt distribution (ideally rendered toy-world
    clips, a few dozen or more so every prompted background is among them). They may
    differ in number and length (generated rollouts may be longer); keep the resolution
    the same, as edge energy and anti-aliased edges depend on it. Returns::

        per_frame       generated curves over frame index: semantic_accuracy and its
                        parts (SEMANTIC_PARTS), saturation,
                        brightness, saturation_drift, brightness_drift, palette_drift (T);
                        persistence, motion_agreement, speed (T-1, pair t -> t+1);
                        jerk (T-2, centred on frames 1..T-2)
        per_frame_real  real curves: saturation, brightness (background-matched), speed, jerk
        per_window      start (first frame of each window), fd
        scalars         the mean of every per-frame curve, reference_coverage, fd (all
                        frames), quality, color_fidelity, smoothness, speed_score,
                        temporal_consistency, total
        early_late      per generated curve: mean of its first and last third, late - early

    Undefined values (e.g. persistence when nothing is detected) are ``None``.
    """
    if not fd_scale > 0:
        raise SelfForcingError(f"fd_scale must be positive, got {fd_scale!r}")
    videos, real_videos = as_videos(videos), as_videos(real_videos)
    det, real_det = detect(videos), detect(real_videos)
    features, real_features = frame_features(videos, det), frame_features(real_videos, real_det)
    weights = reference_weights(real_det, prompts)
    stats, real_stats = color_statistics(videos, det), color_statistics(real_videos, real_det, weights)
    drift = color_drift(stats, real_stats)
    parts = semantic_parts(videos, prompts, det)  # once: the score and its parts
    per_frame = {
        "semantic_accuracy": _semantic_score(parts, prompts).mean(0),
        **{name: part.mean(0) for name, part in parts.items()},
        "saturation": stats["saturation"],
        "brightness": stats["brightness"],
        **drift,
        "persistence": persistence(det, prompts),
        "motion_agreement": motion_agreement(det, prompts),
        "speed": speed(det),
        "jerk": jerk(det),
    }
    per_frame_real = {
        "saturation": real_stats["saturation"],
        "brightness": real_stats["brightness"],
        "speed": speed(real_det),
        "jerk": jerk(real_det),
    }
    starts, window_fd = windowed_fd(features, real_features, window, weights)
    scalars = {name: _nanmean(curve) for name, curve in per_frame.items()}
    scalars["reference_coverage"] = reference_coverage(real_det, prompts)
    scalars["fd"] = frechet_distance(features, real_features, weights[:, None])
    scalars["quality"] = math.exp(-scalars["fd"] / fd_scale)
    scalars["color_fidelity"] = 1 - np.mean([scalars[f"{k}_drift"] for k in ("saturation", "brightness", "palette")])
    scalars["smoothness"] = _smoothness(scalars["jerk"], _nanmean(per_frame_real["jerk"]))
    scalars["speed_score"] = _ratio_score(scalars["speed"], _nanmean(per_frame_real["speed"]))
    temporal = [scalars[k] for k in ("persistence", "motion_agreement", "smoothness", "speed_score")]
    scalars["temporal_consistency"] = float(np.mean(np.nan_to_num(temporal, nan=0.0)))
    scalars["total"] = total_score(
        scalars["semantic_accuracy"], scalars["fd"], scalars["color_fidelity"], scalars["temporal_consistency"],
        fd_scale,
    )
    return {
        "num_videos": int(videos.shape[0]),
        "num_frames": int(videos.shape[1]),
        "window": window,
        "fd_scale": fd_scale,
        "per_frame": {name: _json_list(curve) for name, curve in per_frame.items()},
        "per_frame_real": {name: _json_list(curve) for name, curve in per_frame_real.items()},
        "per_window": {"start": [int(s) for s in starts], "fd": _json_list(window_fd)},
        "scalars": {name: _json_float(float(value)) for name, value in scalars.items()},
        "early_late": {name: early_late(curve) for name, curve in per_frame.items()},
    }
