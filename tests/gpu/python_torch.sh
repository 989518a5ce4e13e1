#!/usr/bin/env bash
# The kvfabric Python module with torch CUDA tensors as the KV caches (tests/python/test_kv_connector_torch.py):
# PD between a prefill process on cuda:0 and a decode process on cuda:1 (cuda:0 with one GPU), each
# layer saved with the engine's CUDA stream and never synchronized, every byte checked on the decode
# side; then a store round trip GPU -> kvfabricd -> GPU through a daemon started here. Skips (77)
# where there is no GPU, torch with CUDA is not installed for the module's interpreter, or the
# module was not built (or was built without CUDA).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../integration/lib.sh"
kvf_init python_torch 420
pydir=$(cd "$KVF_BIN/.." && pwd)/python
[[ -f $pydir/python-executable ]] || kvf_skip "the kvfabric Python module was not built (no $pydir/python-executable: pybind11 not found?)"
python=$(<"$pydir/python-executable")
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
((gpus >= 1)) || kvf_skip "no GPU (nvidia-smi lists none)"
"$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1 ||
  kvf_skip "torch with CUDA is not installed for $python (pip install torch)"

store_env=()
if [[ -x $KVF_BIN/kvfabricd ]]; then
  sock=$KVF_TMP/store.sock
  kvf_start_connector_daemon d python-torch-test "$sock"
  store_env=(KVF_TORCH_STORE_SOCKET="$sock")
else
  kvf_log "no $KVF_BIN/kvfabricd: the store part is skipped"
fi

kvf_run torch 360 env PYTHONPATH="$pydir" "${store_env[@]}" "$python" "$KVF_SOURCE/tests/python/test_kv_connector_torch.py"
rc=$?
log=$(kvf_logfile torch)
((rc == 77)) && kvf_skip "$(grep -m1 '^SKIP' "$log")"
sed 's/^/    | /' "$log"
kvf_check_eq "$rc" 0 "the torch test: $(tail -n1 "$log")"
kvf_check_grep "$log" "^ok: request 1 .*every byte of its 19 blocks arrived" "PD on a side stream: every byte arrived"
kvf_check_grep "$log" "^ok: request 2 .*every byte of its 2 blocks arrived" "PD on the default stream: every byte arrived"
if ((${#store_env[@]})); then
  kvf_check_grep "$log" "^ok: store B: its 16 loaded GPU blocks hold A's bytes" "store round trip GPU -> kvfabricd -> GPU"
  kvf_check kvf_alive d -- "daemon alive at the end"
fi
kvf_finish
