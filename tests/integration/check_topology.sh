#!/usr/bin/env bash
# kvfabricd --check-topology: exit 0 and a summary for the shipped examples; exit 2 and one
# FILE:LINE:COL line per problem, naming the field, for broken files; exit 2 for a missing file.
set -uo pipefail

bin=${KVF_BIN:?KVF_BIN must point at the build bin/ directory}
src=${KVF_SOURCE:?KVF_SOURCE must point at the source tree}
daemon=$bin/kvfabricd
[[ -x $daemon ]] || { echo "skip: $daemon not built"; exit 77; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0

fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# expect_ok FILE SUMMARY: exit 0, stdout is "FILE: ok (SUMMARY)", stderr empty.
expect_ok() {
  local file=$1 summary=$2 out err rc
  out=$("$daemon" --check-topology "$file" 2>"$tmp/err"); rc=$?
  err=$(cat "$tmp/err")
  [[ $rc == 0 ]] || fail "$file: exit $rc, want 0; stderr: $err"
  [[ $out == "$file: ok ($summary)" ]] || fail "$file: stdout '$out', want '$file: ok ($summary)'"
  [[ -z $err ]] || fail "$file: unexpected stderr: $err"
}

# expect_problem FILE LINE:COL TEXT: exit 2 and a stderr line "FILE:LINE:COL: ...TEXT...".
expect_problem() {
  local file=$1 where=$2 text=$3 rc
  "$daemon" --check-topology "$file" >"$tmp/out" 2>"$tmp/err"; rc=$?
  [[ $rc == 2 ]] || fail "$file: exit $rc, want 2"
  [[ ! -s $tmp/out ]] || fail "$file: unexpected stdout: $(cat "$tmp/out")"
  grep -qF -- "$file:$where: " "$tmp/err" || fail "$file: no problem at $where in: $(cat "$tmp/err")"
  grep -F -- "$file:$where: " "$tmp/err" | grep -qF -- "$text" ||
    fail "$file: problem at $where does not mention '$text': $(cat "$tmp/err")"
}

expect_ok "$src/examples/topologies/local.yaml" "1 nodes, 2 engines, 1 models"
expect_ok "$src/examples/topologies/two-node.yaml" "2 nodes, 2 engines, 1 models"
expect_ok "$src/examples/topologies/gpu-2x.yaml" "1 nodes, 2 engines, 1 models"

cat >"$tmp/typo.yaml" <<'YAML'
cluster: c
nodes:
  - name: a
    adress: 10.0.0.1
    control_port: abc
YAML
expect_problem "$tmp/typo.yaml" 3:5 "nodes[0]: missing required key 'address'"
expect_problem "$tmp/typo.yaml" 4:5 "unknown key 'adress' in nodes[0] (did you mean 'address'?)"
expect_problem "$tmp/typo.yaml" 5:19 'nodes[0].control_port: expected an integer 1..65535, got "abc"'
[[ $(grep -c "^$tmp/typo.yaml:[0-9]*:[0-9]*: " "$tmp/err") == 3 ]] || fail "typo.yaml: want 3 problems: $(cat "$tmp/err")"

cat >"$tmp/refs.yaml" <<'YAML'
cluster: c
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 8, dtype: bf16, block_tokens: 16, blocks: 8}
nodes:
  - name: a
    address: 10.0.0.1
    gpus: [0]
    store: {dram: 64GB}
engines:
  - {name: e0, node: b, role: prefill, model: m, port: 17100}
  - {name: e1, node: a, role: decode, model: m, gpu: 1, port: 17000}
YAML
expect_problem "$tmp/refs.yaml" 9:19 'nodes[0].store.dram: bad size "64GB"'
expect_problem "$tmp/refs.yaml" 11:22 "engines[0].node: no node named 'b'"
expect_problem "$tmp/refs.yaml" 12:54 "engines[1].gpu: GPU 1 is not one of node 'a' gpus [0]"
expect_problem "$tmp/refs.yaml" 12:63 "engines[1].port: port 17000 on 10.0.0.1 is already used by nodes[0].control_port"

printf 'cluster: c\nnodes: [\n' >"$tmp/syntax.yaml"
expect_problem "$tmp/syntax.yaml" 3:1 "YAML syntax error"

: >"$tmp/empty.yaml"
expect_problem "$tmp/empty.yaml" 1:1 "empty document"

# A missing file: a clear message and exit 2, no crash.
"$daemon" --check-topology "$tmp/absent.yaml" >"$tmp/out" 2>"$tmp/err"; rc=$?
[[ $rc == 2 ]] || fail "missing file: exit $rc, want 2"
grep -qF "$tmp/absent.yaml: cannot read topology file: No such file or directory" "$tmp/err" ||
  fail "missing file: stderr: $(cat "$tmp/err")"

# The daemon mode refuses a node the topology does not have, naming the ones it has, and a
# topology with problems (daemon_store.sh runs the daemon for real).
timeout 20 "$daemon" --topology "$src/examples/topologies/local.yaml" --node nowhere >"$tmp/out" 2>"$tmp/err"; rc=$?
[[ $rc == 2 ]] || fail "--topology --node nowhere: exit $rc, want 2"
grep -qF "no node 'nowhere'" "$tmp/err" "$tmp/out" || fail "--node nowhere: output: $(cat "$tmp/err" "$tmp/out")"
timeout 20 "$daemon" --topology "$tmp/typo.yaml" --node a >"$tmp/out" 2>"$tmp/err"; rc=$?
[[ $rc == 2 ]] || fail "--topology with problems: exit $rc, want 2"
"$daemon" --topology "$src/examples/topologies/local.yaml" >"$tmp/out" 2>"$tmp/err"; rc=$?
[[ $rc == 2 ]] || fail "--topology without --node: exit $rc, want 2"

"$daemon" --version | grep -qE '^kvfabricd [0-9]+\.[0-9]+\.[0-9]+' || fail "--version"
"$daemon" --help | grep -qF -- "--check-topology" || fail "--help"
"$daemon" --no-such-option >/dev/null 2>&1; rc=$?
[[ $rc == 2 ]] || fail "unknown option: exit $rc, want 2"

if ((failures)); then
  echo "$failures check(s) failed"
  exit 1
fi
echo "check_topology: all checks passed"
