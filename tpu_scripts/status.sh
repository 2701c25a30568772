#!/usr/bin/env bash
# Show TPU VMs / queued resources, wait for one to come up, or report training on its workers.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/status.sh --zone ZONE [--name NAME] [options]

Without --name: list the TPU VMs and queued resources in the zone.
With --name: describe that TPU VM (or, with --queued, that queued resource).

Options:
  --name NAME          the TPU (and queued resource) name
  --zone ZONE          zone (required)
  --project PROJECT    GCP project (default: gcloud's configured project)
  --queued             NAME is a queued resource (state ACTIVE when usable)
  --wait               poll until the TPU is READY (queued resource: ACTIVE)
  --timeout SECONDS    give up waiting after this long (default 3600)
  --poll SECONDS       seconds between polls (default 30)
  --training           report the training process on every worker (running or exit code, last log line)
  --dry-run            print every command (prefixed "+ ") without running any
  -h, --help           this help
EOF
}

main() {
  local name='' zone='' queued=0 wait=0 training=0 timeout=3600 poll=30
  split_flag_values "$@"
  set -- "${ARGS[@]}"
  while (($#)); do
    common_flag "$@" && { shift "$CONSUMED"; continue; }
    case $1 in
      --timeout) need_value "$@"; timeout=$2; shift 2 ;;
      --poll) need_value "$@"; poll=$2; shift 2 ;;
      --queued) queued=1; shift ;;
      --wait) wait=1; shift ;;
      --training) training=1; shift ;;
      *) usage_error "unknown argument '$1'" ;;
    esac
  done
  require --zone "$zone"; validate_zone "$zone"
  validate_positive_int --timeout "$timeout"
  [[ $poll =~ ^[0-9]+$ ]] || usage_error "--poll must be a non-negative integer, got '$poll'"
  scope_flags "$zone"

  if [[ -z $name ]]; then
    ((wait || training)) && usage_error "--wait and --training need --name"
    run "$GCLOUD" compute tpus tpu-vm list "${SCOPE[@]}"
    run "$GCLOUD" compute tpus queued-resources list "${SCOPE[@]}"
    return 0
  fi
  validate_name "$name"
  local kind=node
  ((queued)) && kind=queued
  if ((wait)); then
    wait_for_state "$kind" "$name" "$zone" "$timeout" "$poll"
  elif ((queued)); then
    run "$GCLOUD" compute tpus queued-resources describe "$name" "${SCOPE[@]}"
  else
    run "$GCLOUD" compute tpus tpu-vm describe "$name" "${SCOPE[@]}"
  fi
  if ((training)); then
    ssh_cmd "$name" "$zone" all "$(remote_worker_cmd status)"
    run "${CMD[@]}"
  fi
}

main "$@"
