#!/usr/bin/env bash
# Put the realjax code, a venv with jax[tpu], the data and the env file on every worker of a TPU VM.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/setup.sh --name NAME --zone ZONE [options]

On every worker (--worker=all): put the code in ~/realjax, create ~/realjax/.venv with
`python3.11 -m venv` (the TPU images ship 3.10, so python3.11 and python3.11-venv are installed with
sudo apt-get when missing, from the deadsnakes PPA if apt cannot find them) and `pip install -e '.[tpu]'`,
copy the data / model checkpoint from GCS to local disk, and write ~/realjax.env, which launch.sh reads:
  REALJAX_OUTPUT  root of the runs (output_dir); gs://... or a local path on each worker
  REALJAX_DATA    local copy of --data       REALJAX_MODEL  local copy of --ckpt (passed as model.path)
Safe to rerun (e.g. after editing code): the venv is kept and only updated.

Required:
  --name NAME          TPU name
  --zone ZONE          zone

Options:
  --project PROJECT    GCP project (default: gcloud's configured project)
  --repo URL|PATH      code source (default: this checkout). A local path is packed (git-tracked and
                       untracked-but-not-ignored files, so uncommitted edits travel) and copied with
                       `tpu-vm scp`; a git URL is cloned on each worker (the workers need access to it).
  --ref REF            branch, tag or commit to check out (git URL only; default: the remote's HEAD)
  --data SRC           training/eval data: gs://bucket/path is copied (gcloud storage cp -r) to
                       ~/realjax_data/<basename> on every worker; any other value is a path on the workers
  --ckpt SRC           initial model (HF layout), same rules, copied to ~/realjax_models/<basename>
  --output DIR         output_dir root (default ~/realjax_runs). Use gs://bucket/path on multi-host
                       slices: orbax writes one checkpoint from all hosts and needs storage they share.
  --python VERSION     Python for the venv (default 3.11): pythonVERSION, apt-installed when missing
  --no-constraints     do not pin versions with .ci/constraints.txt
  --dry-run            print every command (prefixed "+ ") without running any
  -h, --help           this help

Examples:
  tpu_scripts/setup.sh --name realjax-v5p8 --zone us-east5-a \
      --data gs://my-bucket/data/math --ckpt gs://my-bucket/models/DeepSeek-R1-Distill-Qwen-1.5B \
      --output gs://my-bucket/realjax-runs
  tpu_scripts/setup.sh --name realjax-v5p8 --zone us-east5-a --repo https://github.com/me/realjax --ref main
EOF
}

is_git_url() { [[ $1 =~ ^(https?|ssh|git)://|^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+: ]]; }

# Packs the local tree at $1 into the tarball $2: with git, the tracked files that still exist plus the
# untracked ones .gitignore lets through (so .venv/, runs/ and caches stay behind).
pack_local_tree() {
  local src=$1 out=$2
  if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    if [[ $DRY_RUN == 1 ]]; then
      local q_src q_out
      q_src=$(quote_word "$src") q_out=$(quote_word "$out")
      echo "+ git -C $q_src ls-files -z --cached --others --exclude-standard | tar -C $q_src --null -T - -czf $q_out"
      return 0
    fi
    note "+ packing $src (git ls-files) into $out"
    local f
    git -C "$src" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do [[ -e $src/$f ]] && printf '%s\0' "$f"; done |
      tar -C "$src" --null -T - -czf "$out"
  else
    run tar -C "$src" --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ -czf "$out" .
  fi
}

main() {
  local name='' zone='' repo='' ref='' data='' ckpt='' output='' python='' no_constraints=0
  split_flag_values "$@"
  set -- "${ARGS[@]}"
  while (($#)); do
    common_flag "$@" && { shift "$CONSUMED"; continue; }
    case $1 in
      --repo) need_value "$@"; repo=$2; shift 2 ;;
      --ref) need_value "$@"; ref=$2; shift 2 ;;
      --data) need_value "$@"; data=$2; shift 2 ;;
      --ckpt) need_value "$@"; ckpt=$2; shift 2 ;;
      --output) need_value "$@"; output=$2; shift 2 ;;
      --python) need_value "$@"; python=$2; shift 2 ;;
      --no-constraints) no_constraints=1; shift ;;
      *) usage_error "unknown argument '$1'" ;;
    esac
  done
  require_name_zone
  [[ -z $python || $python =~ ^[0-9]+\.[0-9]+$ ]] ||
    usage_error "--python takes a version such as 3.11, got '$python'"
  [[ -n $repo ]] || repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

  # Arguments of `worker.sh install`, the same on every worker.
  local -a install=(install)
  [[ -n $data ]] && install+=(--data "$data")
  [[ -n $ckpt ]] && install+=(--ckpt "$ckpt")
  [[ -n $output ]] && install+=(--output "$output")
  [[ -n $python ]] && install+=(--python "$python")
  ((no_constraints)) && install+=(--no-constraints)
  if [[ -n $output && $output != gs://* ]]; then
    note "note: --output $output is local to each worker; on a multi-host slice use gs:// so that all"
    note "      hosts write one checkpoint (and it survives deleting the TPU)."
  fi

  scope_flags "$zone"
  local remote
  if is_git_url "$repo"; then
    # Fetch + detached checkout makes a rerun land exactly on REF, whatever was checked out before.
    local qrepo qref
    qrepo=$(printf '%q' "$repo")
    qref=$(printf '%q' "${ref:-HEAD}")
    remote="set -e; test -d $REMOTE_REPO/.git || git clone --quiet $qrepo $REMOTE_REPO"
    remote+="; git -C $REMOTE_REPO fetch --quiet --tags origin"
    remote+="; git -C $REMOTE_REPO checkout --quiet --detach origin/$qref 2>/dev/null"
    remote+=" || git -C $REMOTE_REPO checkout --quiet --detach $qref"
    remote+="; $(remote_worker_cmd "${install[@]}")"
  else
    [[ -z $ref ]] || usage_error "--ref only applies to a git URL in --repo (a local path is copied as it is)"
    [[ -d $repo ]] || usage_error "--repo '$repo' is neither a git URL nor a local directory"
    [[ -f $repo/tpu_scripts/worker.sh ]] || usage_error "--repo '$repo' has no tpu_scripts/worker.sh"
    if [[ $DRY_RUN == 1 ]]; then
      TARBALL=${TMPDIR:-/tmp}/realjax-src.XXXXXX
    else
      TARBALL=$(mktemp "${TMPDIR:-/tmp}/realjax-src.XXXXXX")
      trap 'rm -f "$TARBALL"' EXIT
    fi
    pack_local_tree "$repo" "$TARBALL"
    run "$GCLOUD" compute tpus tpu-vm scp "$TARBALL" "$name:realjax-src.tgz" "${SCOPE[@]}" --worker=all
    # Unpack beside the old tree; worker.sh install then swaps it in, keeping the old venv.
    remote="set -e; rm -rf ~/realjax.incoming; mkdir -p ~/realjax.incoming"
    remote+="; tar -xzf ~/realjax-src.tgz -C ~/realjax.incoming; rm -f ~/realjax-src.tgz"
    remote+="; bash ~/realjax.incoming/tpu_scripts/worker.sh $(printf '%q ' "${install[@]}")--src ~/realjax.incoming"
  fi
  ssh_cmd "$name" "$zone" all "$remote"
  run "${CMD[@]}"
  note "Next: check the config fits and launch, e.g."
  note "  tpu_scripts/launch.sh --name $name --zone $zone${PROJECT:+ --project $PROJECT} \\"
  note "      --config configs/<experiment>.yaml --compile-first"
}

main "$@"
