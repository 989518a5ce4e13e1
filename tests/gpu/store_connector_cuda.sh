#!/usr/bin/env bash
# The store connector's GPU path between real engine processes through a real kvfabricd: engines
# whose paged KV pools are cudaMalloc'd GPU memory (kvfabric-connector-check --mem cuda:N) store a
# 1000-token prompt's chunks from shuffled GPU blocks into the store arena and load them into
# POISONED, differently SHUFFLED GPU blocks of another process (all layers at once, and layer by
# layer with each layer checked when it is reported), every byte compared through a host mirror
# and nothing outside the loaded blocks changed; chunks cross between host and GPU engines both
# ways (one byte order in the store); a prompt sharing 320 tokens loads exactly the shared chunks;
# a chunk corrupted inside the arena is refused (kVerifyFailed) by GPU and host engines alike, with
# every block still poisoned. With two GPUs the storing and loading engines use different GPUs.
# Skips (77) where there is no GPU.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../integration/lib.sh"
kvf_init store_connector_cuda 300
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
((gpus >= 1)) || kvf_skip "no GPU (nvidia-smi lists none)"
g0=0 g1=$((gpus >= 2 ? 1 : 0))
kvf_log "GPUs: $gpus; storing engines on cuda:$g0, loading engines on cuda:$g1"
check=$KVF_BIN/kvfabric-connector-check
sock=$KVF_TMP/store.sock
kvf_start_connector_daemon d store-connector-cuda-test "$sock"

# engine NAME COMMAND ARGS...: one engine process (1000 tokens = 15 full chunks of 64; a chunk =
# 4 layers x 4 blocks x K,V x 4 KiB = 128 KiB).
engine() { kvf_run "$1" 120 "$check" "${@:2}" --socket "$sock" --tokens 1000; }
last() { tail -n1 "$(kvf_logfile "$1")"; }

# GPU -> store -> GPU.
engine gstore store --seed 42 --table-seed 1 --mem cuda:$g0
kvf_check_eq "$?" 0 "GPU engine A stores the prompt from GPU blocks: $(last gstore)"
kvf_check_grep "$(kvf_logfile gstore)" "^store: 15 chunks stored, 0 already stored, 1966080 bytes" "15 full chunks of 128 KiB from GPU memory"
engine gload load --seed 42 --table-seed 2 --mem cuda:$g1 --expect-tokens 960
kvf_check_eq "$?" 0 "GPU engine B loads into poisoned, shuffled GPU blocks: $(last gload)"
kvf_check_grep "$(kvf_logfile gload)" "every block verified.*\(GPU $g1 memory\)" "every loaded byte checked in GPU memory, the rest still poisoned"
engine glayers load --seed 42 --table-seed 5 --mem cuda:$g1 --layers --expect-tokens 960
kvf_check_eq "$?" 0 "GPU engine C loads layer by layer: $(last glayers)"
kvf_check_grep "$(kvf_logfile glayers)" "layers reported in order as each completed" "each GPU layer complete when reported, in order"
engine gshared load --seed 42 --table-seed 6 --mem cuda:$g1 --diverge-after 320 --expect-tokens 320
kvf_check_eq "$?" 0 "a prompt sharing 320 tokens loads exactly the 5 shared chunks into GPU blocks: $(last gshared)"
engine gagain store --seed 42 --table-seed 3 --mem cuda:$g0
kvf_check_grep "$(kvf_logfile gagain)" "^store: 0 chunks stored, 15 already stored" "storing it again from the GPU stores nothing new"

# GPU-stored chunks -> a host engine; host-stored chunks -> GPU engines.
engine hload load --seed 42 --table-seed 7 --expect-tokens 960
kvf_check_eq "$?" 0 "a host engine loads what the GPU engine stored: $(last hload)"
engine hstore store --seed 43 --table-seed 8
kvf_check_eq "$?" 0 "a host engine stores another prompt: $(last hstore)"
engine ghload load --seed 43 --table-seed 9 --mem cuda:$g1 --expect-tokens 960
kvf_check_eq "$?" 0 "a GPU engine loads what the host engine stored: $(last ghload)"
engine ghlayers load --seed 43 --table-seed 10 --mem cuda:$g0 --layers --expect-tokens 960
kvf_check_eq "$?" 0 "the same, layer by layer: $(last ghlayers)"

# A chunk corrupted in the arena: an error, never its bytes.
engine cstore store --seed 44 --table-seed 11 --mem cuda:$g0
kvf_check_eq "$?" 0 "GPU engine stores a third prompt: $(last cstore)"
engine corrupt corrupt --seed 44 --chunk 3
kvf_check_eq "$?" 0 "one byte of its chunk 3 flipped inside the arena: $(last corrupt)"
engine cgload load --seed 44 --table-seed 12 --mem cuda:$g1 --expect-fail
kvf_check_eq "$?" 0 "GPU engine: the corrupt chunk is refused and every block stays poisoned: $(last cgload)"
kvf_check_grep "$(kvf_logfile cgload)" "load refused: .*does not match its checksum" "the refusal names the checksum"
engine cglayers load --seed 44 --table-seed 13 --mem cuda:$g1 --layers --expect-fail
kvf_check_eq "$?" 0 "the same, layer by layer: $(last cglayers)"
engine chload load --seed 44 --table-seed 14 --expect-fail
kvf_check_eq "$?" 0 "host engine: refused likewise: $(last chload)"
# Compressed entries (the daemon's /compress) loaded into GPU blocks: fixed-rate codecs decoded by
# the GPU straight from the pinned arena into the blocks, zstd on the CPU through pinned scratch;
# every byte equal to what the CPU codec makes of the stored chunk. KV-like data (finite bf16): the
# other prompts' random bytes are refused by the lossy codecs and reported as failed.
port=${KVF_PORT[d]}
compress() {
  curl -s -o "$KVF_TMP/reply.json" -w '%{http_code}' -H 'Content-Type: application/json' \
    -X POST "http://127.0.0.1:$port/compress" -d "{\"all\": true, \"codec\": \"$1\"}"
}
clear_all() { curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
  -X POST "http://127.0.0.1:$port/clear" -d '{"all": true}'; }
# Each codec starts from the raw chunks (a lossy codec re-encoding another's output would not be
# what the checker computes): clear, store raw, compress, load twice.
for codec in int8 int4 fp8; do
  kvf_check_eq "$(clear_all)" 200 "store cleared before $codec"
  engine "s$codec" store --seed 45 --table-seed 15 --mem cuda:$g0 --finite
  kvf_check_eq "$?" 0 "GPU engine stores a KV-like prompt raw: $(last "s$codec")"
  kvf_check_eq "$(compress $codec)" 200 "POST /compress $codec: $(cat "$KVF_TMP/reply.json")"
  kvf_check_grep "$KVF_TMP/reply.json" '"compressed":15' "its 15 chunks re-encoded to $codec"
  engine "z$codec" load --seed 45 --table-seed 16 --mem cuda:$g1 --finite --codec $codec --expect-tokens 960
  kvf_check_eq "$?" 0 "GPU engine loads $codec chunks decoded by the GPU into its blocks: $(last "z$codec")"
  engine "zl$codec" load --seed 45 --table-seed 17 --mem cuda:$g1 --finite --codec $codec --layers --expect-tokens 960
  kvf_check_eq "$?" 0 "the same, layer by layer: $(last "zl$codec")"
done
# zstd is lossless: from fp8 it keeps exactly fp8's result.
kvf_check_eq "$(compress zstd)" 200 "POST /compress zstd (from fp8): $(cat "$KVF_TMP/reply.json")"
engine zzstd load --seed 45 --table-seed 18 --mem cuda:$g1 --finite --codec fp8 --expect-tokens 960
kvf_check_eq "$?" 0 "zstd chunks (CPU-decoded into pinned scratch) equal the fp8 result exactly: $(last zzstd)"
kvf_check kvf_alive d -- "daemon alive at the end"
kvf_finish
