# shellcheck shell=bash
# Shared helpers for the tpu_scripts: sourced, never run.
#
# Conventions every script follows:
#   * `run CMD...` prints `+ CMD` (shell-quoted, one line) and runs it, unless DRY_RUN=1, in which case
#     it only prints. Dry-run lines go to stdout so they can be piped or diffed; during a real run they
#     go to stderr so stdout stays the commands' own output.
#   * `GCLOUD` names the gcloud binary (default `gcloud`); tests point it at a fake.
#   * Errors print `error: ...` on stderr and exit 2 for bad usage, 1 for failures.

if [[ -z ${BASH_VERSINFO:-} ]] || ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  # Empty arrays under `set -u` and `${var@Q}`-era quoting need bash >= 4.4 (macOS ships 3.2).
  echo "error: these scripts need bash >= 4.4 (found ${BASH_VERSION:-unknown}); on macOS: brew install bash" >&2
  exit 2
fi

DRY_RUN=${DRY_RUN:-0}
# fd 3 is the script's stdout even inside $(...), so dry-run echoes of captured queries are not lost.
exec 3>&1
GCLOUD=${GCLOUD:-gcloud}
PROJECT=${PROJECT:-}
# Where setup.sh puts the code on every worker, and the worker-side helper inside it.
# shellcheck disable=SC2088  # the tilde is meant for the remote shell
REMOTE_REPO='~/realjax'
REMOTE_WORKER="bash $REMOTE_REPO/tpu_scripts/worker.sh"

die() { echo "error: $*" >&2; exit 1; }
usage_error() { echo "error: $*" >&2; echo "(run with --help for usage)" >&2; exit 2; }
note() { echo "$*" >&2; }

# ---------------------------------------------------------------------------------------------------
# Printing and running commands
# ---------------------------------------------------------------------------------------------------

# Quote one word so a human can paste it back into a shell. `--flag=value` keeps the flag bare and
# quotes only the value, which reads far better than printf %q's backslashes for long --command strings.
quote_word() {
  local word=$1 prefix=''
  if [[ $word =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    prefix=${BASH_REMATCH[1]}
    word=${BASH_REMATCH[2]}
  fi
  if [[ -n $word && $word =~ ^[A-Za-z0-9_@%+=:,./~-]+$ && $word != '~'* ]]; then
    printf '%s%s' "$prefix" "$word"
  elif [[ -n $word && $word =~ ^~/[A-Za-z0-9_@%+=:,./-]*$ && -z $prefix ]]; then
    # A bare leading ~/ is meant to expand (it is always a path on this or the remote machine).
    printf '%s' "$word"
  else
    printf "%s'%s'" "$prefix" "${word//\'/\'\\\'\'}"
  fi
}

quote_cmd() {
  local out='' w
  for w in "$@"; do out+="$(quote_word "$w") "; done
  printf '%s' "${out% }"
}

print_cmd() {
  if [[ $DRY_RUN == 1 ]]; then echo "+ $(quote_cmd "$@")" >&3; else echo "+ $(quote_cmd "$@")" >&2; fi
}

run() {
  print_cmd "$@"
  [[ $DRY_RUN == 1 ]] && return 0
  "$@"
}

# Like run, but for a query whose stdout the caller captures: in dry-run it prints the command and
# returns the placeholder given as $1.
run_query() {
  local placeholder=$1; shift
  if [[ $DRY_RUN == 1 ]]; then
    print_cmd "$@"
    printf '%s\n' "$placeholder"
    return 0
  fi
  "$@"
}

# ---------------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------------

# Splits `--flag=value` into `--flag value` (up to a bare `--`, after which words pass untouched: the
# training overrides are `key=value` and must not be split). Result in the global array ARGS.
split_flag_values() {
  ARGS=()
  while (($#)); do
    if [[ $1 == -- ]]; then ARGS+=("$@"); return 0; fi
    if [[ $1 =~ ^(--[A-Za-z0-9-]+)=(.*)$ ]]; then
      ARGS+=("${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}")
    else
      ARGS+=("$1")
    fi
    shift
  done
}

# need_value "$@" inside a `case` arm: the flag in $1 must be followed by a value.
need_value() {
  if (($# < 2)) || [[ -z $2 || $2 == --* ]]; then usage_error "$1 needs a value"; fi
}

# The flags every gcloud-side script takes, parsed in one place. Inside the option loop:
#   `common_flag "$@" && { shift "$CONSUMED"; continue; }`
# It sets the caller's locals `name` and `zone` (bash functions see their caller's locals), the globals
# PROJECT and DRY_RUN, and prints the caller's `usage` for --help.
common_flag() {
  case $1 in
    --name) need_value "$@"; name=$2; CONSUMED=2 ;;
    --zone) need_value "$@"; zone=$2; CONSUMED=2 ;;
    --project) need_value "$@"; PROJECT=$2; CONSUMED=2 ;;
    --dry-run) DRY_RUN=1; CONSUMED=1 ;;
    -h | --help) usage; exit 0 ;;
    *) return 1 ;;
  esac
}

# --name and --zone: required by every gcloud-side script, checked alike.
require_name_zone() {
  require --name "$name"; validate_name "$name"
  require --zone "$zone"; validate_zone "$zone"
}

require() {  # require FLAG VALUE
  [[ -n $2 ]] || usage_error "$1 is required"
}

validate_name() {
  # TPU node and queued-resource IDs: lowercase letters, digits, hyphens; start with a letter.
  [[ $1 =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    usage_error "invalid TPU name '$1' (lowercase letters, digits and '-', starting with a letter, at most 63)"
}

validate_zone() {
  [[ $1 =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || usage_error "invalid zone '$1' (expected e.g. us-east5-a)"
}

validate_worker() {
  # gcloud accepts one index, a list (1,4,6), a range (1-3) or `all` when --command is given.
  [[ $1 =~ ^(all|[0-9]+([,-][0-9]+)*)$ ]] || usage_error "invalid --worker '$1' (an index, 1,4,6, 1-3 or all)"
}

validate_positive_int() {  # validate_positive_int FLAG VALUE
  [[ $2 =~ ^[1-9][0-9]*$ ]] || usage_error "$1 must be a positive integer, got '$2'"
}

# ---------------------------------------------------------------------------------------------------
# Accelerator types
# ---------------------------------------------------------------------------------------------------

ACCELERATOR_HELP="v4-N (N = 8..4096, multiple of 8), v5litepod-N or its alias v5e-N (N = 1..256), \
v5p-N (N >= 8, multiple of 8), v6e-N (N = 1..256)"

# Prints the canonical gcloud accelerator type for $1 (v5e-N -> v5litepod-N) or exits with an error.
# N counts TensorCores on v4/v5p (a host has 4 chips = 8 cores, so slices come in multiples of 8) and
# chips on v5e/v6e. Sizes inside these ranges that a zone does not offer are left for gcloud to refuse.
normalize_accelerator() {
  local type=$1 family n
  if [[ ! $type =~ ^(v4|v5litepod|v5e|v5p|v6e)-([0-9]+)$ ]]; then
    usage_error "unsupported accelerator type '$type'; expected $ACCELERATOR_HELP"
  fi
  family=${BASH_REMATCH[1]}
  n=$((10#${BASH_REMATCH[2]}))
  case $family in
    v4)
      ((n >= 8 && n <= 4096 && n % 8 == 0)) ||
        usage_error "invalid accelerator type '$type': v4-N needs N in 8..4096 and a multiple of 8" ;;
    v5p)
      ((n >= 8 && n % 8 == 0)) ||
        usage_error "invalid accelerator type '$type': v5p-N needs N >= 8 and a multiple of 8" ;;
    v5litepod | v5e)
      ((n >= 1 && n <= 256)) ||
        usage_error "invalid accelerator type '$type': v5litepod-N needs N in 1..256"
      family=v5litepod ;;
    v6e)
      ((n >= 1 && n <= 256)) ||
        usage_error "invalid accelerator type '$type': v6e-N needs N in 1..256" ;;
  esac
  printf '%s-%s\n' "$family" "$n"
}

# Default TPU software (runtime) version for a canonical accelerator type: the base images that
# Cloud TPU recommends for JAX; JAX itself comes from pip (jax[tpu]) in setup.sh.
default_runtime() {
  case ${1%%-*} in
    v4) echo tpu-ubuntu2204-base ;;
    v5litepod) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime for '$1'" ;;
  esac
}

# ---------------------------------------------------------------------------------------------------
# gcloud command builders (each sets a global array; callers append flags)
# ---------------------------------------------------------------------------------------------------

scope_flags() {  # --zone / --project, in the order gcloud prints them in its own help
  SCOPE=(--zone="$1")
  [[ -n $PROJECT ]] && SCOPE+=(--project="$PROJECT")
  return 0
}

# ssh_cmd NAME ZONE WORKER REMOTE_COMMAND -> global CMD
ssh_cmd() {
  scope_flags "$2"
  CMD=("$GCLOUD" compute tpus tpu-vm ssh "$1" "${SCOPE[@]}" --worker="$3" --command="$4")
}

# Remote `bash ~/realjax/tpu_scripts/worker.sh SUBCOMMAND ARGS...` with every argument quoted by
# printf %q, so overrides holding spaces, quotes or `$(...)` reach realjax verbatim (the remote login
# shell is bash on the TPU VM images, so %q's bash quoting is understood there).
remote_worker_cmd() {
  local out=$REMOTE_WORKER w
  for w in "$@"; do out+=" $(printf '%q' "$w")"; done
  printf '%s' "$out"
}

# Polls a TPU VM (kind=node, until READY) or a queued resource (kind=queued, until ACTIVE).
# wait_for_state KIND NAME ZONE TIMEOUT_S POLL_S
wait_for_state() {
  local kind=$1 name=$2 zone=$3 timeout=$4 poll=$5 target field state waited=0 start=$SECONDS
  scope_flags "$zone"
  if [[ $kind == queued ]]; then
    target=ACTIVE; field='value(state.state)'
    CMD=("$GCLOUD" compute tpus queued-resources describe "$name" "${SCOPE[@]}" --format="$field")
  else
    target=READY; field='value(state)'
    CMD=("$GCLOUD" compute tpus tpu-vm describe "$name" "${SCOPE[@]}" --format="$field")
  fi
  if [[ $DRY_RUN == 1 ]]; then
    print_cmd "${CMD[@]}"
    echo "# (repeated every ${poll}s until the state is $target; gives up after ${timeout}s)"
    return 0
  fi
  note "waiting for $name to become $target (timeout ${timeout}s, polling every ${poll}s)"
  while :; do
    # A failing describe (e.g. the resource is not visible yet) counts as "unknown", not as an error.
    state=$("${CMD[@]}" 2>/dev/null || true)
    case $state in
      "$target") note "$name is $target after ${waited}s"; return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | PREEMPTED | TERMINATED | STOPPED)
        die "$name is $state; inspect it with: $(quote_cmd "${CMD[@]:0:${#CMD[@]}-1}")" ;;
    esac
    if ((waited >= timeout)); then
      die "$name is still '${state:-unknown}' after ${timeout}s; poll again with: $(quote_cmd "${CMD[@]}")"
    fi
    note "  ${waited}s: ${state:-unknown}"
    sleep "$poll"
    waited=$((SECONDS - start))
  done
}
