"""A run directory that survives anything: metrics rows exactly once after kills and restarts (jsonl and
TensorBoard), damaged checkpoints fall back to older ones, write failures and broken data are one line,
SIGTERM during start-up exits 0, and a run SIGKILLed at many points ends where an uninterrupted one does."""

import errno
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from realjax.checkpoint import MANIFEST, CheckpointUnreadable, Checkpointer
from realjax.cli import main as cli_main
from realjax.config import demo_config_path
from realjax.metrics import MetricsWriter
from realjax.rundir import WriteFailed, write_failed

REPO = Path(__file__).resolve().parents[1]
TINY = ["rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=16", "optim.mini_batches=2",
        "trainer.steps=3", "trainer.eval_every=0", "eval.n=1", "data.eval_limit=4", "logging.progress=false",
        "mesh.fsdp=4", "mesh.tensor=2"]  # 4 prompts over 4 data-parallel devices of the 8 fake ones
TIMING = ("time/", "throughput/", "memory/")


def read_rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def without_timings(row):
    return {k: v for k, v in row.items() if not k.startswith(TIMING)}


def tb_events(directory):
    """(event files, [(tag, step, value)]) of a TensorBoard directory, read straight from the records."""
    from tensorboardX.proto import event_pb2

    files = sorted(Path(directory).glob("events.out.tfevents.*"))
    scalars = []
    for f in files:
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4  # length, its crc, the record, its crc
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return files, scalars


def assert_tensorboard_matches_jsonl(run_dir):
    files, scalars = tb_events(Path(run_dir) / "tensorboard")
    assert len(files) == 1, files
    keys = [(tag, step) for tag, step, _ in scalars]
    assert len(keys) == len(set(keys)), "a (tag, step) appears twice"
    want = {(k.replace("@", "_"), r["step"]): v  # TensorBoard tags allow no "@"
            for r in read_rows(run_dir) for k, v in r.items() if k != "step" and v is not None}
    assert {(t, s): v for t, s, v in scalars} == pytest.approx(want)


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------
def test_metrics_writer_keeps_the_rows_a_checkpoint_covers_and_rebuilds_tensorboard(tmp_path):
    w = MetricsWriter(tmp_path, progress=False)
    for step, loss in [(0, 0.5), (1, 1.0), (2, 2.0), (2, 0.25), (3, 3.0)]:
        w.log(step, {"loss": loss})
    assert w.rows == 5
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a kill in the middle of a write
    w = MetricsWriter(tmp_path, progress=False, start_step=2, keep_rows=4)  # the checkpoint covered 4 rows
    assert w.rows == 4 and [r["loss"] for r in read_rows(tmp_path)] == [0.5, 1.0, 2.0, 0.25]
    w.log(3, {"loss": 3.5})
    w.close()
    assert [r["step"] for r in read_rows(tmp_path)] == [0, 1, 2, 2, 3]
    _, scalars = tb_events(tmp_path / "tensorboard")
    assert [(s, v) for _, s, v in scalars] == [(0, 0.5), (1, 1.0), (2, 2.0), (2, 0.25), (3, 3.5)]

    MetricsWriter(tmp_path, progress=False, start_step=0, keep_rows=0).close()  # no checkpoint: nothing stays
    assert read_rows(tmp_path) == [] and tb_events(tmp_path / "tensorboard")[1] == []
    for step in range(4):
        w.log(step, {"loss": float(step)})
    # A checkpoint written before rows were counted: keep the rows up to its step.
    MetricsWriter(tmp_path, progress=False, start_step=1, keep_rows=None).close()
    assert [r["step"] for r in read_rows(tmp_path)] == [0, 1]


def test_a_failed_metrics_write_names_the_file(tmp_path, monkeypatch):
    w = MetricsWriter(tmp_path, progress=False, tensorboard=False)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("realjax.metrics.open", full_disk, raising=False)
    with pytest.raises(WriteFailed) as err:
        w.log(1, {"loss": 1.0})
    assert str(err.value) == f"cannot write {tmp_path / 'metrics.jsonl'}: No space left on device"


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------
PARAMS = {"w": jnp.arange(1000.0), "b": jnp.ones(3)}
OPT = {"mu": jnp.zeros(1000), "count": jnp.array(3)}


def _saved(tmp_path, steps=(1, 2, 3)):
    ckpt = Checkpointer(tmp_path / "ckpt")
    for s in steps:
        ckpt.save(s, _params_times(s), OPT, {"step": s})
    return ckpt


def _params_times(s):
    return {k: v * s for k, v in PARAMS.items()}


def _largest_array_file(step_dir):
    return max(glob.glob(f"{step_dir}/params/**/d/*", recursive=True), key=os.path.getsize)


DAMAGE = {
    "truncated_array": (lambda d: open(_largest_array_file(d), "r+b").truncate(100), "truncated (100 of"),
    "emptied_metadata": (lambda d: open(f"{d}/params/_METADATA", "w").close(), "_METADATA: empty (0 of"),
    "emptied_meta_record": (lambda d: open(f"{d}/meta/metadata", "w").close(), "meta/metadata: empty"),
    "missing_directory": (lambda d: __import__("shutil").rmtree(f"{d}/opt_state"), "opt_state: missing"),
}


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "orbax_only"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, manifest):
    ckpt = _saved(tmp_path)
    step_dir = ckpt.directory / "3"
    if not manifest:  # a checkpoint of an older realjax: orbax's own error must still be one line
        (step_dir / MANIFEST).unlink()
    hurt, says = DAMAGE[damage]
    hurt(step_dir)
    restored = Checkpointer(ckpt.directory).restore_latest(PARAMS, OPT)
    assert restored.step == 2 and restored.meta == {"step": 2}
    chex.assert_trees_all_equal(restored.params, _params_times(2))
    (line,) = restored.skipped
    assert line.startswith("checkpoint step 3 ") and "\n" not in line and str(step_dir) in line
    if manifest:
        assert says in line
    # The damaged step is set aside, so the resumed run can write step 3 again.
    assert (ckpt.directory / "3.damaged").is_dir() and not step_dir.exists()
    again = Checkpointer(ckpt.directory)
    assert again.all_steps() == [1, 2]
    again.save(3, PARAMS, OPT, {"step": 3})
    assert again.damage(3) is None and again.restore_latest(PARAMS, OPT).step == 3


def test_no_readable_checkpoint_is_one_line(tmp_path):
    ckpt = _saved(tmp_path, steps=(1, 2))
    for s in (1, 2):
        open(ckpt.directory / str(s) / "meta" / "metadata", "w").close()
    with pytest.raises(CheckpointUnreadable) as err:
        Checkpointer(ckpt.directory).restore_latest(PARAMS, OPT)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"no readable checkpoint in {ckpt.directory}: ")
    assert "checkpoint step 2 is damaged" in message and "checkpoint step 1 is damaged" in message
    assert sorted(os.listdir(ckpt.directory)) == ["1", "2"]  # nothing renamed when nothing could be used


# What TensorStore raised on a full 8 MB tmpfs (the exception orbax passes on).
TENSORSTORE_ENOSPC = ('RESOURCE_EXHAUSTED: Error writing "embed.value/0.0" in OCDBT database at local file '
                      '"{d}/3.orbax-checkpoint-tmp/params.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: '
                      '"{d}/3.orbax-checkpoint-tmp/params.orbax-checkpoint-tmp/ocdbt.process_0/d/8aab": Failed to '
                      "write 1218510 bytes to file 7: No space left on device [os_error_code='28']")


@pytest.mark.parametrize("failure", ["tensorstore", "oserror"])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last_good_one(tmp_path, monkeypatch, failure):
    ckpt = _saved(tmp_path, steps=(1, 2))
    d = ckpt.directory
    real_save = ckpt.manager.save

    def full_disk(step, args, force):
        tmp = d / f"{step}.orbax-checkpoint-tmp"
        (tmp / "params").mkdir(parents=True)
        (tmp / "params" / "partial").write_bytes(b"x" * 10)
        if failure == "oserror":
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(tmp / "params" / "partial"))
        raise ValueError(TENSORSTORE_ENOSPC.format(d=d))

    monkeypatch.setattr(ckpt.manager, "save", full_disk)
    with pytest.raises(WriteFailed) as err:
        ckpt.save(3, PARAMS, OPT, {"step": 3})
    reason = "No space left on device" if failure == "tensorstore" else "Permission denied"
    assert str(err.value).startswith(f"cannot write {d}/3.orbax-checkpoint-tmp/params") and reason in str(err.value)
    assert str(err.value).endswith("(checkpoint step 3 not written; step 2 is intact: free space and rerun to resume)")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(ckpt.manager, "save", real_save)
    rerun = Checkpointer(d)  # space freed: the rerun resumes from step 2 and writes step 3 again
    assert rerun.all_steps() == [1, 2] and rerun.damage(2) is None
    assert rerun.restore_latest(PARAMS, OPT).step == 2
    rerun.save(3, PARAMS, OPT, {"step": 3})
    assert rerun.all_steps() == [1, 2, 3]


def test_write_failed_reads_the_os_error_of_any_exception():
    assert write_failed(RuntimeError("a bug"), "/x") is None
    e = write_failed(OSError(errno.EROFS, "Read-only file system"), "/run/config.yaml")
    assert str(e) == "cannot write /run/config.yaml: Read-only file system"


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error, rc", [
    (WriteFailed("/r/checkpoints/3", errno.ENOSPC, "No space left on device"), 1),
    (CheckpointUnreadable("no readable checkpoint in /r/checkpoints: checkpoint step 2 is damaged: x"), 1),
    (OSError(errno.ENOSPC, "No space left on device", "/r/plots/dynamics.png"), 1),
])
def test_run_failures_are_one_line(monkeypatch, capsys, error, rc):
    class Failing:
        def __init__(self, cfg):
            self.main = True

        def run(self):
            raise error

    monkeypatch.setattr("realjax.rl.trainer.Trainer", Failing)
    assert cli_main(["train", "logging.progress=false"]) == rc
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("realjax train: error: ") and ("/r/" in line)


@pytest.mark.parametrize("content", [b"", b"PAR1 not really"])
def test_a_broken_data_file_is_one_line(tmp_path, capsys, content):
    (tmp_path / "train.parquet").write_bytes(content)
    assert cli_main(["train", f"data.train={tmp_path / 'train.parquet'}", f"output_dir={tmp_path}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"realjax train: error: {tmp_path / 'train.parquet'}: not a readable parquet file")


def _catches_sigterm(pid) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc to see the handler installed")
def test_sigterm_during_start_up_exits_0(tmp_path):
    """SIGTERM as soon as the handler exists (before JAX is imported): exit 0, no checkpoint, no rows."""
    cmd = [sys.executable, "-m", "realjax", "train", f"output_dir={tmp_path}", "name=s", *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    t0 = time.time()
    while not _catches_sigterm(proc.pid):
        assert proc.poll() is None and time.time() - t0 < 60
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested during start-up" in out
    assert not list((tmp_path / "s" / "checkpoints").iterdir()) and not (tmp_path / "s" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------------------
# Kills and restarts, end to end
# ----------------------------------------------------------------------------------------------------
class Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing after the raise runs but the finally blocks."""


def _kill_test_config(tmp_path, *extra):
    from realjax.config import load_config

    return load_config(demo_config_path(), [f"output_dir={tmp_path}", "name=k", *TINY, "trainer.save_every=2",
                                            "trainer.export=false", *extra])


def _killed_then_finished(cfg, monkeypatch):
    """Killed while writing the first checkpoint (step 2), then run to the end; returns (summary, rows)."""
    evals = bool(cfg.data.eval)
    from realjax.rl import Trainer

    def killed(self, step, *args):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "save", killed)
        with pytest.raises(Killed):
            Trainer(cfg).run()
    assert [r["step"] for r in read_rows(cfg.run_dir)] == [0, 1, 2][1 - evals:]  # logged, never checkpointed
    summary = Trainer(cfg).run()
    rows = read_rows(cfg.run_dir)
    want = [(0, False), (1, True), (2, True), (3, True), (3, False)]
    assert [(r["step"], "loss" in r) for r in rows] == (want if evals else want[1:-1])
    assert summary["steps_run"] == 3 and summary["steps"] == 3
    assert_tensorboard_matches_jsonl(cfg.run_dir)
    return summary, rows


def test_a_kill_before_the_first_checkpoint_leaves_each_row_once(tmp_path, monkeypatch):
    """The cheap version of the crash tests below (no evaluation, to stay cheap): a run killed while
    writing its first checkpoint restarts from step 0 and must drop the rows it logged (jsonl and
    TensorBoard)."""
    _killed_then_finished(_kill_test_config(tmp_path, "data.eval=", "eval.before=false"), monkeypatch)


@pytest.mark.slow
def test_a_rerun_and_a_damaged_last_checkpoint_leave_each_row_once(tmp_path, monkeypatch, capsys):
    """Rerunning a finished run re-evaluates at the end and must not log that evaluation twice; with the
    last checkpoint damaged, a rerun says so, resumes from the one before and ends with the same rows."""
    from realjax.rl import Trainer

    cfg = _kill_test_config(tmp_path)
    summary, rows = _killed_then_finished(cfg, monkeypatch)
    again = Trainer(cfg).run()  # resumes at the last step: evaluates again, logs that row once
    assert (again["steps_run"], again["resumed_at"], again["steps"]) == (0, 3, 3)
    assert again["total_wall_time_s"] >= summary["wall_time_s"] * 0.5
    assert [without_timings(r) for r in read_rows(cfg.run_dir)] == [without_timings(r) for r in rows]
    assert_tensorboard_matches_jsonl(cfg.run_dir)

    capsys.readouterr()
    open(_largest_array_file(cfg.run_dir / "checkpoints" / "3"), "r+b").truncate(10)
    fallback = Trainer(cfg).run()
    assert (fallback["steps_run"], fallback["resumed_at"]) == (1, 2)
    out = capsys.readouterr().out
    assert "checkpoint step 3 is damaged: " in out and "truncated (10 of" in out
    assert "resuming from checkpoint step 2 instead" in out
    assert [without_timings(r) for r in read_rows(cfg.run_dir)] == [without_timings(r) for r in rows]
    assert_tensorboard_matches_jsonl(cfg.run_dir)


DRIVER = """
import os, signal, sys
kill = sys.argv[1]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if kill.startswith("log:"):  # after the training row of a step is written
    from realjax.metrics import MetricsWriter
    real_log = MetricsWriter.log
    def log(self, step, metrics):
        real_log(self, step, metrics)
        if step == int(kill[4:]) and "loss" in metrics:
            die()
    MetricsWriter.log = log
elif kill.startswith("commit:"):  # mid-checkpoint: the first item of the step written, the rest not
    from orbax.checkpoint._src.path import atomicity
    real_commit = atomicity.AtomicRenameTemporaryPath.finalize
    async def commit(self, *args, **kwargs):
        if f"/{kill[7:]}.orbax-checkpoint-tmp" in str(self._tmp_path):
            die()
        return await real_commit(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = commit
elif kill.startswith("finalize:"):  # the step is in place; orbax has not finished its bookkeeping
    import orbax.checkpoint as ocp
    real_finalize = ocp.CheckpointManager._finalize
    def finalize(self, step, *args, **kwargs):
        if step == int(kill[9:]):
            die()
        return real_finalize(self, step, *args, **kwargs)
    ocp.CheckpointManager._finalize = finalize
elif kill.startswith("manifest:"):  # the checkpoint is complete, its manifest not written yet
    from realjax.checkpoint import Checkpointer
    real_manifest = Checkpointer._write_manifest
    def manifest(self, step):
        if step == int(kill[9:]):
            die()
        return real_manifest(self, step)
    Checkpointer._write_manifest = manifest
elif kill == "export":  # half of the exported weights file written
    import realjax.models.hf as hf
    def write(path, shard):
        with open(path, "wb") as f:
            f.write(b"half a safetensors file")
        die()
    hf.write_safetensors = write
from realjax.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL after a logged step before any checkpoint, in the middle of writing the first checkpoint,
    between a checkpoint and its manifest, between a training row and the evaluation of that step, after
    a checkpoint is in place but before orbax's bookkeeping, and in the middle of the export; after each,
    the same command again. The end state equals an uninterrupted run's: final weights bit for bit, every
    metrics row once with the same values, TensorBoard the same rows."""
    from realjax.config import load_config
    from realjax.rl import Trainer

    common = [*TINY, "trainer.steps=6", "trainer.save_every=2", "trainer.eval_every=3"]
    reference = load_config(demo_config_path(), [f"output_dir={tmp_path}", "name=reference", *common])
    Trainer(reference).run()

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = ["train", "--config", str(demo_config_path()), f"output_dir={tmp_path}", "name=killed", *common]
    run_dir = tmp_path / "killed"
    log = tmp_path / "log.txt"
    for kill in ["log:1", "commit:2", "manifest:2", "log:3", "finalize:4", "export", "none"]:
        with open(log, "a") as f:
            f.write(f"=== {kill}\n")
            f.flush()
            rc = subprocess.run([sys.executable, str(driver), kill, *args], stdout=f, stderr=subprocess.STDOUT,
                                cwd=REPO, timeout=600).returncode
        assert rc == (0 if kill == "none" else -signal.SIGKILL), log.read_text()[-3000:]

    like = Trainer(reference).params
    ref_ckpt, got_ckpt = Checkpointer(reference.run_dir / "checkpoints"), Checkpointer(run_dir / "checkpoints")
    want, _ = ref_ckpt.restore_params(6, like)
    got, meta = got_ckpt.restore_params(6, like)
    assert meta["step"] == 6 and not list(run_dir.glob("checkpoints/*.damaged"))
    chex.assert_trees_all_equal(got, want)
    ref_rows, got_rows = read_rows(reference.run_dir), read_rows(run_dir)
    assert [without_timings(r) for r in got_rows] == [without_timings(r) for r in ref_rows]
    assert [(r["step"], "loss" in r) for r in got_rows] == [(0, False), (1, True), (2, True), (3, True), (3, False),
                                                            (4, True), (5, True), (6, True), (6, False)]
    assert_tensorboard_matches_jsonl(run_dir)
    ref_tb = {(t, s) for t, s, _ in tb_events(reference.run_dir / "tensorboard")[1]}
    assert {(t, s) for t, s, _ in tb_events(run_dir / "tensorboard")[1]} == ref_tb
    from realjax.models import from_pretrained

    assert from_pretrained(run_dir / "export").cfg.num_layers == 4  # the export rewritten whole
    assert np.isfinite(meta["elapsed_s"])
