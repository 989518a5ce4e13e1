#!/usr/bin/env bash
# ucx_perftest_put.sh SIZE ITERS [WARMUP]: one ucx_perftest ucp_put_bw run on this host between two
# processes (server and client on 127.0.0.1, a free port), with the caller's UCX_* environment.
# Prints "GBPS MBS": the run's "overall" bandwidth as GB/s (1e9 bytes/s) and as ucx_perftest's MB/s
# (2^20 bytes). ucx_perftest's "Final:" line is: iterations, latency p50 / average / overall
# (usec), bandwidth average / overall (MB/s), message rate average / overall; "average" is the
# value since its last periodic report, "overall" the whole timed run, which is what kvfabric-perf
# reports. On failure prints nothing, writes the reason to stderr and exits 1.
# Environment: BENCH_TIMEOUT_S (per process, default 120). Used by bench-host.sh and bench-gpu.sh.
set -uo pipefail
size=${1:?size}
iters=${2:?iterations}
warmup=${3:-$((iters / 10 + 1))}
limit=${BENCH_TIMEOUT_S:-120}
command -v ucx_perftest >/dev/null || { echo "ucx_perftest not found (Debian: ucx-utils)" >&2; exit 1; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ucx-perftest.XXXXXX")
trap 'kill "${server:-}" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"' EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# Listening on PORT (from /proc/net/tcp, state 0A), without connecting to it: ucx_perftest's server
# takes exactly one connection. (`ss` is not on every machine this runs on.)
listening() {
  local hex
  hex=$(printf '%04X' "$1")
  grep -qE "^ *[0-9]+: [0-9A-F]+:$hex [0-9A-F]+:[0-9A-F]+ 0A " /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

timeout -k 3 "$limit" ucx_perftest -p "$port" >"$tmp/server.log" 2>&1 </dev/null &
server=$!
for ((i = 0; i < 100; i++)); do
  listening "$port" && break
  sleep 0.1
done
if ! listening "$port"; then
  echo "ucx_perftest's server did not listen on $port: $(tail -n 2 "$tmp/server.log" | tr '\n' ' ')" >&2
  exit 1
fi
timeout -k 3 "$limit" ucx_perftest 127.0.0.1 -p "$port" -t ucp_put_bw -s "$size" -n "$iters" -w "$warmup" \
  >"$tmp/client.log" 2>&1 </dev/null
rc=$?
wait "$server" 2>/dev/null
mbs=$(awk '$1 == "Final:" { print $7 }' "$tmp/client.log")
if [[ $rc != 0 || -z $mbs ]]; then
  echo "ucx_perftest failed (exit $rc): $(grep -v '^[|+]' "$tmp/client.log" | tail -n 2 | tr '\n' ' ')" >&2
  exit 1
fi
python3 -c "import sys; m = float(sys.argv[1]); print('%.4f %s' % (m * 1048576 / 1e9, sys.argv[1]))" "$mbs"
