#!/usr/bin/env bash
# bench-host.sh: kvfabric-perf bw against its anchor, ucx_perftest ucp_put_bw, on this host's
# loopback, measured in the same run and alternating (perftest, kvfabric, perftest, kvfabric, ...)
# so that a noisy, shared machine hurts both sides alike; medians of R rounds.
#   transports: UCX_TLS=tcp, and UCX's default choice (on one host: shared memory, posix/sysv + cma,
#               which is what the "default (shm/cma)" anchor in ANCHORS.md used)
#   sizes:      64K, 1M, 4M; the same number of bytes per run on both sides
#   layers:     kvfabric-perf layers mode (32 layers x 512 blocks x 2 x 32K, shuffled, verified) against
#               kvfabric's own contiguous 4M bw on the same transport: what paging costs; also through
#               --transport ucx_staged (gathered into 8 MiB slots, one put each, scattered) on the same
#               UCX transport.
# Usage: perf/bench-host.sh [--rounds N] [--quick] [--out FILE.md]
#   --rounds N  rounds per cell (default 5; 3 with --quick)
#   --quick     fewer bytes per run (64 MiB instead of 512 MiB) and a 128-block layers request
#   --out FILE  also write the table as markdown (with date, machine and command) to FILE
# Environment: KVF_BIN (default build/bin), BENCH_TIMEOUT_S (per run, default 120).
# The anchor is ucx_perftest's "overall" bandwidth of each run (perf/ucx_perftest_put.sh), what
# kvfabric-perf reports too; both sides are converted to GB/s = 1e9 bytes/s.
set -uo pipefail
# kvfabric sets UCX's tcp segments to 64 KiB unless the user's UCX_* variables say otherwise;
# ucx_perftest gets the same setting so that the comparison is of the same UCX configuration.
perftest_tuning="UCX_TCP_TX_SEG_SIZE=${UCX_TCP_TX_SEG_SIZE:-64k} UCX_TCP_RX_SEG_SIZE=${UCX_TCP_RX_SEG_SIZE:-64k}"

rounds=
quick=0
out=
while (($#)); do
  case $1 in
    --rounds) rounds=${2:?--rounds needs a number}; shift 2 ;;
    --rounds=*) rounds=${1#*=}; shift ;;
    --quick) quick=1; shift ;;
    --out) out=${2:?--out needs a file}; shift 2 ;;
    --out=*) out=${1#*=}; shift ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-host.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ -z $rounds ]] && rounds=$((quick ? 3 : 5))
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "bench-host.sh: --rounds wants a positive integer, got '$rounds'" >&2; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # perf/
bin=${KVF_BIN:-build/bin}
perf_real=$bin/kvfabric-perf
[[ -x $perf_real ]] || { echo "bench-host.sh: $perf_real is not built (set KVF_BIN)" >&2; exit 2; }
command -v ucx_perftest >/dev/null || { echo "bench-host.sh: ucx_perftest not found (Debian: ucx-utils)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "bench-host.sh: python3 not found" >&2; exit 2; }
run_timeout=${BENCH_TIMEOUT_S:-120}

if ((quick)); then
  run_bytes=$((64 << 20)) layer_blocks=128
else
  run_bytes=$((512 << 20)) layer_blocks=512
fi
sizes=(65536 1048576 4194304)
transports=(tcp default)
staged_transports=(tcp-staged default-staged)  # layers only: ucx_staged over the same UCX transport
layers_geometry="32 layers x $layer_blocks blocks x 2 x 32K"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-host.XXXXXX")
# The binary under a name of its own, so that a name-based pkill elsewhere cannot stop our server.
ln -s "$(cd "$(dirname "$perf_real")" && pwd)/kvfabric-perf" "$tmp/kvfbench-perf"
perf=$tmp/kvfbench-perf
results=$tmp/results.tsv  # transport  tool  size  round  GB/s (or "fail")
: >"$results"
declare -A server_pid=() server_port=() restarts=()

cleanup() {
  local pid
  for pid in "${server_pid[@]}"; do
    kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null
  done
  sleep 0.3
  for pid in "${server_pid[@]}"; do
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  done
  [[ ${BENCH_KEEP_TMP:-0} == 1 ]] && echo "bench-host: logs kept in $tmp" || rm -rf "$tmp"
}
trap cleanup EXIT
trap 'echo "bench-host: interrupted" >&2; exit 130' INT TERM

t_start=$(date +%s)
progress() { printf '[bench %4ds] %s\n' $(($(date +%s) - t_start)) "$*"; }

human() {
  case $1 in
    65536) echo 64K ;; 1048576) echo 1M ;; 4194304) echo 4M ;; *) echo "$1" ;;
  esac
}

# tls_env TRANSPORT: the env(1) arguments that select it.
tls_env() {
  if [[ ${1%-staged} == tcp ]]; then echo "UCX_TLS=tcp"; else echo "KVF_BENCH_DEFAULT_TLS=1"; fi
}
# transport_args TRANSPORT: kvfabric-perf's --transport for it (both sides).
transport_args() {
  if [[ $1 == *-staged ]]; then echo "--transport ucx_staged --staging-bytes 8M"; fi
}

start_kvf_server() {
  local transport=$1 log=$tmp/server-$1.log i
  # shellcheck disable=SC2046
  env -u UCX_TLS $(tls_env "$transport") "$perf" server --listen 127.0.0.1:0 $(transport_args "$transport") \
    >"$log" 2>&1 </dev/null &
  server_pid[$transport]=$!
  for ((i = 0; i < 200; i++)); do
    grep -qs 'listening on' "$log" && break
    kill -0 "${server_pid[$transport]}" 2>/dev/null || break
    sleep 0.1
  done
  server_port[$transport]=$(grep -soE 'listening on [^ ]+:[0-9]+' "$log" | sed -E 's/.*:([0-9]+)$/\1/')
  if [[ -z ${server_port[$transport]} ]]; then
    echo "bench-host: kvfabric-perf server ($transport) did not come up: $(cat "$log")" >&2
    exit 1
  fi
  progress "kvfabric-perf server for $transport on port ${server_port[$transport]}"
}

# ensure_kvf_server TRANSPORT: restarts it if it died (a failed run must not end the benchmark).
ensure_kvf_server() {
  [[ -n ${server_pid[$1]:-} ]] && kill -0 "${server_pid[$1]}" 2>/dev/null && return 0
  local n=$((${restarts[$1]:-0} + 1))
  restarts[$1]=$n
  wait "${server_pid[$1]}" 2>/dev/null
  local rc=$?
  cp "$tmp/server-$1.log" "$tmp/server-$1.dead$n.log"
  progress "kvfabric-perf server for $1 is gone (exit status $rc); restarting it; its log:"
  tail -n 30 "$tmp/server-$1.log" | sed 's/^/    | /'
  start_kvf_server "$1"
}

record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$results"; }

# perftest_run TRANSPORT SIZE ROUND (perf/ucx_perftest_put.sh runs it and reads its figure)
perftest_run() {
  local transport=$1 size=$2 round=$3 iters out
  iters=$((run_bytes / size))
  if ! out=$(env -u UCX_TLS $(tls_env "$transport") $perftest_tuning BENCH_TIMEOUT_S="$run_timeout" \
               "$here/ucx_perftest_put.sh" "$size" "$iters" 2>"$tmp/perftest.err"); then
    progress "  ucx_perftest $transport $(human "$size"): FAILED: $(cat "$tmp/perftest.err")"
    record "$transport" perftest "$size" "$round" fail
    return
  fi
  local gbps=${out% *} mbs=${out#* }
  record "$transport" perftest "$size" "$round" "$gbps"
  progress "  ucx_perftest   $transport $(human "$size"): $gbps GB/s ($mbs MB/s overall, $iters x $(human "$size"))"
}

# kvf_run TRANSPORT SIZE|layers ROUND
kvf_run() {
  local transport=$1 what=$2 round=$3 json=$tmp/kvf.json log=$tmp/kvf.log args
  ensure_kvf_server "$transport"
  rm -f "$json"
  if [[ $what == layers ]]; then
    args=(--mode layers --layers 32 --blocks "$layer_blocks" --block-bytes 32K --shuffle --verify --iters 3)
  else
    args=(--mode bw --sizes "$what" --iters $((run_bytes / what)))
  fi
  # shellcheck disable=SC2046
  env -u UCX_TLS $(tls_env "$transport") timeout -k 3 "$run_timeout" "$perf" client \
    --connect "127.0.0.1:${server_port[$transport]}" "${args[@]}" $(transport_args "$transport") \
    --json "$json" >"$log" 2>&1 </dev/null
  local rc=$? gbps=
  [[ $rc == 0 ]] && gbps=$(python3 -c 'import json,sys; print("%.4f" % json.load(open(sys.argv[1]))["results"][0]["gbps"])' "$json" 2>/dev/null)
  if [[ -z $gbps ]]; then
    progress "  kvfabric-perf  $transport $what: FAILED (exit $rc): $(tail -n2 "$log" | tr '\n' ' ')"
    record "$transport" "kvf-$([[ $what == layers ]] && echo layers || echo bw)" "$what" "$round" fail
    return
  fi
  if [[ $what == layers ]]; then
    record "$transport" kvf-layers layers "$round" "$gbps"
    progress "  kvfabric-perf  $transport layers ($layers_geometry, shuffled, verified): $gbps GB/s"
  else
    record "$transport" kvf-bw "$what" "$round" "$gbps"
    progress "  kvfabric-perf  $transport $(human "$what"): $gbps GB/s ($((run_bytes / what)) x $(human "$what"))"
  fi
}

progress "kvfabric-perf ($perf_real) vs ucx_perftest ucp_put_bw on 127.0.0.1; $rounds round(s);" \
  "$((run_bytes >> 20)) MiB per bw run; layers $layers_geometry"
for transport in "${transports[@]}" "${staged_transports[@]}"; do start_kvf_server "$transport"; done

for ((round = 1; round <= rounds; round++)); do
  for transport in "${transports[@]}"; do
    progress "round $round/$rounds, $transport"
    for size in "${sizes[@]}"; do
      perftest_run "$transport" "$size" "$round"
      kvf_run "$transport" "$size" "$round"
    done
    kvf_run "$transport" layers "$round"
    kvf_run "$transport-staged" layers "$round"
  done
done

# The table, from the medians.
table=$(python3 - "$results" "$layers_geometry" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
geometry = sys.argv[2]
def med(transport, tool, size):
    v = [float(r[4]) for r in rows if r[0] == transport and r[1] == tool and r[2] == size and r[4] != "fail"]
    fails = sum(1 for r in rows if r[0] == transport and r[1] == tool and r[2] == size and r[4] == "fail")
    return (statistics.median(v) if v else None), len(v), fails
def fmt(x):
    return "n/a" if x is None else f"{x:.3f}"
def ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"
names = {"tcp": "tcp", "default": "default (shm/cma)"}
human = {"65536": "64K", "1048576": "1M", "4194304": "4M"}
out = ["| transport | size | kvfabric GB/s (median) | ucx_perftest GB/s (median) | kvfabric / perftest | runs ok (kvf, perftest) |",
       "|---|---|---|---|---|---|"]
for t in ("tcp", "default"):
    for s in ("65536", "1048576", "4194304"):
        k, kn, kf = med(t, "kvf-bw", s)
        p, pn, pf = med(t, "perftest", s)
        out.append(f"| {names[t]} | {human[s]} | {fmt(k)} | {fmt(p)} | {ratio(k, p)} | {kn}/{kn + kf}, {pn}/{pn + pf} |")
out.append("")
out.append(f"| transport | layers GB/s (median; {geometry}, shuffled, verified) | kvfabric 4M bw GB/s (median) | layers / 4M bw | runs ok |")
out.append("|---|---|---|---|---|")
for t in ("tcp", "tcp-staged", "default", "default-staged"):
    base = t.removesuffix("-staged")
    l, ln, lf = med(t, "kvf-layers", "layers")
    b, _, _ = med(base, "kvf-bw", "4194304")
    name = names[base] + (", ucx_staged" if t != base else "")
    out.append(f"| {name} | {fmt(l)} | {fmt(b)} | {ratio(l, b)} | {ln}/{ln + lf} |")
print("\n".join(out))
PY
)
echo
echo "$table"
failed=$(awk -F'\t' '$5 == "fail"' "$results" | wc -l)
((failed)) && echo "note: $failed run(s) failed; see the progress lines above"

if [[ -n $out ]]; then
  {
    echo "## bench-host: kvfabric-perf bw vs ucx_perftest ucp_put_bw, loopback"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- machine: $(uname -n), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), UCX $(ucx_info -v 2>/dev/null | head -n1 | sed 's/^# Version //')"
    echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- command: \`KVF_BIN=$bin perf/bench-host.sh --rounds $rounds$( ((quick)) && echo ' --quick')\`"
    echo "- $rounds round(s), alternating perftest / kvfabric; $((run_bytes >> 20)) MiB per bw run on both sides; medians"
    echo
    echo "$table"
  } >"$out"
  echo "wrote $out"
fi
((failed == 0))
