"""A LoRA policy's adapters alone, in the PEFT layout (``adapter_model.safetensors`` + ``adapter_config.json``)
that ``peft.PeftModel.from_pretrained(base, dir)`` loads on top of the HF base model.

PEFT stores each adapted ``nn.Linear`` as ``lora_A.weight [r, in]`` and ``lora_B.weight [out, r]`` with
the update ``(lora_alpha / r) B A``; ours are einsum-shaped (``A [in..., r]``, ``B [r, out...]``), so each
is flattened and transposed, the flattening order being the one ``realjax.models.hf`` uses for the
weights themselves (heads major, head dim minor).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from realjax.models import lora as lora_lib
from realjax.models.hf import tensor_maps, write_safetensors
from realjax.sharding import to_host

_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}


def save_peft_adapters(model, out_dir, *, base_model: str = "") -> Path:
    """Write ``model``'s adapters (a LoRA ``Transformer``) as a PEFT LoRA adapter directory.

    ``base_model`` goes into ``adapter_config.json`` as ``base_model_name_or_path``. Every process must
    call this in a multi-process run (the gathers are collective); process 0 writes.
    """
    cfg = model.cfg
    if cfg.lora is None:
        raise ValueError("the model has no LoRA adapters to save")
    adapters = {path: var for path, var in nnx.to_flat_state(nnx.state(model, lora_lib.LoraParam))}
    entries = []
    for m in tensor_maps(cfg):
        pair = m.path[:-1] + (str(m.path[-1]) + lora_lib.SUFFIX,)
        if pair + ("a",) not in adapters:
            continue
        a, b = adapters[pair + ("a",)].get_value(), adapters[pair + ("b",)].get_value()
        prefix = "base_model.model." + m.hf_name.removesuffix(".weight")
        r = cfg.lora.rank
        entries.append((prefix + ".lora_A.weight", (r, math.prod(a.shape[:-1])), np.dtype(np.float32),
                        lambda a=a: to_host(a).reshape(-1, r).T.astype(np.float32)))
        entries.append((prefix + ".lora_B.weight", (math.prod(b.shape[1:]), r), np.dtype(np.float32),
                        lambda b=b: to_host(b).reshape(r, -1).T.astype(np.float32)))
    out_dir = Path(out_dir)
    if jax.process_index() != 0:
        for *_, produce in entries:
            produce()
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / "adapter_model.safetensors", entries)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
              "target_modules": sorted(_MODULES[t] for t in cfg.lora.targets), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
              "alpha_pattern": {}}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir
