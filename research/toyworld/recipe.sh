#!/usr/bin/env bash
# The toy world's full pretraining recipe, every stage resumable: bash research/toyworld/recipe.sh OUT [DEVICE]
#   DEVICE cuda: the GPU recipe (rendering in worker processes); cpu: the same recipe on this machine's cores.
#   TINY=1 runs every stage for a few steps (what CI-sized checks and a first try on a new machine use).
# Re-running the same command continues each stage from its last checkpoint in OUT.
set -euo pipefail
OUT="${1:?usage: recipe.sh OUT [cpu|cuda]}"
DEVICE="${2:-cpu}"
WORKERS="${WORKERS:-$([ "$DEVICE" = cpu ] && echo 0 || echo 12)}"
if [ "${TINY:-0}" = 1 ]; then
  VAE=(--vae_steps 2 --vae_batch 2) JUDGES=(--judge_steps 2 --image_tower_steps 2) GEN=(--steps 2 --decay_steps 2 --batch 2)
else
  VAE=(--vae_steps 6000 --vae_batch 16) JUDGES=(--judge_steps 1500 --image_tower_steps 1500)
  GEN=(--steps 14500 --decay_steps 14500 --batch 32 --lr 8e-4)
fi
run() { python -m research.toyworld.pretrain --out "$OUT" --device "$DEVICE" --workers "$WORKERS" --resume "$@"; }
run --stage vae --latent_channels 16 "${VAE[@]}"
run --stage judges "${JUDGES[@]}"
run --stage generator "${GEN[@]}"
run --stage export
