#!/usr/bin/env bash
# The store workload test (store_workload.sh: 2 writers, 2 readers and an operator on a real
# kvfabricd, 4x the arena) with kvfabricd and every workload process under valgrind's memcheck:
#   valgrind --tool=memcheck --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite
# (plus --track-origins=yes and tests/valgrind/kvfabric.supp, third-party frames only). Any memcheck
# error (invalid read/write, use of uninitialised bytes, a definite leak) fails it twice over: the
# process exits 9, which store_workload.sh checks, and every process's memcheck log must end with
# "ERROR SUMMARY: 0 errors". About 1 minute on 2 cores with the full-size workload (the store RPC
# is metadata only; chunk bytes go through shared memory), so it is part of the default run
# (ctest label valgrind); skipped where valgrind is not installed (scripts/setup-deps.sh installs it).
# KVF_BIN: the build's bin/ (RelWithDebInfo by default: memcheck's stacks get file:line).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init store_workload_valgrind 900

command -v valgrind >/dev/null || kvf_skip "valgrind is not installed (scripts/setup-deps.sh installs it)"
for b in kvfabricd kvfabric-store-workload; do
  [[ -x $KVF_BIN/$b ]] || kvf_skip "$KVF_BIN/$b is not built"
done

# store_workload.sh takes its two binaries from KVF_STORE_BIN: here, wrappers that exec memcheck on
# the real ones (exec: the pid the test signals and waits for is the process under memcheck).
vg_logs=$KVF_TMP/memcheck
mkdir -p "$KVF_TMP/vg-bin" "$vg_logs"
supp=$KVF_SOURCE/tests/valgrind/kvfabric.supp
vg=(valgrind --tool=memcheck --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite
  --track-origins=yes --num-callers=40)
[[ -f $supp ]] && vg+=("--suppressions=$supp")
for b in kvfabricd kvfabric-store-workload; do
  real=$(cd "$KVF_BIN" && pwd)/$b
  {
    echo '#!/usr/bin/env bash'
    printf 'exec'
    printf ' %q' "${vg[@]}" "--log-file=$vg_logs/$b.%p.log" "$real"
    echo ' "$@"'
  } >"$KVF_TMP/vg-bin/$b"
  chmod +x "$KVF_TMP/vg-bin/$b"
done
kvf_log "memcheck: ${vg[*]}"

kvf_run workload 840 env KVF_STORE_BIN="$KVF_TMP/vg-bin" bash "$KVF_SOURCE/tests/integration/store_workload.sh"
rc=$?
kvf_check_eq "$rc" 0 "store_workload.sh under memcheck: exit status ($(grep -m1 -E '^store_workload: ' "$(kvf_logfile workload)"))"

# Every process ran under memcheck to its end and memcheck found nothing: the daemon, operator, 2
# readers, 2 writers, 2 stats, check-pinned and pinned-keys.
mapfile -t logs < <(find "$vg_logs" -name '*.log' | sort)
kvf_check test "${#logs[@]}" -ge 10 -- "${#logs[@]} processes ran under memcheck (the daemon and 9 clients)"
kvf_check test "$(grep -l 'Command: .*/kvfabricd ' "${logs[@]}" | wc -l)" -eq 1 -- "kvfabricd ran under memcheck"
for f in "${logs[@]}"; do
  what="$(basename "$f" .log) ($(grep -m1 -oE 'Command: [^ ]+ [^ ]+' "$f" | sed 's|Command: .*/||'))"
  summary=$(grep -m1 'ERROR SUMMARY:' "$f")
  if [[ -z $summary ]]; then
    kvf_check_fail "$what: memcheck printed no ERROR SUMMARY (killed before it ended?)"
  elif [[ $summary != *"ERROR SUMMARY: 0 errors"* ]]; then
    kvf_check_fail "$what: ${summary#==*== }"
    # The first errors with their stacks (memcheck's lines after the header and before the summaries).
    sed -n '/^==[0-9]*== Parent PID/,/HEAP SUMMARY\|ERROR SUMMARY/p' "$f" | head -n 80 | sed 's/^/    | /' >&2
    grep -A 30 'definitely lost in' "$f" | head -n 60 | sed 's/^/    | /' >&2
  fi
done
((KVF_FAILURES == 0)) && kvf_pass "memcheck: 0 errors and no definite leak in all ${#logs[@]} processes"
kvf_finish
