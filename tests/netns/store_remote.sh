#!/usr/bin/env bash
# Three nodes (a, b, c) in network namespaces on one bridge, a kvfabricd in each, UCX over tcp on
# the namespaces' own interfaces only. An engine process stores random chunks on a; then:
#   - a router's /lookup at c reports the prefix held on a;
#   - /move {from a, to c, copy} at c brings it over UCX (the holder writes into c's arena), and
#     an engine process on c reads every byte back, verified against the data that was stored;
#   - /move {from a, to b} asked at c (neither end) is forwarded to b; a no longer holds it;
#   - the move in both fetch directions (put and get) is exercised by a second daemon setting;
#   - a peer frame of garbage, a move from a node that is down: clear errors, daemons keep serving.
# Skips (77) where namespaces cannot be made.
set -uo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/../integration/lib.sh"
source "$here/lib.sh"
kvf_init store_remote 240
kvf_on_exit 'kvf_netns_teardown'
kvf_netns_cluster 3 || kvf_skip "$KVF_NETNS_ERROR"
kvf_log "hosts: ${KVF_NS[*]} at ${KVF_NS_ADDR[*]}"

daemon=$KVF_BIN/kvfabricd
tool=$KVF_BIN/kvfabric-store-tool
topo=$KVF_TMP/topology.yaml
cat >"$topo" <<YAML
cluster: store-remote-test
transports:
  ucx_tls: tcp
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 64}
    chunk_tokens: 32
nodes:
  - {name: a, address: ${KVF_NS_ADDR[1]}, control_port: 17000, http_port: 17080, store: {dram: 128MiB, socket: $KVF_TMP/a.sock}}
  - {name: b, address: ${KVF_NS_ADDR[2]}, control_port: 17000, http_port: 17080, store: {dram: 128MiB, socket: $KVF_TMP/b.sock}}
  - {name: c, address: ${KVF_NS_ADDR[3]}, control_port: 17000, http_port: 17080, store: {dram: 128MiB, socket: $KVF_TMP/c.sock}}
YAML
UCX_ENV=(env UCX_NET_DEVICES=kvf0)
names=(x a b c)

start_node() {  # I [extra kvfabricd flags]
  local i=$1 node=${names[$1]}
  shift
  kvf_start_bg "d_$node" ip netns exec "${KVF_NS[i]}" "${UCX_ENV[@]}" "$daemon" --topology "$topo" --node "$node" \
    --no-huge-pages "$@"
  kvf_wait_for_line "d_$node" '\] ready: ' 20 || kvf_die "kvfabricd $node did not get ready: $(tail -n 5 "$(kvf_logfile "d_$node")")"
  kvf_check_grep "$(kvf_logfile "d_$node")" "peers: serving the other nodes on port 17000" "node $node joined its peers"
}
for i in 1 2 3; do start_node $i; done

# http I NAME METHOD PATH [BODY]: curl from host I to node I's API; body in $KVF_TMP/NAME.json, status in CODE.
CODE=0
http() {
  local i=$1 name=$2 method=$3 path=$4 body=${5:-}
  CODE=$(kvf_netns_exec "$i" curl -s -o "$KVF_TMP/$name.json" -w '%{http_code}' -X "$method" \
    -H 'Content-Type: application/json' ${body:+--data "$body"} "http://${KVF_NS_ADDR[i]}:17080$path")
}
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$KVF_TMP/$1.json" 2>&1; }

CHUNKS=16 BYTES=1048576
kvf_run put 60 ip netns exec "${KVF_NS[1]}" "$tool" put --socket "$KVF_TMP/a.sock" --seed 7 --chunks $CHUNKS --bytes $BYTES
kvf_check_eq "$?" 0 "an engine on a stored $CHUNKS chunks"
keys_json=$("$tool" keys --seed 7 --chunks $CHUNKS | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().split()))')

http 3 lookup_c POST /lookup "{\"model\": \"m\", \"chunk_keys\": $keys_json}"
kvf_check_eq "$CODE" 200 "lookup at c: status"
kvf_check_eq "$(field lookup_c '[(m["node"], m["matched_chunks"]) for m in d["matches"]]')" "[('a', $CHUNKS)]" \
  "lookup at c finds the whole prefix on a (and none at c)"

http 3 lookup_c_node POST /lookup "{\"model\": \"m\", \"chunk_keys\": $keys_json, \"scope\": \"node\"}"
kvf_check_eq "$(field lookup_c_node 'd["matches"]')" "[]" "lookup at c with scope node: c's own store only"

http 3 move_ac POST /move "{\"from\": \"a\", \"to\": \"c\", \"keys\": $keys_json, \"copy\": true}"
kvf_check_eq "$CODE" 200 "move a -> c (copy) asked at c: status"
kvf_check_eq "$(field move_ac '[d["moved"], d["bytes"], d["not_found"]]')" "[$CHUNKS, $((CHUNKS * BYTES)), []]" \
  "move a -> c: every chunk and byte"
kvf_check_grep "$(kvf_logfile d_c)" "fetched $CHUNKS chunks \($((CHUNKS * BYTES)) bytes\) from a" "c's log reports the fetch"
kvf_run get_c 60 ip netns exec "${KVF_NS[3]}" "$tool" get --socket "$KVF_TMP/c.sock" --seed 7 --chunks $CHUNKS --bytes $BYTES
kvf_check_eq "$?" 0 "an engine on c reads the fetched chunks back"
kvf_check_grep "$(kvf_logfile get_c)" "^get: verified $CHUNKS chunks" "every byte on c verified against what was stored on a"

http 3 lookup_c2 POST /lookup "{\"model\": \"m\", \"chunk_keys\": $keys_json}"
kvf_check_eq "$(field lookup_c2 '[m["node"] for m in d["matches"]]')" "['c']" \
  "lookup at c: now held locally (peers are asked only when the local prefix is short)"

# Asked at c, between two other nodes: b pulls from a, then a drops them.
http 3 move_ab POST /move "{\"from\": \"a\", \"to\": \"b\", \"keys\": $keys_json}"
kvf_check_eq "$CODE" 200 "move a -> b asked at c: status"
kvf_check_eq "$(field move_ab 'd["moved"]')" "$CHUNKS" "move a -> b: every chunk"
kvf_run get_b 60 ip netns exec "${KVF_NS[2]}" "$tool" get --socket "$KVF_TMP/b.sock" --seed 7 --chunks $CHUNKS --bytes $BYTES
kvf_check_grep "$(kvf_logfile get_b)" "^get: verified $CHUNKS chunks" "every byte on b verified"
kvf_run lookup_a 30 ip netns exec "${KVF_NS[1]}" "$tool" lookup --socket "$KVF_TMP/a.sock" --seed 7 --chunks $CHUNKS
kvf_check_grep "$(kvf_logfile lookup_a)" "^lookup: 0 of $CHUNKS chunks held" "a no longer holds what moved (no copy)"

# Garbage on the peer port: an error reply or a closed connection; the daemon keeps serving.
kvf_netns_exec 2 bash -c "exec 3<>/dev/tcp/${KVF_NS_ADDR[3]}/17000; printf 'GET / HTTP/1.1\r\n\r\n' >&3; timeout 2 cat <&3 >/dev/null" || true
kvf_netns_exec 2 bash -c "exec 3<>/dev/tcp/${KVF_NS_ADDR[3]}/17000; printf '\x05\x00\x00\x00{bad}' >&3; timeout 2 cat <&3" \
  >"$KVF_TMP/garbage.out" 2>&1 || true
kvf_check_grep "$KVF_TMP/garbage.out" "malformed" "a malformed peer frame gets an error naming it"
http 3 health_c GET /health
kvf_check_eq "$CODE" 200 "c serves after garbage on its peer port"

# The holder is down: a clear error, not a hang; c keeps serving.
kill -9 "$(kvf_pid d_b)"
kvf_forget d_b
start=$(kvf_now_ms)
http 3 move_dead POST /move "{\"from\": \"b\", \"to\": \"c\", \"keys\": $keys_json, \"copy\": true}"
kvf_check test "$CODE" -ge 500 -- "move from a dead node: a 5xx ($CODE) after $(($(kvf_now_ms) - start)) ms: $(cat "$KVF_TMP/move_dead.json")"
kvf_check_grep "$KVF_TMP/move_dead.json" "peer ${KVF_NS_ADDR[2]}:17000" "the error names the unreachable peer"
http 1 lookup_a2 POST /lookup "{\"model\": \"m\", \"chunk_keys\": $keys_json}"
kvf_check_eq "$CODE" 200 "a lookup at a with b down still answers"
kvf_check_eq "$(field lookup_a2 '[m["node"] for m in d["matches"]]')" "['c']" "... with what the live nodes hold"

# The other direction: c reads from a's arena with one-sided gets.
kvf_run put2 60 ip netns exec "${KVF_NS[1]}" "$tool" put --socket "$KVF_TMP/a.sock" --seed 8 --chunks 4 --bytes $BYTES
keys2=$("$tool" keys --seed 8 --chunks 4 | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().split()))')
kill "$(kvf_pid d_c)"
kvf_forget d_c
start_node 3 --fetch-by get
http 3 move_get POST /move "{\"from\": \"a\", \"to\": \"c\", \"keys\": $keys2, \"copy\": true}"
kvf_check_eq "$(field move_get '[d["moved"], d["bytes"]]')" "[4, $((4 * BYTES))]" "move a -> c by gets: every chunk"
kvf_run get_c2 60 ip netns exec "${KVF_NS[3]}" "$tool" get --socket "$KVF_TMP/c.sock" --seed 8 --chunks 4 --bytes $BYTES
kvf_check_grep "$(kvf_logfile get_c2)" "^get: verified 4 chunks" "bytes read by gets verified"
for n in a c; do kvf_check kvf_alive "d_$n" -- "daemon $n alive at the end"; done
kvf_finish
