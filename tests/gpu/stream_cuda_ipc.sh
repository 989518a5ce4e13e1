#!/usr/bin/env bash
# Two real processes stream a paged KV request GPU to GPU over the cuda_ipc transport (CUDA IPC
# mappings; NVLink between two GPUs, or one GPU's memory when there is only one) into shuffled,
# poisoned receiver blocks, every byte checked by the receiver; with the copy kernel, the copy
# engines, staged copies (the receiver scatters; also through slots smaller than a layer, so
# extents straddle slots), staging refused by a full receiver (direct copies instead), and the
# default choice; the host-staged path (ucx_staged) with GPU memory; and transport lists (each side offers several, the first both share is chosen).
# Then the error paths: a sender on another transport is
# refused with a clear reason and the receiver keeps serving; a receiver killed mid-stream fails
# the sender within its timeout (nothing hangs). Skips (77) where there is no GPU.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../integration/lib.sh"
kvf_init stream_cuda_ipc 420
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
((gpus >= 1)) || kvf_skip "no GPU (nvidia-smi lists none)"
src=0 dst=$((gpus >= 2 ? 1 : 0))
kvf_log "GPUs: $gpus; sender on cuda:$src, receiver on cuda:$dst"

port=$(kvf_free_port)
kvf_start_bg srv "$KVF_PERF" server --listen 127.0.0.1:$port --transport cuda_ipc --mem cuda:$dst
kvf_wait_for_line srv 'listening on ' 20 || kvf_die "cuda_ipc server did not start: $(tail -3 "$(kvf_logfile srv)")"

LAYERS=8 BLOCKS=96 BLOCK_BYTES=32768
total=$(kvf_layers_bytes $LAYERS $BLOCKS $BLOCK_BYTES)
# Staged copies (from runs of in-order source blocks, from 3 runs a part, and gathered from
# shuffled ones), also through slots smaller than a layer; with the GPU hand-over of slots (on its
# own, with fewer slots than chunks in flight, and with split copies); with copies held back so
# that queued layers share one. The adaptive choice: direct for a lone put, staged for the
# layers queued behind it (between processes on one GPU only with --adaptive-same-gpu), also
# through slots smaller than a layer.
for copy in kernel ce staged "staged --staging-bytes 300K" "staged --shuffle-source" "staged --source-runs 3 --staging-bytes 6M" \
    "staged --staging-handover on" \
    "staged --staging-handover on --staging-bytes 300K --staging-slots 2" \
    "staged --staging-handover on --staging-slots 2 --staging-copy-streams 2" \
    "staged --staging-ahead 1 --inflight 1G" "staged --staging-ahead 2 --inflight 1G --staging-bytes 300K" \
    auto "kernel --resident-plans" adaptive "adaptive --adaptive-same-gpu" \
    "adaptive --adaptive-same-gpu --staging-bytes 300K"; do
  name=client-${copy//[ -]/}
  before=$(kvf_count_lines srv '^stream [0-9]+ from ')
  if kvf_run "$name" 120 "$KVF_PERF" client --connect 127.0.0.1:$port --transport cuda_ipc \
       --mem cuda:$src --mode layers --layers $LAYERS --blocks $BLOCKS --block-bytes $BLOCK_BYTES --shuffle \
       --verify --iters 2 --verbose --copy $copy; then  # unquoted: $copy may carry a flag; --verbose: the lane's line
    kvf_check_grep "$(kvf_logfile "$name")" "receiver verified $total bytes" "copy $copy: the client saw every byte verified"
    kvf_check_verified srv "$total" "$before" 2 "copy $copy"
    if [[ $copy == *"--staging-handover on"* ]]; then  # the hand-over was used
      kvf_check_grep "$(kvf_logfile "$name")" "handed back on the GPUs" "copy $copy: slots handed back on the GPUs"
    fi
    if [[ $copy == adaptive* ]]; then  # both kinds of put where staging pays, only direct where not
      chose=$(grep -oE 'adaptive copies chose direct for [0-9]+ puts, staged for [0-9]+' "$(kvf_logfile "$name")" | tail -1)
      direct=$(awk '{print $6}' <<<"$chose") staged=${chose##* }
      if [[ $copy == *same-gpu* || $src != "$dst" ]]; then
        kvf_check test "${direct:-0}" -gt 0 -a "${staged:-0}" -gt 0 -- "copy $copy: puts both direct and staged ($chose)"
      else
        kvf_check test "${direct:-0}" -gt 0 -a "${staged:-1}" -eq 0 -- "copy $copy: one GPU, every put direct ($chose)"
      fi
    fi
  else
    kvf_check_fail "cuda_ipc stream with copy $copy failed: $(tail -3 "$(kvf_logfile "$name")")"
  fi
done

# A receiver that cannot give staging (its limit is below one sender's slots) refuses the
# request; the sender says why and copies directly, and every byte still arrives.
port2=$(kvf_free_port)
kvf_start_bg srv2 "$KVF_PERF" server --listen 127.0.0.1:$port2 --transport cuda_ipc --mem cuda:$dst --staging-limit 1M
kvf_wait_for_line srv2 'listening on ' 20 || kvf_die "second cuda_ipc server did not start: $(tail -3 "$(kvf_logfile srv2)")"
if kvf_run client-refused 120 "$KVF_PERF" client --connect 127.0.0.1:$port2 --transport cuda_ipc \
     --mem cuda:$src --mode layers --layers $LAYERS --blocks $BLOCKS --block-bytes $BLOCK_BYTES --shuffle \
     --verify --iters 2 --copy staged; then
  kvf_check_grep "$(kvf_logfile client-refused)" "offers no staging" "refused staging: the sender says it copies directly"
  kvf_check_grep "$(kvf_logfile client-refused)" "receiver verified $total bytes" "refused staging: every byte verified"
else
  kvf_check_fail "staged stream against a receiver without staging room failed: $(tail -3 "$(kvf_logfile client-refused)")"
fi
# The adaptive choice against the same receiver: its staged puts go direct too.
if kvf_run client-refused-adaptive 120 "$KVF_PERF" client --connect 127.0.0.1:$port2 --transport cuda_ipc \
     --mem cuda:$src --mode layers --layers $LAYERS --blocks $BLOCKS --block-bytes $BLOCK_BYTES --shuffle \
     --verify --iters 2 --copy adaptive --adaptive-same-gpu; then
  kvf_check_grep "$(kvf_logfile client-refused-adaptive)" "offers no staging" "refused staging, adaptive: the sender says it copies directly"
  kvf_check_grep "$(kvf_logfile client-refused-adaptive)" "receiver verified $total bytes" "refused staging, adaptive: every byte verified"
else
  kvf_check_fail "adaptive stream against a receiver without staging room failed: $(tail -3 "$(kvf_logfile client-refused-adaptive)")"
fi
kill -TERM "$(kvf_pid srv2)" 2>/dev/null; kvf_forget srv2

# Large unshuffled extents: the default sends them straight to the peer's memory on the copy
# engines.
before=$(kvf_count_lines srv '^stream [0-9]+ from ')
big_total=$(kvf_layers_bytes 4 8 1048576)
if kvf_run client-large 120 "$KVF_PERF" client --connect 127.0.0.1:$port --transport cuda_ipc --mem cuda:$src \
     --mode layers --layers 4 --blocks 8 --block-bytes 1M --verify --iters 2; then
  kvf_check_verified srv "$big_total" "$before" 2 "large extents, default copy"
else
  kvf_check_fail "cuda_ipc stream of large extents failed: $(tail -3 "$(kvf_logfile client-large)")"
fi

# Transport lists: a receiver offering cuda_ipc,ucx and a sender preferring nccl,cuda_ipc,ucx
# meet on cuda_ipc (the receiver offers no nccl), and the sender says so.
port3=$(kvf_free_port)
kvf_start_bg srv3 "$KVF_PERF" server --listen 127.0.0.1:$port3 --transport cuda_ipc,ucx --mem cuda:$dst
kvf_wait_for_line srv3 'listening on ' 20 || kvf_die "listing server did not start: $(tail -3 "$(kvf_logfile srv3)")"
if kvf_run client-list 120 "$KVF_PERF" client --connect 127.0.0.1:$port3 --transport nccl,cuda_ipc,ucx \
     --mem cuda:$src --mode layers --layers $LAYERS --blocks $BLOCKS --block-bytes $BLOCK_BYTES --shuffle \
     --verify --iters 2; then
  kvf_check_grep "$(kvf_logfile client-list)" "^transport: cuda_ipc" "lists: the first transport both offer (cuda_ipc) is chosen"
  kvf_check_grep "$(kvf_logfile client-list)" "receiver verified $total bytes" "lists: every byte verified"
else
  kvf_check_fail "stream between transport lists failed: $(tail -3 "$(kvf_logfile client-list)")"
fi
kill -TERM "$(kvf_pid srv3)" 2>/dev/null; kvf_forget srv3

# The host-staged path with GPU memory on both sides: the copy kernel gathers into pinned slots,
# UCX (tcp here, any host) carries them, the receiver's kernel scatters.
port4=$(kvf_free_port)
kvf_start_bg srv4 env UCX_TLS=tcp "$KVF_PERF" server --listen 127.0.0.1:$port4 --transport ucx_staged --mem cuda:$dst
kvf_wait_for_line srv4 'listening on ' 20 || kvf_die "ucx_staged server did not start: $(tail -3 "$(kvf_logfile srv4)")"
before=$(kvf_count_lines srv4 '^stream [0-9]+ from ')
if kvf_run client-staged-host 120 env UCX_TLS=tcp "$KVF_PERF" client --connect 127.0.0.1:$port4 \
     --transport ucx_staged --mem cuda:$src --mode layers --layers $LAYERS --blocks $BLOCKS \
     --block-bytes $BLOCK_BYTES --shuffle --verify --iters 2 --staging-bytes 1M; then
  kvf_check_verified srv4 "$total" "$before" 2 "ucx_staged, GPU to GPU through host slots"
else
  kvf_check_fail "ucx_staged GPU stream failed: $(tail -3 "$(kvf_logfile client-staged-host)")"
fi
llama_total=$(kvf_layers_bytes 32 512 32768)
# Llama-3-8B-sized ucx_staged senders, one after another, into server $1 on port $2; each must have
# every byte verified. $3: the senders' log name, $4: what the check says, $5: sender numbers, the
# rest: the senders' environment.
staged_llama_senders() {
  local server=$1 port=$2 log=$3 what=$4 senders=$5 n before
  shift 5
  for n in $senders; do
    before=$(kvf_count_lines "$server" '^stream [0-9]+ from ')
    if kvf_run "$log$n" 120 env "$@" "$KVF_PERF" client --connect "127.0.0.1:$port" \
         --transport ucx_staged --mem cuda:$src --mode layers --layers 32 --blocks 512 --block-bytes 32K \
         --shuffle --verify --iters 2; then
      kvf_check_verified "$server" "$llama_total" "$before" 2 "$what, sender $n"
    else
      kvf_check_fail "$what: sender $n failed: $(tail -3 "$(kvf_logfile "$log$n")")"
    fi
  done
}
# Senders one after another, with the Llama-3-8B-sized request and default slots: each one's
# pinned slots are unregistered before they are freed. (They stayed registered once, and the
# receiver's next 1 GiB cudaMalloc failed with cudaErrorAlreadyMapped.)
staged_llama_senders srv4 "$port4" client-staged-host "ucx_staged over tcp after the others left" "2 3" UCX_TLS=tcp
kill -TERM "$(kvf_pid srv4)" 2>/dev/null; kvf_forget srv4
# The same with UCX's default transports (shared memory on one host): UCX's cuda_copy domain then
# page-locks the slots it maps itself, once the receiver's thread has a CUDA context, so every
# sender after the first used to be refused ("already registered"). The receiver uses UCX's pin.
port5=$(kvf_free_port)
kvf_start_bg srv5 "$KVF_PERF" server --listen 127.0.0.1:$port5 --transport ucx_staged --mem cuda:$dst
kvf_wait_for_line srv5 'listening on ' 20 || kvf_die "ucx_staged server (default UCX_TLS) did not start: $(tail -3 "$(kvf_logfile srv5)")"
staged_llama_senders srv5 "$port5" client-staged-shm "ucx_staged over UCX's default transports" "1 2 3"
kill -TERM "$(kvf_pid srv5)" 2>/dev/null; kvf_forget srv5

# A ucx sender against the cuda_ipc receiver is refused with the reason.
if kvf_run mismatch 60 "$KVF_PERF" client --connect 127.0.0.1:$port --mode layers --layers 2 --blocks 4 \
     --block-bytes 4K --iters 1; then
  kvf_check_fail "a ucx sender was accepted by a cuda_ipc receiver"
else
  kvf_check_grep "$(kvf_logfile mismatch)" "runs the cuda_ipc transport and the sender offers ucx" "transport mismatch refused clearly"
fi
kvf_check kvf_alive srv -- "the receiver survives the refused sender"
kvf_run after 60 "$KVF_PERF" client --connect 127.0.0.1:$port --transport cuda_ipc --mem cuda:$src --mode layers \
  --layers 4 --blocks 16 --block-bytes 16K --shuffle --verify --iters 1
kvf_check_eq "$?" 0 "a verified stream after the refused sender: exit status"

# A receiver killed mid staged stream with the hand-over on (the sender's copies may be waiting
# on the GPU for a hand-over that never comes) fails the sender too, without a hang.
port5=$(kvf_free_port)
kvf_start_bg srv5 "$KVF_PERF" server --listen 127.0.0.1:$port5 --transport cuda_ipc --mem cuda:$dst
kvf_wait_for_line srv5 'listening on ' 20 || kvf_die "fifth cuda_ipc server did not start: $(tail -3 "$(kvf_logfile srv5)")"
(sleep 2; kill -9 "$(kvf_pid srv5)") &
killer=$!
start=$(kvf_now_ms)
kvf_run killed-staged 90 "$KVF_PERF" client --connect 127.0.0.1:$port5 --transport cuda_ipc --mem cuda:$src \
  --mode layers --layers 32 --blocks 512 --block-bytes 32K --iters 400 --timeout-ms 5000 --copy staged \
  --staging-handover on
rc=$?
wait "$killer" 2>/dev/null
kvf_forget srv5
kvf_check test "$rc" != 0 -a "$rc" != 124 -- "receiver killed mid staged stream -> the sender fails (rc $rc) after $(( ($(kvf_now_ms) - start) / 1000 )) s, no hang: $(tail -1 "$(kvf_logfile killed-staged)")"

# The receiver dies mid-stream: the sender reports an error within its timeout.
(sleep 2; kill -9 "$(kvf_pid srv)") &
killer=$!
start=$(kvf_now_ms)
kvf_run killed 90 "$KVF_PERF" client --connect 127.0.0.1:$port --transport cuda_ipc --mem cuda:$src \
  --mode layers --layers 32 --blocks 512 --block-bytes 32K --iters 400 --timeout-ms 5000
rc=$?
wait "$killer" 2>/dev/null
kvf_forget srv
kvf_check test "$rc" != 0 -a "$rc" != 124 -- "receiver killed mid-stream -> the sender fails (rc $rc) after $(( ($(kvf_now_ms) - start) / 1000 )) s, no hang: $(tail -1 "$(kvf_logfile killed)")"
kvf_finish
