"""The metrics separate real toy-world clips from corrupted ones, in the right direction, per frame."""

import json
import math

import numpy as np
import pytest
import torch

from selfforcing.data.toy_world import (
    BACKGROUND_COLORS,
    OBJECT_COLORS,
    SHAPES,
    Scene,
    ToyObject,
    ToyWorldDataset,
    caption,
    parse_caption,
    render,
)
from selfforcing.errors import SelfForcingError
from selfforcing.eval.metrics import (
    BACKGROUND_NAMES,
    FEATURE_NAMES,
    OBJECT_NAMES,
    detect,
    estimate_background,
    evaluate_videos,
    frame_features,
    frechet_distance,
    reference_coverage,
    reference_weights,
    SEMANTIC_PARTS,
    semantic_accuracy,
    semantic_parts,
    shape_from_fill,
    windowed_fd,
)

T = 16


def clips(seed: int, n: int = 8, frames: int = T, side: int = 32) -> tuple[np.ndarray, list[str]]:
    """Real toy-world clips as uint8 (N, T, H, W, 3) with their captions."""
    dataset = ToyWorldDataset(n, frames, side, side, seed=seed)
    scenes = [dataset.scene(i) for i in range(n)]
    videos = np.stack([render(scene, frames, side, side).numpy() for scene in scenes])
    return videos, [caption(scene) for scene in scenes]


def color_shift(videos: np.ndarray) -> np.ndarray:
    """Rotate the channels (R <- B, G <- R, B <- G): every object colour leaves the palette."""
    return videos[..., [2, 0, 1]]


def frozen(videos: np.ndarray) -> np.ndarray:
    return np.repeat(videos[:, :1], videos.shape[1], axis=1)


def shuffled(videos: np.ndarray) -> np.ndarray:
    return videos[:, np.random.default_rng(0).permutation(videos.shape[1])]


def fade_to_gray(videos: np.ndarray) -> np.ndarray:
    """Blend frame t toward mid-gray with weight t / (T - 1): a drift that grows with time."""
    weight = np.linspace(0, 1, videos.shape[1])[None, :, None, None, None]
    return np.rint(videos * (1 - weight) + 128 * weight).astype(np.uint8)


def growing_noise(videos: np.ndarray) -> np.ndarray:
    """Gaussian pixel noise whose standard deviation grows from 0 to 120 over the clip."""
    std = np.linspace(0, 120, videos.shape[1])[None, :, None, None, None]
    noise = np.random.default_rng(0).normal(size=videos.shape) * std
    return np.clip(videos + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def real():
    return clips(seed=0)


@pytest.fixture(scope="module")
def reference():
    """A disjoint set of real clips, large enough to show every background: the reference."""
    return clips(seed=1, n=32)[0]


@pytest.fixture(scope="module")
def results(real, reference):
    videos, prompts = real
    cases = {
        "real": videos,
        "shift": color_shift(videos),
        "frozen": frozen(videos),
        "shuffled": shuffled(videos),
        "fade": fade_to_gray(videos),
        "noise": growing_noise(videos),
    }
    return {name: evaluate_videos(v, prompts, reference, window=4) for name, v in cases.items()}


def scalar(results, case, name):
    return results[case]["scalars"][name]


# ---------------------------------------------------------------------------- detector


def one_frame(background=(0, 0, 0), side=32):
    frame = np.zeros((1, 1, side, side, 3), dtype=np.uint8)
    frame[:] = background
    return frame


def test_red_square_on_black_is_detected_as_red_square_with_its_centroid():
    video = one_frame()
    video[0, 0, 8:16, 10:20] = OBJECT_COLORS["red"]  # rows 8..15, columns 10..19
    det = detect(video)
    red = OBJECT_NAMES.index("red")
    assert det.present[0, 0].tolist() == [name == "red" for name in OBJECT_NAMES]
    assert SHAPES[det.shape[0, 0, red]] == "square"
    assert det.fill[0, 0, red] == pytest.approx(1.0)
    assert det.area[0, 0, red] == pytest.approx(80 / 1024)
    np.testing.assert_allclose(det.centroid[0, 0, red], [15 / 32, 12 / 32])  # pixel centres (c + 0.5) / 32
    assert BACKGROUND_NAMES[det.background[0, 0]] == "black"
    assert det.background_distance[0, 0] == 0
    assert np.isnan(det.centroid[0, 0, OBJECT_NAMES.index("blue")]).all()
    assert det.shape[0, 0, OBJECT_NAMES.index("blue")] == -1


@pytest.mark.parametrize("side", [32, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_shapes_are_recognised_and_located(shape, side):
    obj = ToyObject(shape, "green", 0.2, (0.4, 0.6), (0.0, 0.0))
    scene = Scene("dark blue", (obj,))
    det = detect(render(scene, 1, side, side))
    green = OBJECT_NAMES.index("green")
    assert SHAPES[det.shape[0, 0, green]] == shape
    assert BACKGROUND_NAMES[det.background[0, 0]] == "dark blue"
    # A triangle's centroid lies a third of its half-height below its box centre.
    expected = np.array([0.4, 0.6 + (obj.size / 3 if shape == "triangle" else 0.0)])
    np.testing.assert_allclose(det.centroid[0, 0, green], expected, atol=1.5 / side)


def test_detector_accepts_tensors_and_single_videos():
    video = render(Scene("gray", (ToyObject("circle", "yellow", 0.2, (0.5, 0.5), (0.0, 0.0)),)), 3, 32, 32)
    det = detect(video)  # torch (T, H, W, 3)
    assert det.present.shape == (1, 3, len(OBJECT_NAMES))
    assert det.present[0, :, OBJECT_NAMES.index("yellow")].all()


@pytest.mark.parametrize("background", list(BACKGROUND_COLORS))
def test_background_is_the_border_median_even_with_an_object_on_the_wall(background):
    video = one_frame(BACKGROUND_COLORS[background])
    video[0, 0, 0:12, 0:12] = OBJECT_COLORS["white"]  # a large object in the corner, touching two walls
    index, distance = estimate_background(video)
    assert BACKGROUND_NAMES[index[0, 0]] == background
    assert distance[0, 0] == 0


def test_shape_from_fill_picks_the_nearest_fill_ratio():
    fills = np.array([1.0, 0.93, math.pi / 4, 0.7, 0.5, 0.6, np.nan])
    assert shape_from_fill(fills).tolist() == [
        SHAPES.index(s) for s in ("square", "square", "circle", "circle", "triangle", "triangle")
    ] + [-1]


def test_detector_recognises_real_clips():
    """Unoccluded objects in real clips: present and of the right shape in nearly every frame."""
    videos, prompts = clips(seed=3, n=16)
    scores = semantic_accuracy(videos, prompts)
    assert scores.shape == (16, T)
    assert scores.mean() > 0.9
    assert scores[:, 0].mean() > 0.95  # frame 0: objects never overlap


# --------------------------------------------------------------------------- semantics


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a red square resting on a black background", 1.0),
        ("a red circle resting on a black background", 3 / 4),  # shape wrong
        ("a red square resting on a gray background", 3 / 4),  # background wrong
        ("a blue square resting on a black background", 1 / 4),  # blue missing (and its shape), red extra
        ("a red square resting and a blue circle moving left on a black background", 4 / 6),  # blue missing
    ],
)
def test_semantic_accuracy_follows_its_formula(prompt, expected):
    video = one_frame()
    video[0, 0, 8:16, 10:20] = OBJECT_COLORS["red"]
    assert semantic_accuracy(video, [prompt])[0, 0] == pytest.approx(expected)


@pytest.mark.parametrize(
    "prompt, expected",
    [  # object_presence, shape_match, no_stray_colour, background_match
        ("a red square resting on a black background", (1, 1, 1, 1)),
        ("a red circle resting on a black background", (1, 0, 1, 1)),
        ("a red square resting on a gray background", (1, 1, 1, 0)),
        ("a blue square resting on a black background", (0, 0, 0, 1)),
        ("a red square resting and a blue circle moving left on a black background", (0.5, 0.5, 1, 1)),
    ],
)
def test_semantic_parts_tell_how_a_prompt_is_missed(prompt, expected):
    video = one_frame()
    video[0, 0, 8:16, 10:20] = OBJECT_COLORS["red"]
    parts = semantic_parts(video, [prompt])
    assert tuple(parts) == SEMANTIC_PARTS
    assert tuple(float(part[0, 0]) for part in parts.values()) == pytest.approx(expected)


def test_semantic_accuracy_rejects_bad_prompts():
    video = one_frame()
    with pytest.raises(SelfForcingError, match="one prompt per video"):
        semantic_accuracy(video, "a red square resting on a black background")
    with pytest.raises(SelfForcingError, match="one prompt per video"):
        semantic_accuracy(video, [])
    with pytest.raises(SelfForcingError):
        semantic_accuracy(video, ["a pink elephant"])


def test_float_videos_are_refused():
    with pytest.raises(SelfForcingError, match="uint8"):
        detect(torch.zeros(1, 4, 32, 32, 3))


def test_color_shift_lowers_semantic_accuracy(results):
    assert scalar(results, "real", "semantic_accuracy") > 0.9
    assert scalar(results, "shift", "semantic_accuracy") < scalar(results, "real", "semantic_accuracy") - 0.4


# ----------------------------------------------------------------------------- quality


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    # Diagonal covariances: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2.
    a = np.array([1.0, 2.0, 0.5]) * rng.normal(size=(20000, 3))
    b = np.array([3.0, 1.0, 0.5]) * rng.normal(size=(20000, 3)) + [1.0, 0.0, -2.0]
    sigma_a, sigma_b = a.std(0, ddof=1), b.std(0, ddof=1)
    mean_gap = a.mean(0) - b.mean(0)
    expected = (mean_gap**2).sum() + ((sigma_a - sigma_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_frechet_distance_handles_singular_covariances_and_weights():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 23)), rng.normal(size=(6, 23))  # fewer samples than dimensions
    distance = frechet_distance(a, b)
    assert math.isfinite(distance) and distance >= 0
    weights = np.array([2, 1, 1, 3, 1, 1])
    assert frechet_distance(a, b, weights) == pytest.approx(frechet_distance(a, np.repeat(b, weights, axis=0)), rel=0.1)
    with pytest.raises(SelfForcingError):
        frechet_distance(a[:1], b)


def test_frame_features_are_deterministic_and_named(real):
    videos, _ = real
    features = frame_features(videos)
    assert features.shape == (*videos.shape[:2], len(FEATURE_NAMES))
    np.testing.assert_array_equal(features, frame_features(videos))
    assert np.isfinite(features).all()


def test_real_vs_real_fd_is_small_next_to_corrupted(results):
    real_fd = scalar(results, "real", "fd")
    for case in ("shift", "fade", "noise"):
        assert scalar(results, case, "fd") > 5 * real_fd, case
        assert scalar(results, case, "quality") < scalar(results, "real", "quality")


def test_windowed_fd_grows_as_the_clip_degrades(results):
    fd = results["noise"]["per_window"]["fd"]
    assert results["noise"]["per_window"]["start"] == [0, 4, 8, 12]
    assert fd[0] < fd[1] < fd[2] < fd[3]
    assert fd[-1] > 5 * max(results["real"]["per_window"]["fd"])


def test_windowed_fd_checks_the_window(real):
    features = frame_features(real[0])
    with pytest.raises(SelfForcingError, match="window"):
        windowed_fd(features, features, 0)
    with pytest.raises(SelfForcingError, match="window"):
        windowed_fd(features, features, T + 1)
    starts, fd = windowed_fd(features, features, 5)  # the last frame does not fill a window
    assert starts.tolist() == [0, 5, 10] and fd.shape == (3,)


# ------------------------------------------------------------------------ colour drift


def test_reference_weights_match_the_prompts_background_mix(real, reference):
    _, prompts = real
    detections = detect(reference)
    weights = reference_weights(detections, prompts)
    assert weights.sum() == pytest.approx(1) and (weights >= 0).all()
    real_backgrounds = [BACKGROUND_NAMES[b] for b in detections.background[:, 0]]
    prompted = [parse_caption(p)["background"] for p in prompts]
    shared = [b for b in prompted if b in real_backgrounds]  # unmatched backgrounds drop out
    for name in set(real_backgrounds):
        mass = sum(w for w, b in zip(weights, real_backgrounds) if b == name)
        assert mass == pytest.approx(shared.count(name) / len(shared)), name


def test_reference_coverage_flags_missing_backgrounds(real, reference):
    _, prompts = real
    assert evaluate_videos(real[0][:1], prompts[:1], reference)["scalars"]["reference_coverage"] == 1.0
    gray = render(Scene("gray", (ToyObject("circle", "red", 0.2, (0.5, 0.5), (0.0, 0.0)),)), 4, 32, 32)
    black = render(Scene("black", (ToyObject("circle", "red", 0.2, (0.5, 0.5), (0.0, 0.0)),)), 4, 32, 32)
    prompts = [f"a red circle resting on a {b} background" for b in ("gray", "black")]
    assert reference_coverage(detect(gray), prompts) == 0.5
    np.testing.assert_allclose(reference_weights(detect(np.stack([gray, gray, black])), prompts), [0.25, 0.25, 0.5])


def test_color_shift_shows_as_palette_drift(results):
    """A channel rotation keeps saturation and luma, so the palette histogram must catch it."""
    assert scalar(results, "shift", "palette_drift") > scalar(results, "real", "palette_drift") + 0.15
    assert scalar(results, "shift", "color_fidelity") < scalar(results, "real", "color_fidelity") - 0.05


def test_real_colour_statistics_match_the_reference(results):
    for name in ("saturation_drift", "brightness_drift"):
        assert scalar(results, "real", name) < 0.05, name


def test_fading_shows_as_falling_saturation_and_semantics(results):
    fade, real = results["fade"], results["real"]
    for name in ("saturation", "semantic_accuracy"):
        curve = fade["per_frame"][name]
        assert curve[-1] < curve[0] - 0.3, name
        assert fade["early_late"][name]["change"] < -0.2, name
        assert abs(real["early_late"][name]["change"]) < 0.05, name
    assert fade["early_late"]["saturation_drift"]["change"] > 0.2
    assert scalar(results, "fade", "color_fidelity") < scalar(results, "real", "color_fidelity") - 0.1


def test_growing_noise_shows_as_falling_semantics(results):
    curve = results["noise"]["per_frame"]["semantic_accuracy"]
    assert curve[0] > 0.9 and curve[-1] < 0.7
    assert results["noise"]["early_late"]["semantic_accuracy"]["change"] < -0.2


# ---------------------------------------------------------------- temporal consistency


def test_frozen_clips_fail_the_motion_terms(results):
    frozen_, real = results["frozen"], results["real"]
    assert scalar(results, "frozen", "speed") == 0
    assert scalar(results, "frozen", "speed_score") == 0
    assert scalar(results, "frozen", "motion_agreement") < scalar(results, "real", "motion_agreement") - 0.5
    assert scalar(results, "real", "speed_score") > 0.5
    assert frozen_["scalars"]["temporal_consistency"] < real["scalars"]["temporal_consistency"] - 0.2


def test_shuffled_frames_have_rough_trajectories(results):
    assert scalar(results, "shuffled", "jerk") > 5 * scalar(results, "real", "jerk")
    assert scalar(results, "shuffled", "smoothness") < 0.3
    assert scalar(results, "real", "smoothness") > 0.6
    assert scalar(results, "shuffled", "temporal_consistency") < scalar(results, "real", "temporal_consistency") - 0.2


def test_persistence_drops_where_an_object_vanishes():
    scene = Scene("black", (ToyObject("square", "red", 0.2, (0.5, 0.5), (0.03, 0.0)),))
    video = render(scene, 8, 32, 32).numpy().copy()
    video[5:] = 0  # the square vanishes after frame 4
    result = evaluate_videos(video, [caption(scene)], render(scene, 8, 32, 32), window=4)
    assert result["per_frame"]["persistence"][:4] == [1.0] * 4
    assert result["per_frame"]["persistence"][4] == 0.0
    assert result["per_frame"]["persistence"][5:] == [None, None]  # nothing left to persist
    assert result["per_frame"]["motion_agreement"][:4] == [1.0] * 4


def test_motion_agreement_checks_resting_objects_too():
    resting = Scene("gray", (ToyObject("circle", "blue", 0.2, (0.5, 0.5), (0.0, 0.0)),))
    moving = Scene("gray", (ToyObject("circle", "blue", 0.2, (0.3, 0.5), (0.04, 0.0)),))
    prompt = [caption(resting)]
    reference = render(moving, 8, 32, 32)
    assert evaluate_videos(render(resting, 8, 32, 32), prompt, reference)["scalars"]["motion_agreement"] == 1.0
    assert evaluate_videos(render(moving, 8, 32, 32), prompt, reference)["scalars"]["motion_agreement"] == 0.0


# ------------------------------------------------------------------------------ summary


def test_evaluate_videos_shapes_and_json(results):
    result = results["real"]
    lengths = {name: len(curve) for name, curve in result["per_frame"].items()}
    assert lengths == {
        "semantic_accuracy": T, **{part: T for part in SEMANTIC_PARTS}, "saturation": T, "brightness": T,
        "saturation_drift": T, "brightness_drift": T, "palette_drift": T,
        "persistence": T - 1, "motion_agreement": T - 1, "speed": T - 1, "jerk": T - 2,
    }
    assert set(result["per_frame_real"]) == {"saturation", "brightness", "speed", "jerk"}
    assert set(result["early_late"]) == set(result["per_frame"])
    json.dumps(result, allow_nan=False)  # JSON-ready: plain floats, None for undefined


def test_total_ranks_real_clips_first(results):
    totals = {case: result["scalars"]["total"] for case, result in results.items()}
    assert all(0 <= total <= 100 for total in totals.values())
    assert totals["real"] > 80
    for case, total in totals.items():
        if case != "real":
            assert total < totals["real"] - 5, case


def test_longer_generated_rollouts_than_real_clips(real, reference):
    """Extrapolation: a 24-frame rollout is compared with 16-frame real clips."""
    long_videos, long_prompts = clips(seed=0, n=4, frames=24)
    result = evaluate_videos(long_videos, long_prompts, reference, window=8)
    assert len(result["per_frame"]["semantic_accuracy"]) == 24
    assert len(result["per_frame_real"]["saturation"]) == T
    assert len(result["per_window"]["fd"]) == 3


def test_a_ring_is_recognised_by_its_hole():
    from dataclasses import replace

    from selfforcing.data.toy_world import sample_scene, video_seed
    from selfforcing.eval.metrics import semantic_accuracy

    scenes = [sample_scene(video_seed(2, i), shapes=("ring",)) for i in range(8)]
    prompts = [caption(scene) for scene in scenes]
    rings = torch.stack([render(scene, 4) for scene in scenes])
    discs = torch.stack([render(Scene(s.background, tuple(replace(o, shape="circle") for o in s.objects)), 4)
                         for s in scenes])
    assert semantic_accuracy(rings, prompts).mean() > 0.95
    assert semantic_accuracy(discs, prompts).mean() < 0.8  # a solid disc is no ring


def test_the_new_colour_is_detected_like_the_trained_ones():
    from selfforcing.data.toy_world import sample_scene, video_seed
    from selfforcing.eval.metrics import semantic_accuracy

    scenes = [sample_scene(video_seed(2, i), colors=("cyan",)) for i in range(8)]
    prompts = [caption(scene) for scene in scenes]
    assert semantic_accuracy(torch.stack([render(scene, 4) for scene in scenes]), prompts).mean() > 0.95
    greens = [caption(scene).replace("cyan", "green") for scene in scenes]  # the same pixels, prompted green
    assert semantic_accuracy(torch.stack([render(scene, 4) for scene in scenes]), greens).mean() < 0.5
