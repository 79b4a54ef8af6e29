#!/usr/bin/env bash
# One command, offline: set up .venv, teach the embedded pretrained toy world a held-out concept with LoLDU, and
# write before_after.png (same prompts and seeds, base model against adapter, with the judges' scores).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
export HF_HUB_OFFLINE=1
CONCEPT="${CONCEPT:-star}"
OUT="${1:-outputs/$CONCEPT}"
CLASS=$(python -c "import json; print(json.load(open('assets/toyworld/concepts/$CONCEPT.json'))['class_noun'])")
# the toy model needs a higher learning rate than SD's paper setting (5e-4) and no more steps than the paper's 400
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no --cpu \
  train_dreambooth_loldu.py \
  --pretrained_model_name_or_path assets/toyworld/pipeline \
  --instance_data_dir "assets/toyworld/concepts/$CONCEPT" \
  --instance_prompt "a photo of a sks $CLASS" \
  --resolution 64 --train_batch_size 4 --max_train_steps "${STEPS:-400}" --learning_rate "${LR:-1e-2}" \
  --checkpointing_steps 200 --validation_prompt "a photo of a sks $CLASS on a blue background" \
  --validation_steps 200 --num_validation_images 4 --report_to tensorboard --output_dir "$OUT"
python -m eval.before_after --adapter "$OUT" --concept "$CONCEPT" --out "$OUT/before_after.png"
ls -l "$OUT"/pytorch_loldu_weights.safetensors "$OUT/before_after.png"
