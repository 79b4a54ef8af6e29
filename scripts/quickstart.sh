#!/usr/bin/env bash
# One command, offline: set up .venv, build the tiny pipeline, train a concept from assets/concept, generate with it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
export HF_HUB_OFFLINE=1
OUT="${1:-outputs/robot}"
python -m loldu_sd.testing --save tiny-sd
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no --cpu \
  train_dreambooth_loldu.py \
  --pretrained_model_name_or_path tiny-sd \
  --instance_data_dir assets/concept \
  --instance_prompt "a photo of sks robot" \
  --resolution 64 --train_batch_size 1 --max_train_steps 40 --checkpointing_steps 20 \
  --learning_rate 5e-3 --validation_prompt "a photo of sks robot on the beach" --validation_steps 20 \
  --num_validation_images 2 --report_to tensorboard --output_dir "$OUT"
python -m loldu_sd.generate --pretrained_model_name_or_path tiny-sd --adapter "$OUT" \
  --prompt "a photo of sks robot on the beach" --num_inference_steps 10 --output "$OUT/beach.png"
ls -l "$OUT"/pytorch_loldu_weights.safetensors
