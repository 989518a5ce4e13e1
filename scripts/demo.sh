#!/usr/bin/env bash
# The README's main command: installs what is missing, builds, and runs the PD demos on the
# embedded default topology (examples/topologies/local.yaml):
#  1. a prefill-side process streams a 32-layer request into a decode-side process over UCX; the
#     decode side verifies every byte and prints per-layer timing and GB/s;
#  2. the reference engines as the topology's prefill0 and decode0 (kvfabric-engine --topology
#     --engine), driven by a PD proxy (kvfabric-pd-demo): the prefill engine computes the prompt and
#     streams each layer's KV into the decode engine's own paged pool as soon as it is written; the
#     decode engine continues from the first token, and the tokens are compared with what one
#     engine gives alone. On the CPU (tiny shape) or, with two GPUs, on the GPUs (Llama-3-8B shape).
# Arguments go to the first demo (kvfabric-pd-stream).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
./scripts/setup-deps.sh
./scripts/build.sh
./build/bin/kvfabric-pd-stream --topology examples/topologies/local.yaml "$@"

echo
# 2. The reference engines as services of the topology's engines, driven by the PD proxy. With
#    two GPUs (and a CUDA build) the GPU topology: Llama-3-8B shape on cuda:0 and cuda:1, an
#    8192-token prompt, KV over NVLink (cuda_ipc); otherwise the CPU engines (tiny shape) over UCX.
topology=examples/topologies/local.yaml prompt=100
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if ((gpus >= 2)) && grep -qE '^CMAKE_CUDA_COMPILER:[A-Z]+=/' build/CMakeCache.txt; then
  topology=examples/topologies/gpu-2x.yaml prompt=8192
fi
echo "== PD with the reference engines of $topology (kvfabric-engine --topology, kvfabric-pd-demo) =="
log=$(mktemp -d "${TMPDIR:-/tmp}/kvf-demo.XXXXXX")
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$log"' EXIT
for engine in decode0 prefill0; do
  ./build/bin/kvfabric-engine --topology "$topology" --engine $engine >"$log/$engine.log" 2>&1 &
  pids+=($!)
done
for engine in decode0 prefill0; do
  for _ in $(seq 1800); do grep -qE 'serving on|kvfabric-engine: ' "$log/$engine.log" && break; sleep 0.1; done
  grep -q 'serving on' "$log/$engine.log" || { echo "demo: engine $engine did not start:"; cat "$log/$engine.log"; exit 1; }
  sed "s/^/demo: /" "$log/$engine.log"
done
./build/bin/kvfabric-pd-demo --topology "$topology" --prompt-tokens $prompt --new 16 --requests 3 --warmup 1 --compare
