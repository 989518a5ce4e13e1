#!/usr/bin/env bash
# The README's main command: installs what is missing, builds, and runs the PD streaming demo on
# the embedded default topology (examples/topologies/local.yaml): a prefill-side process streams
# a 32-layer request into a decode-side process over UCX; the decode side verifies every byte and
# prints per-layer timing and GB/s.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
./scripts/setup-deps.sh
./scripts/build.sh
exec ./build/bin/kvfabric-pd-stream --topology examples/topologies/local.yaml "$@"
