#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, runs the whole suite with ctest.
# Extra arguments go to ctest (e.g. -L unit).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
./scripts/setup-deps.sh
./scripts/build.sh
cd build
ctest --output-on-failure --timeout 900 "$@"
