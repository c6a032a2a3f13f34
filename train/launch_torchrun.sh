#!/usr/bin/env bash
# torchrun: run once per node. NNODES=1 for one node; for N nodes run it on every node with its NODE_RANK and the
# address of node 0. Extra arguments are recipe overrides.
#   GPUS=8 train/launch_torchrun.sh configs/optdnn_apg2_vit_s.yaml
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 GPUS=8 train/launch_torchrun.sh configs/optdnn_apg2_convnext_iso_l.yaml
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [key=value ...]}; shift
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" -m torch.distributed.run --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --nproc_per_node "${GPUS:-8}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m timm_optdnn.training --config "$CONFIG" "$@"
