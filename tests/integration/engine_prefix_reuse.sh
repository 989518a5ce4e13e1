#!/usr/bin/env bash
# Prefix reuse end to end through the engine connector (KvConnector) and a real kvfabricd, on the
# CPU reference engine: a multi-round chat (a shared system prompt, three users, three rounds,
# each answer joining its user's history) and questions about long documents, each run once
# recomputing every prompt and once loading what the store holds. Every request must give exactly
# the same tokens both ways (prompts that are and are not whole chunks), the store pass must load
# most of each later prompt, and the daemon must keep serving.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init engine_prefix_reuse 240
sock=$KVF_TMP/store.sock
kvf_start_connector_daemon d prefix-reuse-test "$sock"

kvf_run reuse 200 "$KVF_BIN/kvfabric-prefix-reuse" --store "$sock" --users 3 --rounds 3 --system-tokens 200 \
  --turn-tokens 37 --new 6 --docs 2 --doc-tokens 300 --questions 3 --chunk-tokens 64
kvf_check_eq "$?" 0 "both workloads ran through the store: $(tail -n1 "$(kvf_logfile reuse)")"
log=$(kvf_logfile reuse)
kvf_check_grep "$log" "^chat: store vs recompute: .*tokens identical in 9 of 9 requests" "chat: exactly the same tokens with the store, 9 requests"
kvf_check_grep "$log" "^doc: store vs recompute: .*tokens identical in 6 of 6 requests" "documents: exactly the same tokens with the store, 6 requests"
# Round 2 of each user finds the system prompt plus round 1 (and its answer) in the store.
kvf_check_grep "$log" "store     user 0 round 1 .* [1-9][0-9]* loaded" "a later chat round loads its history"
# A 300-token document and a 37-token question: chunks 0-3 (256 tokens) are the document's alone;
# chunk 4 holds the question's first tokens, so it differs between questions.
kvf_check_grep "$log" "store     doc 1 question 2 .*   256 loaded" "a later question loads the document's 4 whole chunks (256 tokens)"
# Stores overlapping later requests (an engine frees a request's blocks once the connector lists it
# finished): the same tokens, and blocks a store still reads are never handed out again.
kvf_run reuse-overlap 200 "$KVF_BIN/kvfabric-prefix-reuse" --store "$sock" --workload chat --users 3 --rounds 3 \
  --system-tokens 200 --turn-tokens 37 --new 6 --chunk-tokens 64 --seed 5 --overlap-saves
kvf_check_eq "$?" 0 "chat with overlapping stores ran: $(tail -n1 "$(kvf_logfile reuse-overlap)")"
kvf_check_grep "$(kvf_logfile reuse-overlap)" "^chat: store vs recompute: .*tokens identical in 9 of 9 requests" \
  "overlapping stores: exactly the same tokens, 9 requests"
kvf_check kvf_alive d -- "daemon alive at the end"
kvf_finish
