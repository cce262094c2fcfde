import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfforcing.errors import SelfForcingError
from selfforcing.models.text_encoders import (
    HashTextEncoder,
    UMT5TextEncoder,
    text_encoder_from_config,
    validate_prompts,
)

SRC = Path(__file__).resolve().parents[2] / "src"


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([], "non-empty list"),
        ("a cat", "not a single string"),
        (["a cat", 3], "prompt 1 is not a string"),
        (["a cat", ""], "prompt 1 is empty"),
        ([" \n\t "], "prompt 0 is empty"),
    ],
)
def test_validate_prompts_rejects_bad_input(prompts, message):
    with pytest.raises(SelfForcingError, match=message):
        validate_prompts(prompts)


def test_validate_prompts_accepts_strings():
    validate_prompts(["a cat", "a dog"])


# --------------------------------------------------------------------------- hash encoder


def test_hash_shape_dtype_and_zero_padding():
    enc = HashTextEncoder(dim=16, max_length=8)
    out = enc.encode(["a red fox", "one two three four five"])
    assert out.shape == (2, 8, 16) and out.dtype == torch.float32
    assert out[0, :3].abs().sum(dim=-1).gt(0).all()
    assert torch.equal(out[0, 3:], torch.zeros(5, 16))
    assert torch.equal(out[1, 5:], torch.zeros(3, 16))


def test_hash_truncates_to_max_length():
    enc = HashTextEncoder(dim=8, max_length=4)
    long = enc.encode(["w1 w2 w3 w4 w5 w6"])
    assert long.shape == (1, 4, 8)
    assert torch.equal(long, enc.encode(["w1 w2 w3 w4"]))


def test_hash_is_deterministic_within_a_process():
    a = HashTextEncoder(dim=16, max_length=8)
    b = HashTextEncoder(dim=16, max_length=8)
    prompt = ["A Cat, playing piano!"]
    assert torch.equal(a.encode(prompt), a.encode(prompt))
    assert torch.equal(a.encode(prompt), b.encode(prompt))
    # Case and punctuation are not words.
    assert torch.equal(a.encode(prompt), a.encode(["a cat playing piano"]))


def test_hash_distinguishes_prompts_and_word_order():
    enc = HashTextEncoder(dim=16, max_length=8)
    cat, dog = enc.encode(["a cat runs", "a dog runs"])
    assert not torch.allclose(cat, dog)
    forward, backward = enc.encode(["cat chases dog", "dog chases cat"])
    assert not torch.allclose(forward, backward)


def test_hash_word_vectors_are_roughly_unit_variance():
    vec = HashTextEncoder._gaussian("waves", 4096)
    assert abs(vec.mean().item()) < 0.1 and abs(vec.std().item() - 1) < 0.1


def test_hash_matches_stored_values():
    # Pins the algorithm: any change here changes every toy checkpoint's conditioning.
    out = HashTextEncoder(dim=4, max_length=3).encode(["red fox"])
    expected = torch.tensor(
        [
            [-2.2130690, 1.5551598, 1.0620084, 0.1117456],
            [0.8632060, 0.7486458, -0.9892636, 0.4994043],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)


def test_hash_is_identical_in_a_fresh_process():
    prompts = ["a cat playing piano", "robots dance under neon lights"]
    here = HashTextEncoder(dim=12, max_length=6).encode(prompts)
    code = (
        "import json, sys\n"
        "from selfforcing.models.text_encoders import HashTextEncoder\n"
        "out = HashTextEncoder(dim=12, max_length=6).encode(json.loads(sys.argv[1]))\n"
        "print(json.dumps(out.tolist()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(prompts)],
        capture_output=True,
        text=True,
        check=True,
        # A different hash seed proves Python's hash() plays no part.
        env={**os.environ, "PYTHONPATH": str(SRC), "PYTHONHASHSEED": "12345"},
    )
    there = torch.tensor(json.loads(result.stdout))
    assert torch.equal(here, there)


def test_hash_config_round_trip():
    enc = HashTextEncoder(dim=24, max_length=10)
    assert enc.config() == {"type": "hash", "dim": 24, "max_length": 10}
    again = text_encoder_from_config(enc.config(), path=None, device="cpu")
    assert isinstance(again, HashTextEncoder)
    assert torch.equal(enc.encode(["a b c"]), again.encode(["a b c"]))


@pytest.mark.parametrize("kwargs", [{"dim": 0}, {"max_length": -1}, {"dim": 2.5}])
def test_hash_rejects_bad_sizes(kwargs):
    with pytest.raises(SelfForcingError, match="positive integer"):
        HashTextEncoder(**kwargs)


# --------------------------------------------------------------------------- config errors


def test_from_config_rejects_unknown_type_and_keys():
    with pytest.raises(SelfForcingError, match="'clip'"):
        text_encoder_from_config({"type": "clip"}, path=None, device="cpu")
    with pytest.raises(SelfForcingError, match="width"):
        text_encoder_from_config({"type": "hash", "width": 3}, path=None, device="cpu")
    with pytest.raises(SelfForcingError, match="width"):
        text_encoder_from_config({"type": "umt5", "width": 3}, path=None, device="cpu")
    with pytest.raises(SelfForcingError, match="model directory"):
        text_encoder_from_config({"type": "umt5"}, path=None, device="cpu")


# --------------------------------------------------------------------------- UMT5


def test_umt5_matches_direct_encoder_call_and_zeroes_padding(umt5_dir):
    enc = UMT5TextEncoder.from_pretrained(umt5_dir / "text_encoder", max_length=16)
    assert enc.dim == 32 and enc.max_length == 16
    prompts = ["a cat", "the red fox plays piano in the garden"]
    out = enc.encode(prompts)
    assert out.shape == (2, 16, 32) and out.dtype == torch.float32

    tokens = enc.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
    mask = tokens.attention_mask.bool()
    lengths = mask.sum(dim=1)
    assert lengths[0] < lengths[1] < 16
    with torch.no_grad():
        raw = enc.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    # The raw encoder output is not zero at padding, so the zeroing is doing work.
    assert raw[~mask].abs().sum() > 0
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    torch.testing.assert_close(out[mask], raw[mask])
    # Valid tokens come first (right padding), as Wan's DiT expects.
    assert mask[:, 0].all() and not mask[0, -1]


def test_umt5_truncates_long_prompts(umt5_dir):
    enc = UMT5TextEncoder.from_pretrained(umt5_dir / "text_encoder", max_length=8)
    out = enc.encode(["the red fox plays piano in the garden with a cat and a dog"])
    assert out.shape == (1, 8, 32)
    assert out[0].abs().sum(dim=-1).gt(0).all()


def test_umt5_from_config_and_sibling_tokenizer(umt5_dir):
    enc = text_encoder_from_config({"type": "umt5", "max_length": 16}, path=umt5_dir, device="cpu")
    assert isinstance(enc, UMT5TextEncoder)
    assert enc.config() == {"type": "umt5", "dim": 32, "max_length": 16}
    # tokenizer_path=None finds the sibling tokenizer/ directory.
    sibling = UMT5TextEncoder.from_pretrained(umt5_dir / "text_encoder", max_length=16)
    assert torch.equal(enc.encode(["a dog"]), sibling.encode(["a dog"]))
    with pytest.raises(SelfForcingError, match="dim 32, config says 64"):
        text_encoder_from_config({"type": "umt5", "dim": 64}, path=umt5_dir, device="cpu")


def test_umt5_missing_or_invalid_directory(tmp_path, umt5_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(SelfForcingError, match="nowhere"):
        UMT5TextEncoder.from_pretrained(missing)
    with pytest.raises(SelfForcingError, match="nowhere"):
        text_encoder_from_config({"type": "umt5"}, path=missing, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SelfForcingError, match="text encoder from .*empty"):
        UMT5TextEncoder.from_pretrained(empty, tokenizer_path=umt5_dir / "tokenizer")
    with pytest.raises(SelfForcingError, match="tokenizer from .*empty"):
        UMT5TextEncoder.from_pretrained(umt5_dir / "text_encoder", tokenizer_path=empty)
