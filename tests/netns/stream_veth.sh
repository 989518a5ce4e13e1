#!/usr/bin/env bash
# Two "hosts" in network namespaces joined by a veth pair (10.77.0.1/24 <-> 10.77.0.2/24): the
# kvfabric-perf server runs in one, the client in the other, over UCX tcp on the veth only.
# Asserts: a shuffled, verified layers run (32 x 64 blocks x 2 x 16 KiB, 2 requests) exits 0 and the
# server prints "every byte verified (N)" for the whole request, with the peer seen at 10.77.0.2;
# a bw run at 1M (--json) exits 0 with gbps > 0. The namespaces (and with them the veth) are
# always deleted at exit. Skips (77) when namespaces cannot be made here.
# No traffic goes anywhere but these two namespace addresses.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../integration/lib.sh"
kvf_init stream_veth 180

command -v ip >/dev/null || kvf_skip "iproute2's ip is not installed"
((EUID == 0)) || kvf_skip "network namespaces need root (running as uid $EUID)"

NS_A=kvf-a-$$
NS_B=kvf-b-$$
ADDR_A=10.77.0.1
ADDR_B=10.77.0.2
DEV=kvf0  # the veth's name inside each namespace (the pair is created under unique names)

kvf_on_exit 'ip netns del "$NS_A" 2>/dev/null; ip netns del "$NS_B" 2>/dev/null; ip link del "kvfva$$" 2>/dev/null'
if ! err=$(ip netns add "$NS_A" 2>&1); then
  kvf_skip "cannot create a network namespace: $err"
fi
ip netns add "$NS_B" || kvf_die "ip netns add $NS_B failed"
if ! err=$(ip link add "kvfva$$" type veth peer name "kvfvb$$" 2>&1); then
  kvf_skip "cannot create a veth pair: $err"
fi
setup() {
  ip link set "kvfva$$" netns "$NS_A" &&
    ip link set "kvfvb$$" netns "$NS_B" &&
    ip -n "$NS_A" link set "kvfva$$" name $DEV &&
    ip -n "$NS_B" link set "kvfvb$$" name $DEV &&
    ip -n "$NS_A" addr add $ADDR_A/24 dev $DEV &&
    ip -n "$NS_B" addr add $ADDR_B/24 dev $DEV &&
    ip -n "$NS_A" link set lo up && ip -n "$NS_B" link set lo up &&
    ip -n "$NS_A" link set $DEV up && ip -n "$NS_B" link set $DEV up
}
setup || kvf_die "could not configure the veth pair between $NS_A and $NS_B"
kvf_log "namespaces $NS_A ($ADDR_A) and $NS_B ($ADDR_B) joined by a veth"

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
