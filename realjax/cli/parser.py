"""Every argument of every ``realjax`` sub-command, in one place. Only argparse here: the commands' modules
(``realjax.cli.<command>``) are imported when their command runs, so ``realjax --help`` answers without
initialising JAX."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path


def _lazy(module: str, name: str = "run"):
    """``realjax.cli.<module>.<name>(args)``, imported only when the command runs."""
    def run(args):
        return getattr(importlib.import_module(f"realjax.cli.{module}"), name)(args)

    return run


def _add_plot(sub):
    p = sub.add_parser("plot", help="figures: `gradient-weights` (paper Fig. 1) or a run dir (Fig. 4 dynamics)")
    p.add_argument("what", help="'gradient-weights', or a run directory holding metrics.jsonl")
    p.add_argument("--out", help="output PNG (gradient-weights) or output directory (run dynamics)")
    p.set_defaults(func=_lazy("plot"))


def _add_sample(sub):
    p = sub.add_parser("sample", help="completions from a local HF model dir, as JSONL")
    p.add_argument("--model", required=True, help="local HF model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (a user turn)")
    src.add_argument("--prompts", help='JSONL file of {"prompt": text} or {"messages": [...]} objects')
    p.add_argument("--no-chat-template", action="store_true", help="feed raw text, not the chat template")
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-prompts", type=int, default=8, help="prompts per sampler call")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU/TPU), float32, bfloat16")
    p.add_argument("--output", help="write JSONL here (prompt, completion, token_ids, logprobs)")
    p.set_defaults(func=_lazy("sample"))


def _add_eval(sub):
    p = sub.add_parser("eval", help="Pass@1 (mean over n samples), Pass@k and maj@k per dataset: a table and JSON")
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--data", required=True, help="comma-separated data specs, e.g. aime.parquet,math.parquet")
    p.add_argument("--n", type=int, default=16, help="samples per problem (paper: 16)")
    p.add_argument("--temperature", type=float, default=0.6, help="paper: 0.6")
    p.add_argument("--top-p", type=float, default=0.95, help="paper: 0.95")
    p.add_argument("--top-k", type=int, default=0, help="0 = off (paper)")
    p.add_argument("--max-new-tokens", type=int, default=8192, help="response budget (paper: 8192)")
    p.add_argument("--max-prompt-tokens", type=int, default=1536,
                   help="longer prompts are dropped and counted (verl generation default: 1536)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", help="comma-separated Pass@k budgets, each <= n (default: 1,n); each k > 1 adds maj@k")
    p.add_argument("--limit", type=int, default=0, help="first N problems of each dataset (0 = all)")
    p.add_argument("--batch-prompts", type=int, default=8, help="prompts per sampler call")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU/TPU), float32, bfloat16")
    p.add_argument("--require-think", action="store_true",
                   help="score 0 without </think> (the official verifier's switch)")
    p.add_argument("--no-chat-template", action="store_true", help="feed raw text, not the chat template")
    p.add_argument("--output", help="write the results (metrics, per-problem counts, settings) as JSON here")
    p.set_defaults(func=_lazy("evaluate"))


def _add_train(sub):
    p = sub.add_parser("train", help="RL training; with no --config, the embedded demo")
    p.add_argument("--config", help="YAML experiment file (default: the demo, configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. optim.lr=1e-6")
    p.set_defaults(func=_lazy("train"))


def _add_export(sub):
    p = sub.add_parser("export", help="a run's checkpoint -> an HF safetensors directory")
    p.add_argument("--run", required=True, help="run directory (holds config.yaml and checkpoints/)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", help="saved dtype (default: the parameter dtype), e.g. bfloat16")
    p.add_argument("--peft", metavar="DIR", help="LoRA runs: also write the adapters alone in the PEFT layout")
    p.set_defaults(func=_lazy("export"))


def _add_compile(sub):
    p = sub.add_parser("compile", help="AOT-compile the RL step for a TPU topology on this host: per-chip memory, "
                                       "FLOPs, fits or not (exit 0 fits, 1 does not, 2 error)")
    p.add_argument("--config", help="YAML experiment file (default: the demo)")
    p.add_argument("--topology", required=True, help="TPU slice, e.g. v5p-8, v5p-32, v4-8, v5e-16, v6e-8")
    p.add_argument("--lengths", default="r1-distill", help="also price the rollout on the engine under these "
                                                           "response lengths: r1-distill | all-max | uniform")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    p.add_argument("--jobs", type=int, default=2, help="programs compiled side by side (threads; default 2: "
                                                       "each takes a core and a few GiB of host memory)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, as for train")
    p.set_defaults(func=_lazy("compile"))


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks with baselines measured in the same run (sampler, update, "
                                     "rl-step, rollout, gpu)")
    which = p.add_subparsers(dest="bench", metavar="BENCH", required=True)

    def model_args(q, preset, layers, repeats):
        q.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
        q.add_argument("--preset", default=preset, help="model preset (realjax.models.PRESETS) or 'tiny'")
        q.add_argument("--layers", type=int, default=layers, help="blocks of the preset (0 = all)")
        q.add_argument("--repeats", type=int, default=repeats, help="timed calls after one warm-up call")

    q = which.add_parser("sampler", help="Sampler vs transformers generate vs the memory-bandwidth bound")
    model_args(q, "qwen2.5-0.5b", 4, 3)
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--prompt", type=int, default=64)
    q.add_argument("--new", type=int, default=128, help="new tokens per row (greedy, no stop ids)")
    q.add_argument("--bandwidth-mb", type=float, default=512, help="fp32 matrix that measures the bandwidth")
    q.add_argument("--no-baseline", action="store_true", help="skip transformers (no torch needed)")
    q = which.add_parser("update", help="one REAL update (forward, backward, AdamW) vs the same step in torch")
    model_args(q, "qwen2.5-0.5b", 4, 3)
    q.add_argument("--rows", type=int, default=8)
    q.add_argument("--prompt", type=int, default=128)
    q.add_argument("--response", type=int, default=128)
    q.add_argument("--group-size", type=int, default=4)
    q.add_argument("--no-baseline", action="store_true", help="skip torch")
    q.add_argument("--lengths", help="r1-distill | all-max | uniform: rows of these response lengths, packed vs "
                                     "padded (realjax.tools.bench.packing) instead of full rows vs torch")
    q.add_argument("--tokens-per-micro-batch", type=int, default=0, help="with --lengths: the packing budget "
                                                                         "(0 = the batch's real tokens)")
    q = which.add_parser("rl-step", help="whole RL steps of a config: rollout/verifier/scoring/update/host split")
    q.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    q.add_argument("--config", help="YAML experiment file (default: the demo)")
    q.add_argument("--steps", type=int, default=3, help="RL steps; the first (compiles) is left out")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, as for train")
    q = which.add_parser("rollout", help="static sampler vs the continuous-batching engine on oracle lengths")
    model_args(q, "qwen2.5-0.5b", 2, 1)
    q.add_argument("--lengths", default="r1-distill", help="r1-distill | all-max | uniform (the length oracle)")
    q.add_argument("--rows", type=int, default=64, help="rollouts per call (prompts x group size)")
    q.add_argument("--group-size", type=int, default=8)
    q.add_argument("--prompt", type=int, default=64)
    q.add_argument("--new", type=int, default=256, help="the budget N; oracle lengths fall in [1, N]")
    q.add_argument("--slots", type=int, default=0, help="engine decode slots (0 = rows; fewer exercises refill)")
    q.add_argument("--compact-every", type=int, default=16, help="engine decode steps between compactions")
    q.add_argument("--window-tokens", type=int, default=32, help="attention window growth (both samplers)")
    q.add_argument("--temperature", type=float, default=0.6)
    q.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (evaluation: 0.95; vLLM gets it too)")
    q.add_argument("--vllm-python", metavar="PATH", help="also run vLLM (the interpreter of its venv) on the same "
                                                         "weights, prompts and lengths")
    q = which.add_parser("gpu", help="GPU: copy bandwidth, bf16 matmul, batch-1 decode roofline, learner MFU")
    model_args(q, "deepseek-r1-distill-qwen-1.5b", 0, 5)
    q.add_argument("--prompt", type=int, default=128)
    q.add_argument("--new", type=int, default=256, help="tokens decoded at batch 1")
    q.add_argument("--tokens", type=int, default=8192, help="learner tokens per update")
    q.add_argument("--seq", type=int, default=1024, help="learner tokens per row (prompt + response)")
    q.add_argument("--copy-mb", type=float, default=4096, help="buffer of the copy-bandwidth test")
    q.add_argument("--matmul-n", type=int, default=8192, help="size of the square bf16 matmul")
    q.add_argument("--remat", default="full", help="learner remat policy (full, none, ...; the MFU counts no recompute)")
    q.add_argument("--allow-cpu", action="store_true", help="run on a non-GPU backend anyway (tests)")
    p.set_defaults(func=_lazy("bench"))


def _add_study(sub):
    p = sub.add_parser("study", help="CPU mini-replication of Table 1: objectives x seeds on the demo task, "
                                     "held-out pass@1 with 95%% CIs and seed-band curves")
    p.add_argument("--config", help="YAML experiment file (default: the demo) under the study budget")
    p.add_argument("--losses", default="real,real_bce,real_product,grpo,dapo,gspo,dr_grpo",
                   help="comma-separated objectives (realjax.losses.LOSSES)")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per objective")
    p.add_argument("--out", default="study", help="study directory (rerun to resume; finished runs are skipped)")
    p.add_argument("--base-n", type=int, default=16, help="samples per problem for the base policy's spread")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, as for train")
    p.set_defaults(func=_lazy("study"))


def _add_build_demo(sub):
    p = sub.add_parser("build-demo", help="rebuild the embedded demo model (realjax/assets/demo) reproducibly")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "demo"))
    p.add_argument("--steps", type=int, default=500, help="warm-start steps (fewer: a weaker starting policy)")
    p.set_defaults(func=_lazy("build_demo"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realjax", description="RL from verifiable rewards in JAX, built around REAL.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


_COMMANDS = [_add_train, _add_eval, _add_sample, _add_export, _add_plot, _add_compile, _add_bench, _add_study,
             _add_build_demo]


