#!/usr/bin/env bash
# tests/netns/lib.sh (sourced, after integration/lib.sh): N "hosts" as network namespaces on one bridge, for tests and
# benchmarks that need several nodes. Host i (1..N) is namespace ${KVF_NS[i]} with address
# 10.77.1.i/24 on its interface kvf0; the bridge lives in its own namespace, so nothing touches
# the machine's own network. Everything is deleted at exit (kvf_on_exit from integration/lib.sh,
# or the caller's own trap when sourced without it).
#   kvf_netns_cluster N      makes the cluster or returns 1 with the reason in KVF_NETNS_ERROR
#   kvf_netns_exec I CMD...  runs CMD in host I's namespace
KVF_NS=()
KVF_NS_ADDR=()
KVF_NETNS_ERROR=

kvf_netns_teardown() {
  local ns
  for ns in "${KVF_NS[@]}" "${KVF_NS_SWITCH:-}"; do
    [[ -n $ns ]] && ip netns del "$ns" 2>/dev/null
  done
  return 0
}

kvf_netns_cluster() {
  local n=$1 i tag=$$ err
  command -v ip >/dev/null || { KVF_NETNS_ERROR="iproute2's ip is not installed"; return 1; }
  ((EUID == 0)) || { KVF_NETNS_ERROR="network namespaces need root (running as uid $EUID)"; return 1; }
  KVF_NS_SWITCH=kvf-sw-$tag
  if ! err=$(ip netns add "$KVF_NS_SWITCH" 2>&1); then
    KVF_NETNS_ERROR="cannot create a network namespace: $err"
    return 1
  fi
  ip -n "$KVF_NS_SWITCH" link add br0 type bridge && ip -n "$KVF_NS_SWITCH" link set br0 up ||
    { KVF_NETNS_ERROR="cannot create a bridge"; return 1; }
  for ((i = 1; i <= n; i++)); do
    KVF_NS[i]=kvf-h$i-$tag
    KVF_NS_ADDR[i]=10.77.1.$i
    ip netns add "${KVF_NS[i]}" || { KVF_NETNS_ERROR="ip netns add ${KVF_NS[i]} failed"; return 1; }
    # Made inside the host's namespace, so the names cannot clash with anything else on the machine.
    ip -n "${KVF_NS[i]}" link add kvf0 type veth peer name up$i netns "$KVF_NS_SWITCH" &&
      ip -n "$KVF_NS_SWITCH" link set up$i master br0 &&
      ip -n "$KVF_NS_SWITCH" link set up$i up &&
      ip -n "${KVF_NS[i]}" addr add "${KVF_NS_ADDR[i]}/24" dev kvf0 &&
      ip -n "${KVF_NS[i]}" link set kvf0 up &&
      ip -n "${KVF_NS[i]}" link set lo up ||
      { KVF_NETNS_ERROR="could not wire host $i to the bridge"; return 1; }
  done
  return 0
}

kvf_netns_exec() {
  local i=$1
  shift
  ip netns exec "${KVF_NS[i]}" "$@"
}
