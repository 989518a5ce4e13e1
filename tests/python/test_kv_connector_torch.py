#!/usr/bin/env python3
"""kvfabric's Python KvConnector with torch CUDA tensors as the engine's paged KV caches (GPU only).

Each engine holds its cache as one torch tensor [layers, 2, num_blocks, block_tokens, kv_heads,
head_dim] (flash_attention, bf16, contiguous), registered with memory="cuda": layer l's buffer is
data_ptr() + l * layer_bytes, so the caches are the one allocation PD needs.

PD: a prefill process on cuda:0 and a decode process on cuda:1 (both on cuda:0 with one GPU),
started with multiprocessing's spawn. The prefill engine writes each layer's K/V of a request's
blocks on a CUDA stream behind a spin kernel that delays the write, and reports the layer at once
with save_kv_layer(request, layer, torch.cuda.current_stream().cuda_stream), never synchronizing:
the connector must wait for the event it records there before it reads the layer (a connector that
read at once would send zeros). Request 1 runs on a side stream, request 2 on the default stream
(cuda_stream 0, the legacy default stream). The decode engine's pool is poisoned; its block manager
is a pair of Python callables. It checks, per request: the context arrived, the bytes of every
layer of its blocks (sha256 against the prefill's source), and at the end that every block no
request got is still poisoned.

Store round trip (only when KVF_TORCH_STORE_SOCKET names a kvfabricd's store socket whose model
"m" is tests/integration/lib.sh's kvf_start_connector_daemon's; skipped otherwise): connector A on
cuda:0 stores a fresh prompt's 4 full chunks from random GPU blocks written on a stream (saved with
that stream); connector B on cuda:1 (or 0) loads them into poisoned GPU blocks; the bytes are
compared on the GPU, and B's other blocks must still be poisoned.

Run on a GPU machine (torch with CUDA installed for the interpreter the module was built for):
  PYTHONPATH=<build>/python python3 tests/python/test_kv_connector_torch.py
or under ctest with a daemon for the store part: ctest -L gpu -R python_torch (tests/gpu/python_torch.sh).
Exits 77 (ctest: skipped), saying why, without torch, a CUDA device, or the module.
"""
import hashlib
import json
import os
import queue
import random
import sys
import time
import traceback

SKIP = 77

# PD's layout: 6 layers of 96 blocks of 16 tokens, 8 KV heads x 128, bf16 (32 KiB per block's K or
# V, 6 MiB per layer).
PD = dict(layers=6, blocks=96, block_tokens=16, kv_heads=8, head_dim=128)
PD_CHUNK = 64
# (request, prompt tokens, on a side stream): 300 tokens are 19 blocks, 17 tokens 2 (one partial).
PD_REQUESTS = ((1, 300, True), (2, 17, False))
POISON = 0xA5
# The store part's layout: model "m" of kvf_start_connector_daemon (64-token chunks).
STORE = dict(layers=4, blocks=64, block_tokens=16, kv_heads=2, head_dim=64)
STORE_CHUNK = 64


def skip(reason):
    print(f"SKIP (python_torch): {reason}")
    sys.exit(SKIP)


def layout_of(kvfabric, shape):
    return kvfabric.LayoutDesc(kind="flash_attention", num_layers=shape["layers"], num_blocks=shape["blocks"],
                               block_tokens=shape["block_tokens"], kv_heads=shape["kv_heads"],
                               head_dim=shape["head_dim"], dtype_bytes=2)


def part_bytes(shape):
    return shape["block_tokens"] * shape["kv_heads"] * shape["head_dim"] * 2


class TorchPool:
    """The engine's paged KV cache: one contiguous bf16 tensor [layers, 2, blocks, block_tokens,
    kv_heads, head_dim] on `device`; .u8 views it as bytes [layers, 2 (K, V), blocks, part bytes]."""

    def __init__(self, torch, kvfabric, shape, device):
        self.shape = shape
        self.layout = layout_of(kvfabric, shape)
        self.tensor = torch.zeros((shape["layers"], 2, shape["blocks"], shape["block_tokens"], shape["kv_heads"],
                                   shape["head_dim"]), dtype=torch.bfloat16, device=device)
        assert self.tensor.is_contiguous()
        self.u8 = self.tensor.view(torch.uint8).view(shape["layers"], 2, shape["blocks"], part_bytes(shape))
        layer_bytes = self.tensor[0].numel() * self.tensor.element_size()
        assert layer_bytes == self.layout.layer_bytes, (layer_bytes, self.layout.layer_bytes)
        self.layers = [self.tensor.data_ptr() + layer * layer_bytes for layer in range(shape["layers"])]


def digest(tensor):
    """sha256 of a tensor's bytes (moved to the host)."""
    host = tensor.contiguous().cpu()
    try:
        raw = host.numpy().tobytes()
    except (RuntimeError, TypeError):  # torch without numpy
        raw = bytes(host.view(-1).tolist())
    return hashlib.sha256(raw).hexdigest()


def spin(torch, device):
    """The layer's compute: a kernel that keeps the current stream busy for a while (tens of ms), so
    a write enqueued behind it lands well after the host has moved on."""
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(50_000_000)  # GPU clock cycles
        return
    a = torch.ones((2048, 2048), device=device)
    for _ in range(20):
        a = a @ a / 2048.0


def prompt_of(request, tokens):
    rng = random.Random(1000 + request)
    return [rng.randrange(32000) for _ in range(tokens)]


def blocks_for(tokens, block_tokens):
    return (tokens + block_tokens - 1) // block_tokens


# --- PD: the two engine processes (top level: spawn imports them by name) ------------------------


def decode_main(device, results, expect):
    """The decode engine: listens, hands out blocks of a poisoned pool, reports what arrived."""
    try:
        import torch
        import kvfabric

        torch.cuda.set_device(device)
        dev = torch.device("cuda", device)
        pool = TorchPool(torch, kvfabric, PD, dev)
        pool.u8.fill_(POISON)
        torch.cuda.synchronize(dev)
        free = list(range(PD["blocks"]))
        random.Random(7).shuffle(free)
        handed = {}

        def allocate_blocks(request, n):  # on a connector thread, with the GIL
            if len(free) < n:
                return None
            blocks = [free.pop() for _ in range(n)]
            handed[request] = blocks
            return blocks

        def release_blocks(request, blocks):  # a failed stream's blocks
            free.extend(blocks)

        c = kvfabric.KvConnector("torch-pd", chunk_tokens=PD_CHUNK, memory="cuda", listen="127.0.0.1:0",
                                 allocate_blocks=allocate_blocks, release_blocks=release_blocks,
                                 name="torch-decode")
        c.register_kv_caches(pool.layout, pool.layers)
        results.put(("port", c.listen_port))
        pending = set(expect)
        used = set()
        deadline = time.monotonic() + 120
        while pending and time.monotonic() < deadline:
            _, receiving = c.get_finished()
            for request in receiving:
                if request not in pending:
                    continue
                kv = c.take_received(request)
                index = torch.tensor(kv.blocks, dtype=torch.long, device=dev)
                got = pool.u8.index_select(2, index)  # [layers, 2, n, part bytes]
                digests = [digest(got[layer]) for layer in range(PD["layers"])]
                results.put(("received", request, list(kv.blocks), kv.context, digests,
                             handed.get(request) == list(kv.blocks), list(kv.layer_arrival_ms)))
                used.update(kv.blocks)
                pending.discard(request)
            time.sleep(0.005)
        if pending:
            results.put(("error", "decode", f"requests {sorted(pending)} did not arrive within 120 s"))
        mask = torch.ones(PD["blocks"], dtype=torch.bool, device=dev)
        if used:
            mask[torch.tensor(sorted(used), dtype=torch.long, device=dev)] = False
        untouched = bool((pool.u8[:, :, mask] == POISON).all().item())
        results.put(("poison", untouched, PD["blocks"] - len(used)))
        c.close()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put(("error", "decode", traceback.format_exc()))
    results.put(("done", "decode"))


def prefill_main(device, port, results):
    """The prefill engine: computes (random bytes behind a spin kernel) and streams each layer."""
    try:
        import torch
        import kvfabric

        torch.cuda.set_device(device)
        dev = torch.device("cuda", device)
        pool = TorchPool(torch, kvfabric, PD, dev)
        c = kvfabric.KvConnector("torch-pd", chunk_tokens=PD_CHUNK, memory="cuda", name="torch-prefill")
        c.register_kv_caches(pool.layout, pool.layers)
        peer = f"127.0.0.1:{port}"
        generator = torch.Generator(device=dev)
        generator.manual_seed(20270415)
        side = torch.cuda.Stream(device=dev)
        for request, tokens, on_side_stream in PD_REQUESTS:
            n = blocks_for(tokens, PD["block_tokens"])
            table = random.Random(request).sample(range(PD["blocks"]), n)
            # What the model computes for the request: made up front, written into the pool below.
            source = torch.randint(0, 256, (PD["layers"], 2, n, part_bytes(PD)), dtype=torch.uint8, device=dev,
                                   generator=generator)
            torch.cuda.synchronize(dev)
            expected = [digest(source[layer]) for layer in range(PD["layers"])]
            context = json.dumps({"request": request, "tokens": tokens, "table": table}).encode()
            c.get_num_new_matched_tokens(request, prompt_of(request, tokens), 0)
            c.update_state_after_alloc(request, table, 0)
            c.send_kv_to(request, peer, context)
            index = torch.tensor(table, dtype=torch.long, device=dev)
            stream = side if on_side_stream else torch.cuda.current_stream(dev)
            if on_side_stream:
                stream.wait_stream(torch.cuda.current_stream(dev))  # index and source are ready
            with torch.cuda.stream(stream):
                cuda_stream = torch.cuda.current_stream(dev).cuda_stream
                for layer in range(PD["layers"]):
                    spin(torch, dev)
                    pool.u8[layer].index_copy_(1, index, source[layer])
                    # No synchronize: the connector records an event on the stream and waits for it.
                    c.save_kv_layer(request, layer, cuda_stream)
            c.wait_for_send(request)  # without the GIL
            results.put(("sent", request, table, context, expected, cuda_stream))
            c.request_finished(request)
            torch.cuda.synchronize(dev)  # source and index stay alive until the stream is past them
        c.close()
    except BaseException:  # noqa: BLE001
        results.put(("error", "prefill", traceback.format_exc()))
    results.put(("done", "prefill"))


class Checks:
    def __init__(self):
        self.failures = 0

    def check(self, cond, what):
        print(("ok: " if cond else "FAIL: ") + what, flush=True)
        if not cond:
            self.failures += 1


def test_pd(torch, checks):
    import multiprocessing

    gpus = torch.cuda.device_count()
    src, dst = 0, (1 if gpus >= 2 else 0)
    print(f"PD: {gpus} GPU(s); prefill on cuda:{src}, decode on cuda:{dst}", flush=True)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    expect = [request for request, _, _ in PD_REQUESTS]
    decode = ctx.Process(target=decode_main, args=(dst, results, expect), name="kvf-torch-decode")
    decode.start()
    prefill = None
    sent, received, poison, done = {}, {}, None, set()
    try:
        deadline = time.monotonic() + 240
        while len(done) < 2:
            left = deadline - time.monotonic()
            if left <= 0:
                checks.check(False, f"PD: the engine processes did not finish within 240 s (done: {sorted(done)})")
                break
            try:
                message = results.get(timeout=min(left, 5))
            except queue.Empty:  # are the processes still there?
                if not decode.is_alive() and "decode" not in done:
                    checks.check(False, f"PD: the decode process died (exit {decode.exitcode})")
                    break
                if prefill is not None and not prefill.is_alive() and "prefill" not in done:
                    checks.check(False, f"PD: the prefill process died (exit {prefill.exitcode})")
                    break
                continue
            kind = message[0]
            if kind == "port":
                checks.check(message[1] != 0, f"decode: listening on port {message[1]}")
                prefill = ctx.Process(target=prefill_main, args=(src, message[1], results), name="kvf-torch-prefill")
                prefill.start()
            elif kind == "sent":
                sent[message[1]] = message[2:]
            elif kind == "received":
                received[message[1]] = message[2:]
            elif kind == "poison":
                poison = message[1:]
            elif kind == "error":
                checks.check(False, f"PD: the {message[1]} process failed:\n{message[2]}")
            elif kind == "done":
                done.add(message[1])
            if kind == "done" and message[1] == "decode" and prefill is None:
                break
    finally:
        for proc in (prefill, decode):
            if proc is None:
                continue
            proc.join(timeout=30)
            if proc.is_alive():
                checks.check(False, f"{proc.name} did not exit; terminated")
                proc.terminate()
                proc.join(timeout=10)

    for request, tokens, on_side_stream in PD_REQUESTS:
        where = "a side stream" if on_side_stream else "the default stream"
        if request not in sent or request not in received:
            checks.check(False, f"PD request {request} ({where}): sent {request in sent}, received {request in received}")
            continue
        table, context, expected, cuda_stream = sent[request]
        blocks, got_context, digests, from_manager, arrival = received[request]
        checks.check(on_side_stream or cuda_stream == 0,
                     f"request {request}: saved with cuda_stream {cuda_stream:#x} ({where})")
        checks.check(got_context == context, f"request {request}: the context arrived ({len(got_context)} bytes)")
        checks.check(len(blocks) == len(table) and from_manager,
                     f"request {request}: {len(blocks)} blocks, the ones allocate_blocks gave")
        bad = [layer for layer in range(PD["layers"]) if digests[layer] != expected[layer]]
        checks.check(not bad, f"request {request} ({tokens} tokens, {where}): every byte of its {len(table)} blocks "
                              f"arrived, every layer" + (f"; layers {bad} differ" if bad else ""))
        checks.check(len(arrival) == PD["layers"], f"request {request}: layer arrivals (ms) {[round(t, 2) for t in arrival]}")
    if poison is None:
        checks.check(False, "decode: no poison report")
    else:
        checks.check(poison[0], f"decode: the {poison[1]} blocks no request got are still poisoned")


def test_store(torch, kvfabric, socket, checks):
    gpus = torch.cuda.device_count()
    dev_a = torch.device("cuda", 0)
    dev_b = torch.device("cuda", 1 if gpus >= 2 else 0)
    print(f"store: connector A on {dev_a}, B on {dev_b}, daemon socket {socket}", flush=True)
    pool_a = TorchPool(torch, kvfabric, STORE, dev_a)
    pool_b = TorchPool(torch, kvfabric, STORE, dev_b)
    pool_b.u8.fill_(POISON)
    torch.cuda.synchronize(dev_b)
    a = kvfabric.KvConnector("m", chunk_tokens=STORE_CHUNK, store_socket=socket, memory="cuda")
    a.register_kv_caches(pool_a.layout, pool_a.layers)
    b = kvfabric.KvConnector("m", chunk_tokens=STORE_CHUNK, store_socket=socket, memory="cuda")
    b.register_kv_caches(pool_b.layout, pool_b.layers)

    rng = random.Random(time.time_ns() ^ os.getpid())  # a prompt the daemon has not seen
    prompt = [rng.randrange(32000) for _ in range(300)]  # 4 full chunks of 64 = 256 tokens, 19 blocks
    table_a = rng.sample(range(STORE["blocks"]), 19)
    table_b = rng.sample(range(STORE["blocks"]), 19)
    index_a = torch.tensor(table_a, dtype=torch.long, device=dev_a)
    source = torch.randint(0, 256, (STORE["layers"], 2, 19, part_bytes(STORE)), dtype=torch.uint8, device=dev_a)

    checks.check(a.get_num_new_matched_tokens(1, prompt, 0) == 0, "store A: a fresh prompt matches nothing")
    a.update_state_after_alloc(1, table_a, 0)
    a.start_load_kv()
    stream = torch.cuda.Stream(device=dev_a)
    stream.wait_stream(torch.cuda.current_stream(dev_a))
    with torch.cuda.stream(stream):
        for layer in range(STORE["layers"]):
            spin(torch, dev_a)
            pool_a.u8[layer].index_copy_(1, index_a, source[layer])
            a.save_kv_layer(1, layer, stream.cuda_stream)  # the store reads it once the stream is past
    a.wait_for_save()
    checks.check(a.progress(1)["chunks_stored"] == 4, f"store A: 4 chunks stored from GPU blocks: {a.progress(1)}")
    a.request_finished(1)

    matched = b.get_num_new_matched_tokens(7, prompt, 0)
    checks.check(matched == 256, f"store B: the store gives 256 tokens (got {matched})")
    b.update_state_after_alloc(7, table_b, matched)
    b.start_load_kv()
    for layer in range(STORE["layers"]):
        b.wait_for_layer_load(layer)
    b.wait_for_load(7)
    checks.check(b.get_block_ids_with_load_errors() == [], "store B: no load errors")
    index_b = torch.tensor(table_b[:16], dtype=torch.long, device=dev_b)
    loaded = pool_b.u8.index_select(2, index_b)
    checks.check(torch.equal(loaded, source[:, :, :16].to(dev_b)),
                 "store B: its 16 loaded GPU blocks hold A's bytes, every layer")
    mask = torch.ones(STORE["blocks"], dtype=torch.bool, device=dev_b)
    mask[index_b] = False
    checks.check(bool((pool_b.u8[:, :, mask] == POISON).all().item()), "store B: every other block is still poisoned")
    b.request_finished(7)
    a.close()
    b.close()


def main():
    # The caches are exported for CUDA IPC, which cudaMalloc'd memory allows and torch's expandable
    # segments (cuMemCreate) do not: the spawned engines inherit this.
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:False"
    try:
        import torch
    except ImportError as e:
        skip(f"torch is not installed for {sys.executable} ({e})")
    if not torch.cuda.is_available():
        skip(f"torch {torch.__version__} sees no CUDA device")
    try:
        import kvfabric
    except ImportError as e:
        reason = os.environ.get("KVF_PYTHON_SKIP") or f"cannot import kvfabric ({e}); PYTHONPATH={os.environ.get('PYTHONPATH', '')}"
        skip(reason)
    if not getattr(kvfabric, "built_with_cuda", False):
        skip("the kvfabric module was built without CUDA")

    checks = Checks()
    test_pd(torch, checks)
    socket = os.environ.get("KVF_TORCH_STORE_SOCKET")
    if socket:
        test_store(torch, kvfabric, socket, checks)
    else:
        print("store: skipped (set KVF_TORCH_STORE_SOCKET to a kvfabricd store socket; tests/gpu/python_torch.sh does)")
    if checks.failures:
        print(f"{checks.failures} check(s) FAILED")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
