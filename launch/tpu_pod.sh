#!/usr/bin/env bash
# Runs pfm on every worker of a Cloud TPU VM slice (one process per host; jax.distributed finds
# the slice by itself). Run it from the root of a pfm checkout on your own machine.
#
#   export TPU_NAME=my-tpu ZONE=us-central2-b
#   launch/tpu_pod.sh setup
#   launch/tpu_pod.sh train --config=configs/default.py --workdir=gs://my-bucket/pfm/demo
#   launch/tpu_pod.sh exec 'tail -n 5 pfm-train.log'
#
# See usage() below and launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh COMMAND [ARGS...]

Commands (each runs on all workers of the TPU VM slice at once):
  setup             copy this checkout to every worker (or clone REPO_URL), create a virtual
                    environment and pip install -e '.[tpu]' in it
  train FLAGS...    python -m pfm.train FLAGS... on every worker; FLAGS must include --config and
                    a --workdir that every worker sees: a gs:// path
  exec 'COMMAND'    run a shell command on every worker (in its home directory)

Environment:
  TPU_NAME     name of the TPU VM (required)
  ZONE         its zone (required)
  PROJECT      Google Cloud project (default: gcloud's configured project)
  REPO_URL     setup clones this git URL on the workers instead of copying this checkout
  REPO_REF     branch, tag or commit to check out from REPO_URL (default: its default branch)
  REMOTE_DIR   checkout directory on the workers, relative to the home directory (default: pfm)
  VENV         virtual environment on the workers, relative to the home directory
               (default: pfm-venv)
  PYTHON       interpreter that creates the environment; pfm needs Python >= 3.11
               (default: python3; e.g. PYTHON=python3.11 after
               launch/tpu_pod.sh exec 'sudo apt-get install -y python3.11 python3.11-venv')
  LOG          log file on each worker, relative to the home directory (default: pfm-train.log)
  DETACH=1     train starts the run in the background with nohup and returns at once;
               follow it with: launch/tpu_pod.sh exec 'tail -f pfm-train.log'
EOF
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case "$1" in
  -h|--help|help) usage; exit 0 ;;
esac
: "${TPU_NAME:?set TPU_NAME to the TPU VM name (see launch/tpu_pod.sh --help)}"
: "${ZONE:?set ZONE to the TPU VM zone (see launch/tpu_pod.sh --help)}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
REMOTE_DIR="${REMOTE_DIR:-pfm}"
VENV="${VENV:-pfm-venv}"
PYTHON="${PYTHON:-python3}"
LOG="${LOG:-pfm-train.log}"
DETACH="${DETACH:-0}"
tarball="" index=""  # setup's source archive and scratch git index; removed on exit

gcloud_args=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_args+=(--project="$PROJECT")
fi

# Runs a bash command line on all workers at once. gcloud returns non-zero if any worker fails.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --worker=all \
    --command="bash -c $(printf '%q' "set -euo pipefail; cd \"\$HOME\"; $1")"
}

q() { printf '%q' "$1"; }  # quotes one word for the remote shell

setup() {
  local fetch
  if [[ -n "$REPO_URL" ]]; then
    fetch="rm -rf $(q "$REMOTE_DIR"); git clone $(q "$REPO_URL") $(q "$REMOTE_DIR")"
    if [[ -n "$REPO_REF" ]]; then
      fetch+="; git -C $(q "$REMOTE_DIR") checkout $(q "$REPO_REF")"
    fi
  else
    # Ship this checkout as `git status` sees it: tracked files with their uncommitted changes
    # and untracked ones, not those .gitignore leaves out (runs/, virtual environments). A
    # scratch index gets `git add -A`, so the real index and working tree stay as they are.
    git rev-parse --show-toplevel >/dev/null 2>&1 || die "run setup inside a pfm git checkout"
    local root tree
    root="$(git rev-parse --show-toplevel)"
    tarball="$(mktemp "${TMPDIR:-/tmp}/pfm-src.XXXXXX")"
    index="$tarball.index"
    trap 'rm -f "$tarball" "$index"' EXIT
    cp "$(git -C "$root" rev-parse --path-format=absolute --git-path index)" "$index"
    GIT_INDEX_FILE="$index" git -C "$root" add -A
    tree="$(GIT_INDEX_FILE="$index" git -C "$root" write-tree)"
    git -C "$root" archive --format=tar.gz -o "$tarball" "$tree"
    echo "tpu_pod.sh: copying the working tree of $root" \
      "(at $(git -C "$root" rev-parse --short HEAD)) to all workers"
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:pfm-src.tar.gz" "${gcloud_args[@]}" \
      --worker=all
    fetch="rm -rf $(q "$REMOTE_DIR"); mkdir -p $(q "$REMOTE_DIR")"
    fetch+="; tar -xzf pfm-src.tar.gz -C $(q "$REMOTE_DIR"); rm -f pfm-src.tar.gz"
  fi
  local py venv check
  py="$(q "$PYTHON")"
  venv="\"\$HOME\"/$(q "$VENV")"
  check="$py -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo \"worker"
  check+=" \$(hostname): $py is missing or older than Python 3.11; set PYTHON\" >&2; exit 1; }"
  local install
  install="$py -m venv $venv; $venv/bin/pip install -q -U pip; cd $(q "$REMOTE_DIR")"
  install+="; $venv/bin/pip install -q -e '.[tpu]'"
  install+="; $venv/bin/python -c 'import jax, pfm; print(\"jax\", jax.__version__, \"ready\")'"
  on_all_workers "$check; $fetch; $install"
}

train() {
  [[ $# -ge 1 ]] || die "train needs pfm.train flags (see --help)"
  local arg prev="" workdir=""
  for arg in "$@"; do
    if [[ "$arg" == --workdir=* ]]; then workdir="${arg#--workdir=}"; fi
    if [[ "$prev" == --workdir ]]; then workdir="$arg"; fi
    prev="$arg"
  done
  [[ -n "$workdir" ]] || die "train needs --workdir=gs://BUCKET/PATH (visible to all workers)"
  if [[ "$workdir" != gs://* ]]; then
    echo "tpu_pod.sh: warning: --workdir=$workdir is not a gs:// path; every worker must see" \
      "the same directory (checkpoints are written collectively)" >&2
  fi
  local args="" run log
  for arg in "$@"; do args+=" $(q "$arg")"; done
  run="cd $(q "$REMOTE_DIR") && PYTHONUNBUFFERED=1"
  run+=" \"\$HOME\"/$(q "$VENV")/bin/python -m pfm.train$args"
  log="\"\$HOME\"/$(q "$LOG")"
  if [[ "$DETACH" == 1 ]]; then
    local started
    started="echo \"worker \$(hostname): started, log in $log\""
    on_all_workers "nohup bash -c $(q "$run") > $log 2>&1 < /dev/null & $started"
  else
    on_all_workers "$run 2>&1 | tee $log"
  fi
}

command="$1"
shift
case "$command" in
  setup) [[ $# -eq 0 ]] || die "setup takes no arguments"; setup ;;
  train) train "$@" ;;
  exec) [[ $# -eq 1 ]] || die "exec takes one quoted command"; on_all_workers "$1" ;;
  *) usage >&2; exit 2 ;;
esac
