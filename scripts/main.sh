#!/usr/bin/env bash
# The main job, end to end on the embedded defaults: synthetic ads-CVR data -> task shards
# -> MAML and ERM training with 2 processes -> cold-start evaluation -> batch prediction
# -> MLflow (SQLite).
# Usage: bash scripts/main.sh [CONFIG]   (default configs/ads_cvr.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
CONFIG=${1:-configs/ads_cvr.yaml}
NAME=$(basename "$CONFIG" .yaml)
OUT=runs/$NAME
URI="sqlite:///$PWD/mlflow.db"
start=$(date +%s)

rm -rf "$OUT"  # a new run of the job; a training run of its own continues with --resume auto
gmeta synth --config "$CONFIG"
gmeta prepare --config "$CONFIG"
# (evaluation runs once below, for both models, and logs into the MAML run)
gmeta train --config "$CONFIG" --tracking-uri "$URI" train.output_dir="$OUT/maml" tracking.run_name="$NAME-maml" \
  train.eval_at_end=false
gmeta train --config "$CONFIG" --tracking-uri "$URI" train.output_dir="$OUT/erm" tracking.run_name="$NAME-erm" \
  train.eval_at_end=false meta.algorithm=erm
gmeta evaluate --config "$CONFIG" --checkpoint "$OUT/maml/checkpoint" --baseline "$OUT/erm/checkpoint" \
  --tracking-uri "$URI" --out "$OUT/maml/eval"
gmeta predict --checkpoint "$OUT/maml/checkpoint" --out "$OUT/predictions"

cat <<MSG

done in $(( $(date +%s) - start ))s
  cold-start report:  $OUT/maml/eval/eval_report.{md,html,json} and plots (*.png)
  predictions:        $OUT/predictions/part-*.parquet (held-out tasks' query rows)
  checkpoints:        $OUT/maml/checkpoint  $OUT/erm/checkpoint
  MLflow runs:        $URI  (experiment of $CONFIG)
  browse them with:   .venv/bin/mlflow ui --backend-store-uri $URI
MSG
