#!/usr/bin/env bash
# Two real processes stream a paged KV request GPU to GPU over the nccl transport (NCCL
# send/recv of staged layers: the sender sends a slot's worth straight from its blocks, or gathers
# scattered ones into a slot first; NCCL carries it; the receiver scatters into its shuffled,
# poisoned blocks), every byte checked by the receiver; also through slots smaller than a layer.
# Then the error paths: a cuda_ipc sender against the nccl receiver is refused with the reason and
# the receiver keeps serving; a receiver killed mid-stream fails the sender within its timeout.
# With two GPUs the processes use one each (NCCL over NVLink/P2P). With one GPU both use it and
# pose as two hosts (NCCL_HOSTID), since NCCL refuses two ranks on one GPU of one host: NCCL then
# carries the slots over sockets on loopback, which checks the transport's protocol (sends,
# receives, slots, scatters, errors), not the GPU link. Skips (77) without a GPU or without NCCL.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../integration/lib.sh"
kvf_init stream_nccl 200
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
((gpus >= 1)) || kvf_skip "needs a GPU (nvidia-smi lists none)"
ldconfig -p 2>/dev/null | grep -q 'libnccl.so.2' || kvf_skip "no libnccl.so.2 on this machine"

if ((gpus >= 2)); then
  recv_mem=cuda:1 sender_env=(env) receiver_env=(env)
  echo "stream_nccl: two GPUs, one per process"
else
  recv_mem=cuda:0
  one_gpu=(NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1 NCCL_NET=Socket)
  sender_env=(env NCCL_HOSTID=kvf-stream-nccl-sender "${one_gpu[@]}")
  receiver_env=(env NCCL_HOSTID=kvf-stream-nccl-receiver "${one_gpu[@]}")
  echo "stream_nccl: one GPU: both processes on it, NCCL over loopback sockets (two NCCL_HOSTIDs)"
fi

port=$(kvf_free_port)
kvf_start_bg srv "${receiver_env[@]}" "$KVF_PERF" server --listen 127.0.0.1:$port --transport nccl --mem $recv_mem
kvf_wait_for_line srv 'listening on ' 20 || kvf_die "nccl server did not start: $(tail -3 "$(kvf_logfile srv)")"

LAYERS=8 BLOCKS=96 BLOCK_BYTES=32768
total=$(kvf_layers_bytes $LAYERS $BLOCKS $BLOCK_BYTES)
# Sources in order go straight from the pool as one send a slot; in 3 runs of 1 MiB, with a layer a
# slot, as 6 sends of one group (K and V of each run); shuffled sources are gathered first.
for extra in "" "--staging-bytes 300K" "--source-runs 3 --staging-bytes 6M" "--shuffle-source"; do
  name=client${extra//[ -]/}
  before=$(kvf_count_lines srv '^stream [0-9]+ from ')
  # shellcheck disable=SC2086
  if kvf_run "$name" 60 "${sender_env[@]}" "$KVF_PERF" client --connect 127.0.0.1:$port --transport nccl --mem cuda:0 \
       --mode layers --layers $LAYERS --blocks $BLOCKS --block-bytes $BLOCK_BYTES --shuffle --verify --iters 2 $extra; then
    kvf_check_grep "$(kvf_logfile "$name")" "receiver verified $total bytes" "nccl ${extra:-default slots}: the client saw every byte verified"
    kvf_check_verified srv "$total" "$before" 2 "nccl ${extra:-default slots}"
  else
    kvf_check_fail "nccl stream (${extra:-default slots}) failed: $(tail -3 "$(kvf_logfile "$name")")"
  fi
done

if kvf_run mismatch 60 "$KVF_PERF" client --connect 127.0.0.1:$port --transport cuda_ipc --mem cuda:0 \
     --mode layers --layers 2 --blocks 4 --block-bytes 4K --iters 1; then
  kvf_check_fail "a cuda_ipc sender was accepted by an nccl receiver"
else
  kvf_check_grep "$(kvf_logfile mismatch)" "runs the nccl transport and the sender offers cuda_ipc" "transport mismatch refused clearly"
fi
kvf_check kvf_alive srv -- "the receiver survives the refused sender"

(sleep 2; kill -9 "$(kvf_pid srv)") &
killer=$!
start=$(kvf_now_ms)
kvf_run killed 120 "${sender_env[@]}" "$KVF_PERF" client --connect 127.0.0.1:$port --transport nccl --mem cuda:0 \
  --mode layers --layers 32 --blocks 512 --block-bytes 32K --iters 400 --timeout-ms 5000
rc=$?
wait "$killer" 2>/dev/null
kvf_forget srv
kvf_check test "$rc" != 0 -a "$rc" != 124 -- "receiver killed mid-stream -> the sender fails (rc $rc) after $(( ($(kvf_now_ms) - start) / 1000 )) s, no hang: $(tail -1 "$(kvf_logfile killed)")"
kvf_finish
