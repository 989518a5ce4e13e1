#!/usr/bin/env bash
# Two "hosts" in network namespaces on a bridge of their own (10.77.1.1/24, 10.77.1.2/24; made by
# tests/netns/lib.sh): the kvfabric-perf server runs in one, the client in the other, over UCX tcp
# on their interface only.
# Asserts: a shuffled, verified layers run (32 x 64 blocks x 2 x 16 KiB, 2 requests) exits 0 and the
# server prints "every byte verified (N)" for the whole request, with the peer seen at 10.77.1.2;
# a bw run at 1M (--json) exits 0 with gbps > 0. The namespaces (and with them the veths) are
# always deleted at exit. Skips (77) when namespaces cannot be made here.
# No traffic goes anywhere but these two namespace addresses.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../integration/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init stream_veth 180

kvf_on_exit 'kvf_netns_teardown'
kvf_netns_cluster 2 || kvf_skip "$KVF_NETNS_ERROR"
NS_A=${KVF_NS[1]} NS_B=${KVF_NS[2]}
ADDR_A=${KVF_NS_ADDR[1]} ADDR_B=${KVF_NS_ADDR[2]}
DEV=kvf0  # each host's interface on the bridge (tests/netns/lib.sh)
kvf_log "namespaces $NS_A ($ADDR_A) and $NS_B ($ADDR_B) on a bridge of their own"

# The link works before anything else is blamed on kvfabric.
if command -v ping >/dev/null; then
  kvf_run ping 10 ip netns exec "$NS_B" ping -c 1 -W 2 $ADDR_A ||
    kvf_die "no ping from $ADDR_B to $ADDR_A: $(cat "$(kvf_logfile ping)")"
fi

UCX_ENV=(env UCX_TLS=tcp UCX_NET_DEVICES=$DEV)
kvf_start_server server $ADDR_A ip netns exec "$NS_A" "${UCX_ENV[@]}"
port=${KVF_PORT[server]}

LAYERS=32 BLOCKS=64 BLOCK_BYTES=16384 REQUESTS=2
total=$(kvf_layers_bytes $LAYERS $BLOCKS $BLOCK_BYTES)
before=$(kvf_count_lines server '^stream [0-9]+ from ')
kvf_run layers 120 ip netns exec "$NS_B" "${UCX_ENV[@]}" "$KVF_PERF" client --connect "$ADDR_A:$port" \
  --mode layers --layers $LAYERS --blocks $BLOCKS --block-bytes $BLOCK_BYTES --shuffle --verify \
  --iters $REQUESTS --timeout-ms 10000
rc=$?
kvf_check_eq "$rc" 0 "layers client across the veth: exit status" ||
  sed 's/^/    | /' "$(kvf_logfile layers)" >&2
kvf_check_eq "$(grep -c "receiver verified $total bytes" "$(kvf_logfile layers)")" $REQUESTS \
  "client requests reporting 'receiver verified $total bytes'"
kvf_check_verified server "$total" "$before" $REQUESTS "layers across the veth"
kvf_check_grep "$(kvf_logfile server)" "^stream [0-9]+ from kvfabric-perf-client@$ADDR_B:[0-9]+: " \
  "server saw the client at $ADDR_B"

kvf_run bw 120 ip netns exec "$NS_B" "${UCX_ENV[@]}" "$KVF_PERF" client --connect "$ADDR_A:$port" \
  --mode bw --sizes 1M --iters 100 --json "$KVF_TMP/bw.json"
rc=$?
if kvf_check_eq "$rc" 0 "bw 1M across the veth: exit status"; then
  if gbps=$(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["results"]
assert len(r) == 1 and r[0]["mode"] == "bw" and r[0]["bytes"] == 1 << 20, r
assert r[0]["gbps"] > 0, r
print("%.3f" % r[0]["gbps"])' "$KVF_TMP/bw.json" 2>&1); then
    kvf_pass "bw 1M across the veth: $gbps GB/s"
  else
    kvf_check_fail "bw JSON: $gbps"
  fi
else
  sed 's/^/    | /' "$(kvf_logfile bw)" >&2
fi
kvf_check kvf_alive server -- "server alive at the end"

kvf_finish
