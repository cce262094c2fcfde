"""LoRA adapters on a ``CausalWanModel``, with peft, in the files the Wan ecosystem shares.

The model knows nothing about LoRA: peft wraps its ``nn.Linear`` layers from outside
(``inject_adapter_in_model``), exactly as diffusers does for ``WanTransformer3DModel``,
whose parameter names ours share. So a Wan2.1-T2V-1.3B LoRA applies to a Self-Forcing
student unchanged.

Files are safetensors in the layout of diffusers' ``WanPipeline.save_lora_weights``:
``transformer.<module>.lora_A.weight`` (rank x in) and ``.lora_B.weight`` (out x rank),
the peft config (rank, alpha, targets) as JSON in the metadata key ``lora_adapter_metadata``;
without it, alpha = rank (scale 1), diffusers' convention. The original-Wan / ComfyUI
(``diffusion_model.*``, ``lora_down``/``lora_up`` with ``.alpha``) and musubi-tuner
(``lora_unet_*``) layouts are read through diffusers' own converters.

Inference fuses adapters into the base weights (``fuse``), so a stream runs at base-model
speed and ``StreamingPipeline.compile()`` freezes the fused weights; ``unfuse`` restores
the base weights exactly (to float rounding).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from selfforcing.errors import SelfForcingError, describe, reading
from selfforcing.models.convert import check_finite

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer."
# Every linear layer of a Wan block: self- and cross-attention projections and the FFN.
BLOCK_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
_LORA_KEY = re.compile(r"(.+)\.lora_([AB])\.(weight|bias)")
_I2V_LAYERS = ("add_k_proj", "add_v_proj", "image_embedder")


@dataclass(frozen=True)
class LoraSpec:
    """A fresh adapter to train: rank, alpha (update scaled by alpha / rank), the module
    names it wraps (peft matching: a full name or its trailing part), dropout on its input."""

    rank: int = 16
    alpha: float = 16.0
    target_modules: tuple[str, ...] = BLOCK_LINEARS
    dropout: float = 0.0

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target_modules),
                          lora_dropout=self.dropout)


# ---------------------------------------------------------------------------- adapters on a model
def add_adapter(model: nn.Module, spec: LoraSpec, name: str = "default") -> nn.Module:
    """Wrap the targeted layers with a zero-initialised adapter (B = 0, so the output is
    unchanged) and leave only adapter weights trainable; a target matching nothing is an error."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(spec.peft_config(), model, adapter_name=name)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise SelfForcingError(f"LoRA target_modules {list(spec.target_modules)} match no layer of the model "
                               "(use names such as to_q, to_out.0, ffn.net.2)") from e
    for param_name, param in model.named_parameters():
        param.requires_grad_(".lora_" in param_name and f".{name}." in param_name)
    return model


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights under diffusers' names (``blocks.0.attn1.to_q.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def fuse(model: nn.Module) -> None:
    """Add every active adapter (times its scale) into the base weights: a fused layer's
    forward is its base ``nn.Linear`` alone."""
    for layer in lora_layers(model):
        layer.merge(adapter_names=list(layer.active_adapters))


def unfuse(model: nn.Module) -> None:
    """Subtract the fused adapters again: the base weights and the separate adapters return."""
    for layer in lora_layers(model):
        layer.unmerge()


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights under its own names (``to_q.weight``, not peft's
    ``to_q.base_layer.weight``), fused adapters included: loadable by ``load_weights`` and
    savable as a plain model directory."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


# ---------------------------------------------------------------------------- files
def save_file(path: str | Path, weights: dict[str, torch.Tensor], spec: LoraSpec) -> None:
    """Write an adapter (``adapter_state_dict``) as diffusers' ``WanPipeline.save_lora_weights`` does."""
    from safetensors.torch import save_file as save

    from selfforcing.utils import atomic_path

    config = {"r": spec.rank, "lora_alpha": spec.alpha, "target_modules": sorted(spec.target_modules),
              "lora_dropout": spec.dropout}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({PREFIX + k: v for k, v in config.items()}, sort_keys=True)}
    with atomic_path(Path(path)) as tmp:
        save({PREFIX + k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp), metadata=metadata)


@dataclass
class LoraFile:
    """An adapter read from disk, in diffusers' names without the ``transformer.`` prefix."""

    path: Path
    weights: dict[str, torch.Tensor]
    metadata: dict | None  # peft LoraConfig kwargs, when the file carries them

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module name -> (lora_A, lora_B) weights."""
        return {name: (self.weights[f"{name}.lora_A.weight"], self.weights[f"{name}.lora_B.weight"])
                for name in sorted({_LORA_KEY.fullmatch(k).group(1) for k in self.weights})}


def read_file(path: str | Path) -> LoraFile:
    """Read a Wan LoRA in any supported layout, checked to be one: A and B for every
    module, of one rank each. Whether it fits a given model is ``check_fits``'s job."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SelfForcingError(f"LoRA file {path} {'is not a file' if path.exists() else 'does not exist'}")
    with reading(path, "not a safetensors file"):
        with safe_open(str(path), framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
            header = f.metadata() or {}
    check_finite(raw, f"LoRA file {path}")  # before conversion: a ComfyUI file's alphas too
    weights = _to_diffusers_layout(raw, path)
    metadata = _adapter_metadata(header, path)
    lora = LoraFile(path, weights, metadata)
    _check_pairs(lora)
    ranks = sorted({a.shape[0] for a, _ in lora.modules().values()})
    if metadata and not metadata.get("rank_pattern") and ranks != [metadata.get("r", 8)]:
        raise SelfForcingError(f"LoRA file {path}: its {METADATA_KEY} gives rank {metadata.get('r', 8)} but its "
                               f"weights have rank {', '.join(map(str, ranks))}")
    return lora


def _to_diffusers_layout(raw: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """diffusers names without the prefix, converting the original-Wan and musubi layouts."""
    from diffusers.loaders.lora_conversion_utils import (_convert_musubi_wan_lora_to_diffusers,
                                                         _convert_non_diffusers_wan_lora_to_diffusers)

    if not raw:
        raise SelfForcingError(f"LoRA file {path} holds no tensors")
    converters = {"diffusion_model.": ("original Wan / ComfyUI", _convert_non_diffusers_wan_lora_to_diffusers),
                  "lora_unet_": ("musubi-tuner", _convert_musubi_wan_lora_to_diffusers)}
    for prefix, (layout, convert) in converters.items():
        if any(k.startswith(prefix) for k in raw):
            try:
                raw = convert(dict(raw))
            except Exception as e:  # the converters raise KeyError/ValueError on keys they do not expect
                raise SelfForcingError(f"LoRA file {path} looks like the {layout} layout but cannot be converted "
                                       f"({type(e).__name__}: {e}); is it a Wan2.1 text-to-video LoRA?") from None
            break
    if not all(k.startswith(PREFIX) for k in raw):
        other = next(k for k in raw if not k.startswith(PREFIX))
        raise SelfForcingError(
            f"LoRA file {path} is not a Wan LoRA: key {other!r}; expected diffusers' transformer.* "
            "(WanPipeline.save_lora_weights), original Wan / ComfyUI diffusion_model.* or musubi-tuner lora_unet_* keys")
    weights = {k[len(PREFIX):]: v for k, v in raw.items()}
    odd = [k for k in weights if not _LORA_KEY.fullmatch(k)]
    if odd:
        raise SelfForcingError(f"LoRA file {path} has keys that are not LoRA weights (lora_A / lora_B): "
                               f"{', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''}")
    i2v = sorted({k for k in weights if any(part in k for part in _I2V_LAYERS)})
    if i2v:
        raise SelfForcingError(f"LoRA file {path} was made for an image-to-video Wan model ({i2v[0]}); "
                               "this is a text-to-video model")
    return weights


def _adapter_metadata(header: dict[str, str], path: Path) -> dict | None:
    if METADATA_KEY not in header:
        return None
    try:
        packed = json.loads(header[METADATA_KEY])
    except (json.JSONDecodeError, RecursionError):
        raise SelfForcingError(f"LoRA file {path}: its {METADATA_KEY} metadata is not JSON") from None
    config = {k[len(PREFIX):]: v for k, v in packed.items() if k.startswith(PREFIX)} if isinstance(packed, dict) else {}
    if config:
        _check_metadata(config, path)
    return config or None


def _check_metadata(config: dict, path: Path) -> None:
    """The metadata becomes peft's ``LoraConfig(**config)``: refuse what would fail or mislead
    there (a rank of 0 or "abc", an alpha that is no number, unknown keys), naming it."""
    import dataclasses

    from peft import LoraConfig

    where = f"LoRA file {path}: its {METADATA_KEY}"
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(LoraConfig)})
    if unknown:
        raise SelfForcingError(f"{where} has keys peft's LoraConfig does not know: {', '.join(unknown[:5])}")
    rank, alpha, targets = config.get("r", 8), config.get("lora_alpha", 8), config.get("target_modules")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SelfForcingError(f"{where} gives r (the rank) as {rank!r}, not a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise SelfForcingError(f"{where} gives lora_alpha as {alpha!r}, not a finite number")
    if not (isinstance(targets, str) or isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise SelfForcingError(f"{where} gives target_modules as {targets!r}, not a name or a list of names")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise SelfForcingError(f"{where} gives lora_dropout as {dropout!r}, not a number in [0, 1)")
    try:
        LoraConfig(**config)
    except Exception as e:  # whatever peft's checks raise on a value they do not take (KeyError, TypeError, ...)
        raise SelfForcingError(f"{where} is not a LoRA config peft takes: {describe(e)}") from None


def _check_pairs(lora: LoraFile) -> None:
    for name in {_LORA_KEY.fullmatch(k).group(1) for k in lora.weights}:
        a, b = lora.weights.get(f"{name}.lora_A.weight"), lora.weights.get(f"{name}.lora_B.weight")
        if a is None or b is None:
            has, lacks = ("A", "B") if a is not None else ("B", "A")
            raise SelfForcingError(f"LoRA file {lora.path} has lora_{has} but not lora_{lacks} for {name}")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise SelfForcingError(f"LoRA file {lora.path}: {name} has lora_A {tuple(a.shape)} and lora_B "
                                   f"{tuple(b.shape)}, which are not (rank, in) and (out, rank) of one rank")


def check_fits(lora: LoraFile, model: nn.Module) -> None:
    """Every adapted module must be a linear layer of ``model`` with the adapter's in/out
    widths: a LoRA for another model (depth, width, layer names) is refused, naming why."""
    layers = dict(model.named_modules())
    for name, (a, b) in lora.modules().items():
        layer = layers.get(name)
        layer = getattr(layer, "base_layer", layer)  # already wrapped by another adapter
        if not isinstance(layer, nn.Linear):
            depth = sum(1 for n in layers if re.fullmatch(r"blocks\.\d+", n))
            raise SelfForcingError(f"LoRA {lora.path} does not fit this model: it adapts {name}, which is not a linear "
                                   f"layer of this {depth}-block Wan model (a LoRA made for another model?)")
        if (layer.in_features, layer.out_features) != (a.shape[1], b.shape[0]):
            raise SelfForcingError(
                f"LoRA {lora.path} does not fit this model: {name} maps {a.shape[1]} -> {b.shape[0]} features in the "
                f"LoRA but {layer.in_features} -> {layer.out_features} here (a LoRA made for another model width?)")


# ---------------------------------------------------------------------------- loading for inference
def load(model: nn.Module, path: str | Path, scale: float = 1.0, name: str = "default") -> LoraFile:
    """Add the LoRA file ``path`` to ``model`` as adapter ``name``, weighted by ``scale``
    (on top of its alpha / rank), active beside any adapters loaded before."""
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    if not math.isfinite(scale):
        raise SelfForcingError(f"LoRA scale must be a finite number, got {scale}")
    lora = read_file(path)
    check_fits(lora, model)
    if name in getattr(model, "peft_config", {}):
        raise SelfForcingError(f"the model already has an adapter named {name!r}")
    ranks = {f"^{k}": v.shape[1] for k, v in lora.weights.items() if k.endswith(".lora_B.weight")}
    dtype = next(model.parameters()).dtype
    try:
        config = _create_lora_config(lora.weights, None, lora.metadata, ranks, model_state_dict=model.state_dict())
        with warnings.catch_warnings():  # peft warns that a second adapter makes several: that is the point here
            warnings.simplefilter("ignore", UserWarning)
            inject_adapter_in_model(config, model, adapter_name=name)
        set_peft_model_state_dict(model, {k: v.to(dtype) for k, v in lora.weights.items()}, adapter_name=name)
    except Exception as e:
        if lora.metadata is None:  # from the weights alone, checked above: a failure here is a bug to report
            raise
        # peft checks some settings only as it applies them (bias "sometimes": NotImplementedError)
        raise SelfForcingError(f"LoRA file {lora.path}: its {METADATA_KEY} is not a LoRA config peft can apply: "
                               f"{describe(e)}") from None
    active = sorted({a for layer in lora_layers(model) for a in layer.active_adapters} | {name})
    for layer in lora_layers(model):
        layer.set_adapter([a for a in active if a in layer.lora_A])
        if name in layer.lora_A:
            layer.set_scale(name, scale)
    model.requires_grad_(False)
    return lora
