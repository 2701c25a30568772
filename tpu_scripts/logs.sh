#!/usr/bin/env bash
# Show the training log (~/train.log) of a worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/logs.sh --name NAME --zone ZONE [--worker 0] [--lines 100] [--follow]

Print the end of ~/train.log on a worker (worker 0 holds the metrics and progress of a pod run;
the others mostly matter when they fail).

Options:
  --name NAME          TPU name (required)
  --zone ZONE          zone (required)
  --project PROJECT    GCP project (default: gcloud's configured project)
  --worker W           worker index (default 0); also 1,3 / 0-3 / all (outputs interleave)
  --lines N            lines to show (default 100)
  --follow             keep following the log (tail -F) until Ctrl-C; training goes on
  --dry-run            print every command (prefixed "+ ") without running any
  -h, --help           this help
EOF
}

main() {
  local name='' zone='' worker=0 lines=100 follow=0
  split_flag_values "$@"
  set -- "${ARGS[@]}"
  while (($#)); do
    common_flag "$@" && { shift "$CONSUMED"; continue; }
    case $1 in
      --worker) need_value "$@"; worker=$2; shift 2 ;;
      --lines) need_value "$@"; lines=$2; shift 2 ;;
      --follow) follow=1; shift ;;
      *) usage_error "unknown argument '$1'" ;;
    esac
  done
  require_name_zone
  validate_worker "$worker"
  validate_positive_int --lines "$lines"
  local remote="tail -n $lines"
  ((follow)) && remote+=" -F"
  remote+=" ~/train.log"
  ssh_cmd "$name" "$zone" "$worker" "$remote"
  run "${CMD[@]}"
}

main "$@"
