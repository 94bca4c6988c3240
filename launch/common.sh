# Sourced by the launch scripts: the repository root, its venv, CPU defaults when there is no GPU, the GPU count,
# and run_launcher (the launcher in a session of its own, stop signals forwarded to its ranks).
# shellcheck shell=bash
# The caller's working directory is kept: relative paths in the arguments (--index, meta.output_dir, a preset file)
# resolve against it; the package is found through PYTHONPATH and its configs/ by absolute path.
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$LAUNCH_DIR")"
VENV_BIN="${VENV_BIN:-$REPO/.venv/bin}"
# The launchers by full path, PATH left alone: a venv's pip `ninja` ahead of the system one on PATH makes torch
# rebuild DeepSpeed's JIT ops (~1-2 min) whenever processes with and without it share TORCH_EXTENSIONS_DIR.
DEEPSPEED="$VENV_BIN/deepspeed"
TORCHRUN="$VENV_BIN/torchrun"
[ -x "$DEEPSPEED" ] || DEEPSPEED="$(command -v deepspeed || echo "$VENV_BIN/deepspeed")"
[ -x "$TORCHRUN" ] || TORCHRUN="$(command -v torchrun || echo "$VENV_BIN/torchrun")"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # No GPU: DeepSpeed's cpu accelerator and gloo; one BLAS thread per rank unless told otherwise.
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
MASTER_PORT="${MASTER_PORT:-29500}"

# The number of GPUs nvidia-smi lists; 0 without nvidia-smi or when it fails (never an error under set -e).
gpu_count() {
  command -v nvidia-smi >/dev/null 2>&1 || { echo 0; return 0; }
  nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
}

# NAME VALUE: VALUE ranks per node, a positive integer, or a one-line message and exit 2.
check_ranks() {
  if ! [[ "$2" =~ ^[0-9]+$ ]]; then
    echo "$1=$2: not a number of ranks" >&2; exit 2
  fi
  [ "$2" -ge 1 ] || { echo "no GPU found: set $1=N (ranks on the CPU)" >&2; exit 2; }
}

# run_launcher DEPTH CMD...: runs the launcher CMD in a session of its own and returns its exit status. The ranks
# are the processes DEPTH levels below it (2 for `deepspeed`: runner -> deepspeed.launcher.launch -> ranks; 1 for
# torchrun). A first TERM, INT, HUP or USR1 sent to this script goes to the ranks only (HUP as TERM): each finishes
# its step, saves a checkpoint and exits 0, then the launcher exits 0 and so does this script. The launchers' own
# handlers would instead signal every process (data loader workers too) and SIGKILL whatever still runs after 30 s,
# possibly in the middle of saving. A second signal, or one that comes before any rank runs, terminates the
# launcher's whole session.
_LAUNCHER_PID=""
_RANK_DEPTH=1
_STOPS=0
_SIGNALLED=0

_descendants() {  # PID DEPTH: the processes DEPTH levels below PID
  local pids="$1" depth="$2" next p
  while [ "$depth" -gt 0 ]; do
    next=""
    for p in $pids; do next="$next $(pgrep -P "$p" 2>/dev/null || true)"; done
    pids="$next"
    depth=$((depth - 1))
  done
  # shellcheck disable=SC2086
  echo $pids
}

_forward() {  # SIGNAL: the trap for TERM, INT, HUP and USR1
  local ranks
  _SIGNALLED=1
  _STOPS=$((_STOPS + 1))
  ranks="$(_descendants "$_LAUNCHER_PID" "$_RANK_DEPTH")"
  if [ "$_STOPS" -eq 1 ] && [ -n "$ranks" ]; then
    echo "launch: SIG$1 sent to the ranks ($ranks): they save a checkpoint after this step and exit" >&2
    # shellcheck disable=SC2086
    kill -s "$1" $ranks 2>/dev/null || true
  else
    echo "launch: SIG$1: terminating the launcher and every process it started" >&2
    kill -s TERM -- "-$_LAUNCHER_PID" 2>/dev/null || kill -s TERM "$_LAUNCHER_PID" 2>/dev/null || true
  fi
}

run_launcher() {
  local rc=0
  _RANK_DEPTH="$1"
  shift
  trap '_forward TERM' TERM HUP
  trap '_forward INT' INT
  trap '_forward USR1' USR1
  # A background command of a script is never a process group leader, so setsid does not fork: $! is the launcher,
  # and the session it leads holds every process it starts (but torchrun's ranks, which torchrun waits for).
  local session=0
  if command -v setsid >/dev/null 2>&1 && command -v pgrep >/dev/null 2>&1; then
    setsid "$@" &
    session=1
  else
    "$@" &
  fi
  _LAUNCHER_PID=$!
  while :; do
    _SIGNALLED=0
    wait "$_LAUNCHER_PID" && rc=0 || rc=$?
    # wait returns early when a trapped signal arrives; bash keeps the status of a launcher that has ended
    [ "$_SIGNALLED" -eq 1 ] || break
  done
  # A launcher killed by a signal sent to every process (scancel, a time limit) leaves deepspeed.launcher.launch
  # stopping the ranks: return only when the last of them has exited.
  while [ "$session" -eq 1 ] && pgrep -s "$_LAUNCHER_PID" >/dev/null 2>&1; do sleep 1; done
  trap - TERM HUP INT USR1
  return "$rc"
}
