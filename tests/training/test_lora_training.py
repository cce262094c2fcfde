"""LoRA fine-tuning: only adapters train and are checkpointed, resume is exact, a run exports
the adapter file and the fused model, and FSDP2 under torchrun (2 gloo processes) shards it."""

import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from factories import tiny_config
from selfforcing.errors import SelfForcingError
from selfforcing.models import CausalWanModel, lora
from selfforcing.training.config import config_from_dict
from selfforcing.training.trainer import Trainer
from test_distributed import CONFIG as ODE_CONFIG
from test_distributed import _metrics, _run

LORA = {"rank": 4, "alpha": 8.0}


def lora_config(tmp_path, model_dir=None, teacher_dir=None, **sections) -> dict:
    cfg = tiny_config(tmp_path / "run", lora=LORA, **sections)
    if model_dir is not None:
        cfg["model"] = {"path": str(model_dir)}
    if teacher_dir is not None:
        cfg["teacher"] = {"path": str(teacher_dir)}
    return cfg


def adapters_only(names) -> bool:
    names = list(names)
    return bool(names) and all(".lora_" in n for n in names)


@pytest.mark.parametrize("lora_section, message", [
    ({"rank": 0}, "lora.rank must be a positive integer"),
    ({"ranks": 4}, "unknown config keys in lora: ranks"),
    ({"alpha": -1.0}, "lora.alpha must be > 0"),
    ({"critic": True}, "lora.critic is true but loss denoising trains no critic"),
    ({"target_modules": []}, "lora.target_modules is empty"),
])
def test_lora_section_is_checked(tmp_path, lora_section, message):
    cfg = lora_config(tmp_path, paradigm={"name": "diffusion_forcing"}, loss={"name": "denoising"})
    cfg["lora"] = lora_section
    with pytest.raises(SelfForcingError, match=message):
        config_from_dict(cfg)
    cfg["lora"] = {"target_modules": ["to_qq"]}
    with pytest.raises(SelfForcingError, match="match no layer"):
        Trainer(config_from_dict(cfg))


def test_lora_on_videos_trains_only_adapters_and_exports_adapter_and_fused_model(tmp_path, teacher_dir):
    """Diffusion Forcing on toy videos, starting from a saved model (as a user's fine-tune does)."""
    cfg = lora_config(tmp_path, model_dir=teacher_dir, steps=2, paradigm={"name": "diffusion_forcing"},
                      loss={"name": "denoising"})
    trainer = Trainer(config_from_dict(cfg))
    base = {k: v.clone() for k, v in trainer.student.state_dict().items() if ".lora_" not in k}
    trainer.train()
    after = trainer.student.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())  # the base never moves

    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    assert adapters_only(load_file(checkpoint / "student.safetensors"))
    assert adapters_only(load_file(checkpoint / "ema.safetensors"))
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert adapters_only(state["optimizers"]["student"]["state"])

    model_dir, adapter = tmp_path / "run" / "model", tmp_path / "run" / "lora.safetensors"
    assert trainer.export(model_dir) == [model_dir, adapter]
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 12, 3, 8, 8, generator=g), torch.tensor([600.0]), torch.randn(1, 8, 16, generator=g)
    with_file = CausalWanModel.from_pretrained(teacher_dir).eval()
    lora.load(with_file, adapter)
    fused = CausalWanModel.from_pretrained(model_dir / "transformer").eval()
    with torch.no_grad():
        assert torch.allclose(fused(x, t, ctx), with_file(x, t, ctx), atol=1e-5)
        with trainer.ema.applied():  # the export is the EMA
            assert torch.allclose(trainer.student.eval()(x, t, ctx), fused(x, t, ctx), atol=1e-5)


@pytest.mark.parametrize("critic_lora", [True, False])
def test_prompt_only_self_forcing_with_lora_resumes_exactly(tmp_path, teacher_dir, critic_lora):
    """Self Forcing + DMD from prompts: LoRA on the generator, the critic LoRA or whole."""
    def run(root, steps, resume=False):
        cfg = lora_config(root, teacher_dir=teacher_dir, steps=steps, loss={"name": "dmd", "generator_every": 2},
                          logging={"checkpoint_every": 2})
        cfg["lora"] = {**LORA, "critic": critic_lora}
        trainer = Trainer(config_from_dict(cfg))
        return trainer, trainer.train(resume=resume)

    full, history = run(tmp_path / "full", 4)
    assert all(".lora_" in n for n, p in full.student.named_parameters() if p.requires_grad)
    critic_trainable = [n for n, p in full.critic.named_parameters() if p.requires_grad]
    assert adapters_only(critic_trainable) == critic_lora  # _frozen gave back exactly what trained
    run(tmp_path / "split", 2)
    resumed, rest = run(tmp_path / "split", 4, resume=True)
    assert resumed.step == 4
    for a, b in zip(history[2:], rest):
        assert a["critic_loss"] == b["critic_loss"] and a.get("generator_loss") == b.get("generator_loss")
    for module in ("student", "critic"):
        ours, theirs = getattr(full, module).state_dict(), getattr(resumed, module).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), module
    assert all(torch.equal(full.ema.average[k], resumed.ema.average[k]) for k in full.ema.average)


def test_lora_training_under_torchrun_matches_one_process(tmp_path):
    """ODE regression on a fixed pairs file (world-size independent, as in test_distributed)."""
    from selfforcing.training.paradigms.ode import save_pairs

    g = torch.Generator().manual_seed(0)
    save_pairs(tmp_path / "pairs.safetensors", torch.randn(4, 2, 12, 3, 8, 8, generator=g),
               ["a red fox", "a cat", "a dog plays piano", "the garden"], timesteps=torch.tensor([1000.0]))
    cfg = {**ODE_CONFIG, "steps": 2, "output_dir": str(tmp_path / "single"), "lora": LORA,
           "data": {**ODE_CONFIG["data"], "path": str(tmp_path / "pairs.safetensors")}}
    single = Trainer(config_from_dict(cfg))
    single.train()
    single.export(tmp_path / "single" / "model")

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": str(tmp_path / "multi")}))
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "selfforcing", "train", "cfg.yaml", "--set", "data.batch_size=1"], tmp_path)
    assert proc.returncode == 0, f"2-process LoRA training failed:\n{proc.stderr[-3000:]}"

    one, two = _metrics(tmp_path / "single"), _metrics(tmp_path / "multi")
    for a, b in zip(one, two, strict=True):
        assert b["generator_loss"] == pytest.approx(a["generator_loss"], rel=1e-4)
        assert b["generator_grad_norm"] == pytest.approx(a["generator_grad_norm"], rel=1e-4)
    checkpoint = tmp_path / "multi" / "checkpoints" / "step-0000002"
    assert adapters_only(load_file(checkpoint / "student.safetensors"))  # gathered whole from the shards
    a, b = load_file(tmp_path / "single" / "lora.safetensors"), load_file(tmp_path / "multi" / "lora.safetensors")
    assert a.keys() == b.keys() and all(k.startswith("transformer.") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
