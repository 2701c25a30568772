"""The RL loop: rollouts -> verifier labels -> REAL (or any objective in LOSSES) updates, with exact resume.

One RL step (DESIGN.md section 1): ``prompts_per_step`` prompts x ``group_size`` rollouts from the current
policy; the verifier labels them; ``mini_batches`` optimizer updates follow, each over whole groups. Then
metrics, periodic evaluation and checkpoints. Restarting the same command resumes from the last
checkpoint and replays exactly what an uninterrupted run would have done (the step's RNG is
``fold_in(key(seed), step)`` and the data order is a function of (seed, epoch)). SIGTERM (TPU
preemption) and Ctrl-C finish the current step, write a checkpoint and exit 0.

Departures from the paper's training code (verl), all deliberate:

* ``old_logp`` comes from the sampler when the sampler computes exactly the trainer's numbers (same model
  code, fp32); otherwise (bf16) one scoring pass recomputes it, as verl always does. The mismatch is
  measured and logged either way.
* Updates see whole groups by construction, for any mesh and micro-batch size (verl needs a specific
  batch layout and GPU count for REAL's grouping to hold; see PAPER.md 2.5).
"""

from __future__ import annotations

import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from realjax import sharding as shd
from realjax.checkpoint import Checkpointer
from realjax.config import Config, to_dict
from realjax.data import PromptStream
from realjax.losses import get_loss
from realjax.metrics import MetricsWriter
from realjax.models import (from_pretrained, init_model, load_tokenizer, preset, save_pretrained,
                            stop_token_ids)
from realjax.models.config import resolve_dtype
from realjax.rl import components
from realjax.rl.rollout import RolloutCollector, Rollouts
from realjax.rl.update import make_scoring_fn, make_update_step
from realjax.sampling import Engine, Sampler


class TrainingDiverged(RuntimeError):
    pass


class Trainer:
    """Everything one run needs, built from a ``Config``; ``run()`` trains and returns a summary."""

    def __init__(self, cfg: Config):
        components.init_distributed(cfg)
        self.cfg, self.t_start = cfg, time.perf_counter()
        self.main = jax.process_index() == 0
        self.run_dir = cfg.run_dir
        self.mesh = shd.make_mesh(cfg.mesh)
        self.model_path = components.model_path(cfg)
        self.tokenizer, model = self._load_model()
        self.model_cfg = model.cfg
        self.graphdef, self.params = nnx.split(model)
        self.param_shardings = shd.state_shardings(self.params, self.mesh, shd.TRAIN_RULES)
        self.rollout_shardings = shd.state_shardings(self.params, self.mesh, shd.ROLLOUT_RULES)
        self._rollout_view = _rollout_view_fn(self.model_cfg, self.rollout_shardings)
        self._build_data()
        self._build_learner()
        self._build_rollout()
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=cfg.trainer.keep_checkpoints)
        self.step, self.consecutive_skips, self.skipped_total, self.eval_before = 0, 0, 0, {}
        self._stop_requested = False

    # -- construction ----------------------------------------------------------------------------------
    def _load_model(self):
        cfg, dtype = self.cfg, resolve_dtype(self.cfg.model.dtype)
        if self.model_path is None:  # random weights of a preset, with the character tokenizer (device checks)
            from realjax.tiny import char_tokenizer

            arch = preset(cfg.model.preset, param_dtype=cfg.model.param_dtype, dtype=dtype, remat=cfg.model.remat)
            return char_tokenizer(), init_model(arch, seed=cfg.seed, mesh=self.mesh, rules=shd.TRAIN_RULES)
        model = from_pretrained(self.model_path, dtype=cfg.model.param_dtype, compute_dtype=dtype, mesh=self.mesh,
                                remat=cfg.model.remat, rules=shd.TRAIN_RULES)
        return load_tokenizer(self.model_path), model

    def _build_data(self):
        cfg = self.cfg
        self.train_rows, report = components.training_rows(cfg, self.tokenizer)
        self.eval_data, notes = components.eval_sets(cfg, self.tokenizer, self.train_rows)
        self.data_notes = [report.summary(), *notes]
        self.stream = PromptStream(self.train_rows, seed=cfg.seed, process_index=jax.process_index(),
                                   process_count=jax.process_count())

    def _build_learner(self):
        cfg = self.cfg
        self.optimizer = components.make_run_optimizer(cfg)
        abstract_opt = jax.eval_shape(self.optimizer.init, self.params)
        opt_shardings = _opt_shardings(abstract_opt, self.param_shardings, self.mesh)
        self.opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(self.params)
        hparams = cfg.loss.hparams()
        self.use_ref = components.uses_reference(cfg)
        self.ref_params = jax.tree.map(jnp.copy, self.params) if self.use_ref else None
        kw = dict(temperature=cfg.rollout.temperature, chunk_tokens=cfg.model.logprob_chunk_tokens)
        self.update = make_update_step(self.graphdef, self.optimizer, get_loss(cfg.loss.name), hparams,
                                       group_size=cfg.rollout.group_size, use_ref=self.use_ref,
                                       shardings=(self.param_shardings, opt_shardings), **kw)
        self.score = make_scoring_fn(self.graphdef, **kw)
        self.recompute_old_logp = components.recomputes_old_logp(cfg, self.model_cfg.dtype)

    def _build_rollout(self):
        cfg, r = self.cfg, self.cfg.rollout
        stops = (stop_token_ids(self.model_path, self.tokenizer) if self.model_path else
                 (self.tokenizer.eos_token_id,))
        self.reward_fn, self.verifier, self.pool = components.build_reward_fn(cfg)
        sampling, self.eval_sampling = components.sampling_configs(cfg, stops)
        # Rollouts decode only live rows (continuous batching); evaluation keeps the static sampler.
        self.sampler = Engine(sampling, pad_id=self.tokenizer.pad_token_id, slots=r.slots,
                              compact_every=r.compact_every, mesh=self.mesh, rules=shd.ROLLOUT_RULES)
        self.collector = RolloutCollector(self.sampler, self.tokenizer, self.reward_fn, group_size=r.group_size,
                                          prompts_per_call=r.prompts_per_call, mesh=self.mesh)
        self.eval_sampler = Sampler(self.eval_sampling, pad_id=self.tokenizer.pad_token_id, mesh=self.mesh,
                                    rules=shd.ROLLOUT_RULES)

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self._restore()
        self.writer = MetricsWriter(self.run_dir, enabled=self.main, tensorboard=cfg.logging.tensorboard,
                                    wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                                    run_name=cfg.name, config=to_dict(cfg), progress=cfg.logging.progress,
                                    total_steps=cfg.trainer.steps, start_step=self.step)
        if self.step:
            self.writer.truncate_after(self.step)
            self.writer.message(f"resumed {self.run_dir} at step {self.step}")
        for note in self.data_notes:
            self.writer.message(note)
        self._write_config()
        old_handlers = self._install_signal_handlers()
        try:
            if self.step == 0 and cfg.eval.before and self.eval_data:
                self.eval_before = self._evaluate(0)
            while self.step < cfg.trainer.steps:
                metrics = self._train_step(self.step)
                self.step += 1
                self._log(metrics)
                if cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0 and self.step < cfg.trainer.steps:
                    self._evaluate(self.step)
                if self._stop_agreed():
                    self._save()
                    self.writer.message(f"stop requested: checkpoint at step {self.step} written, exiting")
                    return {"stopped": True, "step": self.step}
                if self.step % cfg.trainer.save_every == 0:
                    self._save()
            return self._finish()
        finally:
            self._restore_signal_handlers(old_handlers)
            self.writer.close()
            self.pool.close()

    def _train_step(self, step: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        rollout_params = self._rollout_view(self.params)
        batch, stats = self.collector.collect(self.graphdef, rollout_params,
                                              lambda: self.stream.next_batch(cfg.rollout.prompts_per_step), key,
                                              dynamic=cfg.rollout.dynamic_sampling,
                                              max_rounds=cfg.rollout.max_sampling_rounds)
        del rollout_params  # the learner's programs run without the rollout view beside them
        t1 = time.perf_counter()
        arrays = self._arrays(batch)
        metrics = {**stats, **self._old_and_ref_logp(arrays, step)}
        t2 = time.perf_counter()
        metrics.update(self._updates(arrays))
        t3 = time.perf_counter()
        metrics.update(_rollout_metrics(batch, cfg.rollout.group_size))
        tokens = float(batch.prompt_mask.sum() + batch.resp_mask.sum())
        metrics["throughput/tokens_per_s"] = tokens / max(t3 - t0, 1e-9)
        metrics.update(_memory_metrics())
        metrics.update({"time/rollout": self.collector.timings.get("rollout", 0.0),
                        "time/verifier": self.collector.timings.get("verifier", 0.0),
                        "time/scoring": t2 - t1, "time/update": t3 - t2, "time/step": t3 - t0,
                        "time/host": (t1 - t0) - sum(self.collector.timings.values())})
        return metrics

    def _arrays(self, batch: Rollouts) -> dict[str, np.ndarray]:
        loss_mask = batch.resp_mask * batch.finished[:, None] if self.cfg.rollout.overlong_filter else batch.resp_mask
        return {"prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask, "tokens": batch.tokens,
                "resp_mask": batch.resp_mask, "loss_mask": loss_mask.astype(np.float32),
                "old_logp": batch.old_logp, "rewards": batch.rewards}

    def _chunked(self, arrays: dict, chunks: int) -> dict:
        """[rows, ...] -> [chunks, rows / chunks, ...] on the mesh (rows of a chunk are whole groups)."""
        split = {k: v.reshape(chunks, -1, *v.shape[1:]) for k, v in arrays.items()}
        return shd.put_batch(split, self.mesh, shd.TRAIN_RULES, axis=1)

    def _old_and_ref_logp(self, arrays: dict, step: int) -> dict:
        """Recompute old log-probs when configured (or, to measure the mismatch, now and then); reference
        log-probs for GRPO's KL term."""
        cfg, metrics = self.cfg, {}
        chunks = components.scoring_chunks(cfg)
        check = cfg.trainer.logp_check_every and step % cfg.trainer.logp_check_every == 0
        if self.recompute_old_logp or check:
            logp, _ = self.score(self.params, self._chunked(arrays, chunks))
            logp = shd.to_host(logp).reshape(arrays["old_logp"].shape)
            diff = np.abs(logp - arrays["old_logp"]) * arrays["resp_mask"]
            metrics["logp_mismatch/max"] = float(diff.max())
            metrics["logp_mismatch/mean"] = float(diff.sum() / max(arrays["resp_mask"].sum(), 1.0))
            if self.recompute_old_logp:
                arrays["old_logp"] = (logp * arrays["resp_mask"]).astype(np.float32)
        if self.use_ref:
            ref, _ = self.score(self.ref_params, self._chunked(arrays, chunks))
            arrays["ref_logp"] = shd.to_host(ref).reshape(arrays["old_logp"].shape)
        return metrics

    def _updates(self, arrays: dict) -> dict:
        o = self.cfg.optim
        per_update = arrays["rewards"].shape[0] // o.mini_batches
        collected = []
        for k in range(o.mini_batches):
            mini = {name: v[k * per_update:(k + 1) * per_update] for name, v in arrays.items()}
            self.params, self.opt_state, m = self.update(self.params, self.opt_state, self._chunked(mini, o.micro_batches))
            collected.append(jax.device_get(m))
            skipped = bool(collected[-1]["skipped"])
            self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
            self.skipped_total += int(skipped)
            if self.consecutive_skips >= o.max_bad_steps:
                raise TrainingDiverged(f"{self.consecutive_skips} updates in a row had a non-finite loss or gradient "
                                       f"(loss={collected[-1]['loss']}); parameters were left unchanged; aborting")
        out = {k: float(np.mean([c[k] for c in collected])) for k in collected[0]}
        out["skipped"] = float(sum(c["skipped"] for c in collected))
        out["kl"] = out.get("kl_old_k3", 0.0)
        return out

    # -- evaluation, logging, checkpoints --------------------------------------------------------------
    def _evaluate(self, step: int) -> dict:
        from realjax.evaluate import evaluate

        t0 = time.perf_counter()
        model = nnx.merge(self.graphdef, self._rollout_view(self.params))
        e = self.cfg.eval
        per_call = components.eval_prompts_per_call(self.cfg)
        # The same seed at every evaluation: the curve compares policies on the same random draws.
        result = evaluate(model, self.tokenizer, self.eval_data, sampling=self.eval_sampler, n=e.n,
                          seed=self.cfg.seed + 1, prompts_per_batch=per_call, verifier=self.verifier)
        metrics = {f"eval/{name}/pass@1": r["pass@1"] for name, r in result["datasets"].items()}
        metrics["eval/pass@1"] = result["average"]["pass@1"]
        metrics["time/eval"] = time.perf_counter() - t0
        if self.main:
            self.writer.log(step, metrics)
            self.writer.message(f"step {step}: held-out pass@1 " + ", ".join(
                f"{name} {r['pass@1']:.3f}" for name, r in result["datasets"].items()))
        self.last_eval = metrics
        return metrics

    def _log(self, metrics: dict) -> None:
        metrics["skipped_total"] = float(self.skipped_total)
        if self.step % self.cfg.trainer.log_every == 0 or self.step == self.cfg.trainer.steps:
            self.writer.log(self.step, metrics)
        self.writer.progress(self.step, {"reward": metrics["reward/mean"], "loss": metrics["loss"],
                                         "pass@1": getattr(self, "last_eval", {}).get("eval/pass@1", float("nan"))})

    def _meta(self) -> dict:
        return {"step": self.step, "data": self.stream.state_dict(), "consecutive_skips": self.consecutive_skips,
                "skipped_total": self.skipped_total, "eval_before": self.eval_before, "seed": self.cfg.seed}

    def _save(self) -> None:
        self.checkpointer.save(self.step, self.params, self.opt_state, self._meta())

    def _restore(self) -> None:
        step = self.checkpointer.latest_step()
        if step is None:
            return
        self.params, self.opt_state, meta = self.checkpointer.restore(step, self.params, self.opt_state)
        self.step, self.consecutive_skips = meta["step"], meta["consecutive_skips"]
        self.skipped_total, self.eval_before = meta["skipped_total"], meta.get("eval_before", {})
        self.stream.load_state_dict(meta["data"])

    def _write_config(self) -> None:
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    def _finish(self) -> dict:
        cfg = self.cfg
        if self.checkpointer.latest_step() != self.step:
            self._save()
        after = self._evaluate(self.step) if self.eval_data else {}
        export = None
        if cfg.trainer.export:
            export = save_pretrained(nnx.merge(self.graphdef, self.params), self.run_dir / "export",
                                     tokenizer_from=self.model_path)
        plots = None
        if self.main:
            from realjax.plots import plot_run

            plots = plot_run(self.run_dir)
        summary = {"run_dir": str(self.run_dir), "steps": self.step, "export": str(export) if export else None,
                   "plots": str(plots) if plots else None, "wall_time_s": time.perf_counter() - self.t_start,
                   "pass@1_before": self.eval_before.get("eval/pass@1"), "pass@1_after": after.get("eval/pass@1"),
                   "skipped_updates": self.skipped_total}
        return summary

    # -- preemption ------------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        def request_stop(signum, frame):
            if self._stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self._stop_requested = True

        return {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signal_handlers(old) -> None:
        for s, handler in old.items():
            signal.signal(s, handler)

    def _stop_agreed(self) -> bool:
        """True on every process when any process was asked to stop (they must checkpoint together)."""
        flags = shd.allgather_host(np.array([self._stop_requested]))
        return bool(flags.any())


def _opt_shardings(abstract_opt, param_shardings, mesh):
    """Optimizer state laid out like the parameters it mirrors (Adam's mu and nu); scalars replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    param_struct = jax.tree.structure(param_shardings)

    def mirrors_params(node) -> bool:
        return jax.tree.structure(node) == param_struct

    return jax.tree.map(lambda node: param_shardings if mirrors_params(node) else replicated, abstract_opt,
                        is_leaf=mirrors_params)


def _memory_metrics() -> dict:
    """Peak device memory (GiB) where the backend reports it (GPU, TPU; not CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"memory/peak_gib": peak / 2**30} if peak else {}


def _rollout_metrics(batch: Rollouts, group_size: int) -> dict:
    r = batch.rewards.reshape(-1, group_size)
    lengths = batch.resp_mask.sum(-1)
    return {"reward/mean": float(batch.rewards.mean()), "reward/std": float(batch.rewards.std()),
            "solve_all": float(np.mean(r.min(-1) == 1.0)), "solve_none": float(np.mean(r.max(-1) == 0.0)),
            "response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
            "truncated": float(1.0 - batch.finished.mean())}


def train(cfg: Config) -> dict:
    return Trainer(cfg).run()


def _rollout_view_fn(model_cfg, rollout_shardings):
    """The weights as rollouts read them: laid out by the rollout rules and stored in the compute dtype.

    The model casts every weight to ``model.dtype`` before using it, so casting once here gives the same
    numbers (the sampler's logprobs stay the trainer's own) while each decode step reads half the bytes of
    fp32 master weights, and the rollout copy takes half the memory.
    """
    dt = jnp.dtype(model_cfg.dtype)

    def view(params):
        return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)

    return jax.jit(view, out_shardings=rollout_shardings)
