#!/usr/bin/env bash
# DeepSpeed launcher: one node, or many nodes listed in a hostfile (passwordless ssh between them; each line
# "host slots=<gpus>"). Extra arguments are recipe overrides.
#   GPUS=8 train/launch_deepspeed.sh configs/optdnn_apg2_vit_s.yaml
#   HOSTFILE=hostfile GPUS=8 train/launch_deepspeed.sh configs/optdnn_apg2_convnext_iso_b.yaml
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [key=value ...]}; shift
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ARGS=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  ARGS+=(--hostfile "$HOSTFILE" --num_gpus "${GPUS:-8}" --master_addr "${MASTER_ADDR:-$(head -1 "$HOSTFILE" | cut -d' ' -f1)}")
else
  ARGS+=(--num_gpus "${GPUS:-8}")
fi
exec "$PY" -m deepspeed.launcher.runner "${ARGS[@]}" --module timm_optdnn.training --config "$CONFIG" "$@"
