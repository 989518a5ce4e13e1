#!/usr/bin/env python3
"""The kvfabric Python module's KvConnector without a store: register host caches (ctypes buffers
passed by address, as a torch engine passes tensor.data_ptr()), a lookup that matches nothing, the
step flow (update, save every layer, finish), and the misuse errors: each raises kvfabric.Error with
the right code name and a message, and the connector keeps serving after each. The wait_* calls
release the GIL (a second thread runs while one waits).

Run: PYTHONPATH=<build>/python python3 tests/python/test_kv_connector.py
Exits 77 (ctest: skipped), saying why, when the module is not built.

With a store (--store-socket SOCKET, tests/integration/store_connector_python.sh starts the
daemon): one connector stores a prompt's prefix from its blocks, a second one loads it into other
blocks, and the bytes match.
"""
import argparse
import ctypes
import os
import random
import sys
import threading

SKIP = 77

try:
    import kvfabric
except ImportError as e:  # the module was not built (no pybind11) or PYTHONPATH does not name it
    reason = os.environ.get("KVF_PYTHON_SKIP") or f"cannot import kvfabric ({e}); PYTHONPATH={os.environ.get('PYTHONPATH', '')}"
    print(f"SKIP (python_kv_connector): {reason}")
    sys.exit(SKIP)

failures = 0


def check(cond, what):
    global failures
    print(("ok: " if cond else "FAIL: ") + what)
    if not cond:
        failures += 1


def check_error(fn, code_name, what):
    """fn() raises kvfabric.Error with code_name and a non-empty message."""
    try:
        fn()
    except kvfabric.Error as e:
        good = e.code_name == code_name and bool(e.message) and kvfabric.error_code_name(e.code) == code_name
        check(good, f"{what}: {e.code_name} ({e.code}): {e.message!r}")
        return
    except Exception as e:  # noqa: BLE001 - any other exception is a failure of the check
        check(False, f"{what}: raised {type(e).__name__}: {e}, want kvfabric.Error {code_name}")
        return
    check(False, f"{what}: no error, want kvfabric.Error {code_name}")


class HostCaches:
    """One ctypes buffer per layer, as an engine's paged KV cache (addresses by ctypes.addressof)."""

    def __init__(self, layout):
        self.layout = layout
        self.buffers = [(ctypes.c_uint8 * layout.layer_bytes)() for _ in range(layout.num_layers)]
        self.addresses = [ctypes.addressof(b) for b in self.buffers]

    def block(self, layer, block):
        """The bytes of one block of one layer (all its parts), as the layout places them."""
        n = self.layout.block_bytes
        if self.layout.kind == "flash_attention":  # [2, num_blocks, ...]: K then V planes
            half = n // 2
            k = bytes(self.buffers[layer][block * half:(block + 1) * half])
            vbase = self.layout.num_blocks * half
            return k + bytes(self.buffers[layer][vbase + block * half:vbase + (block + 1) * half])
        return bytes(self.buffers[layer][block * n:(block + 1) * n])

    def fill_block(self, layer, block, rng):
        n = self.layout.block_bytes
        half = n // 2
        vbase = self.layout.num_blocks * half
        for base in (block * half, vbase + block * half):
            data = rng.randbytes(half)
            ctypes.memmove(self.addresses[layer] + base, data, half)


def test_without_store():
    layout = kvfabric.LayoutDesc(kind="flash_attention", num_layers=3, num_blocks=32, block_tokens=16,
                                 kv_heads=2, head_dim=64, dtype_bytes=2)
    check(layout.layer_bytes == 2 * 32 * 16 * 2 * 64 * 2, f"LayoutDesc.layer_bytes {layout.layer_bytes}")
    caches = HostCaches(layout)
    prompt = [1000 + 7 * i for i in range(100)]

    check_error(lambda: kvfabric.KvConnector("py-test", memory="nowhere"), "invalid_argument", "a bad memory kind")
    check_error(lambda: kvfabric.KvConnector("py-test", chunk_tokens=0), "invalid_argument", "chunk_tokens 0")
    c = kvfabric.KvConnector("py-test", chunk_tokens=32, memory="host")
    check(c.num_layers == 0, "num_layers is 0 before registering")
    check_error(lambda: c.get_num_new_matched_tokens(1, prompt, 0), "invalid_argument", "lookup before registering")

    # Registering: bad layouts (both forms), then a dict, then twice.
    check_error(lambda: c.register_kv_caches({"num_layers": 3}, caches.addresses), "invalid_argument",
                "a dict layout with fields missing")
    check_error(lambda: c.register_kv_caches({"kind": "flash_attention", "num_layers": 3, "num_blocks": 32,
                                              "block_tokens": 16, "kv_heads": 2, "head_dim": 64,
                                              "dtype_bytes": 2, "typo": 1}, caches.addresses),
                "invalid_argument", "a dict layout with an unknown key")
    check_error(lambda: c.register_kv_caches({"kind": "paged", "num_layers": 3, "num_blocks": 32, "block_tokens": 16,
                                              "kv_heads": 2, "head_dim": 64, "dtype_bytes": 2}, caches.addresses),
                "invalid_argument", "a dict layout of an unknown kind")
    check_error(lambda: c.register_kv_caches(42, caches.addresses), "invalid_argument", "a layout that is an int")
    check_error(lambda: c.register_kv_caches(layout, caches.addresses[:2]), "invalid_argument",
                "too few layer buffers")
    check_error(lambda: c.register_kv_caches(layout, [caches.addresses[0], 0, caches.addresses[2]]),
                "invalid_argument", "a null layer buffer")
    as_dict = {"kind": "flash_attention", "num_layers": 3, "num_blocks": 32, "block_tokens": 16, "kv_heads": 2,
               "head_dim": 64, "dtype_bytes": 2}
    c.register_kv_caches(as_dict, caches.addresses)
    check(c.num_layers == 3, f"registered from a dict: num_layers {c.num_layers}")
    check_error(lambda: c.register_kv_caches(layout, caches.addresses), "invalid_argument", "register twice")

    # The step flow: lookup (nothing without a store), blocks, no load, every layer saved, finished.
    blocks1 = [3, 9, 4, 20, 11, 5, 30]
    check(c.get_num_new_matched_tokens(1, prompt, 0) == 0, "no store: the lookup matches nothing")
    c.update_state_after_alloc(1, blocks1, 0)
    c.start_load_kv()
    c.wait_for_load(1)
    for layer in range(3):
        c.wait_for_layer_load(layer)
        c.save_kv_layer(1, layer)
    c.wait_for_save()
    check(c.progress(1)["layers_saved"] == 3, f"progress: {c.progress(1)}")
    check(c.request_finished(1) is False, "nothing pending: free the blocks now")
    check(c.get_finished() == ([], []), "get_finished: nothing")
    check(c.get_block_ids_with_load_errors() == [], "no load errors")

    # Misuse: the right code, a message, and the connector serves on.
    c.get_num_new_matched_tokens(2, prompt, 0)
    c.update_state_after_alloc(2, [0, 1, 2, 6, 7, 8, 10], 0)
    check_error(lambda: c.save_kv_layer(12345, 0), "not_found", "save for an unknown request")
    check_error(lambda: c.wait_for_load(12345), "not_found", "wait_for_load for an unknown request")
    check_error(lambda: c.request_finished(1), "not_found", "finish a forgotten request")
    c.save_kv_layer(2, 0)
    check_error(lambda: c.save_kv_layer(2, 3), "invalid_argument", "a layer out of range")
    check_error(lambda: c.wait_for_layer_load(3), "invalid_argument", "wait_for_layer_load out of range")
    c.save_kv_layer(2, 1)
    check_error(lambda: c.save_kv_layer(2, 1), "invalid_argument", "a layer saved twice")
    c.save_kv_layer(2, 2)
    c.wait_for_save()
    check(c.progress(2)["layers_saved"] == 3, "the connector served on between the errors")

    c.get_num_new_matched_tokens(3, prompt, 0)
    c.update_state_after_alloc(3, blocks1, 0)
    c.abort(3)
    check_error(lambda: c.save_kv_layer(3, 0), "aborted", "save after abort")
    check_error(lambda: c.wait_for_load(3), "aborted", "wait_for_load after abort")
    check_error(lambda: c.get_num_new_matched_tokens(3, prompt, 0), "aborted", "lookup after abort")
    check(c.request_finished(3) is False, "an aborted request is forgotten at finish")
    check(c.request_finished(2) is False, "request 2 finishes")
    check_error(lambda: c.get_num_new_matched_tokens(4, prompt, 101), "invalid_argument",
                "more computed tokens than the prompt")
    check_error(lambda: c.update_state_after_alloc(4, [1, 2], 0), "not_found", "update for an unknown request")

    # kvfabric.Error is an Exception; str() names the code.
    try:
        c.save_kv_layer(999, 0)
    except Exception as e:  # noqa: BLE001
        check(isinstance(e, kvfabric.Error) and str(e).startswith("not_found: "), f"str(Error) = {str(e)!r}")

    # The wait_* calls release the GIL: a Python thread runs while they are called in a loop.
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    for _ in range(2000):
        c.wait_for_save()
        c.wait_for_layer_load(0)
    stop.set()
    t.join()
    check(counter[0] > 0, f"another thread ran while waiting ({counter[0]} spins)")

    # A whole request again after all of it.
    c.get_num_new_matched_tokens(5, prompt, 0)
    c.update_state_after_alloc(5, blocks1, 0)
    for layer in range(3):
        c.save_kv_layer(5, layer)
    c.wait_for_save()
    check(c.request_finished(5) is False, "request 5, after every error, went through")
    del c


def test_with_store(socket):
    """Connector A stores a prompt's prefix; connector B (other blocks) loads it; the bytes match.
    The layout is the daemon's model "m" (tests/integration/lib.sh kvf_start_connector_daemon)."""
    layout = kvfabric.LayoutDesc(kind="flash_attention", num_layers=4, num_blocks=64, block_tokens=16,
                                 kv_heads=2, head_dim=64, dtype_bytes=2)
    rng = random.Random(20261130)
    prompt = [rng.randrange(32000) for _ in range(300)]  # 4 full chunks of 64 = 256 tokens, 19 blocks
    blocks_a = rng.sample(range(64), 19)
    blocks_b = rng.sample(range(64), 19)

    a_caches, b_caches = HostCaches(layout), HostCaches(layout)
    a = kvfabric.KvConnector("m", chunk_tokens=64, store_socket=socket, memory="host")
    a.register_kv_caches(layout, a_caches.addresses)
    b = kvfabric.KvConnector("m", chunk_tokens=64, store_socket=socket, memory="host")
    b.register_kv_caches(layout, b_caches.addresses)

    # A: a fresh prompt matches nothing; it computes (a random pattern) and saves every layer.
    check(a.get_num_new_matched_tokens(1, prompt, 0) == 0, "A: the store does not hold the prompt yet")
    a.update_state_after_alloc(1, blocks_a, 0)
    a.start_load_kv()
    for layer in range(4):
        for blk in blocks_a:
            a_caches.fill_block(layer, blk, rng)
        a.save_kv_layer(1, layer)
    a.wait_for_save()
    check(a.progress(1)["chunks_stored"] == 4, f"A stored 4 chunks: {a.progress(1)}")
    later = a.request_finished(1)
    if later:
        sending, _ = a.get_finished()
        check(1 in sending, "A: the request is listed as sending once its save is done")

    # B: a lookup matches the 4 chunks; it loads them into its own blocks.
    matched = b.get_num_new_matched_tokens(7, prompt, 0)
    check(matched == 256, f"B: the store gives 256 tokens (got {matched})")
    b.update_state_after_alloc(7, blocks_b, matched)
    b.start_load_kv()
    for layer in range(4):
        b.wait_for_layer_load(layer)
    b.wait_for_load(7)
    check(b.progress(7)["loaded_tokens"] == 256, f"B loaded 256 tokens: {b.progress(7)}")
    check(b.get_block_ids_with_load_errors() == [], "B: no load errors")
    _, receiving = b.get_finished()
    check(7 in receiving, "B: the load is listed as received")
    same = all(a_caches.block(layer, blocks_a[i]) == b_caches.block(layer, blocks_b[i])
               for layer in range(4) for i in range(16))
    check(same, "B's 16 loaded blocks hold A's bytes, every layer")
    untouched = all(b_caches.block(layer, blocks_b[i]) == bytes(layout.block_bytes)
                    for layer in range(4) for i in range(16, 19))
    check(untouched, "B's blocks past the loaded prefix are untouched")
    b.request_finished(7)
    # A prompt that differs from the first token on matches nothing.
    other = [(t + 1) % 32000 for t in prompt]
    check(b.get_num_new_matched_tokens(8, other, 0) == 0, "another prompt matches nothing")
    del a, b


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--store-socket", help="a kvfabricd's store socket: run the store test instead")
    args = parser.parse_args()
    if args.store_socket:
        test_with_store(args.store_socket)
    else:
        test_without_store()
    if failures:
        print(f"{failures} check(s) FAILED")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
