"""The prompt-embedding cache: UMT5 runs once, training looks embeddings up."""

import json

import pytest
import torch
from safetensors.torch import save_file

from factories import TEXT_DIM

from selfforcing.cli import main
from selfforcing.errors import SelfForcingError
from selfforcing.models.text_encoders import (
    WAN_NEGATIVE_PROMPT,
    CachedTextEncoder,
    UMT5TextEncoder,
    text_encoder_from_config,
    write_text_cache,
)

MAX_LENGTH = 16
# Different token counts, one longer than MAX_LENGTH (truncated: no padding at all).
PROMPTS = [
    "a cat",
    "the red fox plays piano in the garden",
    "a dog",
    "a cat",  # duplicate: stored once
    "the red fox plays piano in the garden with a cat and a dog and a fox",
]


@pytest.fixture(scope="module")
def umt5(umt5_dir):
    return UMT5TextEncoder.from_pretrained(umt5_dir / "text_encoder", max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def cache(umt5, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "prompts.safetensors"
    # batch_size 2 splits the prompts over several encoder calls.
    write_text_cache(path, PROMPTS + ["", WAN_NEGATIVE_PROMPT], umt5, batch_size=2, progress=False)
    return path


def test_cache_matches_umt5_exactly(cache, umt5):
    enc = CachedTextEncoder(cache)
    assert (enc.dim, enc.max_length) == (TEXT_DIM, MAX_LENGTH)
    assert enc.prompts == [*dict.fromkeys(PROMPTS), WAN_NEGATIVE_PROMPT]  # deduplicated, order kept, no ""
    assert enc.source_config == umt5.config()
    # Any batch order, with a repeat, is bit-identical to running UMT5.
    batch = [PROMPTS[4], PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    out = enc.encode(batch)
    assert out.dtype == torch.float32 and out.shape == (5, MAX_LENGTH, TEXT_DIM)
    assert torch.equal(out, umt5.encode(batch))
    # The prompts really are of different lengths, and the short ones are zero-padded.
    lengths = out.ne(0).any(dim=-1).sum(dim=1).tolist()
    assert lengths[0] == MAX_LENGTH and lengths[1] < lengths[3] < MAX_LENGTH


def test_negative_prompt_and_empty_prompt(cache, umt5):
    enc = CachedTextEncoder(cache)
    assert torch.equal(enc.encode([WAN_NEGATIVE_PROMPT]), umt5.encode([WAN_NEGATIVE_PROMPT]))
    out = enc.encode(["", "a dog", " "])
    assert torch.equal(out[0], torch.zeros(MAX_LENGTH, TEXT_DIM))
    assert torch.equal(out[2], torch.zeros(MAX_LENGTH, TEXT_DIM))
    assert torch.equal(out[1], umt5.encode(["a dog"])[0])


def test_lookup_ignores_whitespace_runs_as_umt5_does(cache, umt5):
    enc = CachedTextEncoder(cache)
    assert torch.equal(enc.encode(["  a   dog\n"]), umt5.encode(["a dog"]))


def test_unknown_prompt_names_it_and_the_fix(cache):
    enc = CachedTextEncoder(cache)
    long = "a purple elephant " * 10
    with pytest.raises(SelfForcingError, match="not in the text cache") as info:
        enc.encode(["a cat", long])
    message = str(info.value)
    assert "a purple elephant" in message and long.strip() not in message  # shortened
    assert "selfforcing data encode-prompts" in message and "\n" not in message


def test_bfloat16_cache_is_close(umt5, tmp_path):
    path = write_text_cache(tmp_path / "bf16.safetensors", PROMPTS, umt5, dtype=torch.bfloat16, progress=False)
    out = CachedTextEncoder(path).encode(PROMPTS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, umt5.encode(PROMPTS), atol=1e-2, rtol=0)


def test_bfloat16_cache_is_smaller_than_float32(umt5, tmp_path):
    f32 = write_text_cache(tmp_path / "f32.safetensors", PROMPTS, umt5, progress=False)
    bf16 = write_text_cache(tmp_path / "bf16.safetensors", PROMPTS, umt5, dtype=torch.bfloat16, progress=False)
    assert bf16.stat().st_size < f32.stat().st_size


def test_from_config(cache):
    enc = text_encoder_from_config({"type": "cache", "path": str(cache)}, path=None, device="cpu")
    assert isinstance(enc, CachedTextEncoder)
    assert enc.config() == {"type": "cache", "path": str(cache.resolve())}
    again = text_encoder_from_config(enc.config(), path=None, device="cpu")
    assert torch.equal(again.encode(["a cat"]), enc.encode(["a cat"]))
    with pytest.raises(SelfForcingError, match="dim"):
        text_encoder_from_config({"type": "cache", "path": str(cache), "dim": 32}, path=None, device="cpu")
    with pytest.raises(SelfForcingError, match="needs 'path'"):
        text_encoder_from_config({"type": "cache"}, path=None, device="cpu")


def test_write_rejects_bad_input(umt5, tmp_path):
    out = tmp_path / "c.safetensors"
    with pytest.raises(SelfForcingError, match="no non-empty prompts"):
        write_text_cache(out, ["", "  "], umt5, progress=False)
    with pytest.raises(SelfForcingError, match="single string"):
        write_text_cache(out, "a cat", umt5, progress=False)
    with pytest.raises(SelfForcingError, match="batch_size"):
        write_text_cache(out, ["a cat"], umt5, batch_size=0, progress=False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- broken files


def test_missing_file(tmp_path):
    with pytest.raises(SelfForcingError, match="does not exist.*encode-prompts"):
        CachedTextEncoder(tmp_path / "nowhere.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.999, 20])
def test_truncated_file(cache, tmp_path, keep):
    data = cache.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(SelfForcingError, match="truncated or corrupt.*encode-prompts"):
        CachedTextEncoder(cut)


def test_not_a_cache(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(SelfForcingError, match="is not a text cache"):
        CachedTextEncoder(other)


def test_inconsistent_cache(cache, tmp_path):
    from safetensors import safe_open

    with safe_open(str(cache), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["prompts"] = json.dumps(json.loads(meta["prompts"])[:-1])
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(SelfForcingError, match="inconsistent"):
        CachedTextEncoder(bad)


# --------------------------------------------------------------------------- CLI


def test_cli_end_to_end(umt5_dir, umt5, tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# animals\na cat\n\na dog\na cat\n", encoding="utf-8")
    out = tmp_path / "cache" / "prompts.safetensors"
    code = main(["data", "encode-prompts", str(prompt_file), "--model", str(umt5_dir), "-o", str(out),
                 "--max-length", str(MAX_LENGTH), "--batch-size", "2"])
    assert code == 0 and out.is_file()
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "3 prompt" in printed[0] and str(out) in printed[0] and "KiB" in printed[0]
    enc = CachedTextEncoder(out)
    assert enc.prompts == ["a cat", "a dog", WAN_NEGATIVE_PROMPT]
    batch = ["a dog", WAN_NEGATIVE_PROMPT, "a cat"]
    assert torch.equal(enc.encode(batch), umt5.encode(batch))


def test_cli_without_negative_prompt_and_bfloat16(umt5_dir, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a cat\n", encoding="utf-8")
    out = tmp_path / "prompts.safetensors"
    code = main(["data", "encode-prompts", str(prompt_file), "--model", str(umt5_dir), "-o", str(out),
                 "--max-length", "8", "--negative-prompt", "", "--dtype", "bfloat16"])
    assert code == 0
    enc = CachedTextEncoder(out)
    assert enc.prompts == ["a cat"] and enc.max_length == 8


@pytest.mark.parametrize("problem", ["missing prompts", "no text encoder"])
def test_cli_errors(umt5_dir, tmp_path, capsys, problem):
    prompt_file = tmp_path / "prompts.txt"
    model = umt5_dir
    if problem == "missing prompts":
        prompt_file = tmp_path / "missing.txt"
    else:
        prompt_file.write_text("a cat\n", encoding="utf-8")
        model = tmp_path / "model"
        (model / "tokenizer").mkdir(parents=True)
    out = tmp_path / "out" / "prompts.safetensors"
    code = main(["data", "encode-prompts", str(prompt_file), "--model", str(model), "-o", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert ("missing.txt" if problem == "missing prompts" else "text_encoder") in err[0]
    assert not out.exists() and not out.parent.exists()
