#!/usr/bin/env bash
# kvfabricd with a small DRAM arena (4 MiB) and an SSD tier (a 64 MiB file in this test's temp
# directory: O_DIRECT where its file system takes it) serves a workload 3x the arena through real
# engine processes (kvfabric-store-tool on StoreClient): a writer stores 48 chunks of 256 KiB, the
# arena spills 32 of them to the SSD tier, and a reader loads every chunk back (each acquire of a
# spilled chunk promotes it) and compares every byte. /lookup reports tier "ssd" for a prefix that
# reaches into the SSD tier and "dram" for one wholly in the arena; /stats and /metrics carry the
# SSD tier's counters, which add up. Garbage written over the tier's file is caught by the
# checksum on the next promotion (verify_failed, the entry dropped), never returned. Clear reaches
# the SSD tier; SIGTERM exits 0 and removes the tier's file.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init store_ssd 120

command -v curl >/dev/null || kvf_skip "curl is not installed (scripts/setup-deps.sh installs it)"
for b in kvfabricd kvfabric-store-tool; do
  [[ -x $KVF_BIN/$b ]] || kvf_skip "$KVF_BIN/$b is not built"
done
ln -s "$(cd "$KVF_BIN" && pwd)/kvfabricd" "$KVF_TMP/bin/kvfit-ssd-daemon"
ln -s "$(cd "$KVF_BIN" && pwd)/kvfabric-store-tool" "$KVF_TMP/bin/kvfit-ssd-tool"
daemon=$KVF_TMP/bin/kvfit-ssd-daemon
tool=$KVF_TMP/bin/kvfit-ssd-tool

sock=$KVF_TMP/store.sock
ssd_dir=$KVF_TMP/ssd
mkdir -p "$ssd_dir"
tier_file=$ssd_dir/kvfabric-ssdit.ssd
http_port=$(kvf_free_port)
base=http://127.0.0.1:$http_port
cat >"$KVF_TMP/topology.yaml" <<YAML
cluster: store-ssd-test
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 64}
    chunk_tokens: 32
nodes:
  - name: ssdit
    address: 127.0.0.1
    http_port: $http_port
    store:
      dram: 4MiB
      ssd: 64MiB
      ssd_path: $ssd_dir
      socket: $sock
YAML

counter() {
  "$tool" stats --socket "$sock" --timeout-ms 3000 2>&1 | sed -n "s/^$1=//p"
}

kvf_start_bg daemon "$daemon" --topology "$KVF_TMP/topology.yaml" --node ssdit --no-peers --drain-ms 3000
kvf_wait_for_line daemon '\] ready: ' 20 || kvf_die "kvfabricd did not get ready: $(tail -n 5 "$(kvf_logfile daemon)")"
log=$(kvf_logfile daemon)
kvf_check_grep "$log" "ssd tier: $tier_file \(67108864 bytes, (direct|buffered) I/O\)" "the daemon logs its SSD tier"
io=$(grep -oE 'ssd tier: .* \(67108864 bytes, [a-z]+ I/O' "$log" | grep -oE '[a-z]+ I/O' | head -n1)
kvf_log "ssd tier I/O: $io ($(df -T "$ssd_dir" | awk 'NR==2{print $2}') under $ssd_dir)"
kvf_check test "$(stat -c %s "$tier_file" 2>/dev/null || echo 0)" -eq 67108864 -- "the tier's file is preallocated to 64 MiB"

# --- a workload 3x the arena: 32 of the 48 chunks spill -------------------------------------------
chunks=48
bytes=262144
kvf_run writer 30 "$tool" put --socket "$sock" --seed 42 --chunks $chunks --bytes $bytes
kvf_check_grep "$(kvf_logfile writer)" "^put: stored $chunks chunks, 0 already present" "writer stored $chunks chunks"
kvf_check_eq "$(counter entries)" 16 "stats: the arena holds 16 chunks"
kvf_check_eq "$(counter evictions)" 32 "stats: 32 evictions from DRAM"
kvf_check_eq "$(counter ssd_spills)" 32 "stats: every one of them spilled to the SSD tier"
kvf_check_eq "$(counter ssd_entries)" 32 "stats: 32 chunks in the SSD tier"
kvf_check_eq "$(counter ssd_spill_failures)" 0 "stats: no spill failed"
kvf_run again 20 "$tool" put --socket "$sock" --seed 42 --chunks $chunks --bytes $bytes
kvf_check_grep "$(kvf_logfile again)" "^put: stored 0 chunks, $chunks already present" \
  "a second put stores nothing: a key in the SSD tier counts as stored"
kvf_run lookup 20 "$tool" lookup --socket "$sock" --seed 42 --chunks $chunks
kvf_check_grep "$(kvf_logfile lookup)" "^lookup: $chunks of $chunks chunks held" "RPC lookup counts the chain across both tiers"

mapfile -t keys < <("$tool" keys --seed 42 --chunks $chunks)
all=$(printf '"%s",' "${keys[@]}")
tail16=$(printf '"%s",' "${keys[@]:32:16}")
kvf_http_expect_ok lookup_all POST /lookup "{\"model\": \"m\", \"chunk_keys\": [${all%,}], \"scope\": \"node\"}" \
  '[d["matches"][0]["matched_chunks"], d["matches"][0]["tier"]]' '[48, "ssd"]'
kvf_http_expect_ok lookup_tail POST /lookup "{\"model\": \"m\", \"chunk_keys\": [${tail16%,}], \"scope\": \"node\"}" \
  '[d["matches"][0]["matched_chunks"], d["matches"][0]["tier"]]' '[16, "dram"]'
kvf_http_expect_ok stats GET /stats '' \
  '[d["entries"], [t["tier"] for t in d["tiers"]], d["tiers"][1]["capacity_bytes"], d["tiers"][1]["entries"], d["tiers"][1]["spills"]]' \
  '[48, ["dram", "ssd"], 67108864, 32, 32]'

# --- every chunk loads back verified (32 of them promoted from the SSD tier) ----------------------
kvf_run reader 60 "$tool" get --socket "$sock" --seed 42 --chunks $chunks --bytes $bytes
kvf_check_eq $? 0 "reader engine: get exit status (every byte compared)"
kvf_check_grep "$(kvf_logfile reader)" "^get: verified $chunks chunks" "reader verified all $chunks chunks"
wdigest=$(grep -oE 'digest [0-9a-f]+' "$(kvf_logfile writer)")
rdigest=$(grep -oE 'digest [0-9a-f]+' "$(kvf_logfile reader)")
kvf_check_eq "$rdigest" "$wdigest" "checksum digest of the bytes read equals the writer's"
kvf_check test "$(counter promotions)" -ge 32 -- "stats: at least 32 promotions ($(counter promotions))"
kvf_check_eq "$(counter ssd_dropped)" 0 "stats: nothing dropped on the way up"
kvf_check_eq "$(counter active_leases)" 0 "stats: every lease released"
kvf_http_expect_ok health GET /health '' 'd["status"]' '"ok"'  # includes the stats invariants across both tiers
kvf_http_call metrics GET /metrics
kvf_check_grep "$KVF_TMP/metrics.json" '^kvf_store_ssd_spills_total [1-9][0-9]*$' "metrics: SSD spills"
kvf_check_grep "$KVF_TMP/metrics.json" '^kvf_store_promotions_total [1-9][0-9]*$' "metrics: promotions"
kvf_check_grep "$KVF_TMP/metrics.json" '^kvf_store_ssd_capacity_bytes 67108864$' "metrics: the SSD tier's capacity"

# --- garbage over the tier's file: the next promotion catches it ---------------------------------
in_ssd=$(counter ssd_entries)
kvf_check test "$in_ssd" -ge 1 -- "chunks are in the SSD tier again ($in_ssd) after the reader moved on"
dd if=/dev/urandom of="$tier_file" bs=1M count=64 conv=notrunc status=none
kvf_run corrupt 20 "$tool" get --socket "$sock" --seed 42 --chunks 1 --bytes $bytes
kvf_check_grep "$(kvf_logfile corrupt)" '^get: error: verify_failed: ' "a corrupted SSD copy is verify_failed, not bytes"
kvf_check_eq "$(counter ssd_dropped)" 1 "stats: the corrupted entry was dropped"
kvf_run lookup_after 20 "$tool" lookup --socket "$sock" --seed 42 --chunks 1
kvf_check_grep "$(kvf_logfile lookup_after)" '^lookup: 0 of 1 chunks held' "the dropped chunk is gone"
kvf_check_grep "$log" 'dropped from the ssd tier: verify_failed' "the daemon logged the drop"

# --- clear reaches the SSD tier; SIGTERM removes the file ----------------------------------------
kvf_http_expect_ok clear POST /clear '{"all": true}' 'd["cleared"]' "$(($(counter entries) + $(counter ssd_entries)))"
kvf_check_eq "$(counter ssd_entries)" 0 "clear emptied the SSD tier"
kvf_check_eq "$(counter ssd_bytes_used)" 0 "and freed its extents"
kill -TERM "$(kvf_pid daemon)"
end=$(($(kvf_now_ms) + 10000))
while kvf_alive daemon && (($(kvf_now_ms) < end)); do sleep 0.1; done
kvf_check test "$(kvf_alive daemon && echo alive || echo gone)" = gone -- "kvfabricd exits within 10 s of SIGTERM"
kvf_forget daemon
kvf_check_eq "$KVF_RC" 0 "kvfabricd exit status after SIGTERM"
kvf_check test ! -e "$tier_file" -- "the SSD tier's file is removed"

kvf_finish
