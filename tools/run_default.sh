#!/usr/bin/env bash
# The embedded default: builds ftune, trains LoRA on the tiny bundled model and dataset
# (inputs/default.toml) and plots the metrics. Extra arguments go to `ftune train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/build.sh
./build/ftune train --config inputs/default.toml "$@"
out=$(grep -E '^output_dir' inputs/default.toml | sed -E 's/.*"(.*)".*/\1/')
for py in python3 /usr/bin/python3; do
  if "$py" -c "import matplotlib" 2>/dev/null; then
    "$py" tools/plot_metrics.py "$out/metrics.jsonl" -o "$out/metrics.png" && break
  fi
done
