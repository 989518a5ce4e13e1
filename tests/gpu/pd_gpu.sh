#!/usr/bin/env bash
# Prefill/decode disaggregation on the GPU reference engine, as an operator runs it: two
# kvfabric-engine processes serve a topology's engines (prefill on cuda:0, decode on cuda:1; one GPU
# for both when there is only one), and kvfabric-pd-demo, the PD proxy, sends each prompt to the
# prefill engine, whose engine connector streams every layer's KV GPU to GPU over cuda_ipc (NVLink)
# into the decode engine's own poisoned pool, each layer once the CUDA event recorded after its K/V
# writes has passed, while the prefill computes on; the decode engine continues from the first
# token. For prompts that are and are not whole 16-token blocks and 256-token chunks, streamed and
# sent after the prefill, the tokens must equal exactly what the prefill engine gives alone. A
# prefill engine with other weights must be told apart (the comparison can fail). Skips (77)
# where there is no GPU or the engine was built without CUDA.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../integration/lib.sh"
kvf_init pd_gpu 300
ENGINE=$KVF_BIN/kvfabric-engine DEMO=$KVF_BIN/kvfabric-pd-demo
[[ -x $ENGINE && -x $DEMO ]] || kvf_skip "kvfabric-engine or kvfabric-pd-demo is not built"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
((gpus >= 1)) || kvf_skip "no GPU (nvidia-smi lists none)"
src=0 dst=$((gpus >= 2 ? 1 : 0))
gpu_list=$src; ((dst != src)) && gpu_list="$src, $dst"
kvf_log "GPUs: $gpus; prefill on cuda:$src, decode on cuda:$dst"

# write_topology FILE PORT PORT PORT: the tiny model's layout, so the GPU engines run the tiny shape (fast).
write_topology() {
  cat >"$1" <<YAML
cluster: pd-gpu
transports:
  preference: [cuda_ipc, ucx]
models:
  - name: tiny
    layout: {kind: flash_attention, layers: 4, kv_heads: 2, head_dim: 32, dtype: bf16, block_tokens: 16, blocks: 512}
    chunk_tokens: 256
nodes:
  - {name: gpu-host, address: 127.0.0.1, control_port: $(kvf_free_port), http_port: $(kvf_free_port), gpus: [$gpu_list]}
engines:
  - {name: prefill0, node: gpu-host, role: prefill, model: tiny, gpu: $src, port: $2}
  - {name: decode0, node: gpu-host, role: decode, model: tiny, gpu: $dst, port: $3}
  - {name: prefill1, node: gpu-host, role: prefill, model: tiny, gpu: $src, port: $4}
YAML
}
topo=$KVF_TMP/topology.yaml
write_topology "$topo" "$(kvf_free_port)" "$(kvf_free_port)" "$(kvf_free_port)"
kvf_start_bg decode "$ENGINE" --topology "$topo" --engine decode0
kvf_start_bg prefill "$ENGINE" --topology "$topo" --engine prefill0
for e in decode prefill; do
  kvf_wait_for_line $e ' serving on |kvfabric-engine' 120 || kvf_die "$e engine did not start: $(tail -3 "$(kvf_logfile $e)")"
  grep -q 'built without CUDA' "$(kvf_logfile $e)" && kvf_skip "kvfabric-engine was built without CUDA"
  grep -q ' serving on ' "$(kvf_logfile $e)" || kvf_die "$e engine failed: $(tail -3 "$(kvf_logfile $e)")"
done
kvf_check_grep "$(kvf_logfile decode)" "on cuda:$dst, model tiny\) serving on .*KV port" "the decode engine runs on cuda:$dst"

id=1
for n in 1 15 16 17 100 256 257 1000; do
  if kvf_run "demo-$n" 120 "$DEMO" --topology "$topo" --prompt-tokens "$n" --new 8 --prompt-seed $((n + 3)) \
       --first-id $id --requests 2 --compare; then
    kvf_check_grep "$(kvf_logfile "demo-$n")" "every request gave exactly the tokens one engine gives" \
      "$n-token prompts over cuda_ipc: PD tokens equal one engine's (2 requests)"
  else
    kvf_check_fail "$n-token prompts: $(tail -3 "$(kvf_logfile "demo-$n")")"
  fi
  id=$((id + 2))
done
if kvf_run demo-after 120 "$DEMO" --topology "$topo" --prompt-tokens 300 --new 8 --first-id $id --compare --no-stream; then
  kvf_check_grep "$(kvf_logfile demo-after)" "every request gave exactly" "--no-stream: the same tokens"
else
  kvf_check_fail "--no-stream: $(tail -3 "$(kvf_logfile demo-after)")"
fi
id=$((id + 1))

# A prefill engine with other weights (seed 2): the decode engine continues KV it cannot have
# computed, and the tokens must differ from what that prefill engine gives alone.
kvf_start_bg prefill1 "$ENGINE" --topology "$topo" --engine prefill1 --seed 2
kvf_wait_for_line prefill1 ' serving on ' 120 || kvf_die "prefill1 did not start: $(tail -3 "$(kvf_logfile prefill1)")"
kvf_run demo-wrong 120 "$DEMO" --topology "$topo" --prefill prefill1 --decode decode0 --prompt-tokens 40 --new 8 \
  --first-id $id --compare
kvf_check test "$?" = 1 -- "KV from other weights: the proxy reports other tokens (the check can fail)"
kvf_check_grep "$(kvf_logfile demo-wrong)" "DIFFERENT TOKENS" "the mismatch is named"
kvf_check kvf_alive decode -- "the decode engine still serves"
kvf_finish
