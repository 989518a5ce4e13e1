#!/usr/bin/env bash
# Compressed PD layer streams between real processes: kvfabric-perf server and client over
# --transport ucx_staged with UCX_TLS=tcp on 127.0.0.1.
#  - int8 and fp8 (and identity through the same path): layers mode, 32 layers x 64 blocks x 2 x
#    16 KiB, shuffled, 2 requests each; the client's blocks are random bf16, the server lands them
#    in a poisoned pool and checks every block against the CPU codec's decode of the client's
#    values; the client waits for that check and exits 0, and the server prints "codec check
#    passed: N bytes" for each request;
#  - errors, each a clear message with both servers still serving afterwards: a client of another
#    codec (fp8 client, int8 server), a client of another row size, a raw client without --codec
#    against an int8 server (refused by the transport itself, both codecs named), a block part that
#    is not whole rows (--block-bytes not a multiple of --row-bytes), a --codec client against a
#    server without --codec.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init stream_codec 420

LAYERS=32 BLOCKS=64 BLOCK_BYTES=16384 REQUESTS=2
TOTAL=$(kvf_layers_bytes $LAYERS $BLOCKS $BLOCK_BYTES)
GEOMETRY=(--layers $LAYERS --blocks $BLOCKS --block-bytes $BLOCK_BYTES)
STAGED=(--transport ucx_staged --staging-bytes 1M --row-bytes 2048)

# codec_run LABEL SERVER CODEC [CLIENT-ARGS...]: one layers run of REQUESTS requests that must pass.
codec_run() {
  local label=$1 server=$2 codec=$3
  shift 3
  local before rc log
  before=$(kvf_count_lines "$server" 'codec check passed: ')
  kvf_run "client-$label" 180 env UCX_TLS=tcp "$KVF_PERF" client --connect "127.0.0.1:${KVF_PORT[$server]}" \
    --mode layers "${GEOMETRY[@]}" --shuffle --verify --iters $REQUESTS --timeout-ms 20000 "${STAGED[@]}" \
    --codec "$codec" "$@"
  rc=$?
  log=$(kvf_logfile "client-$label")
  if [[ $rc != 0 ]]; then
    kvf_check_fail "$label: client exited $rc, want 0:"
    sed 's/^/    | /' "$log" >&2
    return 1
  fi
  kvf_pass "$label: client exited 0 ($(grep -E '^layers ' "$log" | tail -n1 | awk '{print $4 " GB/s"}'))"
  kvf_check_eq "$(grep -cE "server: $TOTAL bytes equal the $codec decode of the sender's values" "$log")" \
    "$REQUESTS" "$label: client requests the server checked whole against the $codec decode"
  kvf_check_eq "$(($(kvf_count_lines "$server" "codec check passed: $TOTAL bytes equal the $codec decode") - before))" \
    "$REQUESTS" "$label: server lines 'codec check passed: $TOTAL bytes'"
  kvf_check_eq "$(kvf_count_lines "$server" 'codec check FAILED')" 0 "$label: no failed check on the server"
}

# refused LABEL SERVER PATTERN CLIENT-ARGS...: a client run that must fail, saying PATTERN.
refused() {
  local label=$1 server=$2 pattern=$3
  shift 3
  kvf_run "client-$label" 120 env UCX_TLS=tcp "$KVF_PERF" client --connect "127.0.0.1:${KVF_PORT[$server]}" \
    --mode layers --shuffle --verify --iters 1 --timeout-ms 10000 "$@"
  local rc=$?
  kvf_check test "$rc" -ne 0 -- "$label: the client fails (exit $rc)"
  kvf_check_grep "$(kvf_logfile "client-$label")" "$pattern" "$label: and says why"
}

kvf_start_server int8 127.0.0.1 env UCX_TLS=tcp -- "${GEOMETRY[@]}" "${STAGED[@]}" --codec int8
kvf_start_server fp8 127.0.0.1 env UCX_TLS=tcp -- "${GEOMETRY[@]}" "${STAGED[@]}" --codec fp8
kvf_start_server raw 127.0.0.1 env UCX_TLS=tcp -- "${GEOMETRY[@]}" "${STAGED[@]}" --codec identity
kvf_start_server plain 127.0.0.1 env UCX_TLS=tcp -- --transport ucx_staged --staging-bytes 1M
kvf_check_grep "$(kvf_logfile int8)" 'codec int8, rows of 2048 bytes: streams land in a poisoned pool' \
  "the int8 server says what it checks"

codec_run int8 int8 int8
codec_run fp8 fp8 fp8
codec_run identity raw identity
codec_run int8-2-workers int8 int8 --staging-workers 2
codec_run int8-inline int8 int8 --staging-workers 0

# --- errors; the servers keep serving ---------------------------------------------------------------
refused codec-mismatch int8 'codec mismatch: the server runs --codec int8 --row-bytes 2048, this client --codec fp8' \
  "${GEOMETRY[@]}" "${STAGED[@]}" --codec fp8
refused row-mismatch int8 'the server runs --codec int8 --row-bytes 2048, this client --codec int8 --row-bytes 4096' \
  "${GEOMETRY[@]}" --transport ucx_staged --staging-bytes 1M --codec int8 --row-bytes 4096
# A client without --codec streams raw: the int8 server's transport refuses its staging request.
refused raw-into-int8 int8 'the sender encodes its slots as identity, this receiver takes int8 \(rows of 2048 bytes\)' \
  "${GEOMETRY[@]}" --transport ucx_staged --staging-bytes 1M
refused no-codec-server plain 'was not started with --codec' "${GEOMETRY[@]}" "${STAGED[@]}" --codec int8
refused not-whole-rows int8 'not whole rows of 2048 bytes' --layers $LAYERS --blocks $BLOCKS --block-bytes 3000 \
  "${STAGED[@]}" --codec int8
kvf_check_eq "$(kvf_count_lines int8 'codec check FAILED')" 0 "no codec check failed on the int8 server"
kvf_check_grep "$(kvf_logfile int8)" 'ucx_staged: refused sender [0-9a-f]+: .*encodes its slots as identity, this receiver takes int8' \
  "the int8 server logs the refused raw sender with the reason"

codec_run int8-after-errors int8 int8
codec_run fp8-after-errors fp8 fp8
kvf_check kvf_alive int8 -- "int8 server still alive"
kvf_check kvf_alive fp8 -- "fp8 server still alive"
kvf_check kvf_alive raw -- "identity server still alive"
kvf_check kvf_alive plain -- "plain server still alive"
kvf_finish
