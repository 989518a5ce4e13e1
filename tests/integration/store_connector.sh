#!/usr/bin/env bash
# The engine connector's store operations between real processes through a real kvfabricd: one
# engine process stores a 1000-token prompt's chunks from its paged host KV pool (shuffled block
# ids); other engine processes, with other block ids and poisoned pools, look it up and load it
# (at once, and layer by layer with each layer reported as soon as it is complete), every byte
# checked, nothing outside the loaded blocks touched. A prompt sharing only the first 320 tokens
# finds and loads exactly the shared chunks; a second store of the same prompt stores nothing new;
# another model's engine finds nothing.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init store_connector 120
check=$KVF_BIN/kvfabric-connector-check
sock=$KVF_TMP/store.sock
kvf_start_connector_daemon d store-connector-test "$sock"

# 1000 tokens = 15 full chunks of 64 (960 tokens); a chunk = 4 layers x 4 blocks x K,V x 4 KiB = 128 KiB.
engine() { kvf_run "$1" 60 "$check" "${@:2}" --socket "$sock" --seed 42 --tokens 1000; }
engine store1 store --table-seed 1
kvf_check_eq "$?" 0 "engine A stores the prompt"
kvf_check_grep "$(kvf_logfile store1)" "^store: 15 chunks stored, 0 already stored, 1966080 bytes" "15 full chunks of 128 KiB each"
engine store2 store --table-seed 3
kvf_check_grep "$(kvf_logfile store2)" "^store: 0 chunks stored, 15 already stored" "storing it again stores nothing new"
engine lookup lookup --table-seed 2 --expect-tokens 960
kvf_check_eq "$?" 0 "another engine's lookup: 960 of 1000 tokens"
engine load load --table-seed 2 --expect-tokens 960
kvf_check_eq "$?" 0 "engine B loads into other block ids: $(tail -n1 "$(kvf_logfile load)")"
kvf_check_grep "$(kvf_logfile load)" "every block verified" "every loaded byte checked, the rest untouched"
engine layers load --table-seed 5 --layers --expect-tokens 960
kvf_check_eq "$?" 0 "engine C loads layer by layer: $(tail -n1 "$(kvf_logfile layers)")"
kvf_check_grep "$(kvf_logfile layers)" "layers reported in order as each completed" "each layer reported once complete, the next not yet"
engine shared load --table-seed 6 --diverge-after 320 --expect-tokens 320
kvf_check_eq "$?" 0 "a prompt sharing 320 tokens loads exactly the 5 shared chunks: $(tail -n1 "$(kvf_logfile shared)")"
engine other lookup --table-seed 2 --model other-model --expect-tokens 0
kvf_check_eq "$?" 0 "another model's engine finds none of it (the model is part of the key)"
kvf_check kvf_alive d -- "daemon alive at the end"

# A store into an arena with room for one chunk (each chunk evicts the one before, once that is
# committed: the connector copies a chunk while committing the one before, and must commit that
# one first when the arena has no room for both), and into one too small for any chunk.
kvf_start_connector_daemon tiny store-connector-tiny "$KVF_TMP/tiny.sock" 192KiB
kvf_run tiny-store 60 "$check" store --socket "$KVF_TMP/tiny.sock" --seed 42 --tokens 1000 --table-seed 1
kvf_check_eq "$?" 0 "an arena of one chunk takes the prompt's chunks one after another: $(tail -n1 "$(kvf_logfile tiny-store)")"
kvf_check_grep "$(kvf_logfile tiny-store)" "^store: 15 chunks stored, 0 already stored" "all 15 stored, each evicting the one before"
kvf_start_connector_daemon small store-connector-small "$KVF_TMP/small.sock" 64KiB
kvf_run small-store 60 "$check" store --socket "$KVF_TMP/small.sock" --seed 42 --tokens 1000 --table-seed 1
rc=$?
kvf_check test "$rc" -ne 0 -- "an arena smaller than a chunk refuses the store (exit $rc)"
kvf_check_grep "$(kvf_logfile small-store)" "storing chunk 0: .*can never fit" "the error names the chunk and the reason"
kvf_check kvf_alive small -- "that daemon keeps serving"
kvf_finish
