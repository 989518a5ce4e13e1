#!/usr/bin/env bash
# bench-pd-codec.sh: PD layer streams raw vs compressed over a slow link (issue 6, item 4): kvfabric-perf
# layers mode through --transport ucx_staged, --codec identity against --codec int8 (or fp8), over
# UCX_TLS=tcp, alternating raw and compressed clients round after round so that a noisy, shared
# machine hurts both alike; medians and their ratio.
#   request: the Llama-3-8B-like request, 32 layers x 512 blocks x (32 KiB K + 32 KiB V) = 1 GiB,
#            shuffled destination blocks, rows of 2048 bytes (8 KV heads x 128 x bf16)
#   servers: one per codec (a process takes one codec), each landing requests in a poisoned pool
#            and checking every block against the CPU codec (raw: the values themselves; int8: the
#            codec's decode of them); a client fails on any difference, and so does the bench
#   link:    loopback (default), or with --netns two network namespaces joined by veth (root):
#            servers in one, clients in the other, UCX tcp over the veth pair; --rate caps the
#            clients' side of the veth (tc tbf), a slow link whose wire, not the CPU, is the limit
# Usage: perf/bench-pd-codec.sh [--rounds N] [--iters I] [--codec int8|fp8] [--netns [--rate R]]
#                               [--direct] [--blocks B] [--workers W] [--slots N] [--slot-bytes S]
#                               [--json FILE] [--tsv FILE]
#   --rounds N   rounds (default 5); each runs a raw client and a compressed client, I requests each
#   --iters I    requests per client run (default 3); a run's figure is its median request
#   --codec C    the compressed codec (default int8)
#   --netns      between two network namespaces over veth instead of loopback (needs root)
#   --rate R     with --netns: the clients' egress capped at R (tc's units: 2gbit, 500mbit, ...)
#   --direct     also a raw client over the plain ucx transport (direct puts, no staging) each round
#   --blocks B   blocks per layer (default 512: 1 GiB a request)
#   --workers W  ucx_staged encode/decode/copy threads per process (default 1)
#   --slots N    ucx_staged staging slots a side (default: kvfabric-perf's, 4)
#   --slot-bytes S  bytes of raw KV per staging slot (default: kvfabric-perf's, 32M)
#   --json FILE  results as JSON: every run, the medians, the ratio
#   --tsv FILE   every run as TSV: round, cell, GB/s
# Environment: KVF_BIN (default build/bin), BENCH_TIMEOUT_S (per client run, default 300),
# BENCH_KEEP_TMP=1 keeps the logs. Prints a table and "ratio <codec>/raw = X (medians of N rounds)".
set -uo pipefail

rounds=5 iters=3 codec=int8 netns=0 rate= direct=0 blocks=512 workers=1 slots= slot_bytes= json= tsv=
while (($#)); do
  case $1 in
    --rounds) rounds=${2:?}; shift 2 ;;
    --iters) iters=${2:?}; shift 2 ;;
    --codec) codec=${2:?}; shift 2 ;;
    --netns) netns=1; shift ;;
    --rate) rate=${2:?}; shift 2 ;;
    --direct) direct=1; shift ;;
    --blocks) blocks=${2:?}; shift 2 ;;
    --workers) workers=${2:?}; shift 2 ;;
    --slots) slots=${2:?}; shift 2 ;;
    --slot-bytes) slot_bytes=${2:?}; shift 2 ;;
    --json) json=${2:?}; shift 2 ;;
    --tsv) tsv=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-pd-codec.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for v in rounds iters blocks; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "bench-pd-codec.sh: --$v wants a positive integer" >&2; exit 2; }
done
[[ $workers =~ ^[0-9]+$ ]] || { echo "bench-pd-codec.sh: --workers wants an integer" >&2; exit 2; }
[[ -z $slots || $slots =~ ^[1-9][0-9]*$ ]] || { echo "bench-pd-codec.sh: --slots wants a positive integer" >&2; exit 2; }
[[ -z $slot_bytes || $slot_bytes =~ ^[1-9][0-9]*[KMG]?$ ]] || { echo "bench-pd-codec.sh: --slot-bytes wants a size (8M, 32M, ...)" >&2; exit 2; }
[[ $codec == int8 || $codec == fp8 ]] || { echo "bench-pd-codec.sh: --codec is int8 or fp8" >&2; exit 2; }
[[ -z $rate || $netns == 1 ]] || { echo "bench-pd-codec.sh: --rate needs --netns" >&2; exit 2; }

bin=${KVF_BIN:-build/bin}
[[ -x $bin/kvfabric-perf ]] || { echo "bench-pd-codec.sh: $bin/kvfabric-perf is not built (set KVF_BIN)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "bench-pd-codec.sh: python3 not found" >&2; exit 2; }
run_timeout=${BENCH_TIMEOUT_S:-300}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-pd-codec.XXXXXX")
# The binary under a name of its own, so that a name-based pkill elsewhere cannot stop our servers.
ln -s "$(cd "$bin" && pwd)/kvfabric-perf" "$tmp/kvfpdcodec-perf"
perf=$tmp/kvfpdcodec-perf
declare -A server_pid=() server_port=()
ns_server=() ns_client=() host=127.0.0.1

cleanup() {
  local pid
  for pid in "${server_pid[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 1 50); do  # up to 5 s to stop (a server frees a GiB pool and its staging)
    local alive=0
    for pid in "${server_pid[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${server_pid[@]}"; do
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if ((netns)); then kvf_netns_teardown; fi
  if [[ ${BENCH_KEEP_TMP:-0} == 1 ]]; then echo "bench-pd-codec: logs kept in $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'echo "bench-pd-codec: interrupted" >&2; exit 130' INT TERM

if ((netns)); then
  source "$(dirname "${BASH_SOURCE[0]}")/../tests/netns/lib.sh"
  kvf_netns_cluster 2 || { echo "bench-pd-codec.sh: --netns: $KVF_NETNS_ERROR" >&2; exit 2; }
  ns_server=(ip netns exec "${KVF_NS[1]}") ns_client=(ip netns exec "${KVF_NS[2]}") host=${KVF_NS_ADDR[1]}
  if [[ -n $rate ]]; then
    tc -n "${KVF_NS[2]}" qdisc add dev kvf0 root tbf rate "$rate" burst 4mb latency 200ms ||
      { echo "bench-pd-codec.sh: tc could not cap the link at $rate" >&2; exit 2; }
  fi
fi

common=(--layers 32 --blocks "$blocks" --block-bytes 32K --row-bytes 2048)
staged=(--transport ucx_staged --staging-workers "$workers")
[[ -n $slots ]] && staged+=(--staging-slots "$slots")
[[ -n $slot_bytes ]] && staged+=(--staging-bytes "$slot_bytes")

# start_server NAME ARGS...: a server on $host:0, its port in server_port[NAME].
start_server() {
  local name=$1 log=$tmp/server-$1.log
  shift
  "${ns_server[@]}" env UCX_TLS=tcp "$perf" server --listen "$host:0" "${common[@]}" "$@" >"$log" 2>&1 &
  server_pid[$name]=$!
  for _ in $(seq 1 200); do
    grep -qs 'listening on' "$log" && break
    kill -0 "${server_pid[$name]}" 2>/dev/null || break
    sleep 0.1
  done
  server_port[$name]=$(grep -soE 'listening on [^ ]+:[0-9]+' "$log" | sed -E 's/.*:([0-9]+)$/\1/')
  if [[ -z ${server_port[$name]} ]]; then
    echo "bench-pd-codec.sh: server $name did not come up:" >&2
    sed 's/^/  | /' "$log" >&2
    exit 1
  fi
}

start_server raw "${staged[@]}" --codec identity
start_server "$codec" "${staged[@]}" --codec "$codec"
cells=(raw "$codec")
if ((direct)); then
  start_server direct --transport ucx
  cells+=(direct)
fi

link=loopback
((netns)) && link="veth between two namespaces"
[[ -n $rate ]] && link+=", the clients' egress capped at $rate"
results=$tmp/results.tsv
: >"$results"
failed=0
echo "bench-pd-codec: $rounds rounds x (${cells[*]}), $iters requests each, 32 x $blocks blocks x 2 x 32K," \
  "UCX_TLS=tcp over $link"
for ((round = 1; round <= rounds; round++)); do
  # Alternate which cell goes first, so neither always follows the other.
  order=("${cells[@]}")
  ((round % 2 == 0)) && order=("$codec" raw "${cells[@]:2}")
  for cell in "${order[@]}"; do
    case $cell in
      raw) args=("${staged[@]}" --codec identity --verify) ;;
      direct) args=(--transport ucx --verify) ;;
      *) args=("${staged[@]}" --codec "$codec" --verify) ;;
    esac
    log=$tmp/client-$cell-$round.log
    timeout "$run_timeout" "${ns_client[@]}" env UCX_TLS=tcp "$perf" client --connect "$host:${server_port[$cell]}" \
      --mode layers "${common[@]}" --shuffle --iters "$iters" --timeout-ms 60000 --json "$tmp/$cell-$round.json" \
      "${args[@]}" >"$log" 2>&1
    rc=$?
    if [[ $rc != 0 ]]; then
      echo "bench-pd-codec: round $round $cell FAILED (exit $rc):" >&2
      sed 's/^/  | /' "$log" >&2
      printf '%s\t%s\tfail\n' "$round" "$cell" >>"$results"
      failed=1
      continue
    fi
    gbps=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["results"][0]["gbps"])' "$tmp/$cell-$round.json")
    printf '%s\t%s\t%s\n' "$round" "$cell" "$gbps" >>"$results"
    printf '  round %d %-6s %7.3f GB/s  (%s)\n' "$round" "$cell" "$gbps" \
      "$(grep -E '^  request' "$log" | sed -E 's/.*: ([0-9.]+) s, ([0-9.]+) GB\/s.*/\2/' | paste -sd' ')"
  done
done
[[ -n $tsv ]] && { printf 'round\tcell\tgbps\n'; cat "$results"; } >"$tsv"

python3 - "$results" "$codec" "$rounds" "$iters" "$blocks" "$netns" "$workers" "${json:-}" "${rate:-}" <<'PY'
import json, statistics, sys
path, codec, rounds, iters, blocks, netns, workers, out, rate = sys.argv[1:10]
runs = [line.rstrip("\n").split("\t") for line in open(path) if line.strip()]
cells = {}
for r, cell, g in runs:
    cells.setdefault(cell, []).append(None if g == "fail" else float(g))
med = {c: statistics.median([g for g in v if g is not None]) if any(g is not None for g in v) else None
       for c, v in cells.items()}
print(f"{'cell':8} {'runs (GB/s, each the median of its requests)':52} median")
for c, v in cells.items():
    shown = " ".join("fail" if g is None else f"{g:.3f}" for g in v)
    print(f"{c:8} {shown:52} {med[c]:.3f}" if med[c] is not None else f"{c:8} {shown:52} -")
ratio = med[codec] / med["raw"] if med.get(codec) and med.get("raw") else None
per_round = {}
for r, cell, g in runs:
    per_round.setdefault(r, {})[cell] = None if g == "fail" else float(g)
round_ratios = [d[codec] / d["raw"] for d in per_round.values() if d.get(codec) and d.get("raw")]
if ratio is not None:
    print(f"ratio {codec}/raw = {ratio:.2f} (medians of {len(cells['raw'])} rounds; per-round ratios "
          + " ".join(f"{x:.2f}" for x in round_ratios) + f", their median {statistics.median(round_ratios):.2f})")
    if "direct" in med and med["direct"]:
        print(f"ratio {codec}/direct ucx puts = {med[codec] / med['direct']:.2f}")
if out:
    doc = {"request": {"layers": 32, "blocks": int(blocks), "block_bytes": 32768, "row_bytes": 2048,
                       "bytes": 32 * int(blocks) * 2 * 32768},
           "link": ("veth between two network namespaces" + (f", clients' egress capped at {rate}" if rate else ""))
                   if netns == "1" else "loopback",
           "ucx_tls": "tcp", "codec": codec, "workers": int(workers), "rounds": int(rounds),
           "iters": int(iters),
           "runs": [{"round": int(r), "cell": c, "gbps": None if g == "fail" else float(g)} for r, c, g in runs],
           "median_gbps": med, "ratio": ratio, "round_ratios": round_ratios}
    json.dump(doc, open(out, "w"), indent=2)
PY
exit $failed
