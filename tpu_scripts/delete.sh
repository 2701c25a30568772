#!/usr/bin/env bash
# Delete a TPU VM, or a queued resource together with its TPU.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/delete.sh --name NAME --zone ZONE [--queued] [--yes]

Delete the TPU VM (billing stops). With --queued, delete the queued resource NAME and, through
--force, the TPU it provisioned. Local disks of the workers go with it: keep checkpoints under a
gs:// output (setup.sh --output) or copy them off first. Asks for confirmation unless --yes.

Options:
  --name NAME          TPU / queued-resource name (required)
  --zone ZONE          zone (required)
  --project PROJECT    GCP project (default: gcloud's configured project)
  --queued             NAME is a queued resource (created with create.sh --queued)
  --yes                do not ask for confirmation
  --dry-run            print every command (prefixed "+ ") without running any
  -h, --help           this help
EOF
}

main() {
  local name='' zone='' queued=0 yes=0
  split_flag_values "$@"
  set -- "${ARGS[@]}"
  while (($#)); do
    common_flag "$@" && { shift "$CONSUMED"; continue; }
    case $1 in
      --queued) queued=1; shift ;;
      --yes | -y) yes=1; shift ;;
      *) usage_error "unknown argument '$1'" ;;
    esac
  done
  require_name_zone
  scope_flags "$zone"
  local what="TPU VM '$name'"
  local -a cmd
  if ((queued)); then
    what="queued resource '$name' and its TPU"
    cmd=("$GCLOUD" compute tpus queued-resources delete "$name" "${SCOPE[@]}" --force --quiet)
  else
    cmd=("$GCLOUD" compute tpus tpu-vm delete "$name" "${SCOPE[@]}" --quiet)
  fi
  if ((!yes)) && [[ $DRY_RUN != 1 ]]; then
    local answer=''
    read -r -p "Delete $what in $zone${PROJECT:+ (project $PROJECT)}? [y/N] " answer ||
      die "no confirmation (stdin closed); pass --yes to delete without asking"
    [[ $answer =~ ^[Yy]([Ee][Ss])?$ ]] || die "not deleted"
  fi
  # --quiet: we asked already; gcloud's own prompt would block a non-interactive caller.
  run "${cmd[@]}"
}

main "$@"
