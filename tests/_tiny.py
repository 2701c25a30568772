"""Tiny random HF checkpoints built with transformers (torch, fp32) for parity tests."""


TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def hf_config(family: str, **overrides):
    import transformers

    kw = dict(TINY)
    if family == "qwen2":
        cls = transformers.Qwen2Config
        kw.update(rope_theta=10000.0, tie_word_embeddings=False)
    elif family == "qwen3":
        cls = transformers.Qwen3Config
        kw.update(head_dim=24, rope_theta=1e6, tie_word_embeddings=True)  # head_dim != hidden / heads
    elif family == "llama":
        cls = transformers.LlamaConfig
        kw.update(rope_theta=500000.0, tie_word_embeddings=True,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    else:
        raise ValueError(family)
    kw.update(overrides)
    return cls(**kw)


def make_hf_model(family: str, out_dir, seed: int = 0, *, tokenizer: bool = True, **overrides):
    """Save a random tiny HF model (and the char tokenizer) to ``out_dir``; returns the torch model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides)).float().eval()
    with torch.no_grad():  # non-trivial biases and norm scales, so a missed one shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    if tokenizer:
        from realjax.models.char_tokenizer import char_tokenizer

        char_tokenizer().save_pretrained(out_dir)
    return model


def torch_logits(model, ids, attention_mask=None):
    import numpy as np
    import torch

    with torch.no_grad():
        ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)
        kw = {}
        if attention_mask is not None:
            mask_t = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
            kw = dict(attention_mask=mask_t, position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0))
        return model(ids_t, **kw).logits.float().numpy()


def assert_sharded_forward_equals(sharded, plain, mesh, ids, atol=2e-5):
    """The mesh-placed model's jitted forward (rows on the mesh, a left-padded row) equals the plain one's."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from realjax import sharding as shd

    mask = np.ones(ids.shape, int)
    mask[1, :4] = 0

    def fwd(graphdef, state, ids, mask):
        with shd.use_rules(mesh):
            return nnx.merge(graphdef, state)(ids, attention_mask_BT=mask)

    graphdef, state = nnx.split(sharded)
    got = jax.jit(fwd, static_argnums=0)(graphdef, state, *shd.put_batch((ids, mask), mesh))
    want = plain(jnp.asarray(ids), attention_mask_BT=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol)
