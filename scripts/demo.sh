#!/usr/bin/env bash
# The README's main command: installs what is missing, builds, and runs the PD demos on the
# embedded default topology (examples/topologies/local.yaml):
#  1. a prefill-side process streams a 32-layer request into a decode-side process over UCX; the
#     decode side verifies every byte and prints per-layer timing and GB/s;
#  2. the CPU reference engines: kvfabric-engine prefill computes a 100-token prompt and streams
#     each layer's KV into a kvfabric-engine decode process's own paged pool as soon as it is
#     written; the decode engine continues the request, and its tokens are compared with what one
#     engine gives with prefill and decode in one place.
# Arguments go to the first demo (kvfabric-pd-stream).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
./scripts/setup-deps.sh
./scripts/build.sh
./build/bin/kvfabric-pd-stream --topology examples/topologies/local.yaml "$@"

echo
echo "== PD with the CPU reference engines (tiny Llama-shaped model, seeded weights) =="
log=$(mktemp -d "${TMPDIR:-/tmp}/kvf-demo.XXXXXX")
./build/bin/kvfabric-engine decode --listen 127.0.0.1:0 >"$log/decode.log" 2>&1 &
decode_pid=$!
trap 'kill "$decode_pid" 2>/dev/null; wait "$decode_pid" 2>/dev/null; rm -rf "$log"' EXIT
for _ in $(seq 100); do grep -q 'listening on' "$log/decode.log" && break; sleep 0.1; done
port=$(grep -oE 'listening on [^ ]+:[0-9]+' "$log/decode.log" | sed -E 's/.*:([0-9]+)$/\1/' || true)
[[ -n $port ]] || { echo "demo: the decode engine did not start:"; cat "$log/decode.log"; exit 1; }
./build/bin/kvfabric-engine prefill --connect "127.0.0.1:$port" --prompt-tokens 100 --new 16 | tee "$log/prefill.log"
for _ in $(seq 100); do grep -q '^request 1 ' "$log/decode.log" && break; sleep 0.1; done
grep '^request 1' "$log/decode.log" | sed 's/^/decode engine: /'
want=$(grep -m1 '^reference tokens:' "$log/prefill.log" | cut -d: -f2 || true)
got=$(grep -m1 '^request 1 tokens:' "$log/decode.log" | cut -d: -f2 || true)
if [[ -n $want && $got == "$want" ]]; then
  echo "demo: the disaggregated decode gave exactly the single engine's tokens"
else
  echo "demo: MISMATCH: decode '$got', single engine '$want'"
  exit 1
fi
