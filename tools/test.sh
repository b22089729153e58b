#!/usr/bin/env bash
# Builds ftune and runs every test (ctest). Tests that need ../shared or a GPU skip with a
# message when those are absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/build.sh
ctest --test-dir build --output-on-failure --timeout 900 "$@"
