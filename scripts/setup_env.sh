#!/usr/bin/env bash
# Create .venv (once) and install loldu-sd with its dev extra (training, studio, eval and test tools).
# Sourced by quickstart.sh and test.sh.
set -euo pipefail
VENV="${LOLDU_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
if ! python -c "import loldu_sd, pytest, peft, accelerate, gradio, open_clip" >/dev/null 2>&1 || [ "${LOLDU_REINSTALL:-0}" = 1 ]; then
  python -m pip install -q --upgrade pip
  # torch first, pinned: an unpinned torch would pull several GB of CUDA wheels
  python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  python -m pip install -q -e ".[dev]"
fi
