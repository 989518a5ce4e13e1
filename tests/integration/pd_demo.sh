#!/usr/bin/env bash
# The PD demo's parts as an operator runs them: two kvfabric-engine processes serve the engines a
# topology names (--topology FILE --engine NAME: role, model and port from the file; the CPU runs
# the tiny shape), and kvfabric-pd-demo, a proxy, sends each prompt to the prefill engine (which
# streams every layer's KV into the decode engine's pool over UCX while it computes and answers
# with the first token) and has the decode engine continue from that token. The decode tokens must
# equal exactly what the prefill engine gives alone (/generate), for prompts that are and are not
# whole blocks and chunks, streamed and sent after the prefill. Then the engines' HTTP API under
# bad input: unknown fields, bad JSON, wrong roles, unknown routes, KV that never comes, a decode
# engine that is not there: each a 4xx/5xx with a reason, and both engines keep serving.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init pd_demo 240
ENGINE=$KVF_BIN/kvfabric-engine DEMO=$KVF_BIN/kvfabric-pd-demo
[[ -x $ENGINE && -x $DEMO ]] || kvf_skip "kvfabric-engine or kvfabric-pd-demo is not built"
export UCX_TLS=tcp
pport=$(kvf_free_port) dport=$(kvf_free_port)
topo=$KVF_TMP/topology.yaml
sed -e "s/port: 17100/port: $pport/" -e "s/port: 17101/port: $dport/" \
  "$(dirname "${BASH_SOURCE[0]}")/../../examples/topologies/local.yaml" >"$topo"

kvf_start_bg decode "$ENGINE" --topology "$topo" --engine decode0
kvf_start_bg prefill "$ENGINE" --topology "$topo" --engine prefill0
kvf_wait_for_line decode ' serving on ' 30 || kvf_die "decode engine did not start: $(tail -3 "$(kvf_logfile decode)")"
kvf_wait_for_line prefill ' serving on ' 30 || kvf_die "prefill engine did not start: $(tail -3 "$(kvf_logfile prefill)")"
kvf_check_grep "$(kvf_logfile decode)" "decode0 \(decode, .* on the CPU, model llama-3-8b\) serving on 127.0.0.1:$dport; KV port [0-9]+" \
  "the decode engine takes its role, model and port from the topology"
kvf_check_grep "$(kvf_logfile prefill)" "no GPU: the CPU reference engine runs the tiny shape" "the CPU engine says it runs the tiny shape"

id=1
for n in 1 16 17 100 257; do
  if kvf_run "demo-$n" 60 "$DEMO" --topology "$topo" --prompt-tokens "$n" --new 6 --prompt-seed $((n + 5)) \
       --first-id $id --requests 2 --compare; then
    kvf_check_grep "$(kvf_logfile "demo-$n")" "every request gave exactly the tokens one engine gives" \
      "$n-token prompts: PD tokens equal one engine's (2 requests)"
  else
    kvf_check_fail "$n-token prompts: $(tail -3 "$(kvf_logfile "demo-$n")")"
  fi
  id=$((id + 2))
done
kvf_run demo-after 60 "$DEMO" --topology "$topo" --prompt-tokens 300 --new 6 --first-id $id --compare --no-stream
kvf_check_grep "$(kvf_logfile demo-after)" "sent after the prefill.*" "--no-stream: the KV goes after the prefill"
kvf_check_grep "$(kvf_logfile demo-after)" "every request gave exactly" "--no-stream: the same tokens"
id=$((id + 1))

# http STATUS-REGEX MESSAGE-REGEX METHOD URL [BODY]: the engine answers with that status and reason.
http() {
  local want=$1 text=$2 method=$3 url=$4 body=${5:-}
  local out code
  out=$(curl -s -m 10 -X "$method" -w '\n%{http_code}' ${body:+-d "$body"} "$url")
  code=${out##*$'\n'}
  if [[ $code =~ ^($want)$ && ${out%$'\n'*} =~ $text ]]; then
    kvf_pass "$method $url -> $code: ${out%$'\n'*}"
  else
    kvf_check_fail "$method $url${body:+ $body}: wanted $want /$text/, got $code: ${out%$'\n'*}"
  fi
}
P=http://127.0.0.1:$pport D=http://127.0.0.1:$dport
http 400 "unknown field 'bogus'" POST $P/prefill '{"prompt_tokens": 5, "bogus": 1}'
http 400 "not valid JSON" POST $P/generate '[1'
http 400 "either 'prompt'" POST $P/generate '{"n_new": 2}'
http 400 "not a token id below the vocab size 1024" POST $P/generate '{"prompt": [1, 5000]}'
http 400 "'request_id' must be an unsigned integer" POST $P/prefill '{"prompt_tokens": 5, "request_id": "x", "decode": "127.0.0.1:1"}'
http 400 "this is a prefill engine" POST $P/decode '{"request_id": 1, "first_token": 1}'
http 400 "this is a decode engine" POST $D/prefill '{"prompt_tokens": 5}'
http 404 "no route /nope" GET $P/nope
http 405 "takes POST" GET $P/generate
http 504 "did not arrive within 300 ms" POST $D/decode '{"request_id": 424242, "first_token": 3, "timeout_ms": 300}'
http 502 "cannot connect" POST $P/prefill "{\"prompt_tokens\": 40, \"request_id\": 77, \"decode\": \"127.0.0.1:$(kvf_free_port)\"}"
http 503 "the KV pool has" POST $P/generate '{"prompt_tokens": 100000, "n_new": 2}'
# Still serving, and still right, after all that.
kvf_run demo-last 60 "$DEMO" --topology "$topo" --prompt-tokens 64 --new 6 --first-id $id --compare
kvf_check_grep "$(kvf_logfile demo-last)" "every request gave exactly" "after the bad requests both engines still serve PD correctly"
kvf_check kvf_alive prefill -- "prefill engine alive"
kvf_check kvf_alive decode -- "decode engine alive"
kill -TERM "$(kvf_pid decode)"
kvf_wait_for_line decode 'stopping' 10 && kvf_pass "SIGTERM stops the decode engine cleanly" || kvf_check_fail "decode engine did not stop on SIGTERM"
kvf_finish
