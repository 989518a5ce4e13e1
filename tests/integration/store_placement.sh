#!/usr/bin/env bash
# kvfabricd's own adaptive placement (store.placement), between real processes: the daemon starts
# with a policy file whose int8 profile loses nothing and halves the bytes, so its re-plans
# re-encode every chunk an engine stores; /metrics counts the rounds and the re-encodes; another
# engine process then loads the prompt into a poisoned pool with other block ids and every byte
# must equal what the CPU int8 codec makes of the stored chunk. A policy file with an unknown field
# stops a second daemon at start with the file and the field named; the first keeps serving.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init store_placement 120
check=$KVF_BIN/kvfabric-connector-check
sock=$KVF_TMP/store.sock
http=$(kvf_free_port)
cat >"$KVF_TMP/policy.json" <<'JSON'
{"profiles": [
  {"name": "identity", "codec": "identity", "size_ratio": 1.0, "quality": 1.0},
  {"name": "int8", "codec": "int8", "size_ratio": 0.52, "quality": 1.0}],
 "recompute_us_per_token": 1000, "dram_fill": 0.9}
JSON
cat >"$KVF_TMP/topology.yaml" <<YAML
cluster: store-placement-test
models:
  - name: m
    layout: {kind: flash_attention, layers: 4, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 256}
    chunk_tokens: 64
nodes:
  - name: it
    address: 127.0.0.1
    http_port: $http
    store: {dram: 16MiB, socket: $sock, placement: {policy: policy.json, interval_ms: 200}}
YAML
kvf_start_bg d "$KVF_BIN/kvfabricd" --topology "$KVF_TMP/topology.yaml" --node it --no-peers --no-huge-pages
kvf_wait_for_line d '\] ready: ' 20 || kvf_die "kvfabricd did not get ready: $(tail -n 5 "$(kvf_logfile d)")"
kvf_check_grep "$(kvf_logfile d)" "placement: re-planning every entry's codec and tier every 200 ms with $KVF_TMP/policy.json \(2 codec profiles\)" \
  "the daemon says it re-plans, with the policy file resolved next to the topology"
base="http://127.0.0.1:$http"

engine() { kvf_run "$1" 60 "$check" "${@:2}" --socket "$sock" --seed 7 --tokens 1000 --finite; }
engine store store --table-seed 1
kvf_check_eq "$?" 0 "engine A stores the prompt raw: $(tail -n1 "$(kvf_logfile store)")"

# The re-plans re-encode all 15 chunks within a few rounds.
recoded=0
for _ in $(seq 50); do
  kvf_http_call metrics GET /metrics
  recoded=$(sed -n 's/^kvfabric_placement_changes_total{kind="recoded"} \([0-9]*\)$/\1/p' "$KVF_TMP/metrics.json")
  [[ ${recoded:-0} -ge 15 ]] && break
  sleep 0.2
done
kvf_check_eq "${recoded:-0}" 15 "/metrics: the daemon re-encoded the 15 chunks by itself"
kvf_check_grep "$KVF_TMP/metrics.json" '^kvfabric_placement_rounds_total [1-9]' "/metrics counts the rounds"
kvf_check_grep "$KVF_TMP/metrics.json" '^kvfabric_placement_changes_total\{kind="failed"\} 0$' "no change failed"
kvf_check_grep "$(kvf_logfile d)" 'placement: 15 entries \(15 planned, 0 unplanned\): 15 re-encoded' "the round is logged"
engine int8 load --table-seed 2 --expect-tokens 960 --codec int8
kvf_check_eq "$?" 0 "engine B loads the re-encoded chunks, decoded, every byte checked: $(tail -n1 "$(kvf_logfile int8)")"

# A second round with nothing new changes nothing more.
sleep 0.5
kvf_http_call metrics2 GET /metrics
kvf_check_grep "$KVF_TMP/metrics2.json" '^kvfabric_placement_changes_total\{kind="recoded"\} 15$' "later rounds leave the plan as it is"

# A bad policy file stops a daemon at start, naming the file and the field.
sed 's/"dram_fill": 0.9/"dram_fill": 0.9, "colour": 1/' "$KVF_TMP/policy.json" >"$KVF_TMP/bad.json"
sed -e "s|policy: policy.json|policy: bad.json|" -e "s|http_port: $http|http_port: $(kvf_free_port)|" \
  -e "s|socket: $sock|socket: $KVF_TMP/bad.sock|" "$KVF_TMP/topology.yaml" >"$KVF_TMP/bad.yaml"
kvf_run bad 20 "$KVF_BIN/kvfabricd" --topology "$KVF_TMP/bad.yaml" --node it --no-peers --no-huge-pages
kvf_check_eq "$?" 2 "a daemon with a bad policy file exits with status 2 (bad input)"
kvf_check_grep "$(kvf_logfile bad)" "placement policy $KVF_TMP/bad.json: unknown field \"colour\"" "naming the file and the field"
kvf_check kvf_alive d -- "the first daemon keeps serving"
kvf_finish
