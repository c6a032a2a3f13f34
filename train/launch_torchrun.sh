#!/usr/bin/env bash
# torchrun: run once per node. One node: GPUS=8 train/launch_torchrun.sh CONFIG.yaml. N nodes: run it on every node
# with the same NNODES and MASTER_ADDR (the address of node 0) and that node's NODE_RANK (0 on node 0).
# Extra arguments are recipe overrides. The interpreter is $PYTHON (default: python3 on PATH).
#   GPUS=8 train/launch_torchrun.sh configs/optdnn_apg2_vit_s.yaml
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 GPUS=8 train/launch_torchrun.sh configs/optdnn_apg2_convnext_iso_l.yaml
# SIGTERM to torchrun reaches every local rank (torchrun passes it on, and kills the ranks 30 s later): each saves a
# checkpoint and exits.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [key=value ...]}; shift
NNODES=${NNODES:-1}
if (( NNODES > 1 )) && [[ -z "${MASTER_ADDR:-}" || -z "${NODE_RANK:-}" ]]; then
  echo "$0: NNODES=$NNODES needs MASTER_ADDR (the address of node 0, the same on every node) and NODE_RANK" \
       "(0 .. $((NNODES - 1)), this node's): without them every node would wait for the others forever" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's timm_optdnn, installed or not
exec "${PYTHON:-python3}" -m torch.distributed.run --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" \
  --nproc_per_node "${GPUS:-8}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m timm_optdnn.training --config "$CONFIG" "$@"
