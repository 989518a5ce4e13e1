#!/usr/bin/env bash
# The router client against real daemons: two kvfabricd (nodes a and b of one topology, loopback,
# free ports); an engine (kvfabric-store-tool) stores a prompt's first chunks on a, under the keys
# kvfabric-ctl hashes from the tokens; kvfabric-ctl lookup and best-engine then pick node a and its
# engine with the held prefix, the daemon's own /lookup by tokens agrees, pin/unpin/clear act on the
# right node (clear --model takes that model's entries, copies moved between nodes included, and
# leaves another model's), move copies between the daemons, a stopped daemon is reported DOWN while
# the other still answers, and the C ABI test (compiled as C) passes against the same daemons.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init router_client 150

command -v curl >/dev/null || kvf_skip "curl is not installed (scripts/setup-deps.sh installs it)"
for b in kvfabricd kvfabric-store-tool kvfabric-ctl kvf-router-c-abi-test; do
  [[ -x $KVF_BIN/$b ]] || kvf_skip "$KVF_BIN/$b is not built"
done
ln -s "$(cd "$KVF_BIN" && pwd)/kvfabricd" "$KVF_TMP/bin/kvfit-router-daemon"
daemon=$KVF_TMP/bin/kvfit-router-daemon
tool=$KVF_BIN/kvfabric-store-tool
ctl=$KVF_BIN/kvfabric-ctl

# Free ports: HTTP and control for both nodes (the engines' ports are only names here, never bound).
ports=()
while ((${#ports[@]} < 4)); do
  p=$(kvf_free_port)
  [[ " ${ports[*]} " == *" $p "* ]] || ports+=("$p")
done
port_a=${ports[0]} port_b=${ports[1]} control_a=${ports[2]} control_b=${ports[3]}
topo=$KVF_TMP/topology.yaml
cat >"$topo" <<YAML
cluster: router-client-test
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 64}
    chunk_tokens: 32
nodes:
  - name: a
    address: 127.0.0.1
    control_port: $control_a
    http_port: $port_a
    store: {dram: 32MiB, socket: $KVF_TMP/a.sock}
  - name: b
    address: 127.0.0.1
    control_port: $control_b
    http_port: $port_b
    store: {dram: 32MiB, socket: $KVF_TMP/b.sock}
engines:
  - {name: a-prefill, node: a, role: prefill, model: m, port: 1}
  - {name: a-both, node: a, role: both, model: m, port: 2}
  - {name: b-decode, node: b, role: decode, model: m, port: 3}
YAML

start_daemon() {  # NAME NODE
  kvf_start_bg "$1" "$daemon" --topology "$topo" --node "$2" --drain-ms 2000
  kvf_wait_for_line "$1" '\] ready: ' 20 || kvf_die "kvfabricd $1 did not get ready: $(tail -n 5 "$(kvf_logfile "$1")")"
  kvf_log "kvfabricd $1 ready (pid $(kvf_pid "$1"))"
}
start_daemon daemon_a a
start_daemon daemon_b b

# ctl NAME ARGS...: runs kvfabric-ctl; output in $KVF_TMP/NAME.log, exit status in RC.
RC=0
ctl() {
  local name=$1
  shift
  kvf_run "$name" 20 "$ctl" --topology "$topo" "$@"
  RC=$?
}
out() { cat "$KVF_TMP/$1.log"; }
line() { grep -E -- "$2" "$KVF_TMP/$1.log" | head -n1; }

# A prompt of 5 full chunks (160 tokens) and a partial tail of 5.
tokens=$(seq -s, 1001 1165)
echo "$tokens" >"$KVF_TMP/tokens.txt"

# --- keys: the client hashes as the daemons do ----------------------------------------------------
ctl keys keys --model m --tokens "$tokens"
kvf_check_eq "$RC" 0 "kvfabric-ctl keys: exit status"
kvf_check_eq "$(grep -cE '^[0-9a-f]{32}$' "$KVF_TMP/keys.log")" 5 "kvfabric-ctl keys: 5 full chunks of 32 tokens"
head -n 3 "$KVF_TMP/keys.log" >"$KVF_TMP/keys_a.txt"
head -n 1 "$KVF_TMP/keys.log" >"$KVF_TMP/keys_b.txt"
ctl keys_file keys --model m --tokens-file "$KVF_TMP/tokens.txt"
kvf_check_eq "$(out keys_file)" "$(out keys)" "--tokens-file gives the same keys as --tokens"

# --- an engine stores the first 3 chunks on a, the first one on b ----------------------------------
# --topology/--model: each put records m's fingerprint, as an engine of m does.
kvf_run put_a 20 "$tool" put --socket "$KVF_TMP/a.sock" --keys-file "$KVF_TMP/keys_a.txt" --bytes 4096 \
  --topology "$topo" --model m
kvf_check_grep "$KVF_TMP/put_a.log" '^put: stored 3 chunks, 0 already present' "engine on a stored 3 chunks"
kvf_run put_b 20 "$tool" put --socket "$KVF_TMP/b.sock" --keys-file "$KVF_TMP/keys_b.txt" --bytes 4096 \
  --topology "$topo" --model m
kvf_check_grep "$KVF_TMP/put_b.log" '^put: stored 1 chunks, 0 already present' "engine on b stored 1 chunk"

# The daemon's own /lookup by tokens (it hashes them itself) finds what was stored under ctl's keys.
json_tokens="[${tokens}]"
reply=$(curl -sS -m 10 -H 'Content-Type: application/json' "http://127.0.0.1:$port_a/lookup" \
  -d "{\"model\": \"m\", \"tokens\": $json_tokens}")
kvf_check_eq "$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["query_chunks"], d["matches"][0]["matched_tokens"])' "$reply" 2>&1)" \
  "5 96" "daemon a's /lookup by tokens: 5 chunks asked, 96 tokens held (client and daemon hash alike)"

# --- lookup and best-engine ------------------------------------------------------------------------
ctl lookup lookup --model m --tokens "$tokens"
kvf_check_eq "$RC" 0 "lookup: exit status"
kvf_check_eq "$(line lookup '^model=')" "model=m query_chunks=5" "lookup: query"
kvf_check_eq "$(line lookup '^node a ')" "node a (127.0.0.1:$port_a): up matched_tokens=96 matched_chunks=3 tier=dram" \
  "lookup: node a holds 3 chunks"
kvf_check_eq "$(line lookup '^node b ')" "node b (127.0.0.1:$port_b): up matched_tokens=32 matched_chunks=1 tier=dram" \
  "lookup: node b holds 1 chunk"
kvf_check_eq "$(grep '^engine ' "$KVF_TMP/lookup.log" | cut -d' ' -f2 | paste -sd,)" "a-both,a-prefill,b-decode" \
  "lookup: engines best first (longest prefix, then role both before prefill)"
ctl best best-engine --model m --tokens "$tokens"
kvf_check_eq "$RC" 0 "best-engine: exit status"
kvf_check_eq "$(line best '^best:')" "best: engine=a-both node=a role=both matched_tokens=96 cached=yes" \
  "best-engine picks a's engine with the 96-token prefix"
ctl lookup_b lookup --model m --tokens "$tokens" --node b
kvf_check_eq "$(grep -c '^node ' "$KVF_TMP/lookup_b.log")" 1 "lookup --node b asks only b"

# --- pin, unpin, stats, clear ------------------------------------------------------------------------
ctl pin pin --model m --tokens "$tokens"
kvf_check_eq "$RC" 0 "pin: exit status"
kvf_check_eq "$(line pin '^node a ')" "node a (127.0.0.1:$port_a): pinned=3 not_found=2" "pin: 3 pinned on a"
kvf_check_eq "$(line pin '^node b ')" "node b (127.0.0.1:$port_b): pinned=1 not_found=4" "pin: 1 pinned on b"
ctl stats stats --node a
kvf_check_grep "$KVF_TMP/stats.log" "^node a \(127.0.0.1:$port_a\): entries=3 pinned=3 leased=0 " "stats: a has 3 entries, 3 pinned"
ctl unpin unpin --keys-file "$KVF_TMP/keys_a.txt" --node a
kvf_check_eq "$(out unpin)" "node a (127.0.0.1:$port_a): unpinned=3 not_found=0" "unpin --node a: 3 unpinned"
ctl stats2 stats --node a
kvf_check_grep "$KVF_TMP/stats2.log" "^node a .*: entries=3 pinned=0 " "stats: nothing pinned on a after unpin"
ctl clear_b clear --node b --keys "$(cat "$KVF_TMP/keys_b.txt")"
kvf_check_eq "$(out clear_b)" "node b (127.0.0.1:$port_b): cleared=1 freed_bytes=4096" "clear --keys on b: 1 entry, 4096 bytes"
ctl lookup2 lookup --model m --tokens "$tokens"
kvf_check_eq "$(line lookup2 '^node b ')" "node b (127.0.0.1:$port_b): up matched_tokens=0 matched_chunks=0 tier=dram" \
  "lookup after clear: b holds nothing"
kvf_check_eq "$(grep -c '^engine ' "$KVF_TMP/lookup2.log")" 2 "lookup after clear: only a's engines match"

# --- move: the daemons join their peers, so a copy from a to b lands in b's store ------------------
ctl move move --from a --to b --keys-file "$KVF_TMP/keys_a.txt" --copy
kvf_check_eq "$RC" 0 "move --copy a -> b: exit status"
kvf_check_eq "$(out move)" "moved=3 bytes=12288 not_found=0" "move --copy: 3 entries, 12288 bytes"
ctl lookup_moved lookup --model m --tokens "$tokens"
kvf_check_eq "$(line lookup_moved '^node b ')" "node b (127.0.0.1:$port_b): up matched_tokens=96 matched_chunks=3 tier=dram" \
  "lookup after the copy: b holds the 96-token prefix too"
kvf_check_eq "$(grep '^engine ' "$KVF_TMP/lookup_moved.log" | cut -d' ' -f2 | paste -sd,)" "a-both,b-decode,a-prefill" \
  "equal prefixes: role both, then decode, then prefill"
ctl move_bad move --from a --to zzz --keys-file "$KVF_TMP/keys_a.txt"
kvf_check_eq "$RC" 1 "move to an unknown node: exit status 1"
kvf_check_grep "$KVF_TMP/move_bad.log" "move: invalid_argument: node a \(127.0.0.1:$port_a\): HTTP 400: .*zzz" \
  "move to an unknown node: the daemon's text, naming the node asked"
# Two chunks of another model on b (the store tool's own), then clear model m on b: the copies go
# (the move carried their model), the other model's chunks stay.
kvf_run put_other 20 "$tool" put --socket "$KVF_TMP/b.sock" --seed 5 --chunks 2 --bytes 8192
kvf_check_grep "$KVF_TMP/put_other.log" '^put: stored 2 chunks' "engine of another model stored 2 chunks on b"
ctl clear_b2 clear --node b --model m
kvf_check_eq "$RC" 0 "clear --model m on b: exit status"
kvf_check_eq "$(out clear_b2)" "node b (127.0.0.1:$port_b): cleared=3 freed_bytes=12288" "clear --model m: the 3 copies on b"
ctl stats_b stats --node b
kvf_check_grep "$KVF_TMP/stats_b.log" "^node b .*: entries=2 " "the other model's 2 entries stay on b"
kvf_run lookup_other 20 "$tool" get --socket "$KVF_TMP/b.sock" --seed 5 --chunks 2 --bytes 8192
kvf_check_eq $? 0 "the other model's chunks still read back verified"
ctl stats_a stats --node a
kvf_check_grep "$KVF_TMP/stats_a.log" "^node a .*: entries=3 " "clear --node b left a's entries of m alone"
ctl clear_nope clear --node b --model nope
kvf_check_eq "$RC" 1 "clear --model of a model the topology lacks: exit status 1"
kvf_check_grep "$KVF_TMP/clear_nope.log" "HTTP 400: unknown model 'nope' \(the topology has: m\)" \
  "clear --model nope: the daemon's 400 names the models it has"
ctl clear_b3 clear --node b --all
kvf_check_eq "$(out clear_b3)" "node b (127.0.0.1:$port_b): cleared=2 freed_bytes=16384" "clear --all on b: the other 2"

# --- usage errors ------------------------------------------------------------------------------------
ctl usage1 lookup --tokens 1,2,3
kvf_check_eq "$RC" 2 "lookup without --model: exit status 2"
kvf_check_grep "$KVF_TMP/usage1.log" 'lookup needs --model' "lookup without --model: says so"
ctl usage2 lookup --model nope --tokens 1,2,3
kvf_check_eq "$RC" 2 "lookup of an unknown model: exit status 2"
ctl usage3 frobnicate
kvf_check_eq "$RC" 2 "unknown command: exit status 2"
ctl usage4 lookup --model m --tokens 1,x,3
kvf_check_grep "$KVF_TMP/usage4.log" "'x' is not a token id" "bad token: says which"

# --- the C ABI, both daemons up --------------------------------------------------------------------
kvf_run c_abi 30 "$KVF_BIN/kvf-router-c-abi-test" "$topo" m "$tokens" a 96
kvf_check_eq $? 0 "C ABI test against the daemons"
kvf_check_eq "$(sed -n 's/^first_key=//p' "$KVF_TMP/c_abi.log")" "$(head -n1 "$KVF_TMP/keys.log")" \
  "C ABI hashes the same first key as kvfabric-ctl"

# --- a daemon stops: b is reported down, a still answers --------------------------------------------
kill -TERM "$(kvf_pid daemon_b)"
kvf_forget daemon_b
kvf_check_eq "$KVF_RC" 0 "kvfabricd b drained and exited 0"
ctl lookup3 lookup --model m --tokens "$tokens"
kvf_check_eq "$RC" 0 "lookup with b down: exit status 0 (a answered)"
kvf_check_grep "$KVF_TMP/lookup3.log" "^node b \(127.0.0.1:$port_b\): DOWN: peer_lost: connect: Connection refused" \
  "lookup: b reported DOWN, naming it"
kvf_check_eq "$(line lookup3 '^node a ')" "node a (127.0.0.1:$port_a): up matched_tokens=96 matched_chunks=3 tier=dram" \
  "lookup: a still answers"
ctl best2 best-engine --model m --tokens "$tokens"
kvf_check_eq "$(line best2 '^best:')" "best: engine=a-both node=a role=both matched_tokens=96 cached=yes" \
  "best-engine with b down still picks a"
ctl health health
kvf_check_eq "$RC" 1 "health with b down: exit status 1"
kvf_check_grep "$KVF_TMP/health.log" "^node a \(127.0.0.1:$port_a\): ok version=" "health: a ok"
kvf_check_grep "$KVF_TMP/health.log" "^node b .*: DOWN: " "health: b DOWN"
kvf_run c_abi_down 30 "$KVF_BIN/kvf-router-c-abi-test" "$topo" m "$tokens" a 96 b
kvf_check_eq $? 0 "C ABI test with node b down"

# --- clear everything: best-engine falls back to a decode-or-both engine on a node that answers -----
ctl clear_all clear --all
kvf_check_eq "$RC" 1 "clear --all with b down: exit status 1 (b failed)"
kvf_check_eq "$(line clear_all '^node a ')" "node a (127.0.0.1:$port_a): cleared=3 freed_bytes=12288" "clear --all: a cleared 3"
ctl best3 best-engine --model m --tokens "$tokens"
kvf_check_eq "$(line best3 '^best:')" "best: engine=a-both node=a role=both matched_tokens=0 cached=no" \
  "best-engine with nothing cached: the fallback engine"

for f in c_abi c_abi_down; do
  [[ $KVF_FAILURES -gt 0 ]] && { echo "----- $f -----"; cat "$KVF_TMP/$f.log"; }
done
kvf_finish
