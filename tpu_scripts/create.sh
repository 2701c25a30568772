#!/usr/bin/env bash
# Create a Cloud TPU VM (or slice) for realjax, directly or through a queued resource.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/create.sh --name NAME --zone ZONE --type TYPE [options]

Create a TPU VM or pod slice. Without --queued this is `gcloud compute tpus tpu-vm create`
(fails at once when the zone has no capacity); with --queued it files a queued-resource request
that Cloud TPU fills when capacity frees up (the usual way to get v5p / v6e slices).

Required:
  --name NAME          TPU name (also the queued-resource ID and node ID with --queued)
  --zone ZONE          e.g. us-east5-a (v5p), us-central2-b (v4), us-east1-d (v6e)
  --type TYPE          accelerator type: v4-8..v4-4096, v5litepod-1..256 (alias v5e-N),
                       v5p-8, v5p-16, ..., v6e-1..256

Options:
  --project PROJECT    GCP project (default: gcloud's configured project)
  --queued             create through `gcloud compute tpus queued-resources create`
  --spot               Spot capacity (cheaper, can be preempted; relaunch resumes from the checkpoint)
  --best-effort        with --queued: the older best-effort tier (uses `gcloud alpha`; prefer --spot)
  --reserved           use the project's reservation
  --runtime VERSION    TPU software version (default by family: v4 tpu-ubuntu2204-base,
                       v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --wait               after creating, poll until the TPU is READY / the queued resource ACTIVE
  --timeout SECONDS    give up waiting after this long (default 3600)
  --poll SECONDS       seconds between polls (default 30)
  --gcloud-flag FLAG   extra flag passed to the create command, repeatable
                       (e.g. --gcloud-flag=--network=my-net --gcloud-flag=--internal-ips)
  --dry-run            print every command (prefixed "+ ") without running any
  -h, --help           this help

Example:
  tpu_scripts/create.sh --name realjax-v5p8 --zone us-east5-a --type v5p-8 --queued --spot --wait
EOF
}

main() {
  local name='' zone='' type='' runtime='' queued=0 spot=0 best_effort=0 reserved=0 wait=0
  local timeout=3600 poll=30
  local -a extra=()
  split_flag_values "$@"
  set -- "${ARGS[@]}"
  while (($#)); do
    common_flag "$@" && { shift "$CONSUMED"; continue; }
    case $1 in
      --type) need_value "$@"; type=$2; shift 2 ;;
      --runtime) need_value "$@"; runtime=$2; shift 2 ;;
      --timeout) need_value "$@"; timeout=$2; shift 2 ;;
      --poll) need_value "$@"; poll=$2; shift 2 ;;
      --gcloud-flag)
        [[ $# -ge 2 && $2 == --* ]] || usage_error "--gcloud-flag needs a value starting with --"
        extra+=("$2"); shift 2 ;;
      --queued) queued=1; shift ;;
      --spot) spot=1; shift ;;
      --best-effort) best_effort=1; shift ;;
      --reserved) reserved=1; shift ;;
      --wait) wait=1; shift ;;
      *) usage_error "unknown argument '$1'" ;;
    esac
  done
  require_name_zone
  require --type "$type"
  type=$(normalize_accelerator "$type")
  validate_positive_int --timeout "$timeout"
  [[ $poll =~ ^[0-9]+$ ]] || usage_error "--poll must be a non-negative integer, got '$poll'"
  ((spot + best_effort + reserved <= 1)) || usage_error "--spot, --best-effort and --reserved exclude each other"
  ((best_effort == 0 || queued == 1)) || usage_error "--best-effort needs --queued"
  [[ -n $runtime ]] || runtime=$(default_runtime "$type")

  scope_flags "$zone"
  local -a cmd tier=()
  ((spot)) && tier=(--spot)
  ((reserved)) && tier=(--reserved)
  ((best_effort)) && tier=(--best-effort)
  if ((queued)); then
    local -a track=()
    # --best-effort exists only on the alpha track of queued-resources create.
    ((best_effort)) && track=(alpha)
    cmd=("$GCLOUD" "${track[@]}" compute tpus queued-resources create "$name" "${SCOPE[@]}"
      --node-id="$name" --accelerator-type="$type" --runtime-version="$runtime" "${tier[@]}" "${extra[@]}")
  else
    cmd=("$GCLOUD" compute tpus tpu-vm create "$name" "${SCOPE[@]}"
      --accelerator-type="$type" --version="$runtime" "${tier[@]}" "${extra[@]}")
  fi
  run "${cmd[@]}"

  local kind=node
  ((queued)) && kind=queued
  if ((wait)); then
    wait_for_state "$kind" "$name" "$zone" "$timeout" "$poll"
  else
    local flags="--name $name --zone $zone"
    [[ -n $PROJECT ]] && flags+=" --project $PROJECT"
    ((queued)) && flags+=" --queued"
    if ((queued)); then
      note "Queued resource requested. It is usable once its state is ACTIVE (it may wait in"
      note "WAITING_FOR_RESOURCES for a long time). Wait for it with:"
    else
      note "Check that the TPU is READY with:"
    fi
    note "  tpu_scripts/status.sh $flags --wait --timeout $timeout"
  fi
  note "Next: tpu_scripts/setup.sh --name $name --zone $zone${PROJECT:+ --project $PROJECT}"
}

main "$@"
