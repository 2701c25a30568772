#!/usr/bin/env bash
# Worker-side half of the tpu_scripts: runs ON each TPU VM worker, invoked over
# `gcloud compute tpus tpu-vm ssh --worker=all --command='bash ~/realjax/tpu_scripts/worker.sh ...'`.
#
# Keeping this logic in a real script (shipped with the repo by setup.sh) rather than in --command
# strings keeps the remote side readable, shellchecked and testable on any Linux box (tests point HOME
# at a temporary directory), and leaves the laptop-side scripts one quoting level deep.
#
# Files on the worker (all under $HOME):
#   realjax/          the code, with realjax/.venv          realjax.env   exports REALJAX_OUTPUT/DATA/MODEL
#   train.log         output of the running / last run      realjax.pid   pid of `realjax train`
#   realjax.exit      exit code of the last run, written when it ends
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO=$HOME/realjax
ENV_FILE=$HOME/realjax.env
LOG_FILE=$HOME/train.log
PID_FILE=$HOME/realjax.pid
EXIT_FILE=$HOME/realjax.exit
# Seconds `train` watches a fresh process before reporting success, to surface config errors at once.
STARTUP_CHECK_S=${REALJAX_STARTUP_CHECK_S:-10}
HOST=${HOSTNAME:-worker}

usage() {
  cat <<'EOF'
Usage: bash ~/realjax/tpu_scripts/worker.sh [--dry-run] COMMAND [options]
Runs on a TPU VM worker; the laptop-side scripts call it on every worker over gcloud ssh.

Commands:
  install [--src DIR] [--python 3.11] [--no-constraints] [--data SRC] [--ckpt SRC] [--output DIR]
      Move a freshly unpacked tree DIR into ~/realjax (keeping its .venv), create the venv with
      `python3.11 -m venv` (python3.11 and python3.11-venv are installed with sudo apt-get when missing,
      from the deadsnakes PPA if apt cannot find them), pip install -e '.[tpu]' (pinned by
      .ci/constraints.txt when present), copy gs:// data and model checkpoint to local disk, and write
      ~/realjax.env.
  train --config FILE [-- key=value ...]
      Start `realjax train` in the background (nohup) with output_dir=$REALJAX_OUTPUT (and
      model.path=$REALJAX_MODEL when set); log in ~/train.log. In overrides, @DATA@, @MODEL@ and
      @OUTPUT@ are replaced by this worker's REALJAX_DATA / REALJAX_MODEL / REALJAX_OUTPUT.
  compile --config FILE --topology TYPE [--timeout SECONDS] [-- key=value ...]
      `realjax compile` for the topology on this host's CPU; exits non-zero when it does not fit.
  stop [--timeout SECONDS] [--kill]
      SIGTERM the training process (realjax checkpoints and exits 0), wait for it to end; with --kill,
      SIGKILL it if it outlives the timeout.
  status
      Whether training runs here, its last exit code and the last log line.

Global: --dry-run prints the commands (prefixed "+ ") without running them; -h/--help this help.
EOF
}

# ---------------------------------------------------------------------------------------------------

wait_for_file() {  # wait_for_file FILE: up to 5 s for FILE to be non-empty (written by the wrapper)
  local i
  for ((i = 0; i < 50; i++)); do [[ -s $1 ]] && return 0; sleep 0.1; done
  return 1
}

training_pid() {  # prints the pid of a live `realjax train` started by `train`, or fails
  local pid
  [[ -f $PID_FILE ]] || return 1
  pid=$(<"$PID_FILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Guards against a stale pid file whose pid the kernel has since reused.
  local cmdline
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *realjax* ]] || return 1
  printf '%s\n' "$pid"
}

load_env() {
  [[ -f $ENV_FILE ]] || die "$HOST: $ENV_FILE is missing; run tpu_scripts/setup.sh first"
  # shellcheck source=/dev/null
  source "$ENV_FILE"
  [[ -n ${REALJAX_OUTPUT:-} ]] || die "$HOST: REALJAX_OUTPUT is not set in $ENV_FILE; rerun setup.sh"
  cd "$REPO" || die "$HOST: $REPO is missing; run tpu_scripts/setup.sh first"
  [[ $DRY_RUN == 1 || -x .venv/bin/realjax ]] || die "$HOST: $REPO/.venv/bin/realjax is missing; rerun setup.sh"
}

# Fills the global OVERRIDES: output_dir (and model.path) from the env file first, so that the user's
# overrides, which come after, win; @DATA@ / @MODEL@ / @OUTPUT@ replaced by this worker's paths.
build_overrides() {
  OVERRIDES=("output_dir=$REALJAX_OUTPUT")
  [[ -n ${REALJAX_MODEL:-} ]] && OVERRIDES+=("model.path=$REALJAX_MODEL")
  local kv
  for kv in "$@"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]] || usage_error "override '$kv' is not key=value"
    if [[ $kv == *@DATA@* ]]; then
      [[ -n ${REALJAX_DATA:-} ]] || die "$HOST: '$kv' uses @DATA@ but setup.sh was run without --data"
      kv=${kv//@DATA@/$REALJAX_DATA}
    fi
    if [[ $kv == *@MODEL@* ]]; then
      [[ -n ${REALJAX_MODEL:-} ]] || die "$HOST: '$kv' uses @MODEL@ but setup.sh was run without --ckpt"
      kv=${kv//@MODEL@/$REALJAX_MODEL}
    fi
    kv=${kv//@OUTPUT@/$REALJAX_OUTPUT}
    OVERRIDES+=("$kv")
  done
}

# Parses `--config FILE [--topology T] [--timeout S] [-- overrides...]` into globals.
parse_run_args() {
  CONFIG='' TOPOLOGY='' TIMEOUT='' REST=()
  while (($#)); do
    case $1 in
      --config) need_value "$@"; CONFIG=$2; shift 2 ;;
      --topology) need_value "$@"; TOPOLOGY=$2; shift 2 ;;
      --timeout) need_value "$@"; TIMEOUT=$2; shift 2 ;;
      --) shift; REST=("$@"); break ;;
      *) usage_error "unknown argument '$1' (overrides go after --)" ;;
    esac
  done
  require --config "$CONFIG"
}

# ---------------------------------------------------------------------------------------------------

cmd_train() {
  parse_run_args "$@"
  load_env
  [[ $DRY_RUN == 1 || -f $CONFIG ]] || die "$HOST: config '$CONFIG' not found in $REPO"
  local pid
  if pid=$(training_pid); then
    die "$HOST: training is already running (pid $pid); stop it first with tpu_scripts/stop.sh"
  fi
  build_overrides "${REST[@]}"
  local -a train=(.venv/bin/realjax train --config "$CONFIG" "${OVERRIDES[@]}")
  if [[ $DRY_RUN == 1 ]]; then
    print_cmd nohup "${train[@]}"
    echo "#   (in the background, stdout+stderr to $LOG_FILE, pid to $PID_FILE, exit code to $EXIT_FILE)"
    return 0
  fi
  [[ -f $LOG_FILE ]] && mv "$LOG_FILE" "$LOG_FILE.$(date +%Y%m%d-%H%M%S)"
  rm -f "$PID_FILE" "$EXIT_FILE"
  print_cmd nohup "${train[@]}"
  # The wrapper shell records realjax's own pid (so stop.sh signals realjax, not a shell) and its exit
  # code. nohup makes SIGHUP ignored in both (inherited across exec): closing the ssh session must not
  # end the run. stdin from /dev/null, stdout/stderr to the log and fd 3 (common.sh's copy of our
  # stdout) closed: an inherited copy of the ssh channel would keep `gcloud ... ssh` from returning.
  # shellcheck disable=SC2016  # expanded by the wrapper shell, not here
  REALJAX_PID_FILE=$PID_FILE REALJAX_EXIT_FILE=$EXIT_FILE nohup bash -c \
    '"$@" & pid=$!; echo "$pid" > "$REALJAX_PID_FILE"; wait "$pid"; echo "$?" > "$REALJAX_EXIT_FILE"' \
    realjax-train "${train[@]}" >"$LOG_FILE" 2>&1 </dev/null 3>&- &
  wait_for_file "$PID_FILE" || die "$HOST: the training wrapper did not start; see $LOG_FILE"
  pid=$(<"$PID_FILE")
  local i
  for ((i = 0; i < STARTUP_CHECK_S; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait_for_file "$EXIT_FILE" || true
      echo "---- $HOST: last lines of $LOG_FILE ----" >&2
      tail -n 30 "$LOG_FILE" >&2 || true
      die "$HOST: realjax train exited during startup (exit code $(cat "$EXIT_FILE" 2>/dev/null || echo '?'))"
    fi
    sleep 1
  done
  echo "$HOST: realjax train running (pid $pid), log $LOG_FILE"
}

cmd_compile() {
  parse_run_args "$@"
  require --topology "$TOPOLOGY"
  TIMEOUT=${TIMEOUT:-1800}
  validate_positive_int --timeout "$TIMEOUT"
  load_env
  [[ $DRY_RUN == 1 || -f $CONFIG ]] || die "$HOST: config '$CONFIG' not found in $REPO"
  build_overrides "${REST[@]}"
  # JAX_PLATFORMS=cpu: compile against the topology description only. Touching the TPU from one worker
  # of a multi-host slice would wait for the other hosts; the timeout catches any hang of that kind.
  if run env JAX_PLATFORMS=cpu timeout "$TIMEOUT" .venv/bin/realjax compile --config "$CONFIG" \
    --topology "$TOPOLOGY" "${OVERRIDES[@]}"; then
    echo "$HOST: compile check passed for $TOPOLOGY"
  else
    local rc=$?
    ((rc == 124)) && die "$HOST: realjax compile timed out after ${TIMEOUT}s"
    die "$HOST: realjax compile failed or the config does not fit $TOPOLOGY (exit code $rc)"
  fi
}

cmd_stop() {
  local timeout=600 force=0
  while (($#)); do
    case $1 in
      --timeout) need_value "$@"; timeout=$2; shift 2 ;;
      --kill) force=1; shift ;;
      *) usage_error "unknown argument '$1'" ;;
    esac
  done
  validate_positive_int --timeout "$timeout"
  local pid
  if ! pid=$(training_pid); then
    if [[ -f $EXIT_FILE ]]; then
      echo "$HOST: no training running (last run exited with code $(<"$EXIT_FILE"))"
    else
      echo "$HOST: no training running"
    fi
    return 0
  fi
  run kill -TERM "$pid"
  [[ $DRY_RUN == 1 ]] && return 0
  echo "$HOST: sent SIGTERM to realjax (pid $pid); waiting up to ${timeout}s for the checkpoint and exit"
  local start=$SECONDS waited
  while kill -0 "$pid" 2>/dev/null && ((SECONDS - start < timeout)); do sleep 0.2; done
  waited=$((SECONDS - start))
  if kill -0 "$pid" 2>/dev/null; then
    ((force)) || die "$HOST: realjax (pid $pid) still running after ${timeout}s; rerun stop.sh with a" \
      "longer --timeout, or --kill (no final checkpoint)"
    run kill -KILL "$pid"
    die "$HOST: realjax (pid $pid) outlived ${timeout}s and was killed with SIGKILL (no final checkpoint)"
  fi
  local code='?'
  wait_for_file "$EXIT_FILE" && code=$(<"$EXIT_FILE")
  rm -f "$PID_FILE"
  if [[ $code == 0 ]]; then
    echo "$HOST: realjax exited cleanly (code 0) after ${waited}s"
  elif [[ $code == 143 ]]; then
    die "$HOST: realjax died from SIGTERM (code 143): it did not handle the signal, so no final checkpoint"
  else
    die "$HOST: realjax exited with code $code after SIGTERM; see $LOG_FILE"
  fi
}

cmd_status() {
  local pid
  if pid=$(training_pid); then
    echo "$HOST: training running (pid $pid)"
  elif [[ -f $EXIT_FILE ]]; then
    echo "$HOST: not running; last run exited with code $(<"$EXIT_FILE")"
  else
    echo "$HOST: not running"
  fi
  [[ -f $LOG_FILE ]] && echo "$HOST: log: $(tail -n 1 "$LOG_FILE")"
  return 0
}

# ---------------------------------------------------------------------------------------------------

# Expands a leading ~/ (the laptop side passes paths %q-quoted, so the remote shell leaves ~ alone).
expand_home() { local p=$1; [[ $p == \~/* ]] && p=$HOME/${p#\~/}; printf '%s' "$p"; }

# fetch SRC DEST_ROOT: copy a gs:// file or folder under DEST_ROOT; sets FETCHED to its local path.
# Any other SRC is taken as a path that already exists on the worker.
fetch() {
  local src=$1 root=$2
  if [[ $src == gs://* ]]; then
    src=${src%/}
    run mkdir -p "$root"
    run "$GCLOUD" storage cp -r "$src" "$root/"
    FETCHED=$root/${src##*/}
  else
    FETCHED=$(expand_home "$src")
    [[ $DRY_RUN == 1 || -e $FETCHED ]] || note "warning: $HOST: $FETCHED does not exist on this worker"
  fi
}

# find_python VERSION: sets PYTHON to pythonVERSION (e.g. python3.11), installing it with apt when it
# is missing or lacks the venv module. The TPU VM images (Ubuntu 22.04) ship Python 3.10 only; jammy has
# python3.11 in universe/updates, and the deadsnakes PPA is the fallback where apt cannot find it.
find_python() {
  local version=$1
  PYTHON=python$version
  # Debian and Ubuntu ship ensurepip, which `python -m venv` needs, in the separate pythonX.Y-venv.
  if command -v "$PYTHON" >/dev/null && "$PYTHON" -c 'import ensurepip' >/dev/null 2>&1; then return 0; fi
  local -a packages=("$PYTHON" "$PYTHON-venv")
  # The lock timeout rides out the unattended upgrades that often hold dpkg's lock on a fresh VM.
  local -a apt_install=(sudo apt-get -o DPkg::Lock::Timeout=600 install -y "${packages[@]}")
  note "$HOST: $PYTHON with its venv module is missing; installing ${packages[*]} with apt"
  if run sudo apt-get update && run "${apt_install[@]}"; then
    if [[ $DRY_RUN == 1 ]]; then
      echo "#   (if apt cannot find them: sudo add-apt-repository -y ppa:deadsnakes/ppa, then the" \
        "same update and install again)"
    fi
  else
    note "$HOST: apt could not install ${packages[*]}; adding the deadsnakes PPA and retrying"
    if ! { run sudo add-apt-repository -y ppa:deadsnakes/ppa && run sudo apt-get update &&
      run "${apt_install[@]}"; }; then
      die "$HOST: could not install ${packages[*]} with apt; install them by hand or pick another --python"
    fi
  fi
  [[ $DRY_RUN == 1 ]] || command -v "$PYTHON" >/dev/null || die "$HOST: $PYTHON still missing after apt install"
}

cmd_install() {
  # shellcheck disable=SC2088  # expanded by expand_home below
  local src='' python=3.11 data='' ckpt='' output='~/realjax_runs' constraints=1
  while (($#)); do
    case $1 in
      --src) need_value "$@"; src=$2; shift 2 ;;
      --python) need_value "$@"; python=$2; shift 2 ;;
      --data) need_value "$@"; data=$2; shift 2 ;;
      --ckpt) need_value "$@"; ckpt=$2; shift 2 ;;
      --output) need_value "$@"; output=$2; shift 2 ;;
      --no-constraints) constraints=0; shift ;;
      *) usage_error "unknown argument '$1'" ;;
    esac
  done
  [[ $python =~ ^[0-9]+\.[0-9]+$ ]] || usage_error "--python takes a version such as 3.11, got '$python'"
  local pid
  if pid=$(training_pid); then die "$HOST: training is running (pid $pid); stop it before setup"; fi

  if [[ -n $src ]]; then
    src=$(expand_home "$src")
    [[ $DRY_RUN == 1 || -d $src ]] || die "$HOST: $src is not a directory"
    # The venv is kept across code updates: same absolute path once moved back, so it stays valid.
    [[ -d $REPO/.venv ]] && run mv "$REPO/.venv" "$src/.venv"
    run rm -rf "$REPO"
    run mv "$src" "$REPO"
  fi
  [[ $DRY_RUN == 1 || -f $REPO/pyproject.toml ]] || die "$HOST: no $REPO/pyproject.toml"

  local venv=$REPO/.venv
  if [[ ! -x $venv/bin/pip ]]; then
    find_python "$python"
    local -a clear=()
    # A venv without pip cannot be updated below: build it afresh (the install step refills it).
    [[ -e $venv ]] && clear=(--clear)
    run "$PYTHON" -m venv "${clear[@]}" "$venv"
  fi
  run "$venv/bin/pip" install --upgrade pip
  local -a pins=()
  ((constraints)) && [[ -f $REPO/.ci/constraints.txt ]] && pins=(-c "$REPO/.ci/constraints.txt")
  run "$venv/bin/pip" install "${pins[@]}" -e "${REPO}[tpu]"

  local -a env_lines=("# written by tpu_scripts/worker.sh install on $(date -u +%Y-%m-%dT%H:%M:%SZ)")
  output=$(expand_home "${output%/}")
  [[ $output == gs://* ]] || run mkdir -p "$output"
  env_lines+=("export REALJAX_OUTPUT=$(printf '%q' "$output")")
  if [[ -n $data ]]; then
    fetch "$data" "$HOME/realjax_data"
    env_lines+=("export REALJAX_DATA=$(printf '%q' "$FETCHED")")
  fi
  if [[ -n $ckpt ]]; then
    fetch "$ckpt" "$HOME/realjax_models"
    env_lines+=("export REALJAX_MODEL=$(printf '%q' "$FETCHED")")
  fi
  if [[ $DRY_RUN == 1 ]]; then
    echo "+ write $ENV_FILE:"
    printf '#   %s\n' "${env_lines[@]}"
  else
    printf '%s\n' "${env_lines[@]}" >"$ENV_FILE"
  fi
  echo "$HOST: ready ($REPO, venv $REPO/.venv, env $ENV_FILE)"
}

main() {
  split_flag_values "$@"
  set -- "${ARGS[@]}"
  while (($#)); do
    case $1 in
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      *) break ;;
    esac
  done
  (($#)) || usage_error "a command is required (install, train, compile, stop, status)"
  local sub=$1; shift
  case $sub in
    install) cmd_install "$@" ;;
    train) cmd_train "$@" ;;
    compile) cmd_compile "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    *) usage_error "unknown command '$sub'" ;;
  esac
}

main "$@"
