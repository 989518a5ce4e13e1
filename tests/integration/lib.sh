# Shared helpers for the integration and netns tests: source it, then call kvf_init.
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"      (netns tests: ../integration/lib.sh)
#   kvf_init NAME DEADLINE_SECONDS
# What it gives:
#   - KVF_BIN / KVF_SOURCE / KVF_TMP (a private temp dir, removed at exit unless KVF_KEEP_TMP=1)
#   - background processes that are always killed at exit (kvf_start_bg, kvf_start_server)
#   - a per-test deadline: when it passes, everything started is killed and the test fails
#   - foreground runs with their own timeout (kvf_run), so no single step can hang
#   - assertions that keep going (kvf_check*) and one that stops (kvf_die), logs shown on failure
# Only processes this test started are ever signalled, by their pid.
# shellcheck shell=bash

# tests/CMakeLists.txt makes a ctest of every integration/*.sh, this file included: run on its own
# it is a library with nothing to test, which ctest shows as skipped.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  echo "lib.sh holds the integration tests' helpers; source it from a test (nothing to run on its own)"
  exit 77
fi

KVF_BIN=${KVF_BIN:-build/bin}
KVF_SOURCE=${KVF_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
KVF_PERF=$KVF_BIN/kvfabric-perf
KVF_TEST=unnamed
KVF_TMP=
KVF_FAILURES=0
KVF_WATCHDOG=
KVF_START_NS=0
declare -gA KVF_PID=()  # name -> pid of a background process
declare -gA KVF_LOG=()  # name -> its log file (stdout and stderr)

kvf_now_ms() { date +%s%3N; }

kvf_log() { printf '[%s +%5.1fs] %s\n' "$KVF_TEST" "$(( $(kvf_now_ms) - KVF_START_NS ))e-3" "$*"; }

# kvf_skip REASON: exit 77 (ctest: skipped) after saying why.
kvf_skip() {
  echo "SKIP ($KVF_TEST): $*"
  exit 77
}

kvf_init() {
  KVF_TEST=$1
  local deadline=${2:-120}
  KVF_START_NS=$(kvf_now_ms)
  [[ -x $KVF_PERF ]] || kvf_skip "$KVF_PERF is not built (set KVF_BIN to the build's bin/)"
  command -v python3 >/dev/null || kvf_skip "python3 is not installed"
  KVF_TMP=$(mktemp -d "${TMPDIR:-/tmp}/kvf-$KVF_TEST.XXXXXX")
  # The binary under a name of this test's own (a symlink): on a shared machine a name-based
  # `pkill kvfabric-perf` run by someone else must not stop this test's servers mid-check.
  mkdir -p "$KVF_TMP/bin"
  ln -s "$(cd "$(dirname "$KVF_PERF")" && pwd)/$(basename "$KVF_PERF")" "$KVF_TMP/bin/kvfit-perf"
  KVF_PERF=$KVF_TMP/bin/kvfit-perf
  trap kvf_cleanup EXIT
  trap 'kvf_on_signal TERM' TERM
  trap 'kvf_on_signal INT' INT
  # The watchdog: a subshell that, past the deadline, marks the failure and signals this shell.
  # This shell only ever blocks in `wait` (see kvf_run), which a trapped signal interrupts.
  local self=$$
  (
    trap - EXIT TERM INT
    sleep "$deadline" &
    sl=$!
    trap 'kill $sl 2>/dev/null; exit 0' TERM
    wait $sl
    echo "FAIL ($KVF_TEST): the test's deadline of ${deadline}s passed; killing what it started" >&2
    : >"$KVF_TMP/.deadline"
    kill -TERM "$self" 2>/dev/null
    sleep 15 &
    sl=$!
    wait $sl
    kill -0 "$self" 2>/dev/null && kill -KILL "$self" 2>/dev/null
  ) &
  KVF_WATCHDOG=$!
  kvf_log "started (deadline ${deadline}s, tmp $KVF_TMP)"
}

kvf_on_signal() {
  echo "FAIL ($KVF_TEST): interrupted by SIG$1" >&2
  KVF_FAILURES=$((KVF_FAILURES + 1))
  exit 1
}

# Kills every background process still registered: TERM, then KILL after a short grace.
kvf_stop_all() {
  local name pid
  for name in "${!KVF_PID[@]}"; do
    pid=${KVF_PID[$name]}
    kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null
  done
  local i
  for ((i = 0; i < 30; i++)); do
    local alive=0
    for name in "${!KVF_PID[@]}"; do
      kill -0 "${KVF_PID[$name]}" 2>/dev/null && alive=1
    done
    ((alive)) || break
    sleep 0.1
  done
  for name in "${!KVF_PID[@]}"; do
    pid=${KVF_PID[$name]}
    if kill -0 "$pid" 2>/dev/null; then
      echo "note: $name (pid $pid) ignored SIGTERM; sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    unset "KVF_PID[$name]"
  done
}

kvf_cleanup() {
  local rc=$?
  trap - EXIT TERM INT
  [[ -n $KVF_WATCHDOG ]] && kill "$KVF_WATCHDOG" 2>/dev/null
  kvf_note_outside_signals
  kvf_stop_all
  # Extra cleanup registered by the test (namespaces, ...), last registered first.
  local i
  for ((i = ${#KVF_CLEANUP_HOOKS[@]} - 1; i >= 0; i--)); do
    eval "${KVF_CLEANUP_HOOKS[$i]}" || true
  done
  if [[ -n $KVF_TMP && -e $KVF_TMP/.deadline ]]; then
    rc=1
    KVF_FAILURES=$((KVF_FAILURES + 1))
  fi
  if ((rc != 0 && rc != 77)) || ((KVF_FAILURES > 0)); then
    kvf_dump_logs
    ((rc == 0)) && rc=1
  fi
  if [[ -n $KVF_TMP && ${KVF_KEEP_TMP:-0} != 1 ]]; then
    rm -rf "$KVF_TMP"
  elif [[ -n $KVF_TMP ]]; then
    echo "logs kept in $KVF_TMP"
  fi
  exit "$rc"
}

# A background process this test still tracks that already said "stopping on signal" was stopped by
# someone else (the machine is shared): say so, it explains the failures that follow.
kvf_note_outside_signals() {
  local name
  for name in "${!KVF_PID[@]}"; do
    if ! kill -0 "${KVF_PID[$name]}" 2>/dev/null && grep -q 'stopping on signal' "$(kvf_logfile "$name")" 2>/dev/null; then
      echo "NOTE ($KVF_TEST): $name (pid ${KVF_PID[$name]}) was stopped by a signal this test did not send" \
        "(another user of this machine?): $(grep -m1 'stopping on signal' "$(kvf_logfile "$name")")" >&2
      KVF_FAILURES=$((KVF_FAILURES + 1))
    fi
  done
}

KVF_CLEANUP_HOOKS=()
# kvf_on_exit 'COMMAND': run COMMAND (a string, eval'ed) at exit, even on failure or deadline.
kvf_on_exit() { KVF_CLEANUP_HOOKS+=("$1"); }

kvf_dump_logs() {
  local f
  for f in "$KVF_TMP"/*.log; do
    [[ -f $f ]] || continue
    echo "----- $(basename "$f") (last 40 lines) -----"
    tail -n 40 "$f"
  done
  echo "-----"
}

# --- assertions ---------------------------------------------------------------------------------

# kvf_check_fail MESSAGE: record a failure and go on.
kvf_check_fail() {
  echo "FAIL ($KVF_TEST): $*" >&2
  KVF_FAILURES=$((KVF_FAILURES + 1))
}

# kvf_die MESSAGE: record a failure and stop the test now (the exit trap cleans up).
kvf_die() {
  kvf_check_fail "$@"
  exit 1
}

kvf_pass() { kvf_log "ok: $*"; }

# kvf_check CONDITION-COMMAND... -- MESSAGE
kvf_check() {
  local args=() msg
  while (($#)) && [[ $1 != -- ]]; do args+=("$1"); shift; done
  shift
  msg=$*
  if "${args[@]}"; then kvf_pass "$msg"; else kvf_check_fail "$msg"; return 1; fi
}

# kvf_check_eq ACTUAL EXPECTED WHAT
kvf_check_eq() {
  if [[ $1 == "$2" ]]; then kvf_pass "$3 = $2"; else kvf_check_fail "$3: got '$1', want '$2'"; return 1; fi
}

# kvf_check_grep FILE EXTENDED-REGEX WHAT
kvf_check_grep() {
  if grep -qE -- "$2" "$1"; then
    kvf_pass "$3"
  else
    kvf_check_fail "$3: no line matching /$2/ in $(basename "$1"):"
    tail -n 20 "$1" | sed 's/^/    | /' >&2
    return 1
  fi
}

# kvf_finish: exit 0 if every check passed, else 1 (with the logs).
kvf_finish() {
  if ((KVF_FAILURES > 0)); then
    echo "$KVF_TEST: $KVF_FAILURES check(s) FAILED after $(( ($(kvf_now_ms) - KVF_START_NS) / 1000 ))s"
    exit 1
  fi
  echo "$KVF_TEST: all checks passed in $(( ($(kvf_now_ms) - KVF_START_NS) / 1000 ))s"
  exit 0
}

# --- processes ----------------------------------------------------------------------------------

# kvf_free_port: prints a TCP port that was free on 127.0.0.1 a moment ago (for tools that need
# one up front, e.g. ucx_perftest; kvfabric-perf server takes port 0 and reports its port).
kvf_free_port() {
  python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
PY
}

# kvf_start_bg NAME COMMAND...: starts COMMAND in the background (stdout+stderr to
# $KVF_TMP/NAME.log); it is killed at exit. Use a COMMAND that execs (env, ip netns exec), not a
# wrapper that forks, when the test wants to signal the real process.
kvf_start_bg() {
  local name=$1
  shift
  local log=$KVF_TMP/$name.log
  "$@" >"$log" 2>&1 </dev/null &
  KVF_PID[$name]=$!
  KVF_LOG[$name]=$log
}

kvf_pid() { echo "${KVF_PID[$1]}"; }
kvf_logfile() { echo "${KVF_LOG[$1]:-$KVF_TMP/$1.log}"; }
kvf_alive() { [[ -n ${KVF_PID[$1]:-} ]] && kill -0 "${KVF_PID[$1]}" 2>/dev/null; }

# kvf_forget NAME: the process ended (or was killed); reap it, stop tracking it and set KVF_RC to
# its exit status (not in a $(...) subshell: only this shell can reap its children).
KVF_RC=0
kvf_forget() {
  local pid=${KVF_PID[$1]:-}
  KVF_RC=0
  [[ -n $pid ]] || return 0
  wait "$pid" 2>/dev/null
  KVF_RC=$?
  unset "KVF_PID[$1]"
}

# kvf_rss_mib NAME: resident memory of NAME's process in MiB (0 when it is gone).
kvf_rss_mib() {
  local kb
  kb=$(awk '/^VmRSS:/ {print $2}' "/proc/${KVF_PID[$1]:-0}/status" 2>/dev/null)
  echo $(( ${kb:-0} / 1024 ))
}

# kvf_wait_for_line NAME EXTENDED-REGEX SECONDS [MIN_COUNT]: waits until NAME's log has at least
# MIN_COUNT (default 1) lines matching. Returns 1 on timeout or when NAME died first.
kvf_wait_for_line() {
  local name=$1 regex=$2 secs=$3 want=${4:-1} log
  log=$(kvf_logfile "$name")
  local end=$(($(kvf_now_ms) + secs * 1000))
  while (($(kvf_now_ms) < end)); do
    (($(grep -cE -- "$regex" "$log" 2>/dev/null || true) >= want)) && return 0
    if [[ -n ${KVF_PID[$name]:-} ]] && ! kill -0 "${KVF_PID[$name]}" 2>/dev/null; then
      (($(grep -cE -- "$regex" "$log" 2>/dev/null || true) >= want)) && return 0
      return 1
    fi
    sleep 0.1
  done
  return 1
}

# kvf_count_lines NAME EXTENDED-REGEX: how many lines of NAME's log match.
kvf_count_lines() { grep -cE -- "$2" "$(kvf_logfile "$1")" 2>/dev/null || true; }

# kvf_start_connector_daemon NAME CLUSTER SOCKET [DRAM]: a kvfabricd (background process NAME) for
# the store connector's tests: model "m" (4 layers, 2 KV heads x 64, bf16, 16-token blocks, 64-token
# chunks), a store of DRAM (default 64MiB) on SOCKET, no peers; its topology is
# $KVF_TMP/topology-NAME.yaml and its HTTP port KVF_PORT[NAME]. Dies if it is not ready in 20 s.
kvf_start_connector_daemon() {
  local name=$1 cluster=$2 socket=$3 dram=${4:-64MiB}
  local http_port
  http_port=$(kvf_free_port)
  KVF_PORT[$name]=$http_port
  cat >"$KVF_TMP/topology-$name.yaml" <<YAML
cluster: $cluster
models:
  - name: m
    layout: {kind: flash_attention, layers: 4, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 256}
    chunk_tokens: 64
nodes:
  - {name: it, address: 127.0.0.1, http_port: $http_port, store: {dram: $dram, socket: $socket}}
YAML
  kvf_start_bg "$name" "$KVF_BIN/kvfabricd" --topology "$KVF_TMP/topology-$name.yaml" --node it --no-peers --no-huge-pages
  kvf_wait_for_line "$name" '\] ready: ' 20 ||
    kvf_die "kvfabricd did not get ready: $(tail -n 5 "$(kvf_logfile "$name")")"
}

# kvf_start_server NAME HOST [PREFIX...] [-- SERVER-ARGS...]: starts `kvfabric-perf server --listen
# HOST:0 SERVER-ARGS` (after the optional PREFIX, e.g. `env UCX_TLS=tcp` or `ip netns exec NS`), waits until it prints
# "listening", and sets KVF_PORT[NAME] to the port it took. Dies if it does not come up in 20 s.
declare -gA KVF_PORT=()
kvf_start_server() {
  local name=$1 host=$2
  shift 2
  local prefix=() server_args=()
  while (($#)); do
    if [[ $1 == -- ]]; then shift; server_args=("$@"); break; fi
    prefix+=("$1"); shift
  done
  kvf_start_bg "$name" "${prefix[@]}" "$KVF_PERF" server --listen "$host:0" "${server_args[@]}"
  if ! kvf_wait_for_line "$name" 'listening on ' 20; then
    kvf_die "server $name did not print 'listening' within 20 s (alive: $(kvf_alive "$name" && echo yes || echo no))"
  fi
  local port
  port=$(grep -oE 'listening on [^ ]+:[0-9]+' "$(kvf_logfile "$name")" | head -n1 | sed -E 's/.*:([0-9]+)$/\1/')
  [[ $port =~ ^[0-9]+$ && $port != 0 ]] || kvf_die "server $name: cannot read its port from: $(head -n3 "$(kvf_logfile "$name")")"
  KVF_PORT[$name]=$port
  kvf_log "server $name up on $host:$port (pid ${KVF_PID[$name]})"
}

# kvf_run NAME SECONDS COMMAND...: runs COMMAND in the foreground under `timeout` (stdout+stderr to
# $KVF_TMP/NAME.log) and returns its exit status (124: it ran past SECONDS and was killed).
# It runs as a background job and is waited for, so the deadline's signal is never held up.
kvf_run() {
  local name=$1 secs=$2
  shift 2
  local log=$KVF_TMP/$name.log
  KVF_LOG[$name]=$log
  timeout -k 3 "$secs" "$@" >"$log" 2>&1 </dev/null &
  local pid=$!
  KVF_PID[$name]=$pid
  wait "$pid"
  local rc=$?
  unset "KVF_PID[$name]"
  return "$rc"
}

# kvf_layers_bytes LAYERS BLOCKS BLOCK_BYTES: bytes of one layers-mode request (K and V per block).
kvf_layers_bytes() { echo $(($1 * $2 * 2 * $3)); }

# kvf_check_verified SERVER_NAME BYTES COUNT_BEFORE REQUESTS WHAT: the server printed REQUESTS new
# "every byte verified (BYTES)" lines after the COUNT_BEFORE it had, and no FAILED line among them.
kvf_check_verified() {
  local name=$1 bytes=$2 before=$3 requests=$4 what=$5 log
  log=$(kvf_logfile "$name")
  local want=$((before + requests))
  kvf_wait_for_line "$name" '^stream [0-9]+ from .*(every byte verified|FAILED)' 10 "$want" || true
  local new
  new=$(grep -E '^stream [0-9]+ from ' "$log" | tail -n +"$((before + 1))")
  local ok
  ok=$(grep -cE ": $bytes bytes in [0-9]+ layers, .*every byte verified \($bytes\)\$" <<<"$new" || true)
  if [[ $ok == "$requests" ]] && ! grep -q FAILED <<<"$new"; then
    kvf_pass "$what: server verified every byte of $requests request(s) of $bytes bytes"
  else
    kvf_check_fail "$what: want $requests server line(s) 'every byte verified ($bytes)', got:"
    sed 's/^/    | /' <<<"$new" >&2
    return 1
  fi
}

# HTTP/JSON helpers for scripts that talk to a daemon's control port; the script sets base to
# "http://HOST:PORT". kvf_http_call NAME METHOD PATH [BODY] [CURL-ARGS...]: the reply body goes to
# $KVF_TMP/NAME.json and its status to CODE. kvf_json_field NAME EXPR: EXPR (Python, over the reply
# as d) as JSON. kvf_http_expect_ok NAME METHOD PATH BODY EXPR VALUE: a 200 whose EXPR is VALUE.
CODE=0
kvf_http_call() {
  local name=$1 method=$2 path=$3 body=${4:-}
  shift 4 2>/dev/null || shift $#
  local args=(-sS -m 10 -o "$KVF_TMP/$name.json" -w '%{http_code}' -X "$method")
  [[ -n $body ]] && args+=(-H 'Content-Type: application/json' --data-binary "$body")
  CODE=$(curl "${args[@]}" "$@" "$base$path" 2>"$KVF_TMP/$name.curl") || CODE="curl-failed:$(cat "$KVF_TMP/$name.curl")"
}
kvf_json_field() {
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps(eval(sys.argv[2], {"d": d})))' \
    "$KVF_TMP/$1.json" "$2" 2>/dev/null || echo "<no JSON>"
}
kvf_http_expect_ok() {
  kvf_http_call "$1" "$2" "$3" "$4"
  kvf_check_eq "$CODE" 200 "$2 $3 ($1): status" || { sed 's/^/    | /' "$KVF_TMP/$1.json" >&2; return; }
  kvf_check_eq "$(kvf_json_field "$1" "$5")" "$6" "$2 $3 ($1): $5"
}
