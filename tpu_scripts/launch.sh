#!/usr/bin/env bash
# Start `realjax train` on every worker of a TPU VM / slice: the same command on all of them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/launch.sh --name NAME --zone ZONE --config configs/X.yaml [options] [-- key=value ...]

Runs the same command on every worker (--worker=all), in the background so it survives the ssh
session:
    source ~/realjax.env; cd ~/realjax
    nohup .venv/bin/realjax train --config X output_dir=$REALJAX_OUTPUT [model.path=$REALJAX_MODEL] \
        key=value... > ~/train.log 2>&1 &
(through ~/realjax/tpu_scripts/worker.sh train, which also refuses to start a second run and reports
a process that dies during startup with the tail of its log). On a pod slice every worker's process
joins the others through jax.distributed.initialize(), which realjax calls by itself on TPU.
Overrides after -- reach realjax verbatim (quoted with printf %q); in them @DATA@, @MODEL@ and
@OUTPUT@ stand for the worker's REALJAX_DATA / REALJAX_MODEL / REALJAX_OUTPUT from setup.sh.
A run whose output_dir/name already holds a checkpoint resumes from it.

Required:
  --name NAME          TPU name
  --zone ZONE          zone
  --config FILE        experiment config, relative to the repo (e.g. configs/r1_distill_qwen_1.5b_real.yaml)

Options:
  --project PROJECT    GCP project (default: gcloud's configured project)
  --compile-first      first run `realjax compile --config FILE --topology TYPE` (same overrides) on
                       worker 0, on its CPU; do not launch unless it succeeds (i.e. the run fits)
  --type TYPE          topology for --compile-first (default: the TPU's accelerator type, from describe)
  --compile-timeout S  give up on the compile check after S seconds (default 1800)
  --dry-run            print every command (prefixed "+ ") without running any
  -h, --help           this help

Example:
  tpu_scripts/launch.sh --name realjax-v5p8 --zone us-east5-a \
      --config configs/r1_distill_qwen_1.5b_real.yaml --compile-first -- \
      data.train=@DATA@/train.parquet trainer.steps=500 name=real-1.5b-run1
EOF
}

main() {
  local name='' zone='' config='' type='' compile_first=0 compile_timeout=1800
  local -a overrides=()
  split_flag_values "$@"
  set -- "${ARGS[@]}"
  while (($#)); do
    common_flag "$@" && { shift "$CONSUMED"; continue; }
    case $1 in
      --config) need_value "$@"; config=$2; shift 2 ;;
      --type) need_value "$@"; type=$2; shift 2 ;;
      --compile-timeout) need_value "$@"; compile_timeout=$2; shift 2 ;;
      --compile-first) compile_first=1; shift ;;
      --) shift; overrides=("$@"); break ;;
      *=*) usage_error "'$1' looks like an override; put overrides after --" ;;
      *) usage_error "unknown argument '$1'" ;;
    esac
  done
  require_name_zone
  require --config "$config"
  validate_positive_int --compile-timeout "$compile_timeout"
  local kv
  for kv in "${overrides[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]] || usage_error "override '$kv' is not key=value (dotted key)"
  done
  [[ -n $type ]] && type=$(normalize_accelerator "$type")
  local here
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  [[ -f $here/$config ]] || note "note: $config is not in this checkout; it must exist in ~/realjax on the workers"

  local -a tail=(--config "$config" --)
  tail+=("${overrides[@]}")
  scope_flags "$zone"
  if ((compile_first)); then
    if [[ -z $type ]]; then
      type=$(run_query '<accelerator-type>' "$GCLOUD" compute tpus tpu-vm describe "$name" "${SCOPE[@]}" \
        --format='value(acceleratorType)')
      [[ $DRY_RUN == 1 ]] || type=$(normalize_accelerator "$type")
    fi
    local check
    check=$(remote_worker_cmd compile --topology "$type" --timeout "$compile_timeout" "${tail[@]}")
    ssh_cmd "$name" "$zone" 0 "$check"
    if ! run "${CMD[@]}"; then
      die "the compile check for $type failed on worker 0 (see above); not launching"
    fi
  fi
  ssh_cmd "$name" "$zone" all "$(remote_worker_cmd train "${tail[@]}")"
  run "${CMD[@]}" || die "launch failed on at least one worker (see above); stop the others with tpu_scripts/stop.sh"
  [[ $DRY_RUN == 1 ]] && return 0
  local flags="--name $name --zone $zone${PROJECT:+ --project $PROJECT}"
  note "Launched. Follow worker 0:  tpu_scripts/logs.sh $flags --follow"
  note "Stop with a checkpoint:     tpu_scripts/stop.sh $flags"
}

main "$@"
