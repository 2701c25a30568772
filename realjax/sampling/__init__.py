"""Rollouts inside the JAX program: KV cache, sampling strategies, the jitted sampler."""

from realjax.models.kv_cache import KVCache
from realjax.sampling.engine import Engine, EngineStats
from realjax.sampling.sampler import DecodeState, SampleOutput, Sampler, decode_windows, replace_config, stack_outputs
from realjax.sampling.strategies import SamplingConfig, choose, truncate
from realjax.sampling.batching import sample_ids

__all__ = ["DecodeState", "Engine", "EngineStats", "KVCache", "SampleOutput", "Sampler", "SamplingConfig", "choose",
           "decode_windows", "replace_config", "sample_ids", "stack_outputs", "truncate"]
