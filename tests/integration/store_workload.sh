#!/usr/bin/env bash
# The prefix store under a workload 3x its size, as separate processes against a real kvfabricd
# over its Unix socket (kvfabric-store-workload on StoreClient): an operator stores and pins 8
# chunks of its own model, then 2 writers put random chunks (bytes derived from each key) until
# together they have committed 4x the arena (at least 3x is the point), while 2 readers lease random
# chunks, check every byte and the checksum, hold the leases as the writers evict around them and
# check again, and the operator clears single keys every 50 ms and the writers' whole model each
# time the store has evicted 64 more entries (leased entries among them: their bytes must stay
# until released). Afterwards: no reader
# saw a changed byte, the pinned chunks all stayed and read back intact, and the daemon's counters
# (RPC stats and HTTP /stats) satisfy their invariants and equal the sums of what the clients did.
# The daemon then drains on SIGTERM and exits 0.
# KVF_WORKLOAD_SSD_MIB (default 0: none) gives the node an SSD tier of that size in the test's temp
# directory: the evictions then spill there, readers' acquires promote them back, and the counters
# are checked across both tiers.
#
# KVF_STORE_BIN (default: KVF_BIN) is where kvfabricd and kvfabric-store-workload come from:
# scripts/asan-store-workload.sh points it at an AddressSanitizer+UBSan build, and then any
# sanitizer report in any process's log fails the test.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init store_workload 420

command -v curl >/dev/null || kvf_skip "curl is not installed (scripts/setup-deps.sh installs it)"
store_bin=${KVF_STORE_BIN:-$KVF_BIN}
for b in kvfabricd kvfabric-store-workload; do
  [[ -x $store_bin/$b ]] || kvf_skip "$store_bin/$b is not built"
done
ln -s "$(cd "$store_bin" && pwd)/kvfabricd" "$KVF_TMP/bin/kvfit-wl-daemon"
ln -s "$(cd "$store_bin" && pwd)/kvfabric-store-workload" "$KVF_TMP/bin/kvfit-wl"
daemon=$KVF_TMP/bin/kvfit-wl-daemon
wl=$KVF_TMP/bin/kvfit-wl
# Sanitizer builds: stop at the first UBSan report too, and keep LeakSanitizer on (harmless elsewhere).
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}

arena_mib=32
arena=$((arena_mib * 1024 * 1024))
ssd_mib=${KVF_WORKLOAD_SSD_MIB:-0}
ssd_lines=""
if ((ssd_mib > 0)); then
  ssd_lines="      ssd: ${ssd_mib}MiB
      ssd_path: $KVF_TMP"
fi
sock=$KVF_TMP/wl.sock
stop=$KVF_TMP/stop
http_port=$(kvf_free_port)
base=http://127.0.0.1:$http_port
cat >"$KVF_TMP/topology.yaml" <<YAML
cluster: store-workload-test
models:
  - name: p
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 64}
    chunk_tokens: 32
nodes:
  - name: wl
    address: 127.0.0.1
    http_port: $http_port
    store:
      dram: ${arena_mib}MiB
      socket: $sock
$ssd_lines
YAML

kvf_start_bg daemon "$daemon" --topology "$KVF_TMP/topology.yaml" --node wl --no-peers --reap-interval-ms 200 \
  --drain-ms 3000
kvf_wait_for_line daemon '\] ready: ' 60 || kvf_die "kvfabricd did not get ready: $(tail -n 5 "$(kvf_logfile daemon)")"
kvf_log "kvfabricd ready (pid $(kvf_pid daemon)), arena $arena_mib MiB"

# 256 keys of 64-384 KiB: about 1.7x the arena, so writers both evict and find keys stored already.
common=(--socket "$sock" --universe 256 --sizes 65536-393216 --pinned 8 --pinned-size 262144 --max-seconds 300)
kvf_start_bg operator "$wl" operator "${common[@]}" --name op --seed 100 --stop-file "$stop" \
  --clear-every-ms 50 --clear-model-after-evictions 64
kvf_wait_for_line operator '^operator: pinned 8 chunks' 60 || kvf_die "operator did not pin: $(cat "$(kvf_logfile operator)")"
kvf_start_bg reader0 "$wl" reader "${common[@]}" --name r0 --seed 200 --stop-file "$stop" --max-hold-us 3000
kvf_start_bg reader1 "$wl" reader "${common[@]}" --name r1 --seed 201 --stop-file "$stop" --max-hold-us 3000
budget=$((arena * 2))  # each writer: 2x the arena, 4x together
started=$(kvf_now_ms)
kvf_start_bg writer0 "$wl" writer "${common[@]}" --name w0 --seed 300 --budget-bytes $budget
kvf_start_bg writer1 "$wl" writer "${common[@]}" --name w1 --seed 301 --budget-bytes $budget

# The writers end once they have committed their budget; then the readers and the operator stop.
for w in writer0 writer1; do
  while kvf_alive "$w"; do sleep 0.2; done
  kvf_forget "$w"
  kvf_check_eq "$KVF_RC" 0 "$w: exit status (committed its budget, no store error)"
done
kvf_log "writers done in $(( ($(kvf_now_ms) - started) ))ms"
# Readers and the operator must have worked alongside the writers, not only after them.
for r in reader0 reader1 operator; do
  kvf_check kvf_alive "$r" -- "$r was still running while the writers wrote"
done
model_clears=$(kvf_count_lines operator '^operator: cleared the writers. model')
kvf_check test "$model_clears" -ge 1 -- "the operator cleared the writers' model $model_clears time(s) while they wrote"
sleep 0.5
: >"$stop"
for p in reader0 reader1 operator; do
  end=$(($(kvf_now_ms) + 60000))
  while kvf_alive "$p" && (($(kvf_now_ms) < end)); do sleep 0.1; done
  kvf_forget "$p"
  kvf_check_eq "$KVF_RC" 0 "$p: exit status (every byte it read verified)"
done

# result VAR ROLE-NAMES...: sums field VAR over the result lines of those processes.
sum() {
  local field=$1 total=0 v name
  shift
  for name in "$@"; do
    v=$(grep -m1 '^result ' "$(kvf_logfile "$name")" | grep -oE " $field=[0-9]+" | cut -d= -f2)
    [[ -n $v ]] || { kvf_check_fail "$name printed no result line with $field"; v=0; }
    total=$((total + v))
  done
  echo "$total"
}
writers=(writer0 writer1)
readers=(reader0 reader1)
all=(writer0 writer1 reader0 reader1 operator)
for p in "${all[@]}"; do
  kvf_check_grep "$(kvf_logfile "$p")" '^result ' "$p printed its result"
  if grep -q '^FAIL' "$(kvf_logfile "$p")"; then
    kvf_check_fail "$p: $(grep -m3 '^FAIL' "$(kvf_logfile "$p")")"
  fi
done

committed=$(sum committed_bytes "${writers[@]}")
kvf_check test "$committed" -ge $((3 * arena)) -- "writers committed $committed bytes, >= 3x the ${arena}-byte arena"
verified=$(sum verified "${readers[@]}")
kvf_check test "$verified" -ge 50 -- "readers verified $verified leased chunks before and after holding them"
kvf_check test "$(sum max_held "${readers[@]}")" -ge 4 -- "readers held several leases at once"
kvf_check test "$(sum deferred operator)" -ge 1 -- "some cleared entries were leased: their bytes stayed for the readers"
kvf_check test "$(sum present "${writers[@]}")" -ge 1 -- "writers found keys stored already (by the other or before)"
kvf_check test "$(sum aborts "${writers[@]}")" -ge 1 -- "writers aborted some reservations"

# --- the daemon's counters: invariants, and equal to what the clients did ---------------------
kvf_run stats 30 "$wl" stats --socket "$sock"
kvf_check_eq $? 0 "stats over the store RPC"
s() { sed -n "s/^$1=//p" "$(kvf_logfile stats)"; }
kvf_check_eq "$(s pinned)" 8 "stats: the 8 pinned chunks are still pinned"
kvf_check_eq "$(s active_leases)" 0 "stats: no lease left (every reader released or disconnected)"
kvf_check_eq "$(s reservations)" 0 "stats: no reservation left"
kvf_check_eq "$(s detached)" 0 "stats: no cleared entry still waiting for a reader"
kvf_check_eq "$(s bytes_detached)" 0 "stats: no detached bytes"
kvf_check_eq "$(s capacity_bytes)" $arena "stats: capacity is the arena"
kvf_check_eq "$(($(s bytes_used) + $(s bytes_free)))" "$(s capacity_bytes)" "bytes_used + bytes_free == capacity"
kvf_check_eq "$(s bytes_used)" "$(($(s bytes_entries) + $(s bytes_reserved) + $(s bytes_detached) + $(s bytes_promoting)))" \
  "bytes_used == entries + reserved + detached + promoting bytes"
kvf_check_eq "$(s reserves)" "$(($(s inserts) + $(s replacements) + $(s aborts) + $(s expired_reservations) + $(s dropped_reservations) + $(s reservations)))" \
  "reserves == inserts + replacements + aborts + expired + dropped + open reservations"
kvf_check_eq "$(($(s inserts) + $(s promotions)))" "$(($(s entries) + $(s evictions) + $(s cleared)))" \
  "inserts + promotions == entries + evictions + cleared"
if ((ssd_mib > 0)); then
  kvf_check_eq "$(s ssd_spills)" "$(($(s ssd_entries) + $(s ssd_evictions) + $(s promotions) + $(s ssd_cleared) + $(s ssd_dropped) + $(s promoting)))" \
    "ssd spills == ssd entries + ssd evictions + promotions + ssd cleared + dropped + promoting"
  kvf_check test "$(s ssd_spills)" -gt 0 -- "evictions spilled to the SSD tier ($(s ssd_spills))"
  kvf_check test "$(s promotions)" -gt 0 -- "readers' acquires promoted chunks back ($(s promotions))"
  kvf_check_eq "$(s ssd_dropped)$(s ssd_spill_failures)" 00 "no SSD copy failed its checksum, no spill failed"
fi
kvf_check_eq "$(s leases_granted)" "$(($(s leases_released) + $(s expired_leases) + $(s dropped_leases) + $(s active_leases)))" \
  "leases granted == released + expired + dropped + active"
kvf_check_eq "$(($(s evictable) + $(s protected_entries)))" "$(s entries)" "evictable + protected == entries"
kvf_check test "$(s evictions)" -gt 0 -- "the workload evicted ($(s evictions) evictions)"
kvf_check test "$(s cleared)" -gt 0 -- "the operator's clears removed entries ($(s cleared))"
# Equal to the clients' own counts: nothing lost, nothing counted twice.
kvf_check_eq "$(s reserves)" "$(sum reserves "${all[@]}")" "reserves == the clients' successful reserves"
kvf_check_eq "$(s inserts)" "$(sum inserts "${all[@]}")" "inserts == the clients' commits"
kvf_check_eq "$(s aborts)" "$(sum aborts "${all[@]}")" "aborts == the writers' aborts"
kvf_check_eq "$(s leases_granted)" "$(sum leases "${all[@]}")" "leases granted == the clients' acquires"
kvf_check_eq "$(s leases_released)" "$(sum releases "${all[@]}")" "leases released == the clients' releases"
kvf_check_eq "$(($(s hits) + $(s ssd_hits)))" "$(sum hits "${all[@]}")" \
  "hits (both tiers) == the clients' acquires and matched lookup keys"
kvf_check_eq "$(s misses)" "$(sum misses "${all[@]}")" "misses == the clients' failed acquires and short lookups"
kvf_check_eq "$(($(s cleared) + $(s ssd_cleared)))" "$(sum cleared operator)" \
  "cleared (both tiers) == what the operator's clears removed"
kvf_check_eq "$(s expired_leases)$(s dropped_leases)$(s expired_reservations)$(s dropped_reservations)" 0000 \
  "nothing expired or was dropped"

# The same counters through HTTP, as an operator sees them.
http() { curl -sS -m 10 "$@" 2>&1; }
stats_json=$(http "$base/stats")
field() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2], {"d": d}))' "$1" "$2" 2>&1; }
kvf_check_eq "$(field "$stats_json" '(d["entries"], d["pinned_entries"], d["leased_entries"])')" \
  "($(($(s entries) + $(s ssd_entries))), 8, 0)" "GET /stats: entries (both tiers), pinned, leased"
kvf_check_eq "$(field "$stats_json" '[(t["hits"], t["misses"], t["evictions"], t["used_bytes"]) for t in d["tiers"]][0]')" \
  "($(s hits), $(($(s misses) + $(s ssd_hits))), $(s evictions), $(s bytes_used))" \
  "GET /stats: the dram tier's hits, misses (keys it did not hold), evictions, used bytes"
kvf_check_eq "$(field "$(http "$base/health")" 'd["status"], d["problems"]')" "('ok', [])" \
  "GET /health: ok (the daemon finds its own stats consistent)"

# --- the pinned chunks: still there and intact, then unpinned -------------------------------------
kvf_run check_pinned 60 "$wl" check-pinned "${common[@]}" --name check --unpin
kvf_check_eq $? 0 "every pinned chunk is held and reads back intact after the workload"
kvf_check_grep "$(kvf_logfile check_pinned)" '^result .* verified=8 .* unpinned=8 ' "8 pinned chunks verified, then unpinned"
mapfile -t pinned < <("$wl" pinned-keys --pinned 8)
keys_json=$(printf '"%s",' "${pinned[@]}")
lookup=$(http -H 'Content-Type: application/json' "$base/lookup" -d "{\"model\": \"p\", \"chunk_keys\": [${keys_json%,}]}")
kvf_check_eq "$(field "$lookup" 'd["matches"][0]["matched_chunks"]')" 8 "POST /lookup: the node holds all 8 pinned chunks"
kvf_run stats2 30 "$wl" stats --socket "$sock"
kvf_check_eq "$(sed -n 's/^pinned=//p' "$(kvf_logfile stats2)")" 0 "stats: nothing pinned after the unpins"

# --- SIGTERM: drain and exit 0; no sanitizer report anywhere ----------------------------------------
kill -TERM "$(kvf_pid daemon)"
end=$(($(kvf_now_ms) + 20000))
while kvf_alive daemon && (($(kvf_now_ms) < end)); do sleep 0.1; done
kvf_forget daemon
kvf_check_eq "$KVF_RC" 0 "kvfabricd exit status after SIGTERM"
kvf_check_grep "$(kvf_logfile daemon)" 'stopped cleanly' "the daemon logged a clean stop"
for f in "$KVF_TMP"/*.log; do
  if grep -qE 'AddressSanitizer|LeakSanitizer|runtime error:|UndefinedBehaviorSanitizer' "$f"; then
    kvf_check_fail "sanitizer report in $(basename "$f"): $(grep -m1 -E 'AddressSanitizer|LeakSanitizer|runtime error:' "$f")"
  fi
done
kvf_finish
