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

import functools
import operator
import time

import jax
import numpy as np
import yaml
from flax import nnx

from realjax import sharding as shd
from realjax.checkpoint import Checkpointer, base_identity, check_base
from realjax.config import Config, to_dict
from realjax.data import PromptStream
from realjax.evaluate import evaluate
from realjax.is_correction import is_metrics, is_weights
from realjax.metrics import MetricsWriter
from realjax.models import (abstract_model, from_pretrained, init_model, load_tokenizer, preset, save_pretrained,
                            stop_token_ids)
from realjax.models import lora as lora_lib
from realjax.models.char_tokenizer import char_tokenizer
from realjax.models.config import resolve_dtype
from realjax.plots import plot_run
from realjax.preemption import STOP
from realjax.rl import setup
from realjax.rl.batch import TrainState, UpdateBatch
from realjax.rl.plan import make_plan
from realjax.rl.rollout import RolloutCollector, Rollouts
from realjax.rundir import atomic_write_text
from realjax.sampling import Engine, Sampler


class TrainingDiverged(RuntimeError):
    pass


class Trainer:
    """Everything one run needs, built from a ``Config``; ``run()`` trains and returns a summary."""

    def __init__(self, cfg: Config):
        setup.init_distributed(cfg)
        self.cfg, self.t_start = cfg, time.perf_counter()
        self.main = jax.process_index() == 0
        self.run_dir = cfg.run_dir
        self.mesh = shd.make_mesh(cfg.mesh)
        self.model_path = setup.model_path(cfg)
        self.tokenizer, model = self._load_model()
        self.model_cfg = model.cfg
        self.graphdef, state = nnx.split(model)
        # LoRA: the adapters train (params), the base is frozen; rollouts run the plain model on merged weights.
        params, frozen = lora_lib.split_policy(state, self.model_cfg.lora)
        self.rollout_graphdef = (self.graphdef if self.model_cfg.lora is None else
                                 abstract_model(self.model_cfg.replace(lora=None))[0])
        stops = (stop_token_ids(self.model_path, self.tokenizer) if self.model_path else
                 (self.tokenizer.eos_token_id,))
        # Every learner and sampler decision, made once; mesh-dependent settings fail here, before any step.
        self.plan = make_plan(cfg, self.mesh, compute_dtype=self.model_cfg.dtype, abstract_params=params,
                              stop_ids=stops, abstract_frozen=frozen)
        self._rollout_view = self.plan.rollout_view
        self._build_data()
        self._build_learner(params, frozen)
        self._build_rollout()
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=cfg.trainer.keep_checkpoints)
        self.step, self.consecutive_skips, self.skipped_total, self.eval_before = 0, 0, 0, {}
        # What the restored checkpoint covers: metrics rows (0 = none: a fresh start keeps no rows) and the
        # wall time of the invocations before this one; notes say which damaged checkpoints were skipped.
        self.start_step, self.resume_rows, self.elapsed_before, self.restore_notes = 0, 0, 0.0, []

    # -- construction ----------------------------------------------------------------------------------
    def _load_model(self):
        cfg, dtype = self.cfg, resolve_dtype(self.cfg.model.dtype)
        if self.model_path is None:  # random weights of a preset, with the character tokenizer (device checks)
            arch = preset(cfg.model.preset, param_dtype=cfg.model.param_dtype, dtype=dtype, remat=cfg.model.remat,
                          scan_layers=cfg.model.scan_layers, lora=cfg.model.lora.model_config())
            return char_tokenizer(), init_model(arch, seed=cfg.seed, mesh=self.mesh, rules=shd.TRAIN_RULES)
        model = from_pretrained(self.model_path, dtype=cfg.model.param_dtype, compute_dtype=dtype, mesh=self.mesh,
                                remat=cfg.model.remat, scan_layers=cfg.model.scan_layers, rules=shd.TRAIN_RULES,
                                lora=cfg.model.lora.model_config(), seed=cfg.seed)
        return load_tokenizer(self.model_path), model

    def _build_data(self):
        cfg = self.cfg
        self.train_rows, report = setup.training_rows(cfg, self.tokenizer)
        self.eval_data, notes = setup.eval_sets(cfg, self.tokenizer, self.train_rows)
        self.data_notes = [report.summary(), *notes]
        self.data_notes += [f"loss.{k} is not a hyperparameter of {cfg.loss.name}: ignored" for k in cfg.loss.ignored()]
        self.stream = PromptStream(self.train_rows, seed=cfg.seed, process_index=jax.process_index(),
                                   process_count=jax.process_count())

    def _build_learner(self, params, frozen):
        self.state: TrainState = self.plan.init_state(params, frozen)
        self.update = self.plan.update_step(self.graphdef)
        self.score = self.plan.scoring_fn(self.graphdef)
        # GRPO's KL reference under LoRA: the frozen base alone, scored as the plain model (no copy kept).
        self.score_base = self.plan.scoring_fn(self.rollout_graphdef) if self.plan.ref_is_base else None
        self.base = base_identity(self.model_path, self.model_cfg, self.cfg) if self.plan.lora else None

    # The checkpoint holds the trained weights (LoRA: the adapters) and the optimizer state; the reference
    # weights are the initial ones (LoRA: the base, identified in the checkpoint's record).
    params = property(lambda self: self.state.params,
                      lambda self, value: setattr(self, "state", self.state.replace(params=value)))
    opt_state = property(lambda self: self.state.opt_state,
                         lambda self, value: setattr(self, "state", self.state.replace(opt_state=value)))

    def _build_rollout(self):
        cfg, r = self.cfg, self.cfg.rollout
        self.reward_fn, self.verifier, self.pool = setup.build_reward_fn(cfg)
        self.eval_sampling = self.plan.eval_sampling
        # Rollouts decode only live rows (continuous batching); evaluation keeps the static sampler.
        self.sampler = Engine(self.plan.sampling, pad_id=self.tokenizer.pad_token_id, slots=r.slots,
                              compact_every=r.compact_every, mesh=self.mesh, rules=shd.ROLLOUT_RULES)
        self.collector = RolloutCollector(self.sampler, self.tokenizer, self.reward_fn, group_size=r.group_size,
                                          prompts_per_call=r.prompts_per_call, mesh=self.mesh)
        self.eval_sampler = Sampler(self.eval_sampling, pad_id=self.tokenizer.pad_token_id, mesh=self.mesh,
                                    rules=shd.ROLLOUT_RULES)

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.writer = None
        with STOP:  # SIGTERM from here on (the CLI installs it earlier still) is a stop request
            try:
                return self._run()
            finally:
                if self.writer is not None:
                    self.writer.close()
                self.pool.close()

    def _run(self) -> dict:
        cfg = self.cfg
        self._restore()
        self.start_step = self.step
        self.writer = MetricsWriter(self.run_dir, enabled=self.main, tensorboard=cfg.logging.tensorboard,
                                    wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                                    run_name=cfg.name, config=to_dict(cfg), progress=cfg.logging.progress,
                                    total_steps=cfg.trainer.steps, start_step=self.step, keep_rows=self.resume_rows)
        for note in self.restore_notes:
            self.writer.message(note)
        if self.step:
            self.writer.message(f"resumed {self.run_dir} at step {self.step}")
        for note in self.data_notes:
            self.writer.message(note)
        self._write_config()
        if self._stop_agreed():  # asked to stop while starting: nothing new to save
            self.writer.message(f"stop requested during start-up: nothing new to save (step {self.step}), exiting")
            return {"stopped": True, "step": self.step}
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

    def _train_step(self, step: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        rollout_params = self._rollout_view(self.params, self.state.frozen)
        batch, stats = self.collector.collect(self.rollout_graphdef, rollout_params,
                                              lambda: self.stream.next_batch(cfg.rollout.prompts_per_step), key,
                                              dynamic=cfg.rollout.dynamic_sampling,
                                              max_rounds=cfg.rollout.max_sampling_rounds)
        del rollout_params  # the learner's programs run without the rollout view beside them
        t1 = time.perf_counter()
        update_batch, scoring = self._old_and_ref_logp(self._update_batch(batch), step)
        metrics = {**stats, **scoring}
        t2 = time.perf_counter()
        metrics.update(self._updates(update_batch))
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

    def _update_batch(self, batch: Rollouts) -> UpdateBatch:
        """The host batch as the learner reads it; the overlong filter drops truncated rows whole."""
        keep = batch.finished if self.cfg.rollout.overlong_filter else np.ones_like(batch.finished)
        return UpdateBatch(prompt_ids_BQ=batch.prompt_ids, prompt_mask_BQ=batch.prompt_mask, tokens_BA=batch.tokens,
                           resp_mask_BA=batch.resp_mask, row_mask_B=keep.astype(np.float32),
                           old_logp_BA=batch.old_logp, rewards_B=batch.rewards)

    def _place(self, batch: UpdateBatch, parts: int, move_groups: bool = False) -> UpdateBatch:
        """[rows, ...] -> [parts, rows / parts, ...] on the mesh (each part is whole groups), packed when
        configured (``move_groups``: see ``RunPlan.pack``)."""
        return shd.put_batch(self.plan.pack(batch.cut(parts), move_groups=move_groups), self.mesh, shd.TRAIN_RULES,
                             axis=1)

    def _old_and_ref_logp(self, batch: UpdateBatch, step: int) -> tuple[UpdateBatch, dict]:
        """Recompute old log-probs when configured (or, to measure the mismatch, now and then); reference
        log-probs for GRPO's KL term."""
        cfg, plan, metrics = self.cfg, self.plan, {}
        check = cfg.trainer.logp_check_every and step % cfg.trainer.logp_check_every == 0
        if not (plan.recompute_old_logp or check or plan.use_ref):
            return batch, metrics
        placed = self._place(batch, plan.scoring_chunks)
        shape, resp_mask = batch.old_logp_BA.shape, batch.resp_mask_BA
        if plan.recompute_old_logp or check:
            logp, _ = self.score(self.state.params, placed, self.state.frozen)
            logp = shd.to_host(logp).reshape(shape)
            diff = np.abs(logp - batch.old_logp_BA) * resp_mask
            metrics["logp_mismatch/max"] = float(diff.max())
            metrics["logp_mismatch/mean"] = float(diff.sum() / max(resp_mask.sum(), 1.0))
            if plan.recompute_old_logp:
                old = (logp * resp_mask).astype(np.float32)
                r = cfg.rollout
                if r.is_correction != "none":  # the sampler's numbers stay, as the behaviour policy
                    batch = batch.replace(sampler_logp_BA=batch.old_logp_BA)
                    metrics.update(is_metrics(is_weights(old, batch.old_logp_BA, resp_mask, mode=r.is_correction,
                                                         cap=r.is_cap, row_mask_B=batch.row_mask_B)))
                batch = batch.replace(old_logp_BA=old)
        if plan.use_ref:
            ref, _ = (self.score_base(self.state.frozen, placed) if plan.ref_is_base else
                      self.score(self.state.ref_params, placed))
            batch = batch.replace(ref_logp_BA=shd.to_host(ref).reshape(shape))
        return batch, metrics

    def _updates(self, batch: UpdateBatch) -> dict:
        """``mini_batches`` optimizer updates, dispatched without waiting; the device is read once, after
        the last. Metrics are exact over the step's rows and tokens (sums added, divided once)."""
        o = self.cfg.optim
        per_update = batch.rows // o.mini_batches
        pending = []
        for k in range(o.mini_batches):
            mini = batch.rows_slice(k * per_update, (k + 1) * per_update)
            # LoRA dropout: masks drawn from (seed, step, update), so a resumed run draws the same ones
            key = (jax.random.fold_in(jax.random.fold_in(jax.random.key(self.cfg.seed + 2), self.step), k)
                   if self.plan.lora is not None and self.plan.lora.dropout > 0 else None)
            self.state, m = self.update(self.state, self._place(mini, o.micro_batches, move_groups=True), key)
            pending.append(m)
        collected = jax.device_get(pending)
        for m in collected:
            skipped = bool(m["skipped"].total)
            self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
            self.skipped_total += int(skipped)
            if self.consecutive_skips >= o.max_bad_steps:
                raise TrainingDiverged(f"{self.consecutive_skips} updates in a row had a non-finite loss or gradient "
                                       f"(loss={m['loss'].value}); parameters were left unchanged; aborting")
        total = {k: functools.reduce(operator.add, (m[k] for m in collected)) for k in collected[0]}
        out = {k: float(v.value) for k, v in total.items()}
        out["skipped"] = float(total["skipped"].total)
        out["kl"] = out.get("kl_old_k3", 0.0)
        return out

    # -- evaluation, logging, checkpoints --------------------------------------------------------------
    def _evaluate(self, step: int) -> dict:
        t0 = time.perf_counter()
        model = nnx.merge(self.rollout_graphdef, self._rollout_view(self.params, self.state.frozen))
        e = self.cfg.eval
        per_call = self.plan.eval_prompts_per_call
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
        elapsed = self.elapsed_before + time.perf_counter() - self.t_start
        meta = {**self._meta(), "metrics_rows": self.writer.rows, "elapsed_s": elapsed}
        if self.base is not None:  # the adapters mean something only on top of this base
            meta["base"] = self.base
        self.checkpointer.save(self.step, self.params, self.opt_state, meta)

    def _restore(self) -> None:
        restored = self.checkpointer.restore_latest(self.params, self.opt_state)
        if restored is None:
            return
        if restored.skipped:
            self.restore_notes = [*restored.skipped, f"resuming from checkpoint step {restored.step} instead "
                                  "(the damaged ones were renamed <step>.damaged)"]
        check_base(restored.meta, self.base, restored.step)
        self.params, self.opt_state, meta = restored.params, restored.opt_state, restored.meta
        self.resume_rows = meta.get("metrics_rows")  # None: a checkpoint from before rows were counted
        self.elapsed_before = meta.get("elapsed_s", 0.0)
        self.step, self.consecutive_skips = meta["step"], meta["consecutive_skips"]
        self.skipped_total, self.eval_before = meta["skipped_total"], meta.get("eval_before", {})
        self.stream.load_state_dict(meta["data"])

    def _write_config(self) -> None:
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    def _finish(self) -> dict:
        cfg = self.cfg
        if self.checkpointer.latest_step() != self.step:
            self._save()
        after = self._evaluate(self.step) if self.eval_data else {}
        export = None
        if cfg.trainer.export:
            # a LoRA policy is written merged (save_pretrained): a plain HF model
            export = save_pretrained(lora_lib.merge_policy(self.graphdef, self.params, self.state.frozen),
                                     self.run_dir / "export",
                                     tokenizer_from=self.model_path)
        plots = None
        if self.main:
            plots = plot_run(self.run_dir)
        wall = time.perf_counter() - self.t_start
        # steps / total_wall_time_s: the whole run; steps_run / wall_time_s: this invocation only.
        summary = {"run_dir": str(self.run_dir), "steps": self.step, "export": str(export) if export else None,
                   "plots": str(plots) if plots else None, "wall_time_s": wall,
                   "steps_run": self.step - self.start_step, "resumed_at": self.start_step,
                   "total_wall_time_s": self.elapsed_before + wall,
                   "pass@1_before": self.eval_before.get("eval/pass@1"), "pass@1_after": after.get("eval/pass@1"),
                   "skipped_updates": self.skipped_total}
        return summary

    # -- preemption ------------------------------------------------------------------------------------
    def _stop_agreed(self) -> bool:
        """True on every process when any process was asked to stop (they must checkpoint together)."""
        flags = shd.allgather_host(np.array([STOP.requested]))
        return bool(flags.any())


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
