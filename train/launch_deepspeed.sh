#!/usr/bin/env bash
# DeepSpeed launcher: one node, or several listed in a hostfile (passwordless ssh between them; each line
# "host slots=<gpus>"). Extra arguments are recipe overrides. The interpreter is $PYTHON (default: python3 on PATH).
#   GPUS=8 train/launch_deepspeed.sh configs/optdnn_apg2_vit_s.yaml
#   HOSTFILE=hostfile GPUS=8 train/launch_deepspeed.sh configs/optdnn_apg2_convnext_iso_b.yaml
# SIGTERM or SIGUSR1 to this script reaches every rank: each saves a checkpoint and exits, and so does the script,
# with code 75 (EXIT_PREEMPTED; `run.resume=auto` continues the run). SIGINT stops everything without saving.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [key=value ...]}; shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's timm_optdnn, installed or not
ARGS=(--master_port "${MASTER_PORT:-29500}" --num_gpus "${GPUS:-8}")
if [[ -n "${HOSTFILE:-}" ]]; then
  ARGS+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$(head -n 1 "$HOSTFILE" | cut -d' ' -f1)}")
fi

# DeepSpeed's runner dies on SIGTERM without passing it on (its ranks then run on, orphaned), and its per-node
# launcher kills the ranks 30 s after a signal, which may be mid-save. So the signal goes to the ranks themselves:
# they save and exit, and the launchers exit with their code. Job control gives the runner its own process group
# (a background job of a script would otherwise ignore SIGINT).
set -m
"${PYTHON:-python3}" -m deepspeed.launcher.runner "${ARGS[@]}" --module timm_optdnn.training --config "$CONFIG" "$@" &
runner=$!
forward() {
  local ranks=""
  if [[ -z "${HOSTFILE:-}" ]]; then  # runner -> deepspeed.launcher.launch -> one process per rank
    ranks=$(pgrep -P "$(pgrep -d, -P "$runner")") || true
  fi
  if [[ -n "$ranks" ]]; then
    kill -s "$1" $ranks 2>/dev/null || true
  elif [[ -n "${HOSTFILE:-}" ]]; then  # ranks on other nodes: DeepSpeed's runner stops them through pdsh itself
    kill -s TERM "$runner" 2>/dev/null || true
  else  # still starting, nothing to save yet
    kill -s TERM -- "-$runner" 2>/dev/null || true
  fi
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'kill -s INT -- "-$runner" 2>/dev/null || true' INT
while true; do
  rc=0
  wait "$runner" || rc=$?
  kill -0 "$runner" 2>/dev/null || break  # still running: the wait was cut short by a signal
done
exit "$rc"
