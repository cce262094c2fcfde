"""Convert Wan2.1 transformer weights between the original and diffusers layouts.

``CausalWanModel`` uses the parameter names of diffusers'
``WanTransformer3DModel``, but many released checkpoints (Wan2.1 itself and
Self-Forcing's ``.pt`` files) use the names of the original ``WanModel``. This
module maps keys in both directions and loads any of those checkpoint files
into diffusers-named tensors, so the rest of the package only ever sees one
naming scheme.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch

from selfforcing.errors import NOT_TENSORS, SelfForcingError, reading

logger = logging.getLogger(__name__)

# One (original, diffusers) template per parameter family. ``{i}`` is a block
# index and ``{w}`` is ``weight`` or ``bias``; both sides name the same
# placeholders, so a rule read left-to-right or right-to-left is an exact
# inverse of itself.
_RULES: tuple[tuple[str, str], ...] = (
    ("patch_embedding.{w}", "patch_embedding.{w}"),
    ("text_embedding.0.{w}", "condition_embedder.text_embedder.linear_1.{w}"),
    ("text_embedding.2.{w}", "condition_embedder.text_embedder.linear_2.{w}"),
    ("time_embedding.0.{w}", "condition_embedder.time_embedder.linear_1.{w}"),
    ("time_embedding.2.{w}", "condition_embedder.time_embedder.linear_2.{w}"),
    ("time_projection.1.{w}", "condition_embedder.time_proj.{w}"),
    ("head.head.{w}", "proj_out.{w}"),
    ("head.modulation", "scale_shift_table"),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    # The affine LayerNorm before cross-attention is norm3 in the original
    # code and norm2 in diffusers; the other block norms have no parameters.
    ("blocks.{i}.norm3.{w}", "blocks.{i}.norm2.{w}"),
    ("blocks.{i}.ffn.0.{w}", "blocks.{i}.ffn.net.0.proj.{w}"),
    ("blocks.{i}.ffn.2.{w}", "blocks.{i}.ffn.net.2.{w}"),
    *(
        rule
        for original_attn, diffusers_attn in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for rule in (
            (f"blocks.{{i}}.{original_attn}.q.{{w}}", f"blocks.{{i}}.{diffusers_attn}.to_q.{{w}}"),
            (f"blocks.{{i}}.{original_attn}.k.{{w}}", f"blocks.{{i}}.{diffusers_attn}.to_k.{{w}}"),
            (f"blocks.{{i}}.{original_attn}.v.{{w}}", f"blocks.{{i}}.{diffusers_attn}.to_v.{{w}}"),
            (f"blocks.{{i}}.{original_attn}.o.{{w}}", f"blocks.{{i}}.{diffusers_attn}.to_out.0.{{w}}"),
            (f"blocks.{{i}}.{original_attn}.norm_q.{{w}}", f"blocks.{{i}}.{diffusers_attn}.norm_q.{{w}}"),
            (f"blocks.{{i}}.{original_attn}.norm_k.{{w}}", f"blocks.{{i}}.{diffusers_attn}.norm_k.{{w}}"),
        )
    ),
)

# Image-to-video parameters, which CausalWanModel does not have. They get a
# dedicated error so users learn that the checkpoint is I2V, not merely odd.
_I2V_PATTERNS = {
    "original": re.compile(r"^img_emb\.|\.cross_attn\.(k_img|v_img|norm_k_img)\."),
    "diffusers": re.compile(
        r"^condition_embedder\.image_embedder\.|\.attn2\.(add_k_proj|add_v_proj|norm_added_k)\."
    ),
}

# Fragments that FSDP, activation checkpointing and torch.compile insert into
# parameter names; they carry no meaning for the weights themselves.
_WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

# Self-Forcing saves the generator wrapper, whose transformer lives at ``model``.
_SELF_FORCING_PREFIX = "model."
_GENERATOR_KEYS = ("generator_ema", "generator")
# Other projects' dicts that hold the weights under one key (LongLive falls back to "model").
_STATE_KEYS = ("model", "state_dict")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_MAX_LISTED_KEYS = 10

Format = Literal["diffusers", "original"]


def _compile(template: str) -> re.Pattern[str]:
    """Turn a rule template into a regex that captures its placeholders."""
    pattern = re.escape(template)
    pattern = pattern.replace(re.escape("{i}"), r"(?P<i>\d+)")
    pattern = pattern.replace(re.escape("{w}"), r"(?P<w>weight|bias)")
    return re.compile(pattern)


_ORIGINAL_TO_DIFFUSERS = tuple((_compile(original), diffusers) for original, diffusers in _RULES)
_DIFFUSERS_TO_ORIGINAL = tuple((_compile(diffusers), original) for original, diffusers in _RULES)
_DIRECTIONS = {"original": _ORIGINAL_TO_DIFFUSERS, "diffusers": _DIFFUSERS_TO_ORIGINAL}


def _list_keys(keys: Iterable[str]) -> str:
    """Name up to ``_MAX_LISTED_KEYS`` keys, so error messages stay readable."""
    ordered = sorted(keys)
    listed = ", ".join(ordered[:_MAX_LISTED_KEYS])
    hidden = len(ordered) - _MAX_LISTED_KEYS
    return f"{listed}, ... and {hidden} more" if hidden > 0 else listed


def _rename(key: str, source: Format) -> str | None:
    """The other format's name for ``key``, or None when no rule matches it."""
    for pattern, target in _DIRECTIONS[source]:
        match = pattern.fullmatch(key)
        if match is not None:
            return target.format(**match.groupdict())
    return None


def _convert(state_dict: Mapping[str, torch.Tensor], source: Format) -> dict[str, torch.Tensor]:
    """Rename every key from ``source`` format; refuse I2V and unknown keys."""
    i2v = [key for key in state_dict if _I2V_PATTERNS[source].search(key)]
    if i2v:
        raise SelfForcingError(
            f"image-to-video (I2V) weights are not supported, but the checkpoint has "
            f"{len(i2v)} I2V keys: {_list_keys(i2v)}"
        )
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        new_key = _rename(key, source)
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = value
    if unknown:
        raise SelfForcingError(
            f"{len(unknown)} keys are not {source}-format Wan transformer weights: {_list_keys(unknown)}"
        )
    return converted


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename original Wan2.1 ``WanModel`` keys to diffusers / ``CausalWanModel`` keys.

    Tensors are passed through untouched (no copy, no dtype change); only the
    names change. Raises :class:`SelfForcingError` on I2V or unrecognised keys,
    because silently dropping them would load a model with missing weights.
    """
    return _convert(state_dict, "original")


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers / ``CausalWanModel`` keys to original Wan2.1 keys.

    The exact inverse of :func:`original_to_diffusers`, so weights can be
    exported for the original Wan and Self-Forcing code bases.
    """
    return _convert(state_dict, "diffusers")


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> Format:
    """Tell whether ``state_dict`` uses original Wan or diffusers key names.

    Keys named alike in both formats (``patch_embedding``) and unknown keys
    give no evidence; the decision rests on keys that only one format has.
    Raises :class:`SelfForcingError` when there is no such key or both kinds
    appear, since converting either way would then be a guess.
    """
    evidence = {
        name: any(_rename(key, name) is not None and _rename(key, other) is None for key in state_dict)
        for name, other in (("original", "diffusers"), ("diffusers", "original"))
    }
    if evidence["original"] and evidence["diffusers"]:
        raise SelfForcingError("the checkpoint mixes original Wan and diffusers key names")
    if evidence["original"]:
        return "original"
    if evidence["diffusers"]:
        return "diffusers"
    raise SelfForcingError(
        f"cannot tell the checkpoint format: no key looks like Wan transformer weights "
        f"({len(state_dict)} keys: {_list_keys(state_dict)})"
    )


def _strip_wrappers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop FSDP / checkpointing / compile fragments and Self-Forcing's ``model.`` prefix."""
    stripped = {}
    for key, value in state_dict.items():
        for fragment in _WRAPPER_FRAGMENTS:
            key = key.replace(fragment, "")
        stripped[key] = value
    if stripped and all(key.startswith(_SELF_FORCING_PREFIX) for key in stripped):
        stripped = {key[len(_SELF_FORCING_PREFIX) :]: value for key, value in stripped.items()}
    return stripped


def read_checkpoint_file(path: Path) -> object:
    """Load the raw object in a ``.safetensors`` or torch checkpoint file (``weights_only``),
    turning failures into user errors."""
    if not path.is_file():
        raise SelfForcingError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", *_TORCH_SUFFIXES):
        raise SelfForcingError(
            f"unsupported checkpoint file type {suffix!r} for {path}; "
            f"expected .safetensors, {', '.join(_TORCH_SUFFIXES)}"
        )
    with reading(path, None if suffix == ".safetensors" else NOT_TENSORS):
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)


def check_weight_files(root: str | Path) -> None:
    """Read the header of every ``.safetensors`` file under ``root``, so that a truncated or
    corrupt one is named before loading starts, not reported by a loader deep inside with the
    reader's message and no file name. Cheap: the header holds each tensor's extent, and
    opening checks them against the file's size without reading the tensors."""
    from safetensors import safe_open

    for file in sorted(Path(root).rglob("*.safetensors")):
        with reading(file), safe_open(file, "pt"):
            pass


def _pick_generator(checkpoint: Mapping[str, object], prefer: str, path: Path) -> object:
    """Choose the generator state dict in a Self-Forcing checkpoint, ``prefer`` first."""
    order = [prefer, *(name for name in _GENERATOR_KEYS if name != prefer)]
    for name in order:
        if checkpoint.get(name) is not None:
            logger.info("loading %r weights from Self-Forcing checkpoint %s", name, path)
            return checkpoint[name]
    raise SelfForcingError(f"Self-Forcing checkpoint {path} holds no generator weights")


def load_state_dict_file(path: str | Path, prefer: str = "generator_ema") -> dict[str, torch.Tensor]:
    """Load a Wan transformer checkpoint of any supported kind as diffusers-named tensors.

    Accepts Self-Forcing training checkpoints (``generator_ema`` / ``generator``
    entries, ``prefer`` chosen first), weights under ``model`` or ``state_dict`` (the
    layouts of its successors' releases), bare original-format state dicts and
    diffusers-format state dicts, in ``.safetensors`` or ``.pt``/``.pth``/``.bin``
    files. ``torch.load`` runs with ``weights_only=True`` so a checkpoint cannot
    execute code. Every problem with the file raises :class:`SelfForcingError`.
    """
    if prefer not in _GENERATOR_KEYS:
        raise SelfForcingError(f"prefer must be one of {', '.join(_GENERATOR_KEYS)}, got {prefer!r}")
    path = Path(path)
    loaded = read_checkpoint_file(path)
    if isinstance(loaded, Mapping) and any(name in loaded for name in _GENERATOR_KEYS):
        loaded = _pick_generator(loaded, prefer, path)
    elif isinstance(loaded, Mapping) and (held := [k for k in _STATE_KEYS if isinstance(loaded.get(k), Mapping)]):
        loaded = loaded[held[0]]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise SelfForcingError(f"checkpoint {path} does not hold a state dict of named tensors")
    state_dict = _strip_wrappers(loaded)
    check_finite(state_dict, f"checkpoint {path}")
    if detect_format(state_dict) == "original":
        state_dict = original_to_diffusers(state_dict)
    return state_dict


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or infinity: loaded, they stream black frames with exit 0."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SelfForcingError(f"{what} holds non-finite values (NaN or infinity) in {key}; "
                                   "its video would be black")


def check_keys(model_keys: set[str], loaded_keys: set[str]) -> None:
    """Raise :class:`SelfForcingError` unless the checkpoint has exactly the model's keys.

    A strict check with a readable message beats ``load_state_dict``'s wall of
    names, and catches checkpoints built for another model size or variant.
    """
    missing = model_keys - loaded_keys
    unexpected = loaded_keys - model_keys
    if not missing and not unexpected:
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_list_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_list_keys(unexpected)}")
    raise SelfForcingError("checkpoint does not match the model; " + "; ".join(problems))
