"""``realjax bench sampler|update|rl-step|rollout|gpu``: the benchmarks of ``realjax.tools.bench``, each with
its baseline measured in the same run; a table, or one JSON line with ``--json`` (all else goes to stderr)."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import jax

from realjax.tools.bench.common import machine, preset_config
from realjax.tools.bench.gpu import bench_gpu
from realjax.tools.bench.packing import bench_packed_update
from realjax.tools.bench.rl_step import bench_rl_step
from realjax.tools.bench.rollout import bench_rollout
from realjax.tools.bench.sampler import bench_sampler
from realjax.tools.bench.update import bench_update


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def report(title: str, result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"bench": title, **result}, default=float), flush=True)
        return
    width = max(map(len, result))
    print(f"realjax bench {title}")
    for k, v in result.items():
        print(f"  {k:<{width}}  {_fmt(v)}")
    sys.stdout.flush()



def run(args) -> int:
    if args.bench == "gpu" and jax.default_backend() != "gpu" and not args.allow_cpu:
        print(f"realjax bench gpu: needs a GPU (the JAX backend here is {jax.default_backend()!r}); "
              "run it on a GPU machine", file=sys.stderr)
        return 2
    info = machine()
    with contextlib.redirect_stdout(sys.stderr):  # only the report goes to stdout
        if args.bench == "sampler":
            res = bench_sampler(preset_config(args.preset, layers=args.layers), batch=args.batch, prompt=args.prompt,
                                new=args.new, repeats=args.repeats, baseline=not args.no_baseline,
                                bandwidth_mb=args.bandwidth_mb)
        elif args.bench == "update" and args.lengths:
            res = bench_packed_update(preset_config(args.preset, layers=args.layers), rows=args.rows,
                                      prompt=args.prompt, response=args.response, group_size=args.group_size,
                                      lengths=args.lengths, repeats=args.repeats,
                                      tokens_per_micro_batch=args.tokens_per_micro_batch)
        elif args.bench == "update":
            res = bench_update(preset_config(args.preset, layers=args.layers), rows=args.rows, prompt=args.prompt,
                               response=args.response, group_size=args.group_size, repeats=args.repeats,
                               baseline=not args.no_baseline)
        elif args.bench == "rollout":
            res = bench_rollout(preset_config(args.preset, layers=args.layers), rows=args.rows,
                                group_size=args.group_size, prompt=args.prompt, new=args.new, lengths=args.lengths,
                                slots=args.slots, compact_every=args.compact_every,
                                window_tokens=args.window_tokens, temperature=args.temperature,
                                top_p=args.top_p, repeats=args.repeats, vllm_python=args.vllm_python)
        elif args.bench == "rl-step":
            res = bench_rl_step(args.config, steps=args.steps, overrides=args.overrides)
        else:
            res = bench_gpu(preset_config(args.preset, layers=args.layers), prompt=args.prompt, new=args.new,
                            tokens=args.tokens, seq=args.seq, copy_mb=args.copy_mb, matmul_n=args.matmul_n,
                            repeats=args.repeats, remat=args.remat)
    report(args.bench, {**res, **info, "load_avg_1m_end": round(os.getloadavg()[0], 2)}, args.json)
    return 0
