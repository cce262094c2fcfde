"""LoRA adapters: identity at initialisation, fusing, diffusers' file layouts and parity, clear refusals."""

import re

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from factories import randomize_
from selfforcing.errors import SelfForcingError
from selfforcing.models import CausalWanModel, preset
from selfforcing.models import lora

TINY_DIFFUSERS = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "proj_out"]


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 3, 8, 8, generator=g), torch.tensor([500.0, 937.5]), torch.randn(2, 7, 16, generator=g)


def randomize_adapters_(model: torch.nn.Module, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random diffusers Wan transformer, and the same weights as our model."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wan")
    randomize_(WanTransformer3DModel(**TINY_DIFFUSERS), std=0.1).save_pretrained(path)
    return path


def diffusers_with_lora(base_dir, rank=4, alpha=8.0):
    ref = WanTransformer3DModel.from_pretrained(base_dir).eval()
    ref.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS))
    randomize_adapters_(ref)
    return ref


@torch.no_grad()
def test_zero_initialised_lora_leaves_output_unchanged(tiny_model):
    x, t, ctx = inputs()
    before = tiny_model(x, t, ctx)
    lora.add_adapter(tiny_model, lora.LoraSpec(rank=4, alpha=8.0))
    assert torch.equal(tiny_model(x, t, ctx), before)
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


@torch.no_grad()
def test_fused_equals_unfused_and_unfuse_restores_the_base(tiny_model):
    x, t, ctx = inputs()
    base = tiny_model(x, t, ctx)
    lora.add_adapter(tiny_model, lora.LoraSpec(rank=4, alpha=2.0))
    randomize_adapters_(tiny_model)
    unfused = tiny_model(x, t, ctx)
    assert (unfused - base).abs().max() > 1e-2
    lora.fuse(tiny_model)
    assert torch.allclose(tiny_model(x, t, ctx), unfused, atol=1e-5)
    lora.unfuse(tiny_model)
    assert torch.allclose(tiny_model(x, t, ctx), unfused, atol=1e-5)
    plain = CausalWanModel(preset("tiny"))
    plain.load_weights(lora.base_state_dict(tiny_model))  # base names survive the wrapping
    assert torch.allclose(plain.eval()(x, t, ctx), base, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("with_metadata", [True, False])
def test_lora_saved_by_diffusers_gives_diffusers_output(base_dir, tmp_path, with_metadata):
    ref = diffusers_with_lora(base_dir, rank=4, alpha=8.0 if with_metadata else 4.0)  # no metadata: alpha = rank
    WanPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
        transformer_lora_adapter_metadata=ref.peft_config["default"].to_dict() if with_metadata else None)
    ours = CausalWanModel.from_pretrained(base_dir).eval()
    lora.load(ours, tmp_path / "pytorch_lora_weights.safetensors")
    x, t, ctx = inputs()
    assert (ours(x, t, ctx) - ref(x, t, ctx).sample).abs().max() <= 1e-4
    lora.fuse(ours)
    assert (ours(x, t, ctx) - ref(x, t, ctx).sample).abs().max() <= 1e-4


@torch.no_grad()
def test_our_file_loads_in_diffusers(base_dir, tmp_path):
    ours = CausalWanModel.from_pretrained(base_dir).eval()
    spec = lora.LoraSpec(rank=3, alpha=6.0, target_modules=tuple(TARGETS))
    lora.add_adapter(ours, spec)
    randomize_adapters_(ours)
    lora.save_file(tmp_path / "mine.safetensors", lora.adapter_state_dict(ours), spec)
    ref = WanTransformer3DModel.from_pretrained(base_dir).eval()
    # what WanPipeline.load_lora_weights does with the file
    state, metadata = WanPipeline.lora_state_dict(str(tmp_path / "mine.safetensors"), return_lora_metadata=True)
    assert metadata["transformer.lora_alpha"] == 6.0
    ref.load_lora_adapter(state, prefix="transformer", metadata=metadata)
    x, t, ctx = inputs()
    assert (ours(x, t, ctx) - ref(x, t, ctx).sample).abs().max() <= 1e-4


@torch.no_grad()
def test_original_wan_layout_converts_like_diffusers(base_dir, tmp_path):
    """``diffusion_model.*`` with lora_down / lora_up and per-module alpha (ComfyUI, the original code)."""
    g = torch.Generator().manual_seed(3)
    original = {}
    for i in range(2):
        for part, width_in, width_out in (("self_attn.q", 32, 32), ("cross_attn.v", 32, 32), ("ffn.0", 32, 64)):
            key = f"diffusion_model.blocks.{i}.{part}"
            original[f"{key}.lora_down.weight"] = torch.randn(2, width_in, generator=g) * 0.2
            original[f"{key}.lora_up.weight"] = torch.randn(width_out, 2, generator=g) * 0.2
            original[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(original, str(tmp_path / "comfy.safetensors"))
    ours = CausalWanModel.from_pretrained(base_dir).eval()
    lora.load(ours, tmp_path / "comfy.safetensors")
    ref = WanTransformer3DModel.from_pretrained(base_dir).eval()
    ref.load_lora_adapter(WanPipeline.lora_state_dict(str(tmp_path / "comfy.safetensors")), prefix="transformer")
    x, t, ctx = inputs()
    assert (ours(x, t, ctx) - ref(x, t, ctx).sample).abs().max() <= 1e-4


@torch.no_grad()
def test_several_loras_add_with_their_scales(base_dir, tmp_path):
    files = []
    for seed, rank in ((0, 2), (1, 5)):
        model = CausalWanModel.from_pretrained(base_dir)
        spec = lora.LoraSpec(rank=rank, alpha=float(rank))
        lora.add_adapter(model, spec)
        torch.manual_seed(seed)
        randomize_adapters_(model)
        files.append(tmp_path / f"{seed}.safetensors")
        lora.save_file(files[-1], {k: v * (seed + 1) for k, v in lora.adapter_state_dict(model).items()}, spec)
    x, t, ctx = inputs()

    def output(*loaded):
        model = CausalWanModel.from_pretrained(base_dir).eval()
        for i, (path, scale) in enumerate(loaded):
            lora.load(model, path, scale, name=f"lora{i}")
        lora.fuse(model)
        return model(x, t, ctx)

    assert torch.allclose(output((files[0], 0.0)), output(), atol=1e-5)
    one, both = output((files[0], 0.7)), output((files[0], 0.7), (files[1], -0.5))
    assert (both - one).abs().max() > 1e-3
    # a LoRA changes every targeted weight by scale * B @ A: the same weights as one combined load
    model = CausalWanModel.from_pretrained(base_dir)
    lora.load(model, files[0], 0.7, name="a")
    lora.load(model, files[1], -0.5, name="b")
    lora.fuse(model)
    assert torch.allclose(model.eval()(x, t, ctx), both, atol=1e-5)


def _write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not_safetensors", "not a safetensors file"),
    ("foreign_keys", "is not a Wan LoRA"),
    ("not_lora", "not LoRA weights"),
    ("unpaired", "has lora_A but not lora_B"),
    ("ranks", "of one rank"),
    ("wider", "another model width"),
    ("deeper", "not a linear layer of this 2-block Wan model"),
    ("i2v", "image-to-video"),
    ("bad_original", "cannot be converted"),
])
def test_bad_lora_files_are_refused_clearly(tiny_model, tmp_path, case, message):
    a, b = torch.zeros(4, 32), torch.zeros(32, 4)
    key = "transformer.blocks.0.attn1.to_q"
    path = tmp_path / "lora.safetensors"
    if case == "not_safetensors":
        path.write_bytes(b"\x00" * 64)
    elif case == "foreign_keys":
        _write(path, {"unet.down.0.lora_A.weight": a})
    elif case == "not_lora":
        _write(path, {f"{key}.weight": a})
    elif case == "unpaired":
        _write(path, {f"{key}.lora_A.weight": a})
    elif case == "ranks":
        _write(path, {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": torch.zeros(32, 8)})
    elif case == "wider":
        _write(path, {f"{key}.lora_A.weight": torch.zeros(4, 1536), f"{key}.lora_B.weight": torch.zeros(1536, 4)})
    elif case == "deeper":
        _write(path, {"transformer.blocks.29.attn1.to_q.lora_A.weight": a,
                      "transformer.blocks.29.attn1.to_q.lora_B.weight": b})
    elif case == "i2v":
        _write(path, {"transformer.blocks.0.attn2.add_k_proj.lora_A.weight": a,
                      "transformer.blocks.0.attn2.add_k_proj.lora_B.weight": b})
    elif case == "bad_original":
        _write(path, {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": a,
                      "diffusion_model.blocks.0.self_attn.q.mystery": b})
    with pytest.raises(SelfForcingError, match=message) as error:
        lora.load(tiny_model, path)
    assert "\n" not in str(error.value)
    assert not lora.lora_layers(tiny_model)  # nothing half-loaded


def test_training_targets_must_match_a_layer(tiny_model):
    with pytest.raises(SelfForcingError, match="match no layer"):
        lora.add_adapter(tiny_model, lora.LoraSpec(target_modules=("to_qq",)))


def test_cli_applies_loras_and_refuses_bad_values_in_one_line(tmp_path, capsys):
    from selfforcing.cli import DEFAULT_MODEL, main

    toy = CausalWanModel.from_pretrained(DEFAULT_MODEL)
    spec = lora.LoraSpec(rank=2, alpha=2.0)
    lora.add_adapter(toy, spec)
    randomize_adapters_(toy, std=0.01)
    good = tmp_path / "ring.safetensors"
    lora.save_file(good, lora.adapter_state_dict(toy), spec)
    out = tmp_path / "out.mp4"
    assert main(["generate", "a red ring resting on a black background", "-o", str(out), "--frames", "3",
                 "--quiet", "--lora", f"{good}:0.5", "--lora", str(good)]) == 0
    assert out.is_file() and "does not know" not in capsys.readouterr().err  # a LoRA may teach new words

    wide = tmp_path / "wide.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 1536),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(1536, 2)}, str(wide))
    for command, message in [
        (["generate", "a cat", "--lora", str(tmp_path / "missing.safetensors")], "does not exist"),
        (["generate", "a cat", "--lora", f"{good}:strong"], "'strong' in .* is not a scale"),
        (["generate", "a cat", "--lora", f"{good}:nan"], "must be a finite number"),
        (["serve", "--lora", str(tmp_path)], "is not a file"),
        (["generate", "a cat", "-o", str(tmp_path / "x.mp4"), "--lora", str(wide)], "another model width"),
    ]:
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err
