"""Tests for converting Wan transformer weights between original and diffusers names."""

import argparse
import logging
import warnings

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from selfforcing.errors import SelfForcingError
from selfforcing.models.convert import (
    check_keys,
    detect_format,
    diffusers_to_original,
    load_state_dict_file,
    original_to_diffusers,
)


@pytest.fixture(scope="module")
def diffusers_state() -> dict[str, torch.Tensor]:
    """A tiny diffusers Wan transformer with every parameter randomised."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def original_state(diffusers_state) -> dict[str, torch.Tensor]:
    return diffusers_to_original(diffusers_state)


def assert_same_state(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_round_trip_is_exact(diffusers_state, original_state):
    assert_same_state(original_to_diffusers(original_state), diffusers_state)
    assert len(original_state) == len(diffusers_state)


def test_original_keys_follow_wan_layout(diffusers_state, original_state):
    assert torch.equal(original_state["blocks.0.norm3.weight"], diffusers_state["blocks.0.norm2.weight"])
    assert torch.equal(original_state["blocks.0.norm3.bias"], diffusers_state["blocks.0.norm2.bias"])
    assert original_state["head.modulation"].shape == (1, 2, 16)
    assert torch.equal(original_state["head.modulation"], diffusers_state["scale_shift_table"])
    assert original_state["blocks.1.modulation"].shape == (1, 6, 16)
    assert torch.equal(original_state["blocks.1.ffn.0.weight"], diffusers_state["blocks.1.ffn.net.0.proj.weight"])
    assert torch.equal(original_state["blocks.1.cross_attn.o.bias"], diffusers_state["blocks.1.attn2.to_out.0.bias"])
    assert "time_projection.1.weight" in original_state
    assert "text_embedding.2.bias" in original_state
    assert "blocks.0.norm2.weight" not in original_state


def test_detect_format(diffusers_state, original_state):
    assert detect_format(diffusers_state) == "diffusers"
    assert detect_format(original_state) == "original"
    with pytest.raises(SelfForcingError, match="cannot tell"):
        detect_format({"patch_embedding.weight": torch.zeros(1)})
    with pytest.raises(SelfForcingError, match="mixes"):
        detect_format({"head.modulation": torch.zeros(1), "proj_out.weight": torch.zeros(1)})


def test_unknown_key_is_named(original_state, diffusers_state):
    with pytest.raises(SelfForcingError, match=r"blocks\.0\.mystery\.weight"):
        original_to_diffusers({**original_state, "blocks.0.mystery.weight": torch.zeros(1)})
    with pytest.raises(SelfForcingError, match=r"blocks\.0\.self_attn\.q\.weight"):
        diffusers_to_original({**diffusers_state, "blocks.0.self_attn.q.weight": torch.zeros(1)})


def test_many_unknown_keys_are_truncated(original_state):
    extra = {f"junk.{n:02d}": torch.zeros(1) for n in range(15)}
    with pytest.raises(SelfForcingError, match=r"15 keys .*and 5 more") as info:
        original_to_diffusers({**original_state, **extra})
    assert "junk.14" not in str(info.value)


def test_i2v_keys_are_refused(original_state):
    state = {
        **original_state,
        "img_emb.proj.0.weight": torch.zeros(1),
        "blocks.0.cross_attn.k_img.weight": torch.zeros(1),
    }
    with pytest.raises(SelfForcingError, match="I2V") as info:
        original_to_diffusers(state)
    assert "img_emb.proj.0.weight" in str(info.value)
    assert "blocks.0.cross_attn.k_img.weight" in str(info.value)


def test_self_forcing_checkpoint_prefers_ema(tmp_path, original_state, diffusers_state, caplog):
    ema = {key: value + 1 for key, value in original_state.items()}
    path = tmp_path / "self_forcing.pt"
    torch.save(
        {
            "generator": {"model." + key: value for key, value in original_state.items()},
            "generator_ema": {"model._fsdp_wrapped_module." + key: value for key, value in ema.items()},
        },
        path,
    )
    with caplog.at_level(logging.INFO, logger="selfforcing.models.convert"):
        loaded = load_state_dict_file(path)
    assert_same_state(loaded, original_to_diffusers(ema))
    assert "generator_ema" in caplog.text

    assert_same_state(load_state_dict_file(path, prefer="generator"), diffusers_state)


def test_self_forcing_checkpoint_falls_back_to_generator(tmp_path, original_state, diffusers_state):
    path = tmp_path / "generator_only.pt"
    torch.save({"generator": {"model." + key: value for key, value in original_state.items()}}, path)
    assert_same_state(load_state_dict_file(path), diffusers_state)


@pytest.mark.parametrize("layout", ["generator", "generator_ema", "model", "state_dict", "flat"])
@pytest.mark.parametrize("prefix", ["", "model.", "model._fsdp_wrapped_module.", "_orig_mod."])
def test_each_released_checkpoint_layout_loads(tmp_path, original_state, diffusers_state, layout, prefix):
    """The layouts the causal Wan family publishes: Self-Forcing / CausVid / Causal Forcing
    (``generator`` or ``generator_ema``, keys under ``model.``, FSDP fragments in EMA dicts),
    LongLive (``model`` as a fallback), ``state_dict`` dicts, and flat files (Reward Forcing)."""
    weights = {prefix + key: value for key, value in original_state.items()}
    path = tmp_path / "released.pt"
    torch.save(weights if layout == "flat" else {layout: weights, "step": 10}, path)
    assert_same_state(load_state_dict_file(path, prefer="generator"), diffusers_state)


def test_original_safetensors_loads(tmp_path, original_state, diffusers_state):
    path = tmp_path / "wan.safetensors"
    save_file({key: value.contiguous() for key, value in original_state.items()}, str(path))
    assert_same_state(load_state_dict_file(path), diffusers_state)


def test_diffusers_pth_loads_unchanged(tmp_path, diffusers_state):
    path = tmp_path / "diffusers.pth"
    torch.save(diffusers_state, path)
    assert_same_state(load_state_dict_file(path), diffusers_state)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(SelfForcingError, match="not found") as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["corrupt.pt", "corrupt.safetensors"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(SelfForcingError, match="cannot read") as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value)


def test_pickle_refused_by_weights_only(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"generator": {"model.x": torch.zeros(1)}, "config": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(SelfForcingError, match="cannot read") as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value)


def test_unsupported_suffix_and_prefer(tmp_path):
    path = tmp_path / "weights.ckpt"
    path.write_bytes(b"")
    with pytest.raises(SelfForcingError, match=r"\.ckpt"):
        load_state_dict_file(path)
    with pytest.raises(SelfForcingError, match="prefer"):
        load_state_dict_file(path, prefer="critic")


def test_check_keys():
    check_keys({"a", "b"}, {"b", "a"})
    with pytest.raises(SelfForcingError) as info:
        check_keys({"a", "b", "c"}, {"b", "c", "extra.weight"})
    message = str(info.value)
    assert "1 missing keys: a" in message
    assert "1 unexpected keys: extra.weight" in message


def test_random_bytes_in_a_torch_file_never_get_the_weights_only_advice(tmp_path):
    """torch.load fails with a different exception for different bytes (UnpicklingError, IndexError,
    KeyError, UnicodeDecodeError...), some advising weights_only=False: every one reads the same."""
    path = tmp_path / "random.pt"
    rng = np.random.default_rng(0)
    for _ in range(40):
        path.write_bytes(rng.bytes(512))
        with pytest.raises(SelfForcingError) as info, warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            load_state_dict_file(path)
        assert not shown  # nor a warning about the bytes it met (a second line on the terminal)
        assert str(info.value) == f"cannot read {path}: not a file of plain tensors (damaged, or holding Python " \
                                  "objects, which are never unpickled)"
