#!/usr/bin/env bash
# A live kvfabric-perf server is fed malformed control traffic over raw TCP sockets (python3),
# one connection per case. Frames are built by hand: magic u32 "KVF1" | version u16 | type u16 |
# payload length u32 | checksum u32 | payload, little-endian; checksum = XXH32(payload, seed), seed
# = (version << 16) | type as include/kvf/protocol/messages.h says (frame_checksum_seed), or 0 as
# the first framing had: the test learns which from the server's first ErrorReply, checks every
# reply against it and sends its valid frames with it. XXH32 is implemented below and checked
# against reference vectors; a valid Hello answered with a HelloAck proves the whole encoding.
# Asserts, per case:
#   - garbage, bad magic, wrong version, unknown type, oversized length (> 64 MiB), bad checksum,
#     an undecodable payload with a good checksum, a Hello asking only for newer versions, and a
#     valid Hello followed by garbage: an ErrorReply frame (type 10, with a well-formed payload and
#     the expected error code) comes back, then the server closes the connection;
#   - a frame from the wrong side (HelloAck) gets an ErrorReply (invalid_argument);
#   - a truncated frame then close, and a header then 1 s of silence then close: no crash;
#     during the silence the server neither answers nor drops the connection (its frame deadline
#     is 10 s);
#   - 20 back-to-back garbage connections, and one connection left open for the rest of the test;
# and afterwards: the server process is alive and a real verified layers run still succeeds.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
kvf_init garbled_frames 180

export UCX_TLS=tcp
kvf_start_server server 127.0.0.1
port=${KVF_PORT[server]}

cat >"$KVF_TMP/garble.py" <<'PY'
import os, random, socket, struct, sys, time

HOST, PORT = "127.0.0.1", int(sys.argv[1])
MAGIC, VERSION = 0x3146564B, int(sys.argv[2])  # include/kvf/protocol/messages.h kProtocolVersion
HELLO, HELLO_ACK, ERROR_REPLY = 1, 2, 10
CODES = {1: "invalid_argument", 2: "malformed", 3: "unsupported_version", 4: "timeout"}
M = 0xFFFFFFFF
P1, P2, P3, P4, P5 = 2654435761, 2246822519, 3266489917, 668265263, 374761393

def rotl(x, r):
    return ((x << r) | (x >> (32 - r))) & M

def xxh32(data, seed=0):
    n, i = len(data), 0
    if n >= 16:
        v = [(seed + P1 + P2) & M, (seed + P2) & M, seed & M, (seed - P1) & M]
        while i + 16 <= n:
            for k, lane in enumerate(struct.unpack_from("<4I", data, i)):
                v[k] = (rotl((v[k] + lane * P2) & M, 13) * P1) & M
            i += 16
        h = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & M
    else:
        h = (seed + P5) & M
    h = (h + n) & M
    while i + 4 <= n:
        h = (rotl((h + struct.unpack_from("<I", data, i)[0] * P3) & M, 17) * P4) & M
        i += 4
    while i < n:
        h = (rotl((h + data[i] * P5) & M, 11) * P1) & M
        i += 1
    h ^= h >> 15; h = (h * P2) & M
    h ^= h >> 13; h = (h * P3) & M
    h ^= h >> 16
    return h

# Reference values of XXH32 (seed 0) from the xxHash test suite / `xxh32sum`.
assert xxh32(b"") == 0x02CC5D05, hex(xxh32(b""))
assert xxh32(b"a") == 0x550D7456, hex(xxh32(b"a"))
assert xxh32(b"abc") == 0x32D153FF, hex(xxh32(b"abc"))
assert xxh32(b"Nobody inspects the spammish repetition") == 0xE2293B2F

# How the checksum is seeded: "typed" = (version << 16) | type, "zero" = 0. Learnt from a reply.
SEED_RULES = {"typed": lambda version, type_: ((version & 0xFFFF) << 16) | type_, "zero": lambda version, type_: 0}
seed_rule = None

def checksum(payload, type_, version=VERSION):
    return xxh32(payload, SEED_RULES[seed_rule](version, type_))

def header(type_, length, checksum_, magic=MAGIC, version=VERSION):
    return struct.pack("<IHHII", magic, version, type_, length, checksum_)

def frame(type_, payload, **kw):
    return header(type_, len(payload), checksum(payload, type_, kw.get("version", VERSION)), **kw) + payload

def string(s):
    return struct.pack("<I", len(s)) + s

def hello(min_v=VERSION, max_v=VERSION, name=b"garbled-frames-test"):
    return struct.pack("<HH", min_v, max_v) + string(name) + string(b"") + string(b"")

def connect():
    s = socket.create_connection((HOST, PORT), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s

def read_until_close(s, seconds):
    """Everything the server sends until it closes (closed=True) or `seconds` pass."""
    data, end = b"", time.time() + seconds
    while time.time() < end:
        s.settimeout(max(0.05, end - time.time()))
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False

def parse_frames(data):
    """[(type, payload)] of the complete, well-formed frames in data; raises on a bad one."""
    frames, i = [], 0
    while i < len(data):
        if len(data) - i < 16:
            raise ValueError(f"{len(data) - i} trailing bytes, not a frame header")
        magic, version, type_, length, checksum_ = struct.unpack_from("<IHHII", data, i)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"reply frame with magic {magic:#x} version {version}")
        payload = data[i + 16:i + 16 + length]
        if len(payload) != length:
            raise ValueError(f"reply frame truncated: {len(payload)} of {length} payload bytes")
        if checksum_ != checksum(payload, type_, version):
            raise ValueError(f"reply frame type {type_}: checksum {checksum_:#x} != "
                             f"{checksum(payload, type_, version):#x} ({seed_rule} seed)")
        frames.append((type_, payload))
        i += 16 + length
    return frames

def error_reply(payload):
    code, n = struct.unpack_from("<HI", payload, 0)
    message = payload[6:6 + n]
    if len(message) != n or 6 + n != len(payload):
        raise ValueError(f"ErrorReply payload of {len(payload)} bytes does not hold a {n}-byte message")
    return CODES.get(code, f"code {code}"), message.decode("utf-8", "replace")

failures = 0

def fail(name, why):
    global failures
    failures += 1
    print(f"FAIL {name}: {why}", flush=True)

def case(name, send, want_types, want_code=None, must_close=True, wait=5.0):
    """Sends `send`, expects reply frames of `want_types` (ending in an ErrorReply with want_code)
    and, when must_close, the server closing the connection."""
    t0 = time.time()
    s = connect()
    try:
        s.sendall(send)
        data, closed = read_until_close(s, wait if must_close else 1.0)
    finally:
        s.close()
    try:
        frames = parse_frames(data)
    except ValueError as e:
        return fail(name, f"bad reply: {e} (raw {data[:64].hex()})")
    types = [t for t, _ in frames]
    if types != want_types:
        return fail(name, f"reply frame types {types}, want {want_types}")
    code, message = error_reply(frames[-1][1])
    if want_code and code != want_code:
        return fail(name, f"ErrorReply code {code}, want {want_code} ({message!r})")
    if must_close and not closed:
        return fail(name, f"server did not close the connection within {wait} s after its ErrorReply")
    print(f"ok   {name}: {'+'.join(map(str, types))} in {time.time() - t0:.2f}s"
          f"{', closed' if closed else ''}: {code}: {message}", flush=True)

rng = random.Random(1234)
garbage = bytes(rng.getrandbits(8) for _ in range(200))
assert garbage[:4] != struct.pack("<I", MAGIC)
good = hello()

# Learn the seed rule from the answer to garbage (it needs no checksum of ours).
s = connect()
s.sendall(garbage)
data, _ = read_until_close(s, 5.0)
s.close()
if len(data) < 16:
    print(f"FAIL seed probe: {len(data)} bytes in reply to garbage, want an ErrorReply frame")
    sys.exit(1)
_, version_, type_, length_, sum_ = struct.unpack_from("<IHHII", data, 0)
for rule, seed_of in SEED_RULES.items():
    if xxh32(data[16:16 + length_], seed_of(version_, type_)) == sum_:
        seed_rule = rule
        break
else:
    print(f"FAIL seed probe: the reply's checksum {sum_:#x} is XXH32 of its payload under no known seed rule")
    sys.exit(1)
print(f"note the server seeds frame checksums with {'(version << 16) | type' if seed_rule == 'typed' else '0'}", flush=True)

# Held open through all the cases: one idle client must not disturb the others.
idle = connect()
idle.sendall(frame(HELLO, good))

case("random garbage", garbage, [ERROR_REPLY], "malformed")
case("bad magic", frame(HELLO, good, magic=0xDEADBEEF), [ERROR_REPLY], "malformed")
case("wrong version", frame(HELLO, good, version=VERSION + 1), [ERROR_REPLY], "unsupported_version")
case("version 0", frame(HELLO, good, version=0), [ERROR_REPLY], "unsupported_version")
case("unknown type 99", frame(99, good), [ERROR_REPLY], "malformed")
case("type 0", frame(0, good), [ERROR_REPLY], "malformed")
case("oversized length 64 MiB + 1", header(HELLO, (64 << 20) + 1, 0), [ERROR_REPLY], "malformed")
case("length 0xFFFFFFFF", header(HELLO, 0xFFFFFFFF, 0), [ERROR_REPLY], "malformed")
case("bad checksum", header(HELLO, len(good), checksum(good, HELLO) ^ 0x5A5A5A5A) + good, [ERROR_REPLY], "malformed")
if seed_rule == "typed":
    # The seed binds the type: a Bye payload under a Hello-seeded checksum must not pass.
    bye = string(b"bye")
    case("checksum of another type", header(11, len(bye), checksum(bye, HELLO)) + bye, [ERROR_REPLY], "malformed")
case("undecodable payload, good checksum",
     frame(HELLO, struct.pack("<HH", VERSION, VERSION) + struct.pack("<I", 1 << 30) + b"x" * 8), [ERROR_REPLY], "malformed")
case("trailing bytes inside the payload", frame(HELLO, good + b"\0\0\0"), [ERROR_REPLY], "malformed")
case("Hello for newer versions only", frame(HELLO, hello(VERSION + 1, VERSION + 2)), [ERROR_REPLY], "unsupported_version")
case("valid Hello then garbage", frame(HELLO, good) + garbage, [HELLO_ACK, ERROR_REPLY], "malformed")
case("HelloAck from the connecting side",
     frame(HELLO, good) + frame(HELLO_ACK, struct.pack("<H", 1) + string(b"x") + string(b"") + struct.pack("<Q", 7)),
     [HELLO_ACK, ERROR_REPLY], "invalid_argument", must_close=False)

# A truncated frame, then close: nothing to answer, nothing may break.
s = connect()
s.sendall(frame(HELLO, good)[:20])
s.close()
print("ok   truncated frame then close: sent 20 of a frame's bytes and closed", flush=True)

# A header, then silence: within 1 s the server neither answers nor drops us (deadline 10 s).
s = connect()
s.sendall(header(HELLO, len(good), checksum(good, HELLO)))
data, closed = read_until_close(s, 1.0)
s.close()
if data or closed:
    fail("header then silence", f"within 1 s the server sent {len(data)} bytes, closed={closed}")
else:
    print("ok   header then silence: no reply and still open after 1 s, then closed by us", flush=True)

# Garbage shorter than a header, then close.
s = connect()
s.sendall(garbage[:7])
s.close()
print("ok   7 bytes then close", flush=True)

# Many bad connections in a row.
t0 = time.time()
for k in range(20):
    s = connect()
    s.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randint(16, 300))))
    data, closed = read_until_close(s, 5.0)
    s.close()
    if not closed:
        fail(f"flood {k}", "server did not close a garbage connection within 5 s")
        break
else:
    print(f"ok   20 garbage connections in a row, each answered and closed ({time.time() - t0:.2f}s)", flush=True)

# The idle connection got its HelloAck and is still open.
data, closed = read_until_close(idle, 0.5)
idle.close()
try:
    types = [t for t, _ in parse_frames(data)]
except ValueError as e:
    types = str(e)
if types != [HELLO_ACK] or closed:
    fail("idle connection", f"got {types}, closed={closed}; want one HelloAck and an open connection")
else:
    print("ok   idle connection: HelloAck, still open after all the cases", flush=True)

sys.exit(1 if failures else 0)
PY

# The protocol version this build speaks, read from the header that defines it.
version=$(grep -oE 'kProtocolVersion = [0-9]+' "$(dirname "${BASH_SOURCE[0]}")/../../include/kvf/protocol/messages.h" | grep -oE '[0-9]+$')
[[ $version =~ ^[0-9]+$ ]] || kvf_die "cannot read kProtocolVersion from include/kvf/protocol/messages.h"
kvf_run garble 120 python3 "$KVF_TMP/garble.py" "$port" "$version"
rc=$?
sed 's/^/    /' "$(kvf_logfile garble)"
kvf_check_eq "$rc" 0 "every malformed-frame case (python exit status)"
kvf_check kvf_alive server -- "server alive after the malformed frames"
kvf_check_grep "$(kvf_logfile server)" 'listening on' "server log intact"
if grep -qE 'terminate called|Assertion|AddressSanitizer|runtime error|Segmentation' "$(kvf_logfile server)"; then
  kvf_check_fail "server log shows a crash or sanitizer report"
fi

total=$(kvf_layers_bytes 32 64 16384)
before=$(kvf_count_lines server '^stream [0-9]+ from ')
kvf_run client 120 "$KVF_PERF" client --connect "127.0.0.1:$port" --mode layers --layers 32 --blocks 64 \
  --block-bytes 16K --shuffle --verify --iters 1 --timeout-ms 10000
rc=$?
kvf_check_eq "$rc" 0 "verified layers run after the garbage: exit status" ||
  sed 's/^/    | /' "$(kvf_logfile client)" >&2
kvf_check_verified server "$total" "$before" 1 "layers run after the garbage"
kvf_check kvf_alive server -- "server still alive at the end"

kvf_finish
