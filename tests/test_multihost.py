"""Multi-process JAX on one machine: the demo as 2 processes x 4 CPU devices (gloo collectives) matches
1 process x 8 devices on the first step, and both exit 0; so does a run whose device list puts process 1's
devices first (as a topology-aware order may), since the mesh places each process's rows in process order."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
COMMON = ["trainer.steps=1", "trainer.eval_every=0", "eval.before=false", "data.eval=", "trainer.export=false",
          "logging.progress=false", "logging.tensorboard=false"]
EXACT = ("reward/mean", "reward/std", "response_length/mean", "response_length/max", "truncated", "solve_all",
         "solve_none", "valid_groups")
CLOSE = ("loss", "grad_norm", "entropy", "kl", "score_mean", "kl_old_k1")


def _env(devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _first_step(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return next(r for r in rows if r["step"] == 1 and "loss" in r)


# `realjax train` whose mesh is asked for with the devices in reverse: process 1's first. (Patching
# jax.devices itself would also reorder jax's own process_allgather.)
REVERSED = ("import jax; from realjax import sharding as s; make = s.make_mesh; "
            "s.make_mesh = lambda cfg=None, devices=None: make(cfg, list(devices or jax.devices())[::-1]); "
            "from realjax.cli import main; raise SystemExit(main())")


def _two_processes(tmp_path, name, launcher):
    train = [sys.executable, *launcher, "train", f"output_dir={tmp_path}", f"name={name}", *COMMON]
    port = _free_port()
    return [subprocess.Popen(train + [f"distributed.coordinator=localhost:{port}", "distributed.num_processes=2",
                                      f"distributed.process_id={i}"],
                             env=_env(4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


@pytest.mark.parametrize("variants", [("multi",), pytest.param(("multi", "reversed"), marks=pytest.mark.slow)])
def test_two_processes_match_one(tmp_path, variants):
    """The default run checks the plain launch (3 processes); the slow one adds the reversed device order."""
    launchers = {"multi": ["-m", "realjax"], "reversed": ["-c", REVERSED]}
    runs = {name: _two_processes(tmp_path, name, launchers[name]) for name in variants}
    train = [sys.executable, "-m", "realjax", "train", f"output_dir={tmp_path}", *COMMON]
    single = subprocess.run(train + ["name=single"], env=_env(8), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    one = _first_step(tmp_path / "single")
    for name, procs in runs.items():
        outs = [p.communicate(timeout=900)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out[-3000:]
        assert not (tmp_path / name / "metrics.jsonl").read_text().count("\n") > 1  # only process 0 writes
        multi = _first_step(tmp_path / name)
        for key in EXACT:
            assert multi[key] == one[key], (name, key)
        for key in CLOSE:
            np.testing.assert_allclose(multi[key], one[key], rtol=1e-3, atol=1e-6, err_msg=f"{name} {key}")
