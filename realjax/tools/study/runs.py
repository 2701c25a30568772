"""``realjax study``: a CPU mini-replication of the paper's Table 1 -- every objective x several seeds on
one verifiable task, held-out pass@1 with 95% confidence intervals, and Fig. 4's dynamics in miniature.

    realjax study                                   # 7 objectives x 5 seeds on the demo task -> study/

Each run is one ``Trainer`` on the demo config (model ``realjax/assets/demo``, synthetic arithmetic) with
the study budget below, ``name=<loss>_s<seed>`` and ``seed=<seed>``: the seed fixes the prompt order, the
rollout keys and the evaluation samples' keys, so every objective sees the same prompts in the same
order for a given seed and the objectives can be compared seed by seed (paired). Every objective gets
the paper's own hyperparameters (PAPER.md 3.2) and one shared learning rate, schedule and budget.

How this departs from the paper (all deliberate, all stated in ``summary.md``):

* Scale: a 0.8M-parameter model, 30 RL steps of 8 prompts x 8 rollouts, 2 updates per rollout batch,
  lr 1e-4 constant, responses up to 48 tokens, rollout temperature 1.0 (the paper: a 1.5B model, ~1400
  steps of 128 x 8, 4 updates, lr 2e-6, 8192 tokens, temperature 0.6). Clip ranges, tau, and GRPO's KL
  coefficient are the paper's, unscaled.
* DAPO is clip-higher + token-mean only, without dynamic sampling or overlong filtering, as the paper
  ran it; the paper's DAPO and GRPO numbers are its own runs, ours are the same recipes at toy scale.
* Evaluation: held-out problems of the same task, n=4 samples at T=0.6, top-p 0.95 (the paper's
  protocol with fewer samples), instead of six math benchmarks.

The study directory holds ``runs/<loss>_s<seed>/`` (the trainers' run dirs, each with ``train.log``),
``base.json`` (the base policy's per-problem pass rates), ``invocations.jsonl`` (wall / CPU time and load
of each invocation that trained), ``summary.md`` and the figures, and ``.jax_cache`` (JAX's persistent
compilation cache: the 35 runs compile the same programs, so all but the first of each kind load them).
Rerunning the same command skips finished runs and resumes an interrupted one from its last checkpoint
(the trainer's exact resume); a run directory left by a different config is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import time
from pathlib import Path

import jax
import yaml

from realjax.config import load_config, to_dict
from realjax.evaluate import evaluate
from realjax.losses import LOSSES, get_terms, hparam_types, hparams_of
from realjax.models import from_pretrained, load_tokenizer, stop_token_ids
from realjax.models.config import resolve_dtype
from realjax.rl import Trainer, TrainingDiverged, setup
from realjax.sampling import SamplingConfig
from realjax.tools.study.design import DONE_FILE, OWNED_KEYS, PAPER_HPARAMS, STUDY_OVERRIDES


class StudyError(ValueError):
    """A study that cannot run as asked: an unknown objective, an override the study owns, a run directory
    left by another config."""


@dataclasses.dataclass(frozen=True)
class Run:
    loss: str
    seed: int
    cfg: object  # realjax.config.Config

    @property
    def name(self) -> str:
        return f"{self.loss}_s{self.seed}"


def _split_overrides(overrides) -> tuple[list[str], dict[str, str]]:
    """(general overrides, loss.* overrides by key); refuses the keys the study owns."""
    general, loss_kw = [], {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in OWNED_KEYS:
            raise StudyError(f"{key} is set by the study per run (use --losses / --seeds / --out)")
        if key.startswith("loss."):
            loss_kw[key.removeprefix("loss.")] = item.split("=", 1)[1] if "=" in item else ""
        else:
            general.append(item)
    return general, loss_kw


def plan(config_path, overrides, losses, seeds: int, out: Path) -> list[Run]:
    """The runs, seed-major (an interrupted study then holds whole seeds, which pair), each a validated
    Config. A ``loss.<key>=v`` override applies to every objective that takes ``key``."""
    general, loss_kw = _split_overrides(overrides)
    if not losses:
        raise StudyError(f"--losses: no objective given; choose from {sorted(LOSSES)}")
    for name in losses:
        try:
            get_terms(name)
        except ValueError as e:
            raise StudyError(f"--losses: {e}") from None
    if seeds < 1:
        raise StudyError(f"--seeds must be >= 1, got {seeds}")
    for key in loss_kw:
        if not any(key in hparams_of(n) for n in losses):
            raise StudyError(f"loss.{key} is a hyperparameter of none of {', '.join(losses)}")
    reset = [f"loss.{key}=null" for key in hparam_types()]
    runs = []
    for seed in range(seeds):
        for loss in losses:
            params = hparams_of(loss)
            hp = {**PAPER_HPARAMS.get(loss, {}), **{k: v for k, v in loss_kw.items() if k in params}}
            per_run = [*reset, f"loss.name={loss}", *(f"loss.{k}={v}" for k, v in hp.items()),
                       f"name={loss}_s{seed}", f"seed={seed}", f"output_dir={out / 'runs'}"]
            cfg = load_config(config_path, [*STUDY_OVERRIDES, *general, *per_run])
            runs.append(Run(loss, seed, cfg))
    return runs


# ----------------------------------------------------------------------------------------------------
# Running (resumable)
# ----------------------------------------------------------------------------------------------------
def _config_diff(run_dir: Path, cfg) -> list[str]:
    """Dotted keys where the run's saved config.yaml differs from ``cfg`` (output_dir aside)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return []
    saved = yaml.safe_load(saved_path.read_text())
    now = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved), flat(now)
    return sorted(k for k in a.keys() | b.keys() if k != "output_dir" and a.get(k) != b.get(k))


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)  # atomic: a killed study never leaves half a marker


def run_one(run: Run) -> dict:
    """Train one run (resuming from its checkpoint if any); its stdout goes to ``train.log``.

    Returns the marker written to ``<run>/study_run.json``: status finished / diverged / stopped.
    """
    run_dir = run.cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log):
        trainer = Trainer(run.cfg)
        try:
            summary = trainer.run()
            status = "stopped" if summary.get("stopped") else "finished"
            marker = {"status": status, "summary": summary}
        except TrainingDiverged as e:
            marker = {"status": "diverged", "error": str(e), "step": trainer.step}
        del trainer
    marker["wall_time_s"] = time.perf_counter() - t0
    marker["load_1min"] = os.getloadavg()[0]  # the machine may be shared: the report says how busy it was
    if marker["status"] != "stopped":
        _write_json(run_dir / DONE_FILE, marker)
    return marker


def pending(runs: list[Run]) -> list[Run]:
    """The runs without a done marker; refuses a run directory left by another config (its checkpoint
    would be resumed under the new one)."""
    for run in runs:
        diff = _config_diff(run.cfg.run_dir, run.cfg)
        if diff:
            raise StudyError(f"{run.cfg.run_dir} was made with another config (differs in {', '.join(diff[:5])}); "
                           "use another --out or delete that run")
    return [run for run in runs if not (run.cfg.run_dir / DONE_FILE).exists()]


def run_all(runs: list[Run], *, log=print) -> tuple[bool, list[dict]]:
    """Every run not yet done, with one progress line each. Returns (all done, the markers of the runs
    trained now); not all done when interrupted (Ctrl-C / SIGTERM)."""
    todo = pending(runs)
    done_before = len(runs) - len(todo)
    if done_before:
        log(f"study: {done_before} of {len(runs)} runs finished earlier, skipped")
    t_start, markers = time.perf_counter(), []
    for i, run in enumerate(todo):
        marker = run_one(run)
        markers.append(marker)
        gc.collect()
        if marker["status"] == "stopped":
            log(f"study: stopped during {run.name}; rerun the same command to resume")
            return False, markers
        eta = sum(m["wall_time_s"] for m in markers) / len(markers) * (len(todo) - i - 1)
        log(f"[{done_before + i + 1:>3}/{len(runs)}] {run.name:<16} {_run_line(run, marker)}  "
            f"{marker['wall_time_s']:5.0f} s  elapsed {_hms(time.perf_counter() - t_start)}  ETA {_hms(eta)}")
    return True, markers


def _run_line(run: Run, marker: dict) -> str:
    if marker["status"] == "diverged":
        return f"DIVERGED at step {marker['step']}"
    s = marker["summary"]
    before, after = s.get("pass@1_before"), s.get("pass@1_after")
    return f"pass@1 {before:.3f} -> {after:.3f}" if before is not None and after is not None else "finished"


def _hms(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------------------------
# The base policy's spread of per-problem pass rates
# ----------------------------------------------------------------------------------------------------
def base_spread(cfg, n: int, path: Path) -> dict:
    """Per held-out problem, the fraction of ``n`` samples of the base policy that are correct.

    Cached in ``path`` (recomputed when the settings differ). Same sampling settings as the runs' eval.
    """
    e = cfg.eval
    settings = {"model": cfg.model.path, "eval": cfg.data.eval, "train": cfg.data.train, "limit": cfg.data.eval_limit,
                "n": n, "temperature": e.temperature, "top_p": e.top_p, "top_k": e.top_k,
                "max_new_tokens": e.max_new_tokens or cfg.rollout.max_new_tokens}
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("settings") == settings:
            return cached
    t0 = time.perf_counter()
    model_dir = setup.model_path(cfg)
    tokenizer = load_tokenizer(model_dir)
    train_rows, _ = setup.training_rows(cfg, tokenizer)
    sets, _ = setup.eval_sets(cfg, tokenizer, train_rows)
    _, verifier, pool = setup.build_reward_fn(cfg)
    model = from_pretrained(model_dir, dtype=cfg.model.param_dtype, compute_dtype=resolve_dtype(cfg.model.dtype))
    sampling = SamplingConfig(max_new_tokens=settings["max_new_tokens"], temperature=e.temperature, top_p=e.top_p,
                              top_k=e.top_k, stop_ids=stop_token_ids(model_dir, tokenizer))
    try:
        result = evaluate(model, tokenizer, sets, sampling=sampling, n=n, seed=12345,
                          prompts_per_batch=e.prompts_per_call or 8, verifier=verifier)
    finally:
        pool.close()
    problems = [{"dataset": name, "source": row.get("data_source", ""), "correct": c}
                for name, rows in sets.items() for row, c in zip(rows, result["per_problem"][name]["correct"])]
    out = {"settings": settings, "problems": problems, "pass@1": result["average"]["pass@1"],
           "wall_time_s": time.perf_counter() - t0}
    _write_json(path, out)
    return out


# ----------------------------------------------------------------------------------------------------
# `realjax study`
# ----------------------------------------------------------------------------------------------------
def enable_compile_cache(directory: Path) -> None:
    """JAX's persistent compilation cache: every run compiles the same programs, so all but the first
    load them from disk. Kept when the user already configured one."""
    if jax.config.jax_compilation_cache_dir:
        return
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
