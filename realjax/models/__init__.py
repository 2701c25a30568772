"""The policy: one NNX decoder for Qwen2/2.5, Qwen3 and Llama 3, HF checkpoints in and out, presets."""

from realjax.models.config import (PRESETS, ModelConfig, RopeScaling, config_from_hf, config_to_hf,
                                   load_hf_config, preset)
from realjax.models.hf import (abstract_model, from_pretrained, init_model, load_tokenizer, save_pretrained,
                              stop_token_ids)
from realjax.models.kv_cache import KVCache
from realjax.models.logprobs import token_logprobs
from realjax.models.transformer import Transformer, positions_from_mask

__all__ = ["PRESETS", "KVCache", "ModelConfig", "RopeScaling", "Transformer", "abstract_model",
           "config_from_hf", "config_to_hf", "from_pretrained", "init_model", "load_hf_config", "load_tokenizer",
           "positions_from_mask", "preset", "save_pretrained", "stop_token_ids", "token_logprobs"]
