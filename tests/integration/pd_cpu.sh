#!/usr/bin/env bash
# Prefill/decode disaggregation on the CPU reference engine, two real processes over UCX tcp:
# kvfabric-engine prefill computes a seeded prompt layer by layer and streams each layer's KV into
# the blocks a kvfabric-engine decode process picks in its own pool (shuffled); the decode engine
# continues the request from that KV. For prompt lengths that are and are not multiples of the
# 16-token block (1, 15, 16, 17, 64, 100), streamed during the prefill and once after it, the
# decode engine's tokens must equal exactly the tokens one engine gives with prefill and decode in
# one place. A prefill with other weights must be told apart (the comparison can fail); a decode
# pool too small for a request refuses it clearly and keeps serving.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init pd_cpu 240
ENGINE=$KVF_BIN/kvfabric-engine
[[ -x $ENGINE ]] || kvf_skip "$ENGINE is not built"
export UCX_TLS=tcp

# start_decode NAME ARGS...: a decode engine on a free port; sets DECODE_PORT[NAME].
declare -A DECODE_PORT=()
start_decode() {
  local name=$1
  shift
  kvf_start_bg "$name" "$ENGINE" decode --listen 127.0.0.1:0 "$@"
  kvf_wait_for_line "$name" 'listening on ' 20 || kvf_die "decode engine $name did not start: $(tail -3 "$(kvf_logfile "$name")")"
  DECODE_PORT[$name]=$(grep -oE 'listening on [^ ]+:[0-9]+' "$(kvf_logfile "$name")" | head -n1 | sed -E 's/.*:([0-9]+)$/\1/')
}

# pd_case LABEL DECODE REQUEST-ID PREFILL-ARGS...: one request through prefill -> decode; its
# decode tokens must equal the prefill's reference tokens.
pd_case() {
  local label=$1 decode=$2 id=$3
  shift 3
  if ! kvf_run "prefill-$label" 60 "$ENGINE" prefill --connect "127.0.0.1:${DECODE_PORT[$decode]}" \
       --request-id "$id" "$@"; then
    kvf_check_fail "$label: prefill failed: $(tail -3 "$(kvf_logfile "prefill-$label")")"
    return 1
  fi
  local want got
  want=$(grep -m1 '^reference tokens:' "$(kvf_logfile "prefill-$label")" | cut -d: -f2)
  kvf_wait_for_line "$decode" "^request $id (tokens|FAILED)" 20 || true
  got=$(grep -m1 -E "^request $id tokens:" "$(kvf_logfile "$decode")" | cut -d: -f2)
  if [[ -n $want && $got == "$want" ]]; then
    kvf_pass "$label: decode tokens equal one engine's:$want"
  else
    kvf_check_fail "$label: decode gave '$got', one engine gives '$want'"
    grep -E "^request $id" "$(kvf_logfile "$decode")" >&2
  fi
}

start_decode decode
id=1
for n in 1 15 16 17 64 100; do
  pd_case "streamed-$n" decode $id --prompt-tokens "$n" --new 8 --prompt-seed $((n + 3))
  id=$((id + 1))
done
pd_case "after-prefill-100" decode $id --prompt-tokens 100 --new 8 --prompt-seed 103 --no-stream
id=$((id + 1))
kvf_check_grep "$(kvf_logfile prefill-after-prefill-100)" "streamed after the prefill" "--no-stream sends the KV after the prefill"
kvf_check_grep "$(kvf_logfile prefill-streamed-100)" "layers streamed during the prefill" "the default streams layers during the prefill"

# Other weights on the prefill side: the decode engine continues KV it cannot have computed, and
# its tokens must differ from what the prefill's own model says.
kvf_run prefill-wrong-seed 60 "$ENGINE" prefill --connect "127.0.0.1:${DECODE_PORT[decode]}" --request-id $id \
  --prompt-tokens 40 --new 8 --seed 2
want=$(grep -m1 '^reference tokens:' "$(kvf_logfile prefill-wrong-seed)" | cut -d: -f2)
kvf_wait_for_line decode "^request $id tokens" 20 || true
got=$(grep -m1 -E "^request $id tokens:" "$(kvf_logfile decode)" | cut -d: -f2)
kvf_check test -n "$want" -a -n "$got" -a "$got" != "$want" -- "KV from other weights gives other tokens (the check can fail)"
id=$((id + 1))

# A pool too small for the request: refused with the reason, and the engine keeps serving.
start_decode small --pool-blocks 4
kvf_run prefill-too-big 60 "$ENGINE" prefill --connect "127.0.0.1:${DECODE_PORT[small]}" --request-id $id \
  --prompt-tokens 100 --new 8
rc=$?
kvf_check test "$rc" != 0 -a "$rc" != 124 -- "a request larger than the decode pool fails the prefill (rc $rc), no hang"
kvf_check_grep "$(kvf_logfile prefill-too-big)" "refused the stream: 7 blocks, this engine has 4" "the prefill is told why"
id=$((id + 1))
pd_case "small-pool-after-refusal" small $id --prompt-tokens 20 --new 4
kvf_check kvf_alive decode -- "the decode engine still serves"
kvf_finish
