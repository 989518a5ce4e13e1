#!/usr/bin/env bash
# The kvfabric Python module against a real kvfabricd: one Python KvConnector stores a 300-token
# prompt's 4 full chunks from its host blocks (a random pattern, every layer saved, wait_for_save);
# a second connector with other block ids finds 256 tokens, loads them (update_state_after_alloc,
# start_load_kv, wait_for_layer_load, wait_for_load) and every byte matches, the blocks past the
# prefix untouched. Skipped (77) when the module was not built (no pybind11).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init store_connector_python 120
pydir=$(cd "$KVF_BIN/.." && pwd)/python
[[ -f $pydir/python-executable ]] || kvf_skip "the kvfabric Python module was not built (no $pydir/python-executable: pybind11 not found?)"
python=$(<"$pydir/python-executable")
sock=$KVF_TMP/store.sock
kvf_start_connector_daemon d store-connector-python-test "$sock"

kvf_run py 60 env PYTHONPATH="$pydir" "$python" "$KVF_SOURCE/tests/python/test_kv_connector.py" --store-socket "$sock"
kvf_check_eq "$?" 0 "Python connector A stores, B loads into other blocks: $(tail -n1 "$(kvf_logfile py)")"
kvf_check_grep "$(kvf_logfile py)" "^ok: B's 16 loaded blocks hold A's bytes" "every loaded byte matches"
kvf_check kvf_alive d -- "daemon alive at the end"
kvf_finish
