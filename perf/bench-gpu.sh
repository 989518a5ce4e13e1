#!/usr/bin/env bash
# bench-gpu.sh: kvfabric's GPU data path against the raw links, measured in one run on one machine,
# alternating sides each round (raw, kvfabric, raw, ...), medians of R rounds and their ratio.
#   peer:    raw cudaMemcpyPeerAsync of 1 GiB contiguous  vs  kvfabric cuda_ipc (two processes),
#            the Llama-3-8B request (32 layers x 512 blocks x 32 KiB K + 32 KiB V = 1 GiB, 8192
#            tokens of 16-token blocks, bf16, 8 KV heads x 128) into shuffled receiver blocks
#            (each copy method in PEER_COPIES, default "kernel staged adaptive auto"; each also with
#            PEER_CONCURRENT request streams at once, default 2: the sustained bandwidth,
#            peer-sustained-*), and the same request unshuffled (contiguous, default choice);
#   nccl:    raw ncclSend/ncclRecv of 1 GiB  vs  kvfabric's nccl path (when built);
#   pinned:  raw pinned cudaMemcpyAsync D2H / H2D of 1 GiB  vs  kvfabric gather of the request's
#            paged blocks into pinned host memory / scatter back (kvfabric-perf local);
#   hoststaged: the request GPU to GPU over ucx_staged (gathered into pinned slots, one UCX put
#            each between host buffers, scattered)  vs  the slowest of its stages measured raw:
#            pinned D2H, pinned H2D (1 GiB) and ucx_perftest ucp_put_bw of 32 MiB (kvfabric-perf's
#            ucx_staged slot; the faster of UCX's default transports and UCX_TLS=^cma, since on one
#            host UCX puts large messages by cma, slower than its shared-memory copy); also the
#            path with its puts through UCX (--mapped-copy off) instead of a memcpy into the
#            receiver's mapped slots; one GPU is enough;
#   overlap: the request streamed over cuda_ipc while a compute stream runs Llama-3-8B-shaped
#            prefill GEMMs of 8192 tokens per layer: compute slowdown and the tail from the last
#            layer's compute to its LayerReady, against one layer's transfer time;
#   store:   the prefix store's put (GPU blocks -> the kvfabricd arena: reserve, one gather launch
#            per chunk into the pinned arena, commit, which the daemon checksums) and get (lease,
#            checksum check, one scatter launch per layer, release) of the same request through
#            StoreConnector (kvfabric-store-connector-bench; shuffled blocks, 32 chunks of 256
#            tokens) against raw pinned cudaMemcpyAsync D2H / H2D of 1 GiB; also get without the
#            checksum check (store-get-noverify), to show what the check costs. Starts its own
#            kvfabricd (STORE_ARENA, default 3GiB of /dev/shm; STORE_HUGE_PAGES=1 tries hugetlbfs).
#   pd:      time to first token of the GPU reference engine (Llama-3-8B shape, 8192-token prompt):
#            one engine alone vs PD over cuda_ipc, layers streamed / sent after (kvfabric-pd-demo);
#   reuse:   prefix reuse on the GPU reference engine: a 16k-token document's later questions load
#            it from the store instead of recomputing it; a multi-round chat's throughput both ways.
#   codec:   the GPU KV codecs (kvfabric-codec-bench-gpu, one GPU) on the same request (32 chunks of
#            256 tokens in shuffled blocks): each fixed-rate codec's encode (paged blocks -> encoded
#            chunks) and decode (encoded chunks -> paged blocks) vs a device-to-device cudaMemcpyAsync
#            of the raw 1 GiB, alternating in one process; GB/s of bytes read + bytes written, both
#            sides. Chunk 0 of every codec is checked against the CPU codec byte for byte first.
# Every kvfabric path is run once with --verify first (the receiver checks every byte of random
# data in poisoned blocks); a failed check fails the cell.
# Usage: perf/bench-gpu.sh [--rounds N] [--iters N] [--out FILE.md] [--json-dir DIR] [--only CELLS]
#   --only peer,nccl,pinned,hoststaged,overlap,store,pd,reuse,codec   (default: all; peer-sweep and staged-sweep:
#   the cuda_ipc knobs, for tuning; staged-host: the staged path's host time per chunk, one GPU)
# Environment: KVF_BIN (default build/bin); PEER_COPIES, PEER_CONCURRENT (see peer); FILL_ONCE=1
# (layer requests send one pattern, filled once, instead of refilling before each); OVERLAP_ARGS
# (extra client args of the overlap cell); OVERLAP_COPIES (its copy methods, default auto); RUN_LIMIT (seconds one run may
# take before it is killed and counted as failed, default 240: a hang costs one cell, not the
# session); needs 2 GPUs for peer/nccl/overlap.
set -uo pipefail
export NCCL_NVLS_ENABLE=0  # never NVLink multicast on a shared host

rounds=5 iters=20 out= json_dir= only=peer,nccl,pinned,hoststaged,overlap,store,pd,reuse,codec
peer_copies=${PEER_COPIES:-kernel staged adaptive auto}
peer_concurrent=${PEER_CONCURRENT:-2}
run_limit=${RUN_LIMIT:-240}
while (($#)); do
  case $1 in
    --rounds) rounds=${2:?}; shift 2 ;;
    --iters) iters=${2:?}; shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    --json-dir) json_dir=${2:?}; shift 2 ;;
    --only) only=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,45p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # perf/
bin=${KVF_BIN:-build/bin}
perf=$bin/kvfabric-perf anchors=$bin/kvfabric-gpu-anchors
for b in "$perf" "$anchors"; do [[ -x $b ]] || { echo "bench-gpu.sh: $b is not built" >&2; exit 2; }; done
tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-gpu.XXXXXX")
json_dir=${json_dir:-$tmp}
results=$tmp/results.tsv  # cell  side  round  GB/s (or a figure)
: >"$results"
server_pid= daemon_pid= extra_pids=()
cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null
  ((${#extra_pids[@]})) && kill "${extra_pids[@]}" 2>/dev/null
  [[ -n $daemon_pid ]] && kill "$daemon_pid" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
cell_wanted() { [[ ,$only, == *,$1,* ]]; }
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
echo "bench-gpu: $gpus GPU(s), rounds $rounds, $iters requests per kvfabric run"

# field FILE KEY: the first result's KEY from a kvfabric JSON file.
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['results'][0][sys.argv[2]])" "$1" "$2" 2>/dev/null; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$results"; }

# raw CELL ROUND ANCHOR-ARGS...: one anchor run, its GB/s recorded.
raw() {
  local cell=$1 round=$2; shift 2
  local j=$json_dir/raw-$cell-$round.json
  if timeout "$run_limit" "$anchors" "$@" --json "$j" >"$tmp/last.log" 2>&1; then
    record "$cell" raw "$round" "$(field "$j" gbps)"
  else
    record "$cell" raw "$round" fail; tail -3 "$tmp/last.log"
  fi
}

# perftest_put CELL ROUND SIZE: ucx_perftest ucp_put_bw of SIZE-byte messages between host
# buffers on this host (UCX's default transports, perf/ucx_perftest_put.sh), 1 GiB in all; its
# "overall" GB/s recorded as raw.
perftest_put() {
  local cell=$1 round=$2 size=$3 out
  if out=$(BENCH_TIMEOUT_S="$run_limit" "$here/ucx_perftest_put.sh" "$size" $(((1 << 30) / size)) 2>"$tmp/perftest.err"); then
    record "$cell" raw "$round" "${out% *}"
  else
    record "$cell" raw "$round" fail; echo "bench-gpu: $cell: $(cat "$tmp/perftest.err")"
  fi
}

start_server() {  # start_server ARGS...: a kvfabric-perf server on a fresh port
  [[ -n $server_pid ]] && { kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; }
  port=$((20000 + RANDOM % 20000))
  "$perf" server --listen 127.0.0.1:$port --max-bytes 4G "$@" >"$tmp/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 50); do grep -q listening "$tmp/server.log" && return 0; sleep 0.1; done
  echo "bench-gpu: server did not start:"; cat "$tmp/server.log"; return 1
}

layers_args=(--mode layers --layers 32 --blocks 512 --block-bytes 32K)
# FILL_ONCE=1: kvfabric-perf fills its source once instead of before every request. The anchors
# copy back to back; a refill from the host leaves the GPUs idle for hundreds of milliseconds
# before each request, and its first copy then ran ~200 us slower (perf/RESULTS.md, session 8).
[[ ${FILL_ONCE:-0} == 1 ]] && layers_args+=(--fill-once)
# kvf CELL ROUND CLIENT-ARGS...: one kvfabric-perf layers run against the running server.
# --copy adaptive runs are --verbose: the transport's last line says how many puts went each way.
kvf() {
  local cell=$1 round=$2; shift 2
  local j=$json_dir/kvf-$cell-$round.json verbose=()
  [[ " $* " == *" adaptive "* ]] && verbose=(--verbose)
  if timeout "$run_limit" "$perf" client --connect 127.0.0.1:$port "${layers_args[@]}" --iters "$iters" --json "$j" "$@" \
       "${verbose[@]}" >"$tmp/last.log" 2>&1; then
    record "$cell" kvfabric "$round" "$(field "$j" gbps)"
    grep -h "adaptive copies chose" "$tmp/last.log" | tail -1 | sed "s/^.*adaptive/bench-gpu: $cell round $round: adaptive/"
  else
    record "$cell" kvfabric "$round" fail; tail -3 "$tmp/last.log"
  fi
}
verified() {  # verified CELL CLIENT-ARGS...: one verified request, or the cell is marked failed
  local cell=$1; shift
  if timeout "$run_limit" "$perf" client --connect 127.0.0.1:$port "${layers_args[@]}" --iters 2 --verify "$@" >"$tmp/last.log" 2>&1 \
     && grep -q "receiver verified" "$tmp/last.log"; then
    echo "bench-gpu: $cell: every byte verified"
  else
    echo "bench-gpu: $cell: VERIFY FAILED"; tail -5 "$tmp/last.log"; record "$cell" verify 0 fail
  fi
}

# --- summary (rewritten after every cell, so a run cut short still leaves its figures) -----------
summarize() {
  python3 - "$results" "$rounds" "$iters" ${out:+"$out"} <<'EOF'
import sys, statistics, datetime, subprocess
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
rounds, iters = sys.argv[2], sys.argv[3]
out = sys.argv[4] if len(sys.argv) > 4 else None
def med(cell, side):
    v = [r[3] for r in rows if r[0] == cell and r[1] == side]
    if not v: return None, 0
    if "fail" in v: return "fail", len(v)
    return statistics.median(float(x) for x in v), len(v)
failed = sorted({r[0] for r in rows if r[1] == "verify"})
anchor = {**{f"sweep-{k}-{v}": "peer" for v in ["s1-128M", "s2-128M", "s4-128M", "s2-512M", "s4-512M"]
             for k in ["shuffled", "contiguous"]},
          "peer-shuffled-kernel": "peer", "peer-shuffled-ce": "peer", "peer-shuffled-staged": "peer",
          "peer-shuffled-auto": "peer", "nccl-shuffled": "nccl", "nccl-shuffled-128M": "nccl",
          "peer-contiguous": "peer", "peer-shuffled-resident": "peer", "peer-contiguous-ce1": "peer", "pinned-gather": "pinned-gather", "pinned-scatter": "pinned-scatter",
          "store-put": "store-put", "store-get": "store-get", "store-get-noverify": "store-get"}
for cell in dict.fromkeys(r[0] for r in rows if r[1] == "kvfabric" and r[0].startswith(("peer-sustained-", "peer-shuffled-"))):
    anchor[cell] = "peer"  # every PEER_COPIES method; --concurrent: the sustained bandwidth of several streams
for cell in dict.fromkeys(r[0] for r in rows if r[1] == "kvfabric" and r[0].startswith(("staged-", "nccl-sweep-"))):
    anchor[cell] = "nccl" if cell.startswith("nccl-sweep-") else "peer"  # staged-sweep variants (STAGED_VARIANTS)
for cell in dict.fromkeys(r[0] for r in rows if r[1] == "kvfabric" and r[0].startswith("codec-")):
    anchor[cell] = "codec-d2d"  # the codec cell: every codec's encode and decode against the same copy
lines = ["| path | kvfabric GB/s | raw GB/s | ratio | runs |", "|---|---|---|---|---|"]
for cell, raw_cell in anchor.items():
    k, n = med(cell, "kvfabric")
    if k is None: continue
    r, _ = med(raw_cell, "raw")
    ratio = f"{k / r:.2f}" if isinstance(k, float) and isinstance(r, float) and r > 0 else "-"
    fmt = lambda x: f"{x:.1f}" if isinstance(x, float) else str(x)
    lines.append(f"| {cell}{' (VERIFY FAILED)' if cell in failed else ''} | {fmt(k)} | {fmt(r)} | {ratio} | {n} |")
for cell in failed:
    if cell not in anchor: lines.append(f"| {cell} (FAILED: see the log) | - | - | - | - |")
r, n = med("nccl", "raw")
if r is not None:
    k, _ = med("nccl", "kvfabric")
    lines.append(f"| nccl | {'not built' if k is None else f'{k:.1f}'} | {r if isinstance(r, str) else f'{r:.1f}'} | - | {n} |")
k, n = med("hoststaged", "kvfabric")
if k is not None:
    # The anchor is the slowest of the path's stages, each measured raw in the same run.
    stages = {name: med("hoststaged-" + name, "raw")[0] for name in ["d2h", "h2d", "ucx", "ucx-nocma"]}
    # UCX's own choice for a large put on one host is cma, ~3x slower than its shared-memory copy
    # (UCX_TLS=^cma) there: the link's raw rate is the faster of the two.
    puts = [v for v in (stages["ucx"], stages.pop("ucx-nocma")) if isinstance(v, float)]
    stages["ucx"] = max(puts) if puts else stages["ucx"]
    known = {name: v for name, v in stages.items() if isinstance(v, float)}
    fmt = lambda x: f"{x:.1f}" if isinstance(x, float) else str(x)
    name = "hoststaged (ucx_staged, GPU to GPU through host slots)" + (" (VERIFY FAILED)" if "hoststaged" in failed else "")
    if known and isinstance(k, float):
        slowest = min(known, key=known.get)
        lines.append(f"| {name} | {fmt(k)} | {fmt(known[slowest])} ({slowest}) | {k / known[slowest]:.2f} | {n} |")
    else:
        lines.append(f"| {name} | {fmt(k)} | - | - | {n} |")
    u, _ = med("hoststaged-ucxput", "kvfabric")
    if u is not None:
        ratio = f"{u / known['ucx']:.2f}" if isinstance(u, float) and "ucx" in known else "-"
        lines.append(f"| hoststaged, slots put through UCX (--mapped-copy off) | {fmt(u)} | {fmt(known.get('ucx', '-'))} (ucx) | {ratio} | {n} |")
    lines.append(f"| (its stages, raw) | | d2h {fmt(stages['d2h'])}, h2d {fmt(stages['h2d'])}, ucx put of 32 MiB {fmt(stages['ucx'])} "
                 f"(default {fmt(med('hoststaged-ucx', 'raw')[0])}, ^cma {fmt(med('hoststaged-ucx-nocma', 'raw')[0])}) | | |")
ov_keys = ["compute_alone_ms", "compute_with_transfer_ms", "slowdown_pct", "tail_us", "layer_transfer_us", "tail_ratio"]
# OVERLAP_COPIES: "overlap-KEY" for the default copy, "overlap@COPY-KEY" for the others.
ov_tags = dict.fromkeys(r[0].split("-")[0] for r in rows if r[0].startswith("overlap") and r[1] == "kvfabric")
ov_rows = []
for tag in ov_tags:
    ov = {k: med(tag + "-" + k, "kvfabric")[0] for k in ov_keys}
    if any(v is not None for v in ov.values()):
        f = lambda x: "-" if x is None else (x if isinstance(x, str) else f"{x:.2f}")
        name = "llama8b 8192 tokens" + ("" if tag == "overlap" else ", --copy " + tag.split("@", 1)[1])
        ov_rows.append(f"| {name} | " + " | ".join(f(ov[k]) for k in ov_keys) + " |")
if ov_rows:
    lines.append("")
    lines.append("| overlap (medians) | compute alone ms | compute with transfers ms | slowdown % | tail µs | one layer's transfer µs | tail / layer |")
    lines.append("|---|---|---|---|---|---|---|")
    lines.extend(ov_rows)
try:
    names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True).stdout.split("\n")
    names = [n for n in names if n]
except OSError:
    names = []
gpu = f"{names[0]} x{len(names)}" if names else "no GPU visible"
head = [f"bench-gpu: {datetime.date.today()}, {gpu}, "
        f"medians of {rounds} rounds, {iters} requests (or copies) per run, raw and kvfabric alternating"]
text = "\n".join(head + [""] + lines)
print(text)
if out: open(out, "w").write(text + "\n")
EOF
}

if cell_wanted peer && ((gpus >= 2)); then
  start_server --transport cuda_ipc --mem cuda:1 || exit 1
  # PEER_COPIES: the copy methods measured on the shuffled request (ce, ce1 and --resident-plans
  # variants were measured on 2026-11-29 and are in perf/RESULTS.md; add them here to re-measure).
  for copy in $peer_copies; do verified "peer-shuffled-$copy" --transport cuda_ipc --mem cuda:0 --shuffle --copy $copy; done
  # PEER_CONCURRENT (default 2; 0: none): also each copy method with that many request streams at
  # once, the sustained bandwidth (one stream pays every request's pipeline fill and drain).
  for copy in $peer_copies; do
    ((peer_concurrent > 1)) && verified "peer-sustained-$copy" --transport cuda_ipc --mem cuda:0 --shuffle --copy $copy \
      --concurrent "$peer_concurrent" --inflight 1G
  done
  verified peer-contiguous --transport cuda_ipc --mem cuda:0
  # Where the GPU time goes (copy time vs gaps between layers) for the direct kernel, staged
  # copies (their copy-engine copies, and the round trip to the receiver's scatter) and the
  # contiguous copy-engine path.
  KVF_CUDA_IPC_TRACE=1 timeout "$run_limit" "$perf" client --connect 127.0.0.1:$port "${layers_args[@]}" --iters "$iters" \
    --transport cuda_ipc --mem cuda:0 --shuffle --copy kernel 2>&1 | grep "cuda_ipc trace" | sed "s/^/bench-gpu: kernel: /"
  KVF_CUDA_IPC_TRACE=1 timeout "$run_limit" "$perf" client --connect 127.0.0.1:$port "${layers_args[@]}" --iters "$iters" \
    --transport cuda_ipc --mem cuda:0 --shuffle --copy staged 2>&1 | grep "cuda_ipc trace" | sed "s/^/bench-gpu: staged: /"
  KVF_CUDA_IPC_TRACE=1 timeout "$run_limit" "$perf" client --connect 127.0.0.1:$port "${layers_args[@]}" --iters "$iters" \
    --transport cuda_ipc --mem cuda:0 2>&1 | grep "cuda_ipc trace" | sed "s/^/bench-gpu: contiguous: /"
  for r in $(seq "$rounds"); do
    echo "bench-gpu: peer round $r/$rounds"
    if ((r % 2)); then raw peer "$r" --mode peer-copy --bytes 1G --iters "$iters"; fi
    for copy in $peer_copies; do kvf "peer-shuffled-$copy" "$r" --transport cuda_ipc --mem cuda:0 --shuffle --copy $copy; done
    for copy in $peer_copies; do
      ((peer_concurrent > 1)) && kvf "peer-sustained-$copy" "$r" --transport cuda_ipc --mem cuda:0 --shuffle --copy $copy \
        --concurrent "$peer_concurrent" --inflight 1G
    done
    kvf peer-contiguous "$r" --transport cuda_ipc --mem cuda:0
    if ((r % 2 == 0)); then raw peer "$r" --mode peer-copy --bytes 1G --iters "$iters"; fi
  done
fi
summarize >/dev/null

# peer-sweep: the cuda_ipc knobs (streams, bytes in flight) side by side, for tuning the defaults.
if cell_wanted peer-sweep && ((gpus >= 2)); then
  start_server --transport cuda_ipc --mem cuda:1 || exit 1
  variants=("s1-128M --streams 1 --inflight 128M" "s2-128M --streams 2 --inflight 128M"
            "s4-128M --streams 4 --inflight 128M" "s2-512M --streams 2 --inflight 512M"
            "s4-512M --streams 4 --inflight 512M")
  for r in $(seq "$rounds"); do
    echo "bench-gpu: peer-sweep round $r/$rounds"
    raw peer "$r" --mode peer-copy --bytes 1G --iters "$iters"
    for v in "${variants[@]}"; do
      read -r name flags <<<"$v"
      # shellcheck disable=SC2086
      kvf "sweep-shuffled-$name" "$r" --transport cuda_ipc --mem cuda:0 --shuffle --copy kernel $flags
      # shellcheck disable=SC2086
      kvf "sweep-contiguous-$name" "$r" --transport cuda_ipc --mem cuda:0 $flags
    done
  done
fi
summarize >/dev/null

# staged-sweep: the staged path's knobs (bytes in flight, receiver slots, copy streams per chunk)
# on the shuffled request, for tuning its defaults. STAGED_VARIANTS overrides the list;
# SWEEP_TRANSPORT=nccl sweeps the nccl transport instead (anchor: raw NCCL); SWEEP_SERVER_ARGS
# go to the receiving server (e.g. --copy-kernel-blocks 16: the receiver's scatter kernel).
if cell_wanted staged-sweep && ((gpus >= 2)); then
  sweep_transport=${SWEEP_TRANSPORT:-cuda_ipc}
  if [[ $sweep_transport == nccl ]]; then
    sweep_args=(--transport nccl --mem cuda:0 --shuffle) sweep_raw=(nccl --mode nccl) sweep=nccl-sweep
  else
    sweep_args=(--transport cuda_ipc --mem cuda:0 --shuffle --copy staged) sweep_raw=(peer --mode peer-copy) sweep=staged
  fi
  # shellcheck disable=SC2086
  start_server --transport "$sweep_transport" --mem cuda:1 ${SWEEP_SERVER_ARGS:-} || exit 1
  if [[ -n ${STAGED_VARIANTS:-} ]]; then
    IFS=';' read -r -a variants <<<"$STAGED_VARIANTS"
  else
    variants=("i128M --inflight 128M" "i512M --inflight 512M" "i512M-c2 --inflight 512M --staging-copy-streams 2"
              "i512M-s8 --inflight 512M --staging-slots 8" "i1G-s8-c2 --inflight 1G --staging-slots 8 --staging-copy-streams 2")
  fi
  for v in "${variants[@]}"; do
    read -r name flags <<<"$v"
    # shellcheck disable=SC2086
    verified "$sweep-$name" "${sweep_args[@]}" $flags
  done
  # Where the time goes, both sides: each variant's traced client, then the server's own trace as
  # it stops.
  for v in "${variants[@]}"; do
    read -r name flags <<<"$v"
    # shellcheck disable=SC2086
    KVF_CUDA_IPC_TRACE=1 timeout "$run_limit" "$perf" client --connect 127.0.0.1:$port "${layers_args[@]}" --iters "$iters" \
      "${sweep_args[@]}" $flags 2>&1 | grep "cuda_ipc trace" | sed "s/^/bench-gpu: $sweep-$name: /"
  done
  kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; server_pid=
  # shellcheck disable=SC2086
  KVF_CUDA_IPC_TRACE=1 start_server --transport "$sweep_transport" --mem cuda:1 ${SWEEP_SERVER_ARGS:-} || exit 1
  for r in $(seq "$rounds"); do
    echo "bench-gpu: staged-sweep round $r/$rounds"
    if ((r % 2)); then raw "${sweep_raw[0]}" "$r" "${sweep_raw[@]:1}" --bytes 1G --iters "$iters"; fi
    for v in "${variants[@]}"; do
      read -r name flags <<<"$v"
      # shellcheck disable=SC2086
      kvf "$sweep-$name" "$r" "${sweep_args[@]}" $flags
    done
    if ((r % 2 == 0)); then raw "${sweep_raw[0]}" "$r" "${sweep_raw[@]:1}" --bytes 1G --iters "$iters"; fi
  done
  kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; server_pid=
  grep "cuda_ipc trace" "$tmp/server.log" | sed "s/^/bench-gpu: $sweep receiver: /"
fi
summarize >/dev/null

# staged-host: where the staged path's host time goes, on one GPU (both processes on GPU 0: the
# copies run at memory speed, so the progress threads' work per chunk shows). Each variant traced
# (KVF_CUDA_IPC_TRACE=1) against a traced server of its own, then untraced; prints the host
# sections (puts, Scatter decode and scatter, answers, launch, encode, notify) of both sides, and
# then (KVF_CUDA_IPC_TRACE=2, both sides) where a chunk's round trip goes (perf/staged_round_trip.py).
# Figures here are not link figures; the cell records none.
if cell_wanted staged-host; then
  variants=("st128 --shuffle --copy staged --inflight 128M" "st-auto --shuffle --copy staged"
            "st-auto-s8 --shuffle --copy staged --staging-slots 8")
  for v in "${variants[@]}"; do
    read -r name flags <<<"$v"
    KVF_CUDA_IPC_TRACE=1 start_server --transport cuda_ipc --mem cuda:0 --staging-limit 2G || exit 1
    # shellcheck disable=SC2086
    KVF_CUDA_IPC_TRACE=1 timeout "$run_limit" "$perf" client --connect 127.0.0.1:$port "${layers_args[@]}" --iters "$iters" \
      --transport cuda_ipc --mem cuda:0 --fill-once $flags >"$tmp/last.log" 2>&1
    echo "bench-gpu: staged-host $name (traced): $(grep -A1 '^mode' "$tmp/last.log" | tail -1)"
    grep -E "cuda_ipc trace .*(host|staged)" "$tmp/last.log" | sed "s/^/bench-gpu: staged-host $name sender: /"
    # shellcheck disable=SC2086
    timeout "$run_limit" "$perf" client --connect 127.0.0.1:$port "${layers_args[@]}" --iters "$iters" \
      --transport cuda_ipc --mem cuda:0 --fill-once $flags >"$tmp/last.log" 2>&1
    echo "bench-gpu: staged-host $name (untraced): $(grep -A1 '^mode' "$tmp/last.log" | tail -1)"
    kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; server_pid=
    grep -E "cuda_ipc trace .*(host|staged)" "$tmp/server.log" | sed "s/^/bench-gpu: staged-host $name receiver: /"
    # The round trip of a chunk across both processes (KVF_CUDA_IPC_TRACE=2 marks on one clock).
    KVF_CUDA_IPC_TRACE=2 start_server --transport cuda_ipc --mem cuda:0 --staging-limit 2G || exit 1
    # shellcheck disable=SC2086
    KVF_CUDA_IPC_TRACE=2 timeout "$run_limit" "$perf" client --connect 127.0.0.1:$port "${layers_args[@]}" --iters 4 \
      --transport cuda_ipc --mem cuda:0 --fill-once $flags >"$tmp/last.log" 2>&1
    kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; server_pid=
    python3 "$(dirname "$0")/staged_round_trip.py" "$tmp/last.log" "$tmp/server.log" | sed "s/^/bench-gpu: staged-host $name: /"
  done
fi

if cell_wanted nccl && ((gpus >= 2)); then
  KVF_CUDA_IPC_TRACE=1 start_server --transport nccl --mem cuda:1 || exit 1
  verified nccl-shuffled --transport nccl --mem cuda:0 --shuffle
  # Where the time goes: the sender's trace of the staged sends (gathers, round trips, gaps).
  KVF_CUDA_IPC_TRACE=1 timeout "$run_limit" "$perf" client --connect 127.0.0.1:$port "${layers_args[@]}" --iters "$iters" \
    --transport nccl --mem cuda:0 --shuffle 2>&1 | grep -E "cuda_ipc trace|nccl|request 10/" | sed "s/^/bench-gpu: nccl: /"
  for r in $(seq "$rounds"); do
    echo "bench-gpu: nccl round $r/$rounds"
    if ((r % 2)); then raw nccl "$r" --mode nccl --bytes 1G --iters "$iters"; fi
    kvf nccl-shuffled "$r" --transport nccl --mem cuda:0 --shuffle
    # Larger slots: fewer NCCL operations (each one costs a launch and a round trip).
    kvf nccl-shuffled-128M "$r" --transport nccl --mem cuda:0 --shuffle --staging-bytes 128M --inflight 1G
    if ((r % 2 == 0)); then raw nccl "$r" --mode nccl --bytes 1G --iters "$iters"; fi
  done
  kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; server_pid=
  grep -E "cuda_ipc trace|nccl" "$tmp/server.log" | tail -8 | sed "s/^/bench-gpu: nccl receiver: /"
fi
summarize >/dev/null

if cell_wanted pinned; then
  local_args=(local --mem cuda:0 --layers 32 --blocks 512 --block-bytes 32K --shuffle --iters "$iters")
  for dir in gather scatter; do
    if timeout "$run_limit" "$perf" "${local_args[@]}" --mode $dir --verify >"$tmp/last.log" 2>&1; then
      echo "bench-gpu: pinned-$dir: $(grep -m1 verified "$tmp/last.log")"
    else
      echo "bench-gpu: pinned-$dir: FAILED"; tail -3 "$tmp/last.log"; record "pinned-$dir" verify 0 fail
    fi
  done
  for r in $(seq "$rounds"); do
    echo "bench-gpu: pinned round $r/$rounds"
    for dir in gather scatter; do
      anchor_mode=pinned-d2h; [[ $dir == scatter ]] && anchor_mode=pinned-h2d
      j=$json_dir/kvf-pinned-$dir-$r.json
      ((r % 2)) && raw "pinned-$dir" "$r" --mode $anchor_mode --bytes 1G --iters "$iters"
      if timeout "$run_limit" "$perf" "${local_args[@]}" --mode $dir --json "$j" >"$tmp/last.log" 2>&1; then
        record "pinned-$dir" kvfabric "$r" "$(field "$j" gbps)"
      else
        record "pinned-$dir" kvfabric "$r" fail; tail -3 "$tmp/last.log"
      fi
      ((r % 2 == 0)) && raw "pinned-$dir" "$r" --mode $anchor_mode --bytes 1G --iters "$iters"
    done
  done
fi
summarize >/dev/null

# hoststaged: the host-staged path (--transport ucx_staged) with GPU memory on both sides: the
# sender's GPU gathers each layer into pinned slots, UCX puts each slot between host buffers (on
# one host: shared memory), the receiver's GPU scatters it. Its stages' raw rates, in the same
# run and alternating: pinned D2H and H2D of 1 GiB, and ucx_perftest ucp_put_bw of one 32 MiB slot
# (the staging size) between host buffers. The path cannot pass the slowest; the summary's ratio
# is to that. Runs on one GPU too (both processes on it).
if cell_wanted hoststaged && ((gpus >= 1)); then
  start_server --transport ucx_staged --mem cuda:$((gpus >= 2 ? 1 : 0)) || exit 1
  verified hoststaged --transport ucx_staged --mem cuda:0 --shuffle
  for r in $(seq "$rounds"); do
    echo "bench-gpu: hoststaged round $r/$rounds"
    raw hoststaged-d2h "$r" --mode pinned-d2h --bytes 1G --iters "$iters"
    kvf hoststaged "$r" --transport ucx_staged --mem cuda:0 --shuffle
    kvf hoststaged-ucxput "$r" --transport ucx_staged --mem cuda:0 --shuffle --mapped-copy off
    raw hoststaged-h2d "$r" --mode pinned-h2d --bytes 1G --iters "$iters"
    perftest_put hoststaged-ucx "$r" $((32 << 20))
    UCX_TLS=^cma perftest_put hoststaged-ucx-nocma "$r" $((32 << 20))
  done
fi
summarize >/dev/null

# overlap: each copy method in OVERLAP_COPIES (default "auto"), rounds alternating between them;
# OVERLAP_ARGS go to every client (e.g. --inflight 1G).
if cell_wanted overlap && ((gpus >= 2)); then
  start_server --transport cuda_ipc --mem cuda:1 || exit 1
  for r in $(seq "$rounds"); do
    for copy in ${OVERLAP_COPIES:-auto}; do
      tag=overlap; [[ $copy == auto ]] || tag="overlap@$copy"
      echo "bench-gpu: overlap round $r/$rounds, --copy $copy"
      j=$json_dir/kvf-$tag-$r.json
      if timeout "$run_limit" "$perf" client --connect 127.0.0.1:$port "${layers_args[@]}" --iters "$iters" --shuffle \
           --transport cuda_ipc --mem cuda:0 --compute llama8b --tokens 8192 --copy "$copy" ${OVERLAP_ARGS:-} --json "$j" \
           $([[ $copy == adaptive ]] && echo --verbose) >"$tmp/last.log" 2>&1; then
        for k in compute_alone_ms compute_with_transfer_ms slowdown_pct tail_us layer_transfer_us tail_ratio; do
          record "$tag-$k" kvfabric "$r" "$(field "$j" $k)"
        done
        grep -h "adaptive copies chose" "$tmp/last.log" | tail -1 | sed "s/^.*adaptive/bench-gpu: $tag round $r: adaptive/"
      else
        record "$tag" kvfabric "$r" fail; tail -5 "$tmp/last.log"
      fi
    done
  done
fi
summarize >/dev/null

# store: put/get through the engine connector's GPU path against the raw pinned copies, with a
# kvfabricd of its own (the arena must hold the 1 GiB request; /dev/shm must have room for it).
if cell_wanted store; then
  store_bench=$bin/kvfabric-store-connector-bench
  store_dir=$tmp/store
  mkdir -p "$store_dir"
  sock=$store_dir/kvfabricd.sock
  cat >"$store_dir/topology.yaml" <<YAML
cluster: bench-gpu-store
models:
  - name: llama8b
    layout: {kind: flash_attention, layers: 32, kv_heads: 8, head_dim: 128, dtype: bf16, block_tokens: 16, blocks: 576}
    chunk_tokens: 256
nodes:
  - {name: bench, address: 127.0.0.1, http_port: $((20000 + RANDOM % 20000)), store: {dram: ${STORE_ARENA:-3GiB}, socket: $sock}}
YAML
  huge=(--no-huge-pages); [[ ${STORE_HUGE_PAGES:-0} == 1 ]] && huge=()
  "$bin/kvfabricd" --topology "$store_dir/topology.yaml" --node bench --no-peers "${huge[@]}" \
    >"$store_dir/daemon.log" 2>&1 &
  daemon_pid=$!
  for _ in $(seq 100); do grep -q "ready: node" "$store_dir/daemon.log" && break; sleep 0.2; done
  if [[ ! -x $store_bench ]] || ! grep -q "ready: node" "$store_dir/daemon.log"; then
    echo "bench-gpu: store: kvfabricd did not start (or $store_bench is not built):"; tail -5 "$store_dir/daemon.log"
    record store-put verify 0 fail
  else
    grep -m1 -iE "arena|huge" "$store_dir/daemon.log" | sed "s/^/bench-gpu: store: /"
    store_args=(--socket "$sock" --mem cuda:0 --layers 32 --blocks 512 --chunk-tokens 256)
    if timeout "$run_limit" "$store_bench" "${store_args[@]}" --iters 2 --verify >"$tmp/last.log" 2>&1 \
       && grep -q "every byte verified" "$tmp/last.log"; then
      echo "bench-gpu: store: $(grep -m1 "every byte verified" "$tmp/last.log")"
    else
      echo "bench-gpu: store: VERIFY FAILED"; tail -5 "$tmp/last.log"; record store-put verify 0 fail; record store-get verify 0 fail
    fi
    # store_run ROUND [FLAGS...]: one timed run; records put and get (or get only, named by FLAGS).
    store_run() {
      local round=$1; shift
      local j=$json_dir/kvf-store-$round${1:+-noverify}.json
      if timeout "$run_limit" "$store_bench" "${store_args[@]}" --iters "$iters" --json "$j" "$@" >"$tmp/last.log" 2>&1; then
        local put get
        put=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['results'][0]['gbps'])" "$j")
        get=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['results'][1]['gbps'])" "$j")
        if (($#)); then record store-get-noverify kvfabric "$round" "$get"; else
          record store-put kvfabric "$round" "$put"; record store-get kvfabric "$round" "$get"; fi
      else
        if (($#)); then record store-get-noverify kvfabric "$round" fail; else
          record store-put kvfabric "$round" fail; record store-get kvfabric "$round" fail; fi
        tail -3 "$tmp/last.log"
      fi
    }
    for r in $(seq "$rounds"); do
      echo "bench-gpu: store round $r/$rounds"
      if ((r % 2)); then
        raw store-put "$r" --mode pinned-d2h --bytes 1G --iters "$iters"
        raw store-get "$r" --mode pinned-h2d --bytes 1G --iters "$iters"
      fi
      store_run "$r"
      store_run "$r" --no-verify-loads
      if ((r % 2 == 0)); then
        raw store-put "$r" --mode pinned-d2h --bytes 1G --iters "$iters"
        raw store-get "$r" --mode pinned-h2d --bytes 1G --iters "$iters"
      fi
    done
  fi
  [[ -n $daemon_pid ]] && { kill "$daemon_pid" 2>/dev/null; wait "$daemon_pid" 2>/dev/null; daemon_pid=; }
fi
summarize >/dev/null

# pd: time to first token of the GPU reference engine (Llama-3-8B shape, bf16, PD_TOKENS-token
# prompts, default 8192): the topology examples/topologies/gpu-2x.yaml served by two kvfabric-engine
# processes (prefill on cuda:0, decode on cuda:1) and driven by kvfabric-pd-demo, which alternates
# each prompt through PD (the prefill engine streams each layer's KV over cuda_ipc while it computes;
# PD's TTFT is when the first token is known AND every layer is at the decode engine) and through
# the prefill engine alone (/generate), the first request left out as warm-up; once with layers
# streamed, once with the KV sent after the prefill. Every PD request's tokens must equal one engine's.
if cell_wanted pd && ((gpus >= 2)); then
  pd_tokens=${PD_TOKENS:-8192} pd_port=$((20000 + RANDOM % 20000))
  sed -e "s/port: 17100/port: $pd_port/" -e "s/port: 17101/port: $((pd_port + 1))/" \
    "$(dirname "$0")/../examples/topologies/gpu-2x.yaml" >"$tmp/pd-topology.yaml"
  for e in decode0 prefill0; do
    "$bin/kvfabric-engine" --topology "$tmp/pd-topology.yaml" --engine $e >"$tmp/pd-$e.log" 2>&1 &
    extra_pids+=($!)
  done
  pd_ok=1
  for e in decode0 prefill0; do
    for _ in $(seq 900); do grep -qE "serving on|kvfabric-engine: " "$tmp/pd-$e.log" && break; sleep 0.2; done
    grep -q "serving on" "$tmp/pd-$e.log" || { echo "bench-gpu: pd: $e did not start:"; tail -5 "$tmp/pd-$e.log"; pd_ok=0; }
  done
  if ((pd_ok)); then
    grep -h "serving on" "$tmp"/pd-*.log | sed "s/^/bench-gpu: pd: /"
    for mode in stream after; do
      flags=(--compare --warmup 1 --requests $((rounds + 1)) --prompt-tokens "$pd_tokens" --new 16)
      [[ $mode == after ]] && flags+=(--no-stream --first-id 1000)
      if timeout "$run_limit" "$bin/kvfabric-pd-demo" --topology "$tmp/pd-topology.yaml" "${flags[@]}" \
           >"$tmp/pd-$mode.log" 2>&1; then
        grep -hE "^TTFT medians|every request gave" "$tmp/pd-$mode.log" | sed "s/^/bench-gpu: pd ($mode): /"
      else
        echo "bench-gpu: pd ($mode): FAILED"; tail -6 "$tmp/pd-$mode.log"; record "pd-$mode" verify 0 fail
      fi
    done
  else
    record pd verify 0 fail
  fi
  [[ -n $json_dir ]] && cp "$tmp"/pd-*.log "$json_dir/" 2>/dev/null
  kill "${extra_pids[@]}" 2>/dev/null; wait "${extra_pids[@]}" 2>/dev/null; extra_pids=()
fi

# reuse: prefix reuse on the GPU reference engine (Llama-3-8B shape) through KvConnector and a
# kvfabricd of its own: questions about a REUSE_DOC_TOKENS-token document (default 16384: the
# first question stores it, later ones load it) and a multi-round chat, each recomputed and then
# through the store; TTFT of the requests that hit, throughput both ways, tokens compared.
if cell_wanted reuse; then
  reuse_dir=$tmp/reuse
  mkdir -p "$reuse_dir"
  rsock=$reuse_dir/kvfabricd.sock
  cat >"$reuse_dir/topology.yaml" <<YAML
cluster: bench-gpu-reuse
models:
  - name: llama8b
    layout: {kind: flash_attention, layers: 32, kv_heads: 8, head_dim: 128, dtype: bf16, block_tokens: 16, blocks: 2048}
    chunk_tokens: 256
nodes:
  - {name: bench, address: 127.0.0.1, http_port: $((20000 + RANDOM % 20000)), store: {dram: ${REUSE_ARENA:-8GiB}, socket: $rsock}}
YAML
  "$bin/kvfabricd" --topology "$reuse_dir/topology.yaml" --node bench --no-peers --no-huge-pages \
    >"$reuse_dir/daemon.log" 2>&1 &
  daemon_pid=$!
  for _ in $(seq 100); do grep -q "ready: node" "$reuse_dir/daemon.log" && break; sleep 0.2; done
  if ! grep -q "ready: node" "$reuse_dir/daemon.log"; then
    echo "bench-gpu: reuse: kvfabricd did not start:"; tail -5 "$reuse_dir/daemon.log"; record reuse verify 0 fail
  else
    reuse=(timeout "$run_limit" "$bin/kvfabric-prefix-reuse" --store "$rsock" --model llama8b --gpu 0 --shape llama3-8b
           --chunk-tokens 256 --new 16)
    if "${reuse[@]}" --workload doc --docs 1 --doc-tokens "${REUSE_DOC_TOKENS:-16384}" --questions 4 --turn-tokens 64 \
         >"$reuse_dir/doc.log" 2>&1 &&
       "${reuse[@]}" --workload chat --users 4 --rounds 3 --system-tokens 2048 --turn-tokens 200 --overlap-saves \
         >"$reuse_dir/chat.log" 2>&1; then
      grep -hE "^(model on|doc|chat|  (recompute|store)|every request|FAILED)" "$reuse_dir/doc.log" "$reuse_dir/chat.log" |
        sed "s/^/bench-gpu: reuse: /"
    else
      echo "bench-gpu: reuse: FAILED:"; tail -8 "$reuse_dir"/*.log; record reuse verify 0 fail
    fi
    [[ -n $json_dir ]] && cp "$reuse_dir"/*.log "$json_dir/" 2>/dev/null
  fi
  kill "$daemon_pid" 2>/dev/null; wait "$daemon_pid" 2>/dev/null; daemon_pid=
fi
summarize >/dev/null

# codec: the GPU KV codecs against a device-to-device copy of the same raw bytes (one GPU). The
# bench alternates the copy with each codec's calls itself; every round's figure is recorded, so
# the medians here are the bench's.
if cell_wanted codec; then
  codec_bench=$bin/kvfabric-codec-bench-gpu
  j=$json_dir/kvf-codec.json
  rm -f "$j"
  if [[ ! -x $codec_bench ]]; then
    echo "bench-gpu: codec: $codec_bench is not built"; record codec verify 0 fail
  else
    timeout "$run_limit" "$codec_bench" --rounds "$rounds" --json "$j" >"$tmp/codec.log" 2>&1
    codec_rc=$?
    grep -E "^(verify|\||VERIFY)" "$tmp/codec.log" | sed "s/^/bench-gpu: codec: /"
    if [[ -s $j ]]; then
      python3 - "$j" >>"$results" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
raw = d["shape"]["raw_bytes"]
for i, r in enumerate(d["results"]):
    moved = raw + r["encoded_bytes"]
    for k, ms in enumerate(r["encode_runs_ms"]):
        print(f"codec-{r['codec']}-encode\tkvfabric\t{k + 1}\t{moved / ms / 1e6:.3f}")
    for k, ms in enumerate(r["decode_runs_ms"]):
        print(f"codec-{r['codec']}-decode\tkvfabric\t{k + 1}\t{moved / ms / 1e6:.3f}")
    for k, ms in enumerate(r["anchor_runs_ms"]):
        print(f"codec-d2d\traw\t{i * 1000 + k + 1}\t{2 * raw / ms / 1e6:.3f}")
EOF
    fi
    if ((codec_rc != 0)); then
      echo "bench-gpu: codec: FAILED (exit $codec_rc)"; tail -5 "$tmp/codec.log"; record codec verify 0 fail
    fi
  fi
fi
summarize >/dev/null
summarize
[[ -n $out ]] && cp "$results" "${out%.md}.tsv"
exit 0
