"""The embedded demo's model: how ``realjax/assets/demo/`` is built, reproducibly.

``realjax build-demo --out realjax/assets/demo`` trains a tiny Qwen2-architecture model (character
tokenizer, ~0.8M parameters) with a short supervised warm start on worked solutions of the synthetic
arithmetic task, and stops early -- while its sampled pass@1 is still low -- so that RL has something to
do. The warm start never sees the demo's held-out evaluation problems. Same command, same bytes (CPU,
fixed seeds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from realjax.data import load_rows, prompt_text
from realjax.models import ModelConfig, init_model, save_pretrained
from realjax.models.char_tokenizer import EOS, char_tokenizer
from realjax.rewards import generate_rows

# The demo's data specs (configs/demo.yaml uses the same): RL prompts, held-out evaluation problems, and
# the warm start's own problems (another seed, evaluation prompts removed).
DEMO_TASK = "min_ops=1&max_ops=3&max_value=9"
EVAL_SPEC = f"synthetic:arithmetic?n=256&seed=7&{DEMO_TASK}"
WARM_START_SEED = 12345


def demo_model_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(family="qwen2", vocab_size=vocab_size, hidden_size=128, num_layers=4, num_heads=4,
                       num_kv_heads=2, head_dim=32, intermediate_size=384, rope_theta=10000.0,
                       tie_word_embeddings=True, max_position_embeddings=512, rms_norm_eps=1e-6)


def slipped(solution: str) -> str:
    """The same worked solution with the first intermediate result boxed instead of the final one."""
    steps = solution[len("<think>"):solution.index("</think>")].split(" ")
    return solution[:solution.index("\\boxed{")] + "\\boxed{" + steps[0].split("=", 1)[1] + "}"


def _examples(tokenizer, n: int, seed: int, exclude: set[str], slip: float):
    """Token ids and loss masks of (prompt, worked solution + EOS) pairs, right-padded to one length;
    a ``slip`` fraction of the multi-step solutions box their first intermediate result."""
    rows = [r for r in generate_rows(n, seed=seed, min_ops=1, max_ops=3, max_value=9)
            if r["messages"][0]["content"] not in exclude]
    rng = np.random.default_rng(seed)
    seqs, masks = [], []
    for r in rows:
        prompt = tokenizer(prompt_text(r["messages"], tokenizer), add_special_tokens=False)["input_ids"]
        solution = r["solution"]
        if " " in solution.split("</think>")[0] and rng.random() < slip:
            solution = slipped(solution)
        answer = tokenizer(solution + EOS, add_special_tokens=False)["input_ids"]
        seqs.append(prompt + answer)
        masks.append([0] * len(prompt) + [1] * len(answer))
    t = max(map(len, seqs))
    ids = np.full((len(seqs), t), tokenizer.pad_token_id, np.int32)
    loss_mask = np.zeros((len(seqs), t), np.float32)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)], loss_mask[i, :len(m)] = s, m
    return ids, loss_mask


def warm_start(steps: int, *, slip: float = 0.4, schedule_steps: int = 1200, batch: int = 64, lr: float = 2e-3,
               seed: int = 0, log_every: int = 50):
    """Supervised next-token training on worked solutions, stopped after ``steps`` of a warmup-cosine
    schedule that would run ``schedule_steps``; returns (model, tokenizer)."""
    tok = char_tokenizer()
    held_out = {r["messages"][0]["content"] for r in load_rows(EVAL_SPEC)[0]}
    ids, loss_mask = _examples(tok, 40000, WARM_START_SEED, held_out, slip)
    model = init_model(demo_model_config(len(tok)), seed=seed)
    graphdef, params = nnx.split(model)
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, 50, schedule_steps), weight_decay=0.01)
    opt_state = opt.init(params)

    def loss_fn(params, ids, m):
        logits = nnx.merge(graphdef, params)(ids[:, :-1], attention_mask_BT=ids[:, :-1] != tok.pad_token_id)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)[..., 0]
        return -jnp.sum(logp * m[:, 1:]) / jnp.sum(m[:, 1:])

    @jax.jit
    def step(params, opt_state, ids, m):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, m)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        rows = rng.integers(0, len(ids), batch)
        params, opt_state, loss = step(params, opt_state, ids[rows], loss_mask[rows])
        if log_every and (i + 1) % log_every == 0:
            print(f"warm start step {i + 1}/{steps}: loss {float(loss):.4f}", flush=True)
    return nnx.merge(graphdef, params), tok


def build(out: Path, steps: int) -> dict:
    """Warm-start the demo model and write it, its tokenizer and ``build_info.json`` to ``out``."""
    t0 = time.perf_counter()
    model, tok = warm_start(steps)
    tok_dir = out / "_tokenizer"
    tok.save_pretrained(tok_dir)
    save_pretrained(model, out, tokenizer_from=tok_dir)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}, indent=2))
    info = {"command": f"realjax build-demo --out {out} --steps {steps}", "warm_start_steps": steps,
            "seconds": round(time.perf_counter() - t0, 1), "parameters": model.cfg.num_params()}
    (out / "build_info.json").write_text(json.dumps(info, indent=2))
    return info
