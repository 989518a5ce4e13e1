#!/usr/bin/env bash
# kvfabric-perf server and client on 127.0.0.1 over real UCX:
#  - layers mode (32 layers x 64 blocks x 2 x 16 KiB, shuffled, --verify, 2 requests) for
#    UCX_TLS=tcp and for shared memory (UCX_TLS=sm; see the XFAIL note below): the client exits 0, reports every byte
#    verified, and the server prints "every byte verified (N)" with N = the whole request;
#  - bw and lat modes with --json: the file holds {"results":[{mode,bytes,iters,seconds,gbps,
#    p50_us,p99_us}]}, one entry per size, gbps > 0 (lat: p50 <= p99, both > 0);
#  - --shuffle-source (sent from shuffled pool blocks) and --concurrent 2 (two request streams at
#    once), every request verified on both sides;
#  - the server is still alive and serving after all of it.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init stream_loopback 240

LAYERS=32 BLOCKS=64 BLOCK_BYTES=16384 REQUESTS=2
TOTAL=$(kvf_layers_bytes $LAYERS $BLOCKS $BLOCK_BYTES)

# check_json FILE MODE SIZES...: the documented fields, one result per size in order, gbps > 0.
check_json() {
  local file=$1 mode=$2
  shift 2
  local why
  if why=$(python3 - "$file" "$mode" "$@" <<'PY' 2>&1
import json, sys
path, mode, sizes = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]]
doc = json.load(open(path))
results = doc["results"]
assert isinstance(results, list), "results is not a list"
assert len(results) == len(sizes), f"{len(results)} results, want {len(sizes)}"
fields = {"mode", "bytes", "iters", "seconds", "gbps", "p50_us", "p99_us"}
for r, size in zip(results, sizes):
    missing = fields - set(r)
    assert not missing, f"missing fields {sorted(missing)} in {r}"
    assert r["mode"] == mode, f"mode {r['mode']!r}, want {mode!r}"
    assert r["bytes"] == size, f"bytes {r['bytes']}, want {size}"
    assert isinstance(r["iters"], int) and r["iters"] > 0, f"iters {r['iters']}"
    for k in ("seconds", "gbps", "p50_us", "p99_us"):
        assert isinstance(r[k], (int, float)), f"{k} is not a number: {r[k]!r}"
    assert r["seconds"] > 0, f"seconds {r['seconds']}"
    assert r["gbps"] > 0, f"gbps {r['gbps']} for {size} bytes"
    if mode == "lat":
        assert 0 < r["p50_us"] <= r["p99_us"], f"p50_us {r['p50_us']} p99_us {r['p99_us']}"
print(" ".join(f"{r['bytes']}:{r['gbps']:.3f}GB/s" for r in results))
PY
  ); then
    kvf_pass "$mode JSON has the documented fields, gbps > 0 ($why)"
  else
    kvf_check_fail "$mode JSON $file: $why"
    sed 's/^/    | /' "$file" >&2
  fi
}

# layers_run LABEL SERVER [PREFIX...] [-- CLIENT-ARGS...]: one verified, shuffled layers run
# against SERVER.
layers_run() {
  local label=$1 server=$2
  shift 2
  local prefix=() client_args=()
  while (($#)); do
    if [[ $1 == -- ]]; then shift; client_args=("$@"); break; fi
    prefix+=("$1"); shift
  done
  local before rc
  before=$(kvf_count_lines "$server" '^stream [0-9]+ from ')
  kvf_run "client-$label" 120 "${prefix[@]}" "$KVF_PERF" client --connect "127.0.0.1:${KVF_PORT[$server]}" \
    --mode layers --layers $LAYERS --blocks $BLOCKS --block-bytes $BLOCK_BYTES --shuffle --verify \
    --iters $REQUESTS --timeout-ms 10000 "${client_args[@]}"
  rc=$?
  local log
  log=$(kvf_logfile "client-$label")
  if [[ $rc != 0 ]]; then
    kvf_check_fail "$label: layers client exited $rc, want 0:"
    sed 's/^/    | /' "$log" >&2
    return 1
  fi
  kvf_pass "$label: layers client exited 0 ($(grep -E '^layers ' "$log" | tail -n1 | awk '{print $4 " GB/s"}'))"
  kvf_check_eq "$(grep -cE "receiver verified $TOTAL bytes" "$log")" "$REQUESTS" \
    "$label: client requests reporting 'receiver verified $TOTAL bytes'"
  kvf_check_verified "$server" "$TOTAL" "$before" "$REQUESTS" "$label"
}

# --- TCP --------------------------------------------------------------------------------------
kvf_start_server tcp 127.0.0.1 env UCX_TLS=tcp
layers_run tcp tcp env UCX_TLS=tcp

kvf_run bw-tcp 120 env UCX_TLS=tcp "$KVF_PERF" client --connect "127.0.0.1:${KVF_PORT[tcp]}" \
  --mode bw --sizes 64K,1M --iters 40 --json "$KVF_TMP/bw.json"
rc=$?
if kvf_check_eq "$rc" 0 "bw client exit status"; then
  check_json "$KVF_TMP/bw.json" bw 65536 1048576
fi

kvf_run lat-tcp 120 env UCX_TLS=tcp "$KVF_PERF" client --connect "127.0.0.1:${KVF_PORT[tcp]}" \
  --mode lat --sizes 4K,64K --iters 200 --json "$KVF_TMP/lat.json"
rc=$?
if kvf_check_eq "$rc" 0 "lat client exit status"; then
  check_json "$KVF_TMP/lat.json" lat 4096 65536
fi

# The same server takes a second layers run after the bw/lat runs.
layers_run tcp-again tcp env UCX_TLS=tcp

# --shuffle-source: the request's blocks come from shuffled blocks of the sender's pool.
layers_run tcp-shuffled-source tcp env UCX_TLS=tcp -- --shuffle-source

# --fill-once --timeline: the same pattern in every request (each still verified against the
# poisoned receiver), and one timeline line per request.
layers_run tcp-fill-once tcp env UCX_TLS=tcp -- --fill-once --timeline
kvf_check_eq "$(grep -cE '^ +timeline \(us from the request.s start' "$(kvf_logfile client-tcp-fill-once)")" "$REQUESTS" \
  "fill-once: a timeline line per request"

# --concurrent: two request streams at once (two connections, two sources), every byte verified.
before=$(kvf_count_lines tcp '^stream [0-9]+ from ')
kvf_run client-concurrent 120 env UCX_TLS=tcp "$KVF_PERF" client --connect "127.0.0.1:${KVF_PORT[tcp]}" \
  --mode layers --layers $LAYERS --blocks $BLOCKS --block-bytes $BLOCK_BYTES --shuffle --verify \
  --iters $REQUESTS --concurrent 2 --timeout-ms 10000
kvf_check_eq "$?" 0 "concurrent layers client exit status"
kvf_check_grep "$(kvf_logfile client-concurrent)" \
  "$((2 * REQUESTS)) requests in .* receiver verified $((2 * REQUESTS * TOTAL)) bytes" \
  "concurrent: the client saw all $((2 * REQUESTS)) requests verified"
kvf_check_verified tcp "$TOTAL" "$before" $((2 * REQUESTS)) "concurrent"
kvf_check kvf_alive tcp -- "tcp server still alive after 7 client runs"

# --- transport lists: each peer takes the first transport both sides offer ------------------------
# With host memory a list leaves the GPU transports out, so ucx is chosen here;
# tests/gpu/stream_cuda_ipc.sh covers lists that choose cuda_ipc.
kvf_start_server list 127.0.0.1 env UCX_TLS=tcp -- --transport cuda_ipc,nccl,ucx
layers_run list-plain-sender list env UCX_TLS=tcp  # a plain ucx sender meets a receiver offering a list
layers_run list-both list env UCX_TLS=tcp -- --transport nccl,cuda_ipc,ucx
kvf_check_eq "$(grep -c '^transport: ucx (this side offers ucx)' "$(kvf_logfile client-list-both)")" 1 \
  "a listing sender says which transport it chose"
kvf_check_eq "$(grep -c 'cuda_ipc left out\|cuda_ipc: this side' "$(kvf_logfile client-list-both)")" 0 \
  "host memory leaves GPU transports out quietly"
# Without --transport, --topology takes the list from the topology's transports.preference.
layers_run list-topology list env UCX_TLS=tcp -- --topology "$KVF_SOURCE/examples/topologies/gpu-2x.yaml"
kvf_check_eq "$(grep -c '^transport: ucx (this side offers ucx)' "$(kvf_logfile client-list-topology)")" 1 \
  "a sender taking [cuda_ipc, nccl, ucx] from the topology chooses ucx for host memory"
kvf_run bad-topology 20 "$KVF_PERF" client --connect 127.0.0.1:1 --topology /etc/hostname
kvf_check test $? -ne 0 -- "an invalid --topology fails the client"
kvf_check_grep "$(kvf_logfile bad-topology)" "--topology /etc/hostname is not valid" "and says why"
kvf_check kvf_alive list -- "list server still alive"

# --- ucx_staged: gather -> one UCX put per slot -> the receiver scatters ------------------------
kvf_start_server staged 127.0.0.1 env UCX_TLS=tcp -- --transport ucx_staged --staging-bytes 1M
layers_run staged staged env UCX_TLS=tcp -- --transport ucx_staged --staging-bytes 1M
layers_run staged-list staged env UCX_TLS=tcp -- --transport ucx,ucx_staged --staging-bytes 1M
kvf_check_eq "$(grep -c '^transport: ucx_staged' "$(kvf_logfile client-staged-list)")" 1 \
  "a list whose first choice the receiver lacks falls through to ucx_staged"
kvf_start_server staged-full 127.0.0.1 env UCX_TLS=tcp -- --transport ucx_staged --staging-limit 1M
kvf_run staged-refused 60 env UCX_TLS=tcp "$KVF_PERF" client --connect "127.0.0.1:${KVF_PORT[staged-full]}" \
  --transport ucx_staged --mode layers --layers 2 --blocks 4 --block-bytes 16K --iters 1 --timeout-ms 10000
rc=$?
kvf_check test "$rc" != 0 -a "$rc" != 124 -- "a receiver without staging room fails the sender (rc $rc), no hang"
kvf_check_grep "$(kvf_logfile staged-refused)" "gives no staging slots.*limit" "the sender says the receiver has no room"
kvf_check kvf_alive staged-full -- "the full receiver keeps serving"
kvf_check kvf_alive staged -- "the ucx_staged server still alive"

# --- shared memory ----------------------------------------------------------------------------
# UCX's shared-memory transports here (ucx_info -d): posix, sysv (mm) and cma. "sm" names them all.
# Known limitation (UCX 1.13, Debian bookworm): the transport creates endpoints with
# UCP_ERR_HANDLING_MODE_PEER (detect_peer_failure), which posix/sysv do not support ("no peer
# failure handler") and cma cannot carry active messages, so ucp_ep_create fails with "Destination
# is unreachable". That exact failure is reported as XFAIL; any other failure fails the test, and
# once shared memory works every check below applies. KVF_STRICT_SHM=1 makes the XFAIL a failure.
shm_known_limitation() {
  grep -q 'no peer failure handler' "$1" && grep -q 'Destination is unreachable' "$1"
}
kvf_start_server shm 127.0.0.1 env UCX_TLS=sm
before=$(kvf_count_lines shm '^stream [0-9]+ from ')
kvf_run probe-shm 60 env UCX_TLS=sm "$KVF_PERF" client --connect "127.0.0.1:${KVF_PORT[shm]}" \
  --mode bw --sizes 64K --iters 10
rc=$?
if [[ $rc != 0 && ${KVF_STRICT_SHM:-0} != 1 ]] && shm_known_limitation "$(kvf_logfile probe-shm)"; then
  echo "XFAIL ($KVF_TEST): UCX_TLS=sm: kvfabric's peer-failure-detecting endpoints cannot use UCX 1.13's" \
    "shared-memory transports: $(grep -m1 'kvfabric-perf:' "$(kvf_logfile probe-shm)")"
else
  kvf_check_eq "$rc" 0 "shm bw probe client exit status" || sed 's/^/    | /' "$(kvf_logfile probe-shm)" >&2
  layers_run shm shm env UCX_TLS=sm
  kvf_run bw-shm 120 env UCX_TLS=sm "$KVF_PERF" client --connect "127.0.0.1:${KVF_PORT[shm]}" \
    --mode bw --sizes 1M --iters 40 --json "$KVF_TMP/bw-shm.json"
  rc=$?
  if kvf_check_eq "$rc" 0 "shm bw client exit status"; then
    check_json "$KVF_TMP/bw-shm.json" bw 1048576
  else
    sed 's/^/    | /' "$(kvf_logfile bw-shm)" >&2
  fi
fi
kvf_check kvf_alive shm -- "shm server still alive"
kvf_check_eq "$(kvf_count_lines shm 'FAILED')" 0 "FAILED lines on the shm server"

kvf_finish
