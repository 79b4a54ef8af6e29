#!/usr/bin/env bash
# One command, offline: set up .venv, teach the embedded toy world's pretrained pipeline a held-out concept with LoLDU
# (about 2 minutes on 2 CPU cores), then draw the same prompts and seeds without and with the adapter:
# <out>/before_after.png, with the toy-world judges' subject- and prompt-fidelity scores.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
export HF_HUB_OFFLINE=1
CONCEPT="${CONCEPT:-star}"                 # star, disc, checker or eye (loldu_sd/toyworld/assets/concepts)
OUT="${1:-outputs/$CONCEPT}"
PIPE=loldu_sd/toyworld/assets/pipeline
PROMPT="$(python -c "from loldu_sd.toyworld.concepts import CONCEPTS; print(CONCEPTS['$CONCEPT'].instance_prompt)")"
SETTINGS="$(python -c "from loldu_sd import toyworld as t; print(t.LEARNING_RATE, t.TRAIN_STEPS, t.TRAIN_BATCH_SIZE)")"
read -r LR STEPS BATCH <<< "$SETTINGS"           # the small model's settings (loldu_sd/toyworld/__init__.py)
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no --cpu \
  train_dreambooth_loldu.py \
  --pretrained_model_name_or_path "$PIPE" \
  --instance_data_dir "loldu_sd/toyworld/assets/concepts/$CONCEPT" --instance_prompt "$PROMPT" \
  --resolution 64 --train_batch_size "$BATCH" --max_train_steps "$STEPS" --learning_rate "$LR" \
  --checkpointing_steps 200 --validation_prompt "${PROMPT/a photo of a/a photo of two}s" --validation_steps 200 \
  --num_validation_images 2 --report_to tensorboard --output_dir "$OUT"
python -m eval.before_after --adapter "$OUT" --concept "$CONCEPT" --pretrained_model_name_or_path "$PIPE" \
  --out "$OUT/before_after.png"
ls -l "$OUT"/pytorch_loldu_weights.safetensors "$OUT/before_after.png"
