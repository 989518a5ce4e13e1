#!/usr/bin/env python3
"""The kvfabric Python module's KvConnector without a store: register host caches (ctypes buffers
passed by address, as a torch engine passes tensor.data_ptr()), a lookup that matches nothing, the
step flow (update, save every layer, finish), and the misuse errors: each raises kvfabric.Error with
the right code name and a message, and the connector keeps serving after each. The wait_* calls
release the GIL (a second thread runs while one waits).

Then PD on host memory: a prefill and a decode connector in this process over UCX on loopback, the
decode side's block manager in Python callables (called on the connector's threads, each taking
the GIL while the main thread waits in wait_for_send without it): random bytes land in poisoned
decode blocks from one allocation (numpy arrays; ctypes when numpy is missing), every byte and the
context checked, nothing else touched; an abort, refusals by the block manager (None, an exception,
a wrong type, blocks out of range) and the PD misuse errors.

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
import time

SKIP = 77

try:
    import numpy as np
except ImportError:
    np = None
if os.environ.get("KVF_TEST_NO_NUMPY"):  # to run the ctypes path where numpy is installed
    np = None

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


class ContiguousPool:
    """An engine's paged KV cache in one allocation, layer l at address + l * layer_bytes (what PD
    needs): a numpy array [num_layers, layer_bytes], or a ctypes array where numpy is missing."""

    def __init__(self, layout):
        self.layout = layout
        size = layout.num_layers * layout.layer_bytes
        if np is not None:
            self.array = np.zeros((layout.num_layers, layout.layer_bytes), dtype=np.uint8)
            self.address = self.array.ctypes.data
            self.mem = memoryview(self.array.reshape(-1))
        else:
            self.buffer = (ctypes.c_uint8 * size)()
            self.address = ctypes.addressof(self.buffer)
            self.mem = memoryview(self.buffer).cast("B")
        self.addresses = [self.address + layer * layout.layer_bytes for layer in range(layout.num_layers)]

    def fill_random(self, seed):
        size = len(self.mem)
        if np is not None:
            self.array[:] = np.random.default_rng(seed).integers(0, 256, size=self.array.shape, dtype=np.uint8)
        else:
            self.mem[:] = random.Random(seed).randbytes(size)

    def poison(self, value):
        self.mem[:] = bytes([value]) * len(self.mem)

    def part(self, layer, block, part):
        """The bytes of K (part 0) or V (part 1) of one block of one layer (flash_attention: all K
        blocks of a layer, then all V blocks)."""
        n = self.layout.block_bytes // 2
        base = layer * self.layout.layer_bytes + (part * self.layout.num_blocks + block) * n
        return bytes(self.mem[base:base + n])


class BlockManager:
    """The decode engine's block manager: a shuffled free list. mode picks what allocate_blocks does,
    for the refusal cases."""

    def __init__(self, num_blocks, rng):
        self.free = list(range(num_blocks))
        rng.shuffle(self.free)
        self.num_blocks = num_blocks
        self.lock = threading.Lock()
        self.mode = "normal"
        self.handed = []        # (request, blocks) given out
        self.released = []      # (request, blocks) handed back
        self.threads = set()    # the threads the callbacks ran on

    def allocate(self, request, n):
        self.threads.add(threading.get_ident())
        if self.mode == "refuse":
            return None
        if self.mode == "raise":
            raise RuntimeError("the block manager failed on purpose")
        if self.mode == "garbage":
            return "not a list"
        if self.mode == "out_of_range":
            return list(range(self.num_blocks, self.num_blocks + n))
        with self.lock:
            if len(self.free) < n:
                return []
            blocks, self.free = self.free[:n], self.free[n:]
            self.handed.append((request, blocks))
            return blocks

    def release(self, request, blocks):
        self.threads.add(threading.get_ident())
        with self.lock:
            self.released.append((request, list(blocks)))


def wait_received(decode, request, seconds):
    """Polls decode.get_finished() until request is listed under receiving."""
    deadline = time.monotonic() + seconds
    while True:
        _, receiving = decode.get_finished()
        if request in receiving:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


def check_send_fails(c, request, what):
    """wait_for_send(request) raises kvfabric.Error (any code) with a message."""
    try:
        c.wait_for_send(request)
    except kvfabric.Error as e:
        check(bool(e.message), f"{what}: {e.code_name}: {e.message!r}")
        return
    check(False, f"{what}: wait_for_send succeeded")


def test_pd():
    layout = kvfabric.LayoutDesc(kind="flash_attention", num_layers=3, num_blocks=32, block_tokens=16,
                                 kv_heads=2, head_dim=64, dtype_bytes=2)
    rng = random.Random(20270415)
    prompt = [1000 + 7 * i for i in range(100)]
    print(f"PD on host memory, buffers: {'numpy' if np is not None else 'ctypes (numpy not installed)'}")
    prefill_pool, decode_pool = ContiguousPool(layout), ContiguousPool(layout)
    prefill_pool.fill_random(42)
    decode_pool.poison(0xA5)
    manager = BlockManager(layout.num_blocks, rng)

    # Options that cannot work are refused at once; a bad listen address when listening starts.
    check_error(lambda: kvfabric.KvConnector("py-pd", chunk_tokens=32, memory="host", listen="127.0.0.1:0"),
                "invalid_argument", "listening without the block manager callables")
    check_error(lambda: kvfabric.KvConnector("py-pd", chunk_tokens=32, memory="host", listen="127.0.0.1:0",
                                             allocate_blocks=42, release_blocks=manager.release),
                "invalid_argument", "allocate_blocks that is not callable")
    with kvfabric.KvConnector("py-pd", chunk_tokens=32, memory="host", listen="no-port-here",
                              allocate_blocks=manager.allocate, release_blocks=manager.release) as bad:
        check_error(lambda: bad.register_kv_caches(layout, decode_pool.addresses), "invalid_argument",
                    "a bad listen address, refused by register_kv_caches")
    check_error(lambda: bad.num_layers, "invalid_argument", "a call after close() (the with block)")

    decode = kvfabric.KvConnector("py-pd", chunk_tokens=32, memory="host", listen="127.0.0.1:0",
                                  allocate_blocks=manager.allocate, release_blocks=manager.release,
                                  name="py-decode")
    check(decode.listen_port == 0, "not listening before register_kv_caches")
    decode.register_kv_caches(layout, decode_pool.addresses)
    check(decode.listen_port != 0, f"decode: listening on port {decode.listen_port}")
    prefill = kvfabric.KvConnector("py-pd", chunk_tokens=32, memory="host", name="py-prefill")
    prefill.register_kv_caches(layout, prefill_pool.addresses)
    check(prefill.listen_port == 0, "the prefill connector does not listen")
    peer = f"127.0.0.1:{decode.listen_port}"

    # Request 1: the misuse first, then the whole stream.
    blocks1 = [3, 9, 4, 20, 11, 5, 30]
    context = b"ctx\x00\xffend"
    prefill.get_num_new_matched_tokens(1, prompt, 0)
    check_error(lambda: prefill.send_kv_to(1, peer, context), "invalid_argument", "send_kv_to before alloc")
    check_error(lambda: prefill.send_kv_to(4242, peer), "not_found", "send_kv_to for an unknown request")
    prefill.update_state_after_alloc(1, blocks1, 0)
    check_error(lambda: prefill.send_kv_to(1, "no-port"), "invalid_argument", "send_kv_to a peer without a port")
    check_error(lambda: prefill.send_kv_to(1, peer, 3.5), "invalid_argument", "a context that is not bytes")
    check_error(lambda: prefill.wait_for_send(1), "invalid_argument", "wait_for_send before send_kv_to")
    check_error(lambda: prefill.wait_for_send(4242), "not_found", "wait_for_send for an unknown request")
    check_error(lambda: prefill.save_kv_layer(1, 0, cuda_stream=0), "invalid_argument",
                "save_kv_layer with a CUDA stream on host caches")
    prefill.send_kv_to(1, peer, bytearray(context))  # any bytes-like object
    check_error(lambda: prefill.send_kv_to(1, peer), "invalid_argument", "send_kv_to twice")
    for layer in range(3):
        prefill.save_kv_layer(1, layer)
    prefill.wait_for_send(1)  # without the GIL: the decode side's allocate_blocks takes it meanwhile
    check(True, "wait_for_send: the decode side has every layer")
    check(wait_received(decode, 1, 10), "decode: get_finished lists request 1 under receiving")
    check_error(lambda: decode.take_received(4242), "not_found", "take_received for a request that did not arrive")
    kv = decode.take_received(1)
    check_error(lambda: decode.take_received(1), "not_found", "take_received twice")
    check(kv.request == 1 and kv.context == context, f"{kv!r}: the context arrived as sent ({kv.context!r})")
    check(len(kv.layer_arrival_ms) == 3 and all(t >= 0 for t in kv.layer_arrival_ms),
          f"an arrival time per layer: {kv.layer_arrival_ms}")
    check(manager.handed == [(1, kv.blocks)], f"the blocks are the ones allocate_blocks gave: {kv.blocks}")
    check(threading.get_ident() not in manager.threads and manager.threads,
          "allocate_blocks ran on a connector thread, not the caller's")
    same = all(prefill_pool.part(layer, src, part) == decode_pool.part(layer, dst, part)
               for layer in range(3) for part in (0, 1) for src, dst in zip(blocks1, kv.blocks))
    check(same and len(kv.blocks) == 7, "every K and V byte of the 7 blocks, every layer, equals the prefill's")
    poison = bytes([0xA5]) * (layout.block_bytes // 2)
    untouched = all(decode_pool.part(layer, b, part) == poison for layer in range(3) for part in (0, 1)
                    for b in range(layout.num_blocks) if b not in kv.blocks)
    check(untouched, "every other decode block is still poisoned")
    check(prefill.request_finished(1) is False, "prefill: request 1's stream has ended: free its blocks now")

    # Request 2: aborted after one layer; the decode side never lists it.
    prefill.get_num_new_matched_tokens(2, prompt, 0)
    prefill.update_state_after_alloc(2, [0, 1, 2, 6, 7, 8, 10], 0)
    prefill.send_kv_to(2, peer)
    prefill.save_kv_layer(2, 0)
    prefill.abort(2)
    check_error(lambda: prefill.wait_for_send(2), "aborted", "wait_for_send after abort")
    check(not wait_received(decode, 2, 0.5), "decode: the aborted request is never listed as received")
    prefill.request_finished(2)

    # Requests 3-6: the block manager refuses (None), raises, returns a wrong type, or gives blocks out
    # of range (handed back at once through release_blocks). Each fails the prefill's send.
    unraisable = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: unraisable.append(u.exc_type)
    try:
        for request, mode in ((3, "refuse"), (4, "raise"), (5, "garbage"), (6, "out_of_range")):
            manager.mode = mode
            prefill.get_num_new_matched_tokens(request, prompt, 0)
            prefill.update_state_after_alloc(request, blocks1, 0)
            prefill.send_kv_to(request, peer)
            for layer in range(3):
                prefill.save_kv_layer(request, layer)
            check_send_fails(prefill, request, f"request {request}: allocate_blocks in mode {mode}")
            prefill.request_finished(request)
    finally:
        sys.unraisablehook = old_hook
        manager.mode = "normal"
    check(RuntimeError in unraisable and TypeError in unraisable,
          f"the callback's exception and the wrong type were reported as unraisable: {unraisable}")
    deadline = time.monotonic() + 2
    while not manager.released and time.monotonic() < deadline:
        time.sleep(0.005)
    check(6 in [r for r, _ in manager.released], f"release_blocks got request 6's blocks back: {manager.released}")
    check(not any(wait_received(decode, r, 0) for r in (3, 4, 5, 6)), "decode: none of them is listed")

    # Request 7, after all of it: through again.
    prefill.get_num_new_matched_tokens(7, prompt, 0)
    prefill.update_state_after_alloc(7, blocks1[::-1], 0)
    prefill.send_kv_to(7, peer, b"\x2a")
    for layer in range(3):
        prefill.save_kv_layer(7, layer)
    prefill.wait_for_send(7)
    check(wait_received(decode, 7, 10), "decode: request 7 arrived")
    kv7 = decode.take_received(7)
    same = all(prefill_pool.part(layer, src, part) == decode_pool.part(layer, dst, part)
               for layer in range(3) for part in (0, 1) for src, dst in zip(blocks1[::-1], kv7.blocks))
    check(same and kv7.context == b"*", "request 7's bytes and context arrived")
    prefill.request_finished(7)
    decode.close()
    decode.close()  # twice: nothing more
    check_error(lambda: decode.take_received(7), "invalid_argument", "take_received after close()")
    del prefill


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
        test_pd()
    if failures:
        print(f"{failures} check(s) FAILED")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
