from selfforcing.models.kv_cache import KVCache
from selfforcing.models.wan import PRESETS, BlockCausal, CausalWanModel, TextContext, WanConfig, preset

__all__ = ["PRESETS", "BlockCausal", "CausalWanModel", "KVCache", "TextContext", "WanConfig", "preset"]
