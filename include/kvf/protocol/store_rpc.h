// Store RPC: the binary protocol between a node's engines and its kvfabricd over a Unix stream
// socket. Engines send small requests (reserve, commit, acquire, ...) and get small replies; chunk
// bytes never travel here, engines read and write them in the shared arena that `hello` names.
// Every frame is
//   magic u32 "KVS1" | version u8 | kind u8 (1 request, 2 reply) | op u8 | reserved u8 (0) |
//   request id u64 | payload length u32 | checksum u32 | payload
// little-endian; checksum = XXH32(payload, seed = version << 16 | kind << 8 | op). A reply carries
// the request's id and op. A reply payload starts with an error code u16; a non-zero code is
// followed by the message string and nothing else, zero by the op's result fields. Decoding is
// exact and bounds-checked like the control channel's (wire_codec): any malformed input is a
// kMalformed/kUnsupportedVersion Status naming the field, never a crash or an oversized allocation.
// Versions: 2 added the model fingerprint to reserve and the model scope to clear; 3 the codec
// byte (kv_codec.h: how the chunk's bytes are encoded) to reserve and to acquire's reply. The header and
// an error reply's payload are laid out alike in every version, so a daemon answers a frame of
// another version with an error reply in that version (version_refusal) that the engine can read,
// saying which versions meet, and closes the connection.
// Plain value types and free functions; no shared state.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "kvf/protocol/chunk_key.h"
#include "kvf/protocol/kv_codec.h"
#include "kvf/protocol/status.h"

namespace kvf::protocol::store_rpc {

inline constexpr uint32_t kMagic = 0x3153564Bu;  // "KVS1" read as little-endian u32
inline constexpr uint8_t kVersion = 3;
inline constexpr size_t kHeaderBytes = 24;
// Requests and replies are metadata only; the largest is a lookup or clear of many keys
// (16 bytes each: 64 Ki keys per MiB).
inline constexpr uint32_t kMaxPayload = 1u << 20;
inline constexpr uint32_t kMaxKeys = (kMaxPayload - 16) / 16;

enum class FrameKind : uint8_t { kRequest = 1, kReply = 2 };

enum class Op : uint8_t {
  kHello = 1,
  kReserve = 2,
  kCommit = 3,
  kAbort = 4,
  kLookup = 5,
  kAcquire = 6,
  kRelease = 7,
  kPin = 8,
  kUnpin = 9,
  kClear = 10,
  kStats = 11,
};
std::string_view op_name(Op op);  // "reserve"; "unknown" for values outside the enum

struct FrameHeader {
  uint8_t version = kVersion;
  FrameKind kind = FrameKind::kRequest;
  Op op = Op::kHello;
  uint64_t request_id = 0;
  uint32_t payload_bytes = 0;
  uint32_t checksum = 0;
};

// --- requests ---------------------------------------------------------------------------------

struct HelloRequest {
  std::string client_name;  // for the daemon's logs: "prefill0 pid 1234"
};
struct ReserveRequest {
  ChunkKey key;
  uint64_t bytes = 0;
  ChunkKey model;  // the fingerprint `key` was hashed with (zero: none), kept with the entry
  KvCodec codec = KvCodec::kIdentity;  // how the bytes will be encoded, kept with the entry
};
struct CommitRequest {  // also abort
  ChunkKey key;
  uint64_t reservation_id = 0;
};
struct LookupRequest {
  std::vector<ChunkKey> keys;  // a prefix chain, at most kMaxKeys
};
struct KeyRequest {  // acquire, pin, unpin
  ChunkKey key;
};
struct ReleaseRequest {
  uint64_t lease_id = 0;
};
enum class ClearScope : uint8_t { kAll = 0, kKeys = 1, kModel = 2 };
struct ClearRequest {
  ClearScope scope = ClearScope::kAll;
  std::vector<ChunkKey> keys;  // kKeys: at most kMaxKeys; must be empty otherwise
  ChunkKey model;              // kModel: the entries reserved under it; must be zero otherwise
};
struct EmptyRequest {};  // stats

using RequestBody = std::variant<HelloRequest, ReserveRequest, CommitRequest, LookupRequest, KeyRequest,
                                 ReleaseRequest, ClearRequest, EmptyRequest>;

struct Request {
  Op op = Op::kHello;
  uint64_t id = 0;
  RequestBody body;
};

// --- replies ----------------------------------------------------------------------------------

enum class ArenaBacking : uint8_t {
  kPosixShm = 0,   // shm_open(name)
  kHugetlbfs = 1,  // open(name): a file on a hugetlbfs mount
};

struct HelloReply {
  std::string node;
  std::string arena_name;  // what to open, see backing
  ArenaBacking backing = ArenaBacking::kPosixShm;
  uint64_t arena_bytes = 0;  // map exactly this many bytes from offset 0
  uint64_t client_id = 0;    // this connection's id in the daemon's logs and stats
};
struct ReserveReply {
  uint64_t reservation_id = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
};
struct LookupReply {
  uint32_t matched = 0;
};
struct AcquireReply {
  uint64_t lease_id = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t checksum = 0;
  KvCodec codec = KvCodec::kIdentity;  // how the leased bytes are encoded
};
struct ClearReply {
  uint64_t removed = 0;
  uint64_t deferred = 0;
  uint64_t bytes = 0;
};
// Named counters, so that either side may add fields without breaking the other. Names are
// 1..64 characters of [a-z0-9_], at most 256 pairs.
struct StatsReply {
  std::vector<std::pair<std::string, uint64_t>> counters;
};
struct EmptyReply {};  // commit, abort, release, pin, unpin

using ReplyBody =
    std::variant<EmptyReply, HelloReply, ReserveReply, LookupReply, AcquireReply, ClearReply, StatsReply>;

struct Reply {
  Op op = Op::kHello;
  uint64_t id = 0;
  Status status;   // not ok: body is EmptyReply
  ReplyBody body;  // the type that belongs to `op` (see reply_body_matches)
};

// Whole frames.
std::vector<uint8_t> encode_request(const Request& request);
std::vector<uint8_t> encode_reply(const Reply& reply);

// Checks magic, version, kind, op and payload length <= kMaxPayload; `bytes` must hold at least
// kHeaderBytes. A header that fails here leaves the stream unsynchronized: close the connection.
Result<FrameHeader> decode_header(std::span<const uint8_t> bytes);
// Checks the payload's length and checksum and decodes it exactly. The header must be a request
// (decode_request) or a reply (decode_reply) header. A failure here leaves the stream in sync: the
// daemon answers it with an error reply and keeps the connection.
Result<Request> decode_request(const FrameHeader& header, std::span<const uint8_t> payload);
Result<Reply> decode_reply(const FrameHeader& header, std::span<const uint8_t> payload);

// A header that decode_header refused only for its version (right magic, another version): the
// error reply that tells the sender so, framed in the sender's version with its request id and op,
// and how many payload bytes follow that header. nullopt for any other header.
struct VersionRefusal {
  uint8_t version = 0;  // the sender's
  uint32_t payload_bytes = 0;
  std::vector<uint8_t> reply;  // a whole frame
};
std::optional<VersionRefusal> version_refusal(std::span<const uint8_t> header_bytes);

// Whether `body` is the request or reply type that `op` carries.
bool request_body_matches(Op op, const RequestBody& body);
bool reply_body_matches(Op op, const ReplyBody& body);

}  // namespace kvf::protocol::store_rpc
