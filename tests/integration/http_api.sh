#!/usr/bin/env bash
# The HTTP/JSON control API with curl, as an operator would use it: every route against the test
# server (kvf-http-test-server: the real HttpControlServer over an in-memory ControlApi), every class
# of bad input answered with a 4xx naming the problem, garbage on a raw socket, keep-alive reuse, and
# the server still serving (and stopping cleanly on SIGTERM) at the end.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init http_api 120

command -v curl >/dev/null || kvf_skip "curl is not installed (scripts/setup-deps.sh installs it)"
server=$KVF_BIN/kvf-http-test-server
[[ -x $server ]] || kvf_skip "$server is not built"

# 4 chunks of model "m" are held from the start: tokens 0..1023.
kvf_start_bg srv "$server" --port 0 --seed-chunks 4 --max-body-bytes 65536
kvf_wait_for_line srv 'listening on ' 20 || kvf_die "the test server did not start: $(cat "$(kvf_logfile srv)")"
port=$(grep -oE 'listening on [^ ]+:[0-9]+' "$(kvf_logfile srv)" | head -n1 | sed -E 's/.*:([0-9]+)$/\1/')
base=http://127.0.0.1:$port
kvf_log "test server on $base"

# Requests go through lib.sh's kvf_http_call / kvf_json_field / kvf_http_expect_ok against $base.

# expect_refused NAME METHOD PATH BODY STATUS CODE FIELD: the status, the error class and the field
# named in {"error", "field", "code"}; and a non-empty message.
expect_refused() {
  local name=$1 method=$2 path=$3 body=$4 status=$5 code=$6 want_field=$7
  kvf_http_call "$name" "$method" "$path" "$body"
  kvf_check_eq "$CODE" "$status" "$method $path ($name): status" || { sed 's/^/    | /' "$KVF_TMP/$name.json" >&2; return; }
  kvf_check_eq "$(kvf_json_field "$name" 'd["code"]')" "\"$code\"" "$name: code"
  kvf_check_eq "$(kvf_json_field "$name" 'd["field"]')" "$want_field" "$name: field"
  kvf_check_eq "$(kvf_json_field "$name" 'len(d["error"]) > 0')" true "$name: has a message"
}

key() { printf '%032x' "$1"; }
tokens() { python3 -c "import sys; print(','.join(str(i) for i in range(int(sys.argv[1]))))" "$1"; }

# --- every route -------------------------------------------------------------------------------
kvf_http_expect_ok health GET /health '' 'd["status"]' '"ok"'
kvf_http_expect_ok lookup_tokens POST /lookup "{\"model\": \"m\", \"tokens\": [$(tokens 1500)]}" \
  '[d["query_chunks"], d["matches"][0]["matched_tokens"], d["matches"][0]["tier"]]' '[5, 1024, "dram"]'
kvf_http_expect_ok lookup_miss POST /lookup '{"model": "m", "tokens": [9, 9, 9]}' 'd["matches"]' '[]'
kvf_http_expect_ok lookup_keys POST /lookup "{\"model\": \"m\", \"chunk_keys\": [\"$(key 1)\"]}" 'd["query_chunks"]' 1
kvf_http_expect_ok stats GET /stats '' '[d["entries"], d["tiers"][0]["tier"]]' '[4, "dram"]'
kvf_http_expect_ok pin POST /pin "{\"keys\": [\"$(key 7)\"]}" '[d["pinned"], d["not_found"]]' "[0, [\"$(key 7)\"]]"
kvf_http_expect_ok unpin POST /unpin "{\"keys\": [\"$(key 7)\"]}" 'd["unpinned"]' 0
kvf_http_expect_ok compress POST /compress '{"all": true, "codec": "identity"}' 'd["compressed"]' 4
kvf_http_expect_ok move POST /move "{\"from\": \"local\", \"to\": \"peer\", \"keys\": [\"$(key 7)\"], \"copy\": true}" \
  '[d["moved"], d["copy"]]' '[0, true]'
kvf_http_call metrics GET /metrics
kvf_check_eq "$CODE" 200 "GET /metrics: status"
kvf_check_grep "$KVF_TMP/metrics.json" '^kvf_store_entries 4$' "metrics: the API's series"
kvf_check_grep "$KVF_TMP/metrics.json" '^kvf_http_requests_total\{route="/lookup",code="200"\} 3$' \
  "metrics: the server's request counters"
ctype=$(curl -sS -m 10 -o /dev/null -w '%{content_type}' "$base/metrics")
kvf_check_eq "$ctype" "text/plain; version=0.0.4; charset=utf-8" "metrics content type"
kvf_http_expect_ok clear_model POST /clear '{"model": "m"}' 'd["cleared"]' 4
kvf_http_expect_ok lookup_after_clear POST /lookup "{\"model\": \"m\", \"tokens\": [$(tokens 512)]}" 'd["matches"]' '[]'

# --- errors of the API map to status codes -----------------------------------------------------
expect_refused unknown_model POST /lookup '{"model": "nope", "tokens": [1]}' 400 invalid_argument null
expect_refused unknown_node POST /move "{\"from\": \"local\", \"to\": \"elsewhere\", \"keys\": []}" 404 not_found null
expect_refused unreachable POST /move "{\"from\": \"local\", \"to\": \"unreachable\", \"keys\": []}" 503 unavailable null
expect_refused no_codec POST /compress '{"all": true, "codec": "zstd"}' 400 invalid_argument null

# --- bad input ---------------------------------------------------------------------------------
expect_refused malformed POST /lookup '{"model": "m", "tokens": [1, 2' 400 malformed_json null
expect_refused not_object POST /pin '[1, 2]' 400 wrong_type null
expect_refused unknown_field POST /lookup '{"model": "m", "tokens": [1], "temperature": 0.7}' 400 unknown_field \
  '"temperature"'
expect_refused wrong_type POST /lookup '{"model": "m", "tokens": [1, "two"]}' 400 wrong_type '"tokens[1]"'
expect_refused negative_token POST /lookup '{"model": "m", "tokens": [-3]}' 400 invalid_value '"tokens[0]"'
expect_refused big_token POST /lookup '{"model": "m", "tokens": [4294967296]}' 400 invalid_value '"tokens[0]"'
expect_refused missing POST /move '{"from": "local", "keys": []}' 400 missing_field '"to"'
expect_refused bad_key POST /pin '{"keys": ["not-a-key"]}' 400 invalid_value '"keys[0]"'
expect_refused both POST /clear '{"all": true, "keys": []}' 400 conflicting_fields '"keys"'
expect_refused unknown_route GET /v2/lookup '' 404 unknown_route null
expect_refused wrong_method GET /lookup '' 405 method_not_allowed null
expect_refused wrong_method_post POST /metrics '{}' 405 method_not_allowed null
allow=$(curl -sS -m 10 -o /dev/null -D - "$base/lookup" | tr -d '\r' | sed -n 's/^[Aa]llow: //p')
kvf_check_eq "$allow" POST "405 names the allowed method"

# An oversized body (the server runs with a 64 KiB limit here): 413 before the body is read. curl
# sends "Expect: 100-continue" for large bodies, so the refusal comes at the head.
python3 -c 'print("{\"model\": \"m\", \"tokens\": [" + ",".join(["1"] * 40000) + "]}")' >"$KVF_TMP/big.json"
kvf_http_call too_big POST /lookup "@$KVF_TMP/big.json"
kvf_check_eq "$CODE" 413 "oversized body: status"
kvf_check_eq "$(kvf_json_field too_big 'd["code"]')" '"body_too_large"' "oversized body: code"

# Garbage on a raw socket: a 400, and the connection closed.
if exec 3<>"/dev/tcp/127.0.0.1/$port"; then
  printf '\x16\x03\x01 definitely not HTTP\r\n\r\n' >&3
  reply=$(timeout 10 cat <&3 | head -c 200 | tr -d '\r' | head -n1)
  exec 3<&- 3>&-
  kvf_check_eq "$reply" "HTTP/1.1 400 Bad Request" "garbage on the wire: 400"
else
  kvf_check_fail "cannot open a raw socket to the server"
fi

# Keep-alive: curl sends several requests over one connection; the server counts one connection.
accepted() { curl -sS -m 10 "$base/metrics" | sed -n 's/^kvf_http_connections_accepted_total //p'; }
before=$(accepted)
curl -sS -m 10 -o /dev/null -o /dev/null -o /dev/null "$base/health" "$base/stats" "$base/health"
after=$(accepted)
kvf_check_eq "$((after - before))" 2 "keep-alive: 3 requests on 1 connection (+1 for the metrics probe)"

# --- still serving; stops cleanly --------------------------------------------------------------
kvf_http_expect_ok health_after GET /health '' 'd["status"]' '"ok"'
kvf_check kvf_alive srv -- "the server is still running after every bad request"
kill -TERM "$(kvf_pid srv)"
kvf_forget srv
kvf_check_eq "$KVF_RC" 0 "SIGTERM: clean exit"
kvf_finish
