#!/usr/bin/env bash
# Configures and builds ftune into build/ (Release, Ninja). Used by run_default.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build --parallel "$(nproc)"
