#!/usr/bin/env bash
# A peer dies with kill -9 in the middle of a stream, on loopback, for UCX_TLS=tcp and UCX_TLS=sm
# (shared memory: there UCX does not watch the peer, so the control connection and the layer
# timeout must notice):
#  (a) the CLIENT dies: the server prints "stream N ... FAILED: <reason>" for the stream that was in
#      flight (the reason names the lost sender), stays up, and a following verified layers run
#      against the same server succeeds with every byte verified;
#  (b) the SERVER dies during a layers run (--timeout-ms 5000): the client exits 1 within 30 s with
#      a "kvfabric-perf: ..." message, never hangs;
#  (c) the SERVER dies during a bw run: the same, bounded by 30 s.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init peer_killed 240

# Requests of 1 GiB: even on an idle machine one takes a good fraction of a second over tcp.
REQ_BLOCKS=1024
REQ_MIB=$(( $(kvf_layers_bytes 32 $REQ_BLOCKS 16384) >> 20 ))
BIG=(--mode layers --layers 32 --blocks $REQ_BLOCKS --block-bytes 16K --shuffle --verify --iters 2)
SMALL_TOTAL=$(kvf_layers_bytes 32 32 16384)
BOUND_S=30

# kill_mid_stream SERVER VICTIM WHO: SIGKILLs VICTIM (the client or SERVER itself) while a stream
# is in flight. The sign of one: the server holds the request's receive region, which it allocates
# and fills (poisons) when the offer arrives, before the grant, and frees when the stream ends. The
# client fills its source before the offer, so "the client printed something" is not that sign.
kill_mid_stream() {
  local server=$1 victim=$2 who=$3 base t0
  base=$(kvf_rss_mib "$server")
  t0=$(kvf_now_ms)
  until (($(kvf_rss_mib "$server") > base + REQ_MIB - 16)); do
    kvf_alive "$victim" || kvf_die "$who ended before a stream was in flight: $(tail -n3 "$(kvf_logfile "$victim")")"
    (($(kvf_now_ms) - t0 < 60000)) || kvf_die "no stream in flight within 60 s (server RSS $(kvf_rss_mib "$server") MiB)"
    sleep 0.05
  done
  sleep 0.05  # shm moves the whole request in ~0.2 s: land early, after the grant
  kvf_alive "$victim" || kvf_die "$who finished before it could be killed; make the stream bigger"
  kvf_log "kill -9 $who (pid $(kvf_pid "$victim")) while a stream is in flight (server RSS $(kvf_rss_mib "$server") MiB, was $base)"
  kill -KILL "$(kvf_pid "$victim")"
}

# client_dies_in_bounds NAME WHAT: NAME (a background client whose server was just killed) exits
# non-zero within BOUND_S seconds with a "kvfabric-perf: ..." message.
client_dies_in_bounds() {
  local name=$1 what=$2 t0 waited rc
  t0=$(kvf_now_ms)
  while kvf_alive "$name" && (($(kvf_now_ms) - t0 < BOUND_S * 1000)); do sleep 0.1; done
  waited=$(( ($(kvf_now_ms) - t0) ))
  if kvf_alive "$name"; then
    kvf_check_fail "$what: client still running ${BOUND_S}s after its server was killed (hang)"
    kill -KILL "$(kvf_pid "$name")"
    kvf_forget "$name"
    return 1
  fi
  kvf_forget "$name"
  rc=$KVF_RC
  kvf_log "$what: client exited $rc, $((waited / 1000)).$(((waited % 1000) / 100)) s after the kill"
  kvf_check_eq "$rc" 1 "$what: client exit status"
  kvf_check_grep "$(kvf_logfile "$name")" '^kvfabric-perf: .+' "$what: client printed a 'kvfabric-perf: ...' error"
  grep -m1 '^kvfabric-perf: ' "$(kvf_logfile "$name")" | sed "s/^/    $what: /"
  if grep -qE 'terminate called|Aborted|Segmentation|core dumped' "$(kvf_logfile "$name")"; then
    kvf_check_fail "$what: client crashed instead of failing cleanly"
  fi
}

scenarios() {
  local T=$1 line rc before
  export UCX_TLS=$T
  # --- (a) the client dies ----------------------------------------------------------------------
  kvf_start_server server-a-$T 127.0.0.1
  kvf_start_bg client-a-$T "$KVF_PERF" client --connect "127.0.0.1:${KVF_PORT[server-a-$T]}" "${BIG[@]}"
  kill_mid_stream server-a-$T client-a-$T "the $T client"
  kvf_forget client-a-$T
  kvf_check_eq "$KVF_RC" 137 "$T: killed client's exit status"
  if kvf_wait_for_line server-a-$T ' FAILED: ' 20; then
    line=$(grep -m1 ' FAILED: ' "$(kvf_logfile server-a-$T)")
    kvf_log "server said: $line"
    kvf_check grep -qE '^stream [0-9]+ from kvfabric-perf-client@127\.0\.0\.1:[0-9]+ FAILED: peer_lost: .*sender connection ended after [0-9]+/32 layers' \
      <<<"$line" -- "$T: server's FAILED line names the stream, the lost sender and how far it got"
  else
    kvf_check_fail "$T: server printed no FAILED line within 20 s of the client's death"
  fi
  kvf_check kvf_alive server-a-$T -- "$T: server alive after its client was killed"

  before=$(kvf_count_lines server-a-$T '^stream [0-9]+ from ')
  kvf_run survivor-a-$T 60 "$KVF_PERF" client --connect "127.0.0.1:${KVF_PORT[server-a-$T]}" --mode layers \
    --layers 32 --blocks 32 --block-bytes 16K --shuffle --verify --iters 1 --timeout-ms 10000
  rc=$?
  kvf_check_eq "$rc" 0 "$T: next client run against the same server: exit status" ||
    sed 's/^/    | /' "$(kvf_logfile survivor-a-$T)" >&2
  kvf_check_verified server-a-$T "$SMALL_TOTAL" "$before" 1 "$T: next client run"
  kvf_check kvf_alive server-a-$T -- "$T: server alive after the next run"

  # --- (b) the server dies during a layers run --------------------------------------------------
  kvf_start_server server-b-$T 127.0.0.1
  kvf_start_bg client-b-$T "$KVF_PERF" client --connect "127.0.0.1:${KVF_PORT[server-b-$T]}" "${BIG[@]}" \
    --timeout-ms 5000
  kill_mid_stream server-b-$T server-b-$T "the $T server (layers run)"
  kvf_forget server-b-$T
  client_dies_in_bounds client-b-$T "$T: server killed during layers"

  # --- (c) the server dies during a bw run ------------------------------------------------------
  kvf_start_server server-c-$T 127.0.0.1
  kvf_start_bg client-c-$T "$KVF_PERF" client --connect "127.0.0.1:${KVF_PORT[server-c-$T]}" --mode bw \
    --sizes 4M --iters 100000
  sleep 1.5
  kvf_alive client-c-$T || kvf_die "bw client ended before the kill: $(tail -n3 "$(kvf_logfile client-c-$T)")"
  kvf_log "kill -9 the $T server (bw run, pid $(kvf_pid server-c-$T))"
  kill -KILL "$(kvf_pid server-c-$T)"
  kvf_forget server-c-$T
  client_dies_in_bounds client-c-$T "$T: server killed during bw"
  kvf_stop_all  # the idle servers of this transport: their progress threads cost CPU
}

for transport in ${KVF_TRANSPORTS:-tcp sm}; do  # KVF_TRANSPORTS=sm: just one
  scenarios $transport
done

kvf_finish
