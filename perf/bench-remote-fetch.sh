#!/usr/bin/env bash
# bench-remote-fetch.sh: a remote fetch between two kvfabricd nodes against kvfabric-perf on the
# same link, measured in one run, alternating sides each round, medians and their ratio.
# Two network namespaces on a bridge (tests/netns/lib.sh), UCX over tcp on their interface only.
#   fetch: node b's /move {from a, to b, copy} of CHUNKS chunks of CHUNK bytes that an engine
#          stored on a (wall time of the HTTP call: grant, the holder's puts into b's arena,
#          checksums, commit), then b's store is cleared for the next round;
#   perf:  kvfabric-perf client on a putting into a server on b (--mode bw, CHUNK-sized puts over
#          the same footprint) — the link as kvfabric's streaming path drives it.
# Usage: perf/bench-remote-fetch.sh [--rounds N] [--chunks N] [--chunk-bytes BYTES] [--fetch-by put|get]
# Environment: KVF_BIN (default build/bin). Needs root (network namespaces).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${KVF_BIN:-$root/build/bin}
rounds=5 chunks=64 chunk_bytes=4194304 fetch_by=put
while (($#)); do
  case $1 in
    --rounds) rounds=${2:?}; shift 2 ;;
    --chunks) chunks=${2:?}; shift 2 ;;
    --chunk-bytes) chunk_bytes=${2:?}; shift 2 ;;
    --fetch-by) fetch_by=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "bench-remote-fetch: unknown argument $1" >&2; exit 2 ;;
  esac
done
source "$root/tests/netns/lib.sh"
tmp=$(mktemp -d /tmp/kvf-bench-fetch.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  kvf_netns_teardown
  rm -rf "$tmp"
}
trap cleanup EXIT
kvf_netns_cluster 2 || { echo "bench-remote-fetch: $KVF_NETNS_ERROR" >&2; exit 77; }
A=${KVF_NS_ADDR[1]} B=${KVF_NS_ADDR[2]}
footprint=$((chunks * chunk_bytes))
arena=$(( (footprint * 2 + (64 << 20)) >> 20 ))MiB
cat >"$tmp/topology.yaml" <<YAML
cluster: bench-remote-fetch
transports:
  ucx_tls: tcp
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 64}
    chunk_tokens: 32
nodes:
  - {name: a, address: $A, control_port: 17000, http_port: 17080, store: {dram: $arena, socket: $tmp/a.sock}}
  - {name: b, address: $B, control_port: 17000, http_port: 17080, store: {dram: $arena, socket: $tmp/b.sock}}
YAML
export UCX_NET_DEVICES=kvf0 UCX_TLS=tcp
start() {  # I LOG CMD...
  local i=$1 log=$2
  shift 2
  ip netns exec "${KVF_NS[i]}" "$@" >"$log" 2>&1 &
  pids+=($!)
}
wait_for() {  # LOG REGEX
  for _ in $(seq 100); do grep -qE "$2" "$1" && return 0; sleep 0.1; done
  echo "bench-remote-fetch: no '$2' in $1: $(tail -3 "$1")" >&2
  exit 1
}
start 1 "$tmp/a.log" "$bin/kvfabricd" --topology "$tmp/topology.yaml" --node a --no-huge-pages --fetch-by "$fetch_by"
start 2 "$tmp/b.log" "$bin/kvfabricd" --topology "$tmp/topology.yaml" --node b --no-huge-pages --fetch-by "$fetch_by"
start 2 "$tmp/perf-server.log" "$bin/kvfabric-perf" server --listen "$B:18515"
wait_for "$tmp/a.log" '\] ready: '
wait_for "$tmp/b.log" '\] ready: '
wait_for "$tmp/perf-server.log" 'listening on '
ip netns exec "${KVF_NS[1]}" "$bin/kvfabric-store-tool" put --socket "$tmp/a.sock" --seed 11 --chunks "$chunks" \
  --bytes "$chunk_bytes" >/dev/null || { echo "bench-remote-fetch: storing on a failed" >&2; exit 1; }
keys=$("$bin/kvfabric-store-tool" keys --seed 11 --chunks "$chunks" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().split()))')
api() {  # PATH BODY -> body on stdout, time on fd 3
  ip netns exec "${KVF_NS[2]}" curl -s -H 'Content-Type: application/json' -w '\n%{time_total}' \
    "http://$B:17080$1" -d "$2"
}
echo "bench-remote-fetch: $chunks chunks x $chunk_bytes bytes ($((footprint >> 20)) MiB) a -> b over UCX tcp between namespaces, fetch by $fetch_by, $rounds rounds"
results=$tmp/results.tsv
: >"$results"
fetch_round() {
  local out t bytes
  out=$(api /move "{\"from\": \"a\", \"to\": \"b\", \"keys\": $keys, \"copy\": true}")
  t=$(tail -n1 <<<"$out")
  bytes=$(head -n1 <<<"$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["bytes"])' 2>/dev/null)
  if [[ $bytes != "$footprint" ]]; then
    echo "bench-remote-fetch: fetch round moved '$bytes' bytes, want $footprint: $(head -n1 <<<"$out")" >&2
    exit 1
  fi
  python3 -c "print('fetch\t%.4f' % ($bytes / $t / 1e9))" >>"$results"
  api /clear '{"all": true}' >/dev/null
}
perf_round() {
  ip netns exec "${KVF_NS[1]}" "$bin/kvfabric-perf" client --connect "$B:18515" --mode bw --sizes "$chunk_bytes" \
    --footprint "$footprint" --iters "$chunks" --json "$tmp/perf.json" >"$tmp/perf-client.log" 2>&1 ||
    { echo "bench-remote-fetch: kvfabric-perf failed: $(tail -3 "$tmp/perf-client.log")" >&2; exit 1; }
  python3 -c "import json; print('perf\t%.4f' % json.load(open('$tmp/perf.json'))['results'][0]['gbps'])" >>"$results"
}
fetch_round  # warm-up: connections, first touch of both arenas
api /clear '{"all": true}' >/dev/null
perf_round
: >"$results"
for r in $(seq "$rounds"); do
  if ((r % 2)); then perf_round; fetch_round; else fetch_round; perf_round; fi
  echo "bench-remote-fetch: round $r/$rounds: $(tail -n2 "$results" | tr '\n\t' '  ')"
done
python3 - "$results" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]) if l.strip()]
f = [float(v) for k, v in rows if k == "fetch"]
p = [float(v) for k, v in rows if k == "perf"]
mf, mp = statistics.median(f), statistics.median(p)
print("| path | GB/s (median) | runs |\n|---|---|---|")
print(f"| remote fetch (/move copy, end to end) | {mf:.3f} | {len(f)} |")
print(f"| kvfabric-perf bw, same link and size | {mp:.3f} | {len(p)} |")
print(f"ratio fetch / kvfabric-perf: {mf / mp:.2f}")
PY
grep -h "fetched" "$tmp/b.log" | tail -n 2
