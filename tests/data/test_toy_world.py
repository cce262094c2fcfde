import itertools
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from selfforcing.data import toy_world
from selfforcing.data.toy_world import (
    BACKGROUND_COLORS,
    OBJECT_COLORS,
    VOCABULARY,
    Scene,
    ToyObject,
    ToyWorldDataset,
    ToyWorldFolder,
    caption,
    describe,
    parse_caption,
    render,
    sample_scene,
    to_float_video,
    trajectory,
    unknown_words,
    video_seed,
    write_dataset,
)
from selfforcing.errors import SelfForcingError

SEEDS = range(200)


def one_object(shape="circle", color="red", size=0.2, position=(0.5, 0.5), velocity=(0.0, 0.0), background="black"):
    return Scene(background, (ToyObject(shape, color, size, position, velocity),))


def test_same_seed_same_video_and_caption_without_global_rng():
    np.random.seed(1)
    torch.manual_seed(1)
    a = sample_scene(7)
    np.random.seed(2)
    torch.manual_seed(2)
    b = sample_scene(7)
    assert a == b
    assert caption(a) == caption(b)
    assert torch.equal(render(a, 8), render(b, 8))


def test_different_seeds_give_different_videos():
    videos = [render(sample_scene(seed), 4) for seed in range(10)]
    for x, y in itertools.combinations(videos, 2):
        assert not torch.equal(x, y)
    assert len({caption(sample_scene(seed)) for seed in range(50)}) > 25


def test_long_video_continues_short_one():
    for seed in range(20):
        scene = sample_scene(seed)
        long = render(scene, 200, 32, 32)
        assert torch.equal(long[:9], render(scene, 9, 32, 32))
        assert torch.equal(long[150:160], render(scene, 10, 32, 32, start_frame=150))


def test_render_shapes_dtypes_and_float_helper():
    video = render(sample_scene(0), 5, 16, 24)
    assert video.shape == (5, 16, 24, 3) and video.dtype == torch.uint8
    as_float = to_float_video(video)
    assert as_float.shape == (3, 5, 16, 24) and as_float.dtype == torch.float32
    assert torch.equal(to_float_video(torch.tensor([[[[0, 255, 0]]]], dtype=torch.uint8)).flatten(),
                       torch.tensor([-1.0, 1.0, -1.0]))
    assert as_float.min() >= -1 and as_float.max() <= 1


def test_caption_of_a_hand_made_scene():
    scene = Scene("dark blue", (
        ToyObject("circle", "red", 0.1, (0.3, 0.3), (-0.02, 0.0)),
        ToyObject("triangle", "orange", 0.1, (0.7, 0.7), (0.02, 0.03)),
    ))
    assert caption(scene) == "a red circle moving left and an orange triangle bouncing on a dark blue background"
    moving_up = one_object(velocity=(0.0, -0.01), background="gray")
    assert caption(moving_up) == "a red circle moving up on a gray background"
    assert caption(one_object(color="white")) == "a white circle resting on a black background"


def test_captions_round_trip_and_match_the_scene():
    for seed in SEEDS:
        scene = sample_scene(seed)
        parsed = parse_caption(caption(scene))
        assert parsed == describe(scene)
        assert parsed["count"] == len(scene.objects)
        assert parsed["background"] == scene.background
        assert parsed["colors"] == [o.color for o in scene.objects]
        assert parsed["shapes"] == [o.shape for o in scene.objects]
        for obj, motion in zip(scene.objects, parsed["motions"]):
            vx, vy = obj.velocity
            expected = {
                (True, True): "resting",
                (False, True): "moving left" if vx < 0 else "moving right",
                (True, False): "moving up" if vy < 0 else "moving down",
                (False, False): "bouncing",
            }[(vx == 0, vy == 0)]
            assert motion == expected


def test_sampled_scenes_cover_the_grammar_and_respect_options():
    scenes = [sample_scene(seed) for seed in SEEDS]
    motions = {o.motion for s in scenes for o in s.objects}
    assert motions == set(toy_world.MOTION_PHRASES)
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert {s.background for s in scenes} == set(BACKGROUND_COLORS)
    for scene in scenes:
        assert len({o.color for o in scene.objects}) == len(scene.objects)
    crowded = sample_scene(3, min_objects=4, max_objects=4, motions=("diagonal",))
    assert len(crowded.objects) == 4 and {o.motion for o in crowded.objects} == {"bouncing"}


def test_objects_move_and_bounce_inside_the_frame():
    for seed in SEEDS:
        scene = sample_scene(seed)
        centres = trajectory(scene, 300)
        for obj, path in zip(scene.objects, centres):
            assert path.min() >= obj.size - 1e-9 and path.max() <= 1 - obj.size + 1e-9
            moving = obj.velocity != (0.0, 0.0)
            assert (np.ptp(path, axis=0).max() > 0) == moving
    # Heading right from near the right wall, the object turns back: it bounces.
    path = trajectory(one_object(size=0.1, position=(0.85, 0.5), velocity=(0.05, 0.0)), 6)[0, :, 0]
    np.testing.assert_allclose(path, [0.85, 0.9, 0.85, 0.8, 0.75, 0.7], atol=1e-12)


def test_whole_object_stays_visible_while_it_moves():
    """A shape cut off by the frame edge would lose pixels; its pixel count stays put instead."""
    scene = one_object("square", "yellow", 0.15, (0.3, 0.6), (0.045, -0.035))
    video = render(scene, 60, 32, 32, antialias=False)
    is_object = (video == torch.tensor(OBJECT_COLORS["yellow"], dtype=torch.uint8)).all(-1)
    counts = is_object.sum((1, 2))
    assert counts.min() >= 81 and counts.max() <= 121  # 9x9 to 11x11 pixels of a 9.6-pixel side
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    centre_x = (is_object * xs).sum((1, 2)) / counts
    expected_x = torch.from_numpy(trajectory(scene, 60)[0, :, 0]).float() * 32 - 0.5
    assert (centre_x - expected_x).abs().max() < 0.75
    assert centre_x.max() - centre_x.min() > 10


def test_pixel_colours_at_object_centres_match_the_caption():
    size = 32
    for seed in SEEDS:
        scene = sample_scene(seed)
        video = render(scene, 20, size, size)
        centres = trajectory(scene, 20)
        colors = parse_caption(caption(scene))["colors"]
        for k, (color, obj) in enumerate(zip(colors, scene.objects)):
            topmost = k == len(scene.objects) - 1
            for t in range(20) if topmost else [0]:  # first frames are clear; later, objects may overlap
                x, y = (centres[k, t] * size).astype(int)
                assert tuple(video[t, y, x].tolist()) == OBJECT_COLORS[color], (seed, t, obj)


def test_without_antialiasing_only_palette_colours_appear():
    scene = sample_scene(4)
    video = render(scene, 10, 32, 32, antialias=False)
    palette = {BACKGROUND_COLORS[scene.background]} | {OBJECT_COLORS[o.color] for o in scene.objects}
    assert {tuple(p) for p in video.reshape(-1, 3).tolist()} <= palette
    smooth = render(scene, 10, 32, 32)
    assert len({tuple(p) for p in smooth.reshape(-1, 3).tolist()}) > len(palette)


def test_dataset_items_are_deterministic():
    ds = ToyWorldDataset(5, num_frames=6, height=16, width=16, seed=3)
    item = ds[2]
    assert item["video"].shape == (3, 6, 16, 16) and item["video"].dtype == torch.float32
    assert item["index"] == 2 and item["caption"] == caption(ds.scene(2))
    assert ds.scene(2) == sample_scene(video_seed(3, 2))
    again = ToyWorldDataset(5, num_frames=6, height=16, width=16, seed=3)[2]
    assert torch.equal(item["video"], again["video"]) and item["caption"] == again["caption"]
    assert len(ds) == 5 and [x["index"] for x in ds] == [0, 1, 2, 3, 4]
    with pytest.raises(IndexError):
        ds[5]
    other_seed = ToyWorldDataset(5, num_frames=6, height=16, width=16, seed=4)
    assert not torch.equal(other_seed[2]["video"], item["video"])


def test_infinite_dataset_has_no_length_and_keeps_going():
    ds = ToyWorldDataset(None, num_frames=2, height=8, width=8, max_objects=1)
    with pytest.raises(TypeError):
        len(ds)
    items = list(itertools.islice(ds, 30))
    assert [x["index"] for x in items] == list(range(30))
    assert all(parse_caption(x["caption"])["count"] == 1 for x in items)


def test_dataloader_workers_split_the_videos():
    ds = ToyWorldDataset(7, num_frames=2, height=8, width=8)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    assert sorted(item["index"] for item in loader) == list(range(7))


def test_write_dataset_is_complete_and_readable(tmp_path):
    out = write_dataset(tmp_path / "toy", 4, num_frames=5, height=16, width=16, seed=9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no temporary directory left
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == sorted(p.name for p in out.glob("*.npy"))
    ds = ToyWorldDataset(4, num_frames=5, height=16, width=16, seed=9)
    folder = ToyWorldFolder(out)
    assert len(folder) == 4
    for i, record in enumerate(records):
        frames = np.load(out / record["file"])
        assert frames.dtype == np.uint8 and frames.shape == (5, 16, 16, 3)
        scene = Scene.from_dict(record["scene"])
        assert scene == ds.scene(i) == sample_scene(record["seed"]) == folder.scene(i)
        assert record["caption"] == caption(scene)
        assert np.array_equal(frames, render(scene, 5, 16, 16).numpy())
        assert torch.equal(folder[i]["video"], ds[i]["video"]) and folder[i]["caption"] == ds[i]["caption"]


def test_write_dataset_refuses_to_overwrite_and_accepts_an_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    write_dataset(tmp_path / "empty", 1, num_frames=1, height=8, width=8)
    with pytest.raises(SelfForcingError, match="already exists"):
        write_dataset(tmp_path / "empty", 1, num_frames=1, height=8, width=8)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return render(*args, **kwargs)

    monkeypatch.setattr(toy_world, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "toy", 3, num_frames=2, height=8, width=8)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "num_videos"),
    (dict(n=True), "num_videos"),
    (dict(num_frames=0), "num_frames"),
    (dict(num_frames=2.0), "num_frames"),
    (dict(height=7), "height"),
    (dict(width=4), "width"),
    (dict(max_objects=0), "max_objects"),
    (dict(max_objects=8), "max_objects"),
    (dict(min_objects=2, max_objects=1), "min_objects"),
    (dict(motions=("spinning",)), "motions"),
    (dict(size_range=(0.2, 0.6)), "size_range"),
    (dict(speed_range=(0.1, 0.05)), "speed_range"),
])
def test_bad_arguments_raise_clear_errors(tmp_path, kwargs, message):
    args = dict(n=2, num_frames=2, height=8, width=8) | kwargs
    with pytest.raises(SelfForcingError, match=message):
        write_dataset(tmp_path / "toy", **args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", [
    "",
    "a red circle bouncing",
    "a red circle bouncing on a pink background",
    "a magenta circle bouncing on a black background",
    "a red hexagon bouncing on a black background",
    "a red circle spinning on a black background",
    "a red circle bouncing and on a black background",
    "red circle bouncing on a black background",
])
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(SelfForcingError):
        parse_caption(text)


def test_parse_caption_is_lenient_about_case_and_punctuation():
    parsed = parse_caption("A Yellow Square moving down, and a blue triangle resting on a black background.")
    assert parsed["colors"] == ["yellow", "blue"] and parsed["motions"] == ["moving down", "resting"]


def test_unknown_words():
    assert unknown_words("A red dragon flying over a red, flying sea on a gray background") == [
        "dragon", "flying", "over", "sea"]
    for seed in range(50):
        assert unknown_words(caption(sample_scene(seed))) == []
    assert {"red", "circle", "dark", "background", "moving", "left", "resting"} <= VOCABULARY
    assert "dragon" not in VOCABULARY


def test_the_ring_is_drawn_and_read_only_when_asked_for():
    """The LoRA demo's new concept: never in the default scenes, a hole in its middle, in the grammar."""
    assert all(o.shape != "ring" for i in range(200) for o in sample_scene(i).objects)
    scene = sample_scene(3, shapes=("ring",), max_objects=1)
    (ring,) = scene.objects
    frame = render(scene, 1, 64, 64, antialias=False)[0].numpy()
    cx, cy = (int(v * 64) for v in ring.position)
    background = np.array(toy_world.BACKGROUND_COLORS[scene.background])
    assert ring.shape == "ring" and (frame[cy, cx] == background).all()  # the hole
    assert parse_caption(caption(scene))["shapes"] == ["ring"]
    with pytest.raises(SelfForcingError, match="shapes must be a non-empty subset"):
        sample_scene(0, shapes=("star",))


def test_cyan_is_drawn_and_read_only_when_asked_for():
    """The LoRA demo's new colour: never in the default scenes or the vocabulary, drawn when
    asked (a scene has at most as many objects as colours), in the grammar."""
    assert all(o.color != "cyan" for i in range(200) for o in sample_scene(i).objects)
    assert "cyan" not in VOCABULARY and unknown_words("a cyan circle resting on a black background") == ["cyan"]
    scenes = [sample_scene(i, colors=("cyan",)) for i in range(20)]
    assert all(len(s.objects) == 1 and s.objects[0].color == "cyan" for s in scenes)
    frame = render(scenes[0], 1, 64, 64, antialias=False)[0].numpy()
    assert (frame == np.array(toy_world.NEW_COLORS["cyan"])).all(-1).sum() > 20
    assert parse_caption(caption(scenes[0]))["colors"] == ["cyan"]
    two = sample_scene(1, colors=("cyan", "red"), min_objects=2)
    assert sorted(o.color for o in two.objects) == ["cyan", "red"]
    for colors in [("teal",), ("cyan", "cyan"), ()]:
        with pytest.raises(SelfForcingError, match="colors must be distinct colours"):
            sample_scene(0, colors=colors)
