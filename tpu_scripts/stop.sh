#!/usr/bin/env bash
# Stop training on every worker with SIGTERM, so realjax writes a checkpoint and exits 0.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/stop.sh --name NAME --zone ZONE [--timeout 600] [--kill]

Send SIGTERM to `realjax train` on every worker (--worker=all) and wait for it to exit: realjax saves
a checkpoint and exits 0, and a later launch.sh with the same config resumes from it. Exits non-zero
when a worker's process ended with another code or did not end in time.

Options:
  --name NAME          TPU name (required)
  --zone ZONE          zone (required)
  --project PROJECT    GCP project (default: gcloud's configured project)
  --timeout SECONDS    how long to wait for the checkpoint and exit (default 600; large models
                       writing to GCS may need more)
  --kill               SIGKILL what is still running after the timeout (loses the final checkpoint)
  --dry-run            print every command (prefixed "+ ") without running any
  -h, --help           this help
EOF
}

main() {
  local name='' zone='' timeout=600 force=0
  split_flag_values "$@"
  set -- "${ARGS[@]}"
  while (($#)); do
    common_flag "$@" && { shift "$CONSUMED"; continue; }
    case $1 in
      --timeout) need_value "$@"; timeout=$2; shift 2 ;;
      --kill) force=1; shift ;;
      *) usage_error "unknown argument '$1'" ;;
    esac
  done
  require_name_zone
  validate_positive_int --timeout "$timeout"
  local -a stop=(stop --timeout "$timeout")
  ((force)) && stop+=(--kill)
  ssh_cmd "$name" "$zone" all "$(remote_worker_cmd "${stop[@]}")"
  run "${CMD[@]}"
}

main "$@"
