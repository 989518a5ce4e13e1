#!/usr/bin/env bash
# Compressed entries end to end, between real processes and a real kvfabricd: an engine stores a
# prompt's chunks raw; an operator re-encodes them with POST /compress (int8, then zstd, then back
# to identity); other engine processes load them into poisoned pools with other block ids, and
# every loaded byte must equal what the CPU codec makes of the stored chunk (int8: encode, then
# decode; zstd and identity: exactly what was stored, after the int8 loss). A corrupted compressed
# chunk is refused by its checksum, nothing written; bad codec names are 400s; the daemon keeps serving.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init store_compress 120
check=$KVF_BIN/kvfabric-connector-check
sock=$KVF_TMP/store.sock
kvf_start_connector_daemon d store-compress-test "$sock"
port=${KVF_PORT[d]}
post() { curl -s -o "$KVF_TMP/reply.json" -w '%{http_code}' -H 'Content-Type: application/json' -X POST "http://127.0.0.1:$port/$1" -d "$2"; }

# KV-like data: finite bf16 values (lossy codecs refuse inf and NaN).
engine() { kvf_run "$1" 60 "$check" "${@:2}" --socket "$sock" --seed 42 --tokens 1000 --finite; }
engine store store --table-seed 1
kvf_check_eq "$?" 0 "engine A stores the prompt raw"

kvf_check_eq "$(post compress '{"all": true, "codec": "int8"}')" 200 "POST /compress int8: $(cat "$KVF_TMP/reply.json")"
kvf_check_grep "$KVF_TMP/reply.json" '"compressed":15' "all 15 chunks re-encoded"
kvf_check_grep "$KVF_TMP/reply.json" '"bytes_after":1016640' "int8 halves them (15 x 67776 bytes, scales and header included)"
engine int8 load --table-seed 2 --expect-tokens 960 --codec int8
kvf_check_eq "$?" 0 "engine B loads the int8 chunks, decoded: $(tail -n1 "$(kvf_logfile int8)")"
engine int8layers load --table-seed 3 --layers --expect-tokens 960 --codec int8
kvf_check_eq "$?" 0 "and layer by layer: $(tail -n1 "$(kvf_logfile int8layers)")"

kvf_check_eq "$(post compress '{"all": true, "codec": "zstd"}')" 200 "POST /compress zstd: $(cat "$KVF_TMP/reply.json")"
kvf_check_grep "$KVF_TMP/reply.json" '"compressed":15' "all 15 re-encoded from int8 to zstd"
engine zstd load --table-seed 4 --expect-tokens 960 --codec int8
kvf_check_eq "$?" 0 "zstd is lossless: the load equals the int8 result exactly: $(tail -n1 "$(kvf_logfile zstd)")"

engine corrupt corrupt --chunk 3
kvf_check_eq "$?" 0 "one compressed chunk corrupted in the arena"
engine refused load --table-seed 5 --expect-fail
kvf_check_eq "$?" 0 "the load is refused by the checksum: $(tail -n1 "$(kvf_logfile refused)")"

kvf_check_eq "$(post compress '{"all": true, "codec": "gzip"}')" 400 "an unknown codec is a 400"
kvf_check_grep "$KVF_TMP/reply.json" "unknown codec 'gzip'" "naming the codecs there are"
kvf_check_eq "$(post compress '{"all": true, "codec": "identity"}')" 200 "back to identity: $(cat "$KVF_TMP/reply.json")"
kvf_check_grep "$KVF_TMP/reply.json" '"compressed":14' "the 14 intact chunks decoded back to raw"
kvf_check_grep "$KVF_TMP/reply.json" '"failed":1' "the corrupted one is reported, not re-encoded"
kvf_check kvf_alive d -- "daemon alive at the end"
kvf_finish
