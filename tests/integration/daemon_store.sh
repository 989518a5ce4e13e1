#!/usr/bin/env bash
# kvfabricd as an operator runs it, with real engine processes (kvfabric-store-tool on StoreClient):
# one engine stores chunks in the shared arena and another loads and verifies the same bytes; the
# HTTP control API answers curl about the same store (clear by model takes one model's chunks,
# compress says what it re-encoded, left unchanged or could not); malformed RPC frames and an
# engine of another RPC version hurt only their sender; a writer killed (or stopped) mid-put has
# its space freed; engines see errors, not hangs, while the daemon is down and succeed again once
# it is back; SIGTERM drains, removes the socket and the arena, and exits 0.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init daemon_store 150

command -v curl >/dev/null || kvf_skip "curl is not installed (scripts/setup-deps.sh installs it)"
for b in kvfabricd kvfabric-store-tool; do
  [[ -x $KVF_BIN/$b ]] || kvf_skip "$KVF_BIN/$b is not built"
done
# Under names of this test's own, like lib.sh does for kvfabric-perf.
ln -s "$(cd "$KVF_BIN" && pwd)/kvfabricd" "$KVF_TMP/bin/kvfit-daemon"
ln -s "$(cd "$KVF_BIN" && pwd)/kvfabric-store-tool" "$KVF_TMP/bin/kvfit-store-tool"
daemon=$KVF_TMP/bin/kvfit-daemon
tool=$KVF_TMP/bin/kvfit-store-tool

sock=$KVF_TMP/store.sock
http_port=$(kvf_free_port)
base=http://127.0.0.1:$http_port
cat >"$KVF_TMP/topology.yaml" <<YAML
cluster: daemon-store-test
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 64}
    chunk_tokens: 32
nodes:
  - name: it
    address: 127.0.0.1
    http_port: $http_port
    store:
      dram: 64MiB
      socket: $sock
YAML

# start_daemon NAME: runs kvfabricd for node "it" and waits for "ready".
start_daemon() {
  kvf_start_bg "$1" "$daemon" --topology "$KVF_TMP/topology.yaml" --node it --reservation-timeout-ms 2000 \
    --reap-interval-ms 200 --drain-ms 3000
  kvf_wait_for_line "$1" '\] ready: ' 20 || kvf_die "kvfabricd ($1) did not get ready: $(tail -n 5 "$(kvf_logfile "$1")")"
  kvf_log "kvfabricd $1 ready (pid $(kvf_pid "$1"))"
}

# stat NAME: one counter from the daemon, through the store RPC.
stat() {
  "$tool" stats --socket "$sock" --timeout-ms 3000 2>&1 | sed -n "s/^$1=//p"
}

# wait_stat NAME VALUE SECONDS: polls until the counter has VALUE; returns 1 at the deadline.
wait_stat() {
  local end=$(($(kvf_now_ms) + $3 * 1000))
  while (($(kvf_now_ms) < end)); do
    [[ $(stat "$1") == "$2" ]] && return 0
    sleep 0.1
  done
  return 1
}

# kvf_http_call NAME METHOD PATH [BODY]: curl, reply body in $KVF_TMP/NAME.json, status in CODE.

start_daemon d1
log1=$(kvf_logfile d1)
kvf_check_grep "$log1" "store rpc: listening on $sock\$" "daemon serves engines on the topology's socket"
kvf_check_grep "$log1" "http: listening on 127.0.0.1:$http_port\$" "daemon serves HTTP on the topology's http port"
kvf_check_grep "$log1" 'store arena: /kvfabric-it-[0-9]+ \(67108864 bytes\); huge pages: ' "arena in shm, huge pages reported"
arena1=$(grep -oE 'store arena: /kvfabric-it-[0-9]+' "$log1" | head -n1 | sed 's/store arena: //')
kvf_check test -e "/dev/shm${arena1#/}" -o -e "/dev/shm$arena1" -- "arena $arena1 exists in /dev/shm"

# --- two engines: one stores, the other loads the same bytes through the shared mapping -------------
chunks=16
bytes=262144
kvf_run writer 20 "$tool" put --socket "$sock" --seed 42 --chunks $chunks --bytes $bytes
kvf_check_eq $? 0 "writer engine: put exit status"
kvf_check_grep "$(kvf_logfile writer)" "^put: stored $chunks chunks, 0 already present" "writer stored $chunks chunks"
kvf_run reader 20 "$tool" get --socket "$sock" --seed 42 --chunks $chunks --bytes $bytes
kvf_check_eq $? 0 "reader engine: get exit status (every byte compared)"
kvf_check_grep "$(kvf_logfile reader)" "^get: verified $chunks chunks" "reader verified $chunks chunks"
wdigest=$(grep -oE 'digest [0-9a-f]+' "$(kvf_logfile writer)")
rdigest=$(grep -oE 'digest [0-9a-f]+' "$(kvf_logfile reader)")
kvf_check_eq "$rdigest" "$wdigest" "checksum digest of the bytes read equals the writer's"
kvf_run again 20 "$tool" put --socket "$sock" --seed 42 --chunks $chunks --bytes $bytes
kvf_check_grep "$(kvf_logfile again)" "^put: stored 0 chunks, $chunks already present" "a second put of the same keys stores nothing"
kvf_run lookup 20 "$tool" lookup --socket "$sock" --seed 42 --chunks 20
kvf_check_grep "$(kvf_logfile lookup)" "^lookup: $chunks of 20 chunks held" "RPC lookup: the held prefix"
kvf_check_eq "$(stat entries)" $chunks "stats: entries"
kvf_check_eq "$(stat active_leases)" 0 "stats: every lease released"

# --- the HTTP control API on the same store ------------------------------------------------------
mapfile -t keys < <("$tool" keys --seed 42 --chunks 20)
key_list=$(printf '"%s",' "${keys[@]}")
key_list="[${key_list%,}]"
kvf_http_expect_ok health GET /health '' '[d["status"], d["node"]]' '["ok", "it"]'
kvf_http_expect_ok stats GET /stats '' '[d["entries"], d["tiers"][0]["tier"], d["tiers"][0]["capacity_bytes"]]' \
  '[16, "dram", 67108864]'
kvf_http_expect_ok lookup_keys POST /lookup "{\"model\": \"m\", \"chunk_keys\": $key_list}" \
  '[d["query_chunks"], d["matches"][0]["node"], d["matches"][0]["matched_chunks"], d["matches"][0]["matched_tokens"]]' \
  '[20, "it", 16, 512]'
kvf_http_expect_ok lookup_tokens POST /lookup '{"model": "m", "tokens": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33]}' \
  '[d["query_chunks"], d["matches"]]' '[1, []]'
kvf_http_call lookup_model POST /lookup '{"model": "nope", "tokens": [1]}'
kvf_check_eq "$CODE" 400 "POST /lookup of an unknown model: status"
kvf_http_expect_ok pin POST /pin "{\"keys\": [\"${keys[0]}\", \"${keys[19]}\"]}" '[d["pinned"], d["not_found"]]' "[1, [\"${keys[19]}\"]]"
kvf_check_eq "$(stat pinned)" 1 "stats: the pin reached the store"
kvf_http_expect_ok unpin POST /unpin "{\"keys\": [\"${keys[0]}\"]}" 'd["unpinned"]' 1
kvf_http_expect_ok clear_key POST /clear "{\"keys\": [\"${keys[15]}\"]}" '[d["cleared"], d["freed_bytes"]]' "[1, $bytes]"
kvf_http_call move POST /move "{\"from\": \"it\", \"to\": \"other\", \"keys\": [\"${keys[0]}\"]}"
kvf_check_eq "$CODE" 400 "POST /move to a node the topology lacks: refused"
kvf_check_eq "$(kvf_json_field move '"no node '"'"'other'"'"'" in d["error"]')" true "POST /move: the message names the unknown node"
kvf_http_call bad_json POST /lookup '{"model": "m", "tokens": [1,'
kvf_check_eq "$CODE" 400 "malformed JSON: 400"
# Clear by model: an engine of model m (the topology's) stores 3 chunks beside the 15 of the tool's
# own model; POST /clear {"model": "m"} takes exactly those 3.
kvf_run put_m 20 "$tool" put --socket "$sock" --seed 9 --chunks 3 --bytes 4096 --topology "$KVF_TMP/topology.yaml" --model m
kvf_check_grep "$(kvf_logfile put_m)" '^put: stored 3 chunks' "engine of model m stored 3 chunks"
kvf_check_eq "$(stat entries)" 18 "stats: 15 + 3 entries"
kvf_http_expect_ok clear_model POST /clear '{"model": "m"}' '[d["cleared"], d["freed_bytes"]]' '[3, 12288]'
kvf_check_eq "$(stat entries)" 15 "clear by model left the other model's 15 entries"
kvf_run get_after_clear 20 "$tool" get --socket "$sock" --seed 42 --chunks 15 --bytes $bytes
kvf_check_eq $? 0 "the other model's entries still read back verified"
kvf_run lookup_m 20 "$tool" lookup --socket "$sock" --seed 9 --chunks 3 --topology "$KVF_TMP/topology.yaml" --model m
kvf_check_grep "$(kvf_logfile lookup_m)" '^lookup: 0 of 3 chunks held' "model m's chunks are gone"
kvf_http_call clear_unknown POST /clear '{"model": "nope"}'
kvf_check_eq "$CODE" 400 "POST /clear of a model the topology lacks: 400"
kvf_check_eq "$(kvf_json_field clear_unknown 'd["error"]')" '"unknown model '"'"'nope'"'"' (the topology has: m)"' \
  "POST /clear of an unknown model: the message names the models there are"
# The same over the store RPC, from an engine process.
kvf_run put_m2 20 "$tool" put --socket "$sock" --seed 10 --chunks 2 --bytes 4096 --topology "$KVF_TMP/topology.yaml" --model m
kvf_run clear_m_rpc 20 "$tool" clear --by-model --socket "$sock" --topology "$KVF_TMP/topology.yaml" --model m
kvf_check_grep "$(kvf_logfile clear_m_rpc)" '^clear: removed 2 entries \(8192 bytes\)' "RPC clear by model: the 2 chunks of m"
kvf_check_eq "$(stat entries)" 15 "RPC clear by model left the other model's entries"
# Compress: identity over identity entries leaves them unchanged; a real codec needs the entry's
# chunk shape, which the tool's own model (not in the topology) does not give: each entry is
# counted as failed with the reason, and nothing changes; an unknown codec is a 400.
kvf_http_expect_ok compress_all POST /compress '{"all": true, "codec": "identity"}' \
  '[d["codec"], d["compressed"], d["unchanged"], d["bytes_before"], d["bytes_after"]]' \
  "[\"identity\", 0, 15, $((15 * bytes)), $((15 * bytes))]"
kvf_http_expect_ok compress_keys POST /compress "{\"keys\": [\"${keys[0]}\", \"${keys[19]}\"], \"codec\": \"identity\"}" \
  '[d["unchanged"], d["bytes_before"], d["not_found"]]' "[1, $bytes, [\"${keys[19]}\"]]"
kvf_http_expect_ok compress_lz4 POST /compress '{"all": true, "codec": "lz4"}' \
  '[d["compressed"], d["failed"], "not a model of the topology" in d["errors"][0]]' '[0, 15, true]'
kvf_http_call compress_nope POST /compress '{"all": true, "codec": "nope"}'
kvf_check_eq "$CODE" 400 "POST /compress with an unknown codec: 400"
kvf_http_call metrics GET /metrics
kvf_check_grep "$KVF_TMP/metrics.json" '^kvf_store_entries 15$' "metrics: store entries"
kvf_check_grep "$KVF_TMP/metrics.json" '^kvf_store_rpc_requests_total [1-9][0-9]*$' "metrics: RPC counters"

# --- malformed frames on the engine socket hurt only their sender ------------------------------
python3 - "$sock" >"$KVF_TMP/garbage.log" 2>&1 <<'PY'
import socket, struct, sys
path = sys.argv[1]

def read_reply(s):
    """One store RPC reply: (version, kind, op, request id, error code, payload)."""
    head = b""
    while len(head) < 24:
        chunk = s.recv(24 - len(head))
        if not chunk: break
        head += chunk
    magic, version, kind, op, _, rid, n, _ = struct.unpack("<IBBBBQII", head)
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    return version, kind, op, rid, struct.unpack("<H", body[:2])[0], body

# 1. A garbage header: the daemon cannot find the next frame, so it closes this connection.
s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(path)
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
try:
    closed = s.recv(64) == b""
except ConnectionResetError:  # closed with our extra bytes unread: a reset is a close too
    closed = True
print("garbage header -> closed" if closed else "garbage header -> still open")
s.close()
# 2. A good header whose payload fails its checksum: an error reply, and the connection stays.
s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(path)
payload = b"\x00" * 24
s.sendall(struct.pack("<IBBBBQII", 0x3153564B, 3, 1, 2, 0, 77, len(payload), 0xDEADBEEF) + payload)
version, kind, op, rid, code, body = read_reply(s)
print(f"bad checksum -> reply kind={kind} op={op} id={rid} code={code} message={body[6:].decode(errors='replace')!r}")
s.close()
# 3. An engine of store RPC version 1 says hello: an error reply it can read (version 1 framing,
# its request id, code 3 unsupported_version), then the daemon closes the connection.
# (The version is refused from the header alone, before the payload's checksum is looked at.)
s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(path)
name = b"old engine"
payload = struct.pack("<I", len(name)) + name
s.sendall(struct.pack("<IBBBBQII", 0x3153564B, 1, 1, 1, 0, 501, len(payload), 0) + payload)
version, kind, op, rid, code, body = read_reply(s)
print(f"old version -> reply version={version} kind={kind} op={op} id={rid} code={code} message={body[6:].decode(errors='replace')!r}")
try:
    closed = s.recv(64) == b""
except ConnectionResetError:
    closed = True
print("old version -> closed" if closed else "old version -> still open")
s.close()
PY
kvf_check_grep "$KVF_TMP/garbage.log" '^garbage header -> closed$' "a garbage header closes that connection"
kvf_check_grep "$KVF_TMP/garbage.log" "^bad checksum -> reply kind=2 op=2 id=77 code=2 message='.*checksum mismatch" \
  "a bad payload gets an error reply naming it"
kvf_check_grep "$KVF_TMP/garbage.log" "^old version -> reply version=1 kind=2 op=1 id=501 code=3 message='store rpc version 1 is not supported: this kvfabricd speaks version 3" \
  "an engine of store RPC version 1 gets an error reply in its own version saying which versions meet"
kvf_check_grep "$KVF_TMP/garbage.log" '^old version -> closed$' "and the daemon closes that connection"
kvf_check kvf_alive d1 -- "daemon alive after malformed frames"
kvf_check_eq "$(stat entries)" 15 "daemon still serves engines after malformed frames"

# --- a writer killed mid-put: its reservation is freed -----------------------------------------
kvf_start_bg dying "$tool" put --socket "$sock" --seed 7 --chunks 1 --bytes 1048576 --hold-before-commit 60
kvf_wait_for_line dying '^put: holding reservation' 10 || kvf_die "writer did not reach its hold: $(cat "$(kvf_logfile dying)")"
kvf_check_eq "$(stat reservations)" 1 "a reservation is held by the writer mid-put"
kvf_check_eq "$(stat bytes_reserved)" 1048576 "its bytes are reserved"
kill -KILL "$(kvf_pid dying)"
kvf_forget dying
kvf_check wait_stat reservations 0 5 -- "kill -9 of the writer: its reservation is freed"
kvf_check_eq "$(stat dropped_reservations)" 1 "stats: counted as dropped with its connection"
kvf_check_eq "$(stat bytes_reserved)" 0 "stats: no bytes reserved"

# A writer that stays connected but stops (SIGSTOP) is freed by the reservation timeout (2 s here).
kvf_start_bg stuck "$tool" put --socket "$sock" --seed 8 --chunks 1 --bytes 1048576 --hold-before-commit 60
kvf_wait_for_line stuck '^put: holding reservation' 10 || kvf_die "writer did not reach its hold: $(cat "$(kvf_logfile stuck)")"
kill -STOP "$(kvf_pid stuck)"
stopped_at=$(kvf_now_ms)
kvf_check_eq "$(stat reservations)" 1 "a stopped writer still holds its reservation"
kvf_check wait_stat expired_reservations 1 8 -- "the stopped writer's reservation expires"
waited=$(($(kvf_now_ms) - stopped_at))
kvf_check test "$waited" -ge 1500 -- "not before the timeout (freed after ${waited} ms, timeout 2000 ms)"
kvf_check_eq "$(stat bytes_reserved)" 0 "stats: no bytes reserved after the timeout"
kvf_check_grep "$log1" 'reaper: freed 1 expired reservation' "the reaper logged it"
kill -KILL "$(kvf_pid stuck)"
kill -CONT "$(kvf_pid stuck)" 2>/dev/null
kvf_forget stuck

# --- a daemon that does not answer (stopped): a timeout, not a hang -------------------------------
kill -STOP "$(kvf_pid d1)"
started=$(kvf_now_ms)
kvf_run frozen 10 "$tool" stats --socket "$sock" --timeout-ms 500
rc=$?
took=$(($(kvf_now_ms) - started))
kill -CONT "$(kvf_pid d1)"
kvf_check_eq $rc 3 "engine kvf_http_call to a stopped daemon: a store error (exit 3)"
kvf_check_grep "$(kvf_logfile frozen)" '^stats: error: timeout: ' "it is a timeout"
kvf_check test $took -lt 3000 -- "within its deadline (${took} ms for a 500 ms deadline)"
kvf_check_eq "$(stat entries)" 15 "the daemon serves again once continued"

# --- the daemon goes away and comes back: errors, not hangs; then success on the same client ------
kvf_start_bg probe "$tool" probe --socket "$sock" --count 100 --interval-ms 100 --timeout-ms 1000
kvf_wait_for_line probe '^probe [0-9]+: ok' 10 2 || kvf_die "probe client never succeeded: $(cat "$(kvf_logfile probe)")"
d1_pid=$(kvf_pid d1)
kill -KILL "$d1_pid"
kvf_forget d1
kvf_wait_for_line probe '^probe [0-9]+: error unavailable' 10 || kvf_check_fail "probe client saw no error while the daemon was down"
started=$(kvf_now_ms)
kvf_run down 10 "$tool" get --socket "$sock" --seed 42 --chunks 1 --bytes $bytes --timeout-ms 2000
rc=$?
took=$(($(kvf_now_ms) - started))
kvf_check_eq $rc 3 "engine kvf_http_call while the daemon is down: a store error (exit 3)"
kvf_check_grep "$(kvf_logfile down)" '^get: error: unavailable: store daemon not reachable' "it says the daemon is not reachable"
kvf_check test $took -lt 2000 -- "and says so at once (${took} ms), no hang"

start_daemon d2
log2=$(kvf_logfile d2)
kvf_check_grep "$log2" "removing stale socket $sock" "the restarted daemon replaces the dead one's socket"
kvf_check test ! -e "/dev/shm${arena1}" -- "the dead daemon's arena $arena1 was removed on restart"
before=$(kvf_count_lines probe '^probe [0-9]+: ok')
kvf_wait_for_line probe '^probe [0-9]+: ok' 10 $((before + 1)) || kvf_check_fail "probe client did not reconnect"
kvf_check_grep "$(kvf_logfile probe)" '^probe [0-9]+: ok entries=0' "the same client object reconnected to the new daemon"
kvf_run after 20 "$tool" put --socket "$sock" --seed 43 --chunks 4 --bytes 4096
kvf_check_eq $? 0 "put after restart"
kvf_run after_get 20 "$tool" get --socket "$sock" --seed 43 --chunks 4 --bytes 4096
kvf_check_eq $? 0 "get after restart verifies"

# --- SIGTERM: drain, remove the socket and the arena, exit 0 -----------------------------------
arena2=$(grep -oE 'store arena: /kvfabric-it-[0-9]+' "$log2" | head -n1 | sed 's/store arena: //')
kill -TERM "$(kvf_pid d2)"
end=$(($(kvf_now_ms) + 10000))
while kvf_alive d2 && (($(kvf_now_ms) < end)); do sleep 0.1; done
kvf_check test "$(kvf_alive d2 && echo alive || echo gone)" = gone -- "kvfabricd exits within 10 s of SIGTERM"
kvf_forget d2
kvf_check_eq "$KVF_RC" 0 "kvfabricd exit status after SIGTERM"
kvf_check test ! -e "$sock" -- "the socket is removed"
kvf_check test ! -e "/dev/shm${arena2}" -- "the arena $arena2 is removed"
kvf_check_grep "$log2" 'stopped cleanly' "the daemon logged a clean stop"
kill -KILL "$(kvf_pid probe)" 2>/dev/null
kvf_forget probe

kvf_finish
