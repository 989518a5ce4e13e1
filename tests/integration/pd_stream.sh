#!/usr/bin/env bash
# The README demo's first part, kvfabric-pd-stream, on the embedded default topology (its ports
# moved to free ones): the prefill process streams a request layer by layer into a decode child
# process over UCX, the decode side checks every byte, and both sides must say so. Run several
# times in a row, because the decode process exits as soon as its request is verified: its
# StreamResult must still reach the prefill side (a shutdown that dropped it failed 1 run in 12
# under load). Then its bad input: an unknown engine, zero tokens, a wrong role and a decode side
# that is not there, each a clear error and a failing exit status.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init pd_stream 300
STREAM=$KVF_BIN/kvfabric-pd-stream
[[ -x $STREAM ]] || kvf_skip "kvfabric-pd-stream is not built"
pport=$(kvf_free_port) dport=$(kvf_free_port)
topo=$KVF_TMP/topology.yaml
sed -e "s/port: 17100/port: $pport/" -e "s/port: 17101/port: $dport/" \
  "$KVF_SOURCE/examples/topologies/local.yaml" >"$topo"

# tokens -> the request's bytes: whole 16-token blocks of 32 layers x 8 heads x 128 dims x K,V x bf16.
request_bytes() { echo $(( ($1 + 15) / 16 * 16 * 32 * 8 * 128 * 2 * 2 )); }

run=0
for tokens in 8192 1000 1000 2048 2048 16; do
  run=$((run + 1))
  bytes=$(request_bytes "$tokens")
  if kvf_run "stream-$run" 90 "$STREAM" --topology "$topo" --tokens "$tokens" --seed $((run * 7)); then
    log=$(kvf_logfile "stream-$run")
    kvf_check_grep "$log" "\[decode decode0\] .*every byte verified: yes" "run $run ($tokens tokens): decode verified every byte"
    kvf_check_grep "$log" "\[prefill prefill0\] decode verified $bytes bytes" \
      "run $run: the prefill side heard the decode side's result ($bytes bytes)"
    kvf_check_grep "$log" "^PD stream demo: OK" "run $run: both processes succeeded"
  else
    kvf_check_fail "run $run ($tokens tokens) failed: $(tail -3 "$(kvf_logfile "stream-$run")")"
  fi
done

# expect_error NAME REGEX WHAT ARGS...: the command fails and says REGEX.
expect_error() {
  local name=$1 regex=$2 what=$3
  shift 3
  if kvf_run "$name" 30 "$STREAM" --topology "$topo" "$@"; then
    kvf_check_fail "$what: exited 0"
  else
    kvf_check_grep "$(kvf_logfile "$name")" "$regex" "$what"
  fi
}
expect_error bad-engine "no decode engine \(or the one named\)" "an unknown decode engine is named" --decode nosuch
expect_error zero-tokens "--tokens must be positive" "zero tokens" --tokens 0
expect_error bad-role "--role must be both, prefill or decode" "an unknown role" --role sideways
expect_error no-decode "cannot reach decode0" "no decode side listening: the prefill gives up after its timeout" \
  --role prefill --connect-timeout-s 1
kvf_finish
