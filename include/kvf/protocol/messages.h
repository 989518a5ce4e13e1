// Control messages: what peers say to each other over the control channel (TCP), and how they are
// framed. Every frame is
//   magic u32 "KVF1" | version u16 | type u16 | payload length u32 | checksum u32 | payload
// all little-endian; checksum = XXH32(payload, seed = frame_checksum_seed(type)), so a corrupted
// type is caught as surely as a corrupted payload. The decoder turns any malformed input (bad magic, unknown
// version or type, oversized or truncated payload, bad checksum, counts past the end, trailing bytes) into a
// kMalformed/kUnsupportedVersion Status: never a crash, never a read out of range.
// Plain value types and free functions; no shared state.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "kvf/protocol/kv_layout.h"
#include "kvf/protocol/status.h"

namespace kvf::protocol {

inline constexpr uint32_t kFrameMagic = 0x3146564Bu;  // "KVF1" read as little-endian u32
// 2: RegionDescriptor carries a CUDA IPC handle.
inline constexpr uint16_t kProtocolVersion = 3;
inline constexpr size_t kFrameHeaderBytes = 16;
inline constexpr uint32_t kMaxFramePayload = 64u << 20;  // 64 MiB
inline constexpr uint32_t kMaxStringBytes = 4096;        // names, messages, tokens

enum class MessageType : uint16_t {
  kHello = 1,
  kHelloAck = 2,
  kRegionGrant = 3,
  kStreamOffer = 4,
  kRecvPlan = 5,
  kStreamResult = 6,
  kAbort = 7,
  kRunRequest = 8,
  kRunResult = 9,
  kErrorReply = 10,
  kBye = 11,
};

enum class MemoryKind : uint8_t { kHost = 0, kSharedMemory = 1, kPinnedHost = 2, kCudaDevice = 3 };

// A registered memory range as a peer needs to see it to write into it.
struct RegionDescriptor {
  uint64_t region_id = 0;
  uint64_t base_address = 0;
  uint64_t length = 0;
  MemoryKind kind = MemoryKind::kHost;
  std::vector<uint8_t> ucx_rkey;  // packed UCX rkey (may be empty for transports that need none)
  // CUDA device memory: the exporter's CUDA IPC blob for the allocation (see cuda_ipc_region.h),
  // so a process on the same host can map it; empty otherwise.
  std::vector<uint8_t> cuda_ipc;
  bool operator==(const RegionDescriptor&) const = default;
};

// Connecting side -> accepting side, first frame on a connection.
struct Hello {
  uint16_t min_version = kProtocolVersion;
  uint16_t max_version = kProtocolVersion;
  std::string peer_name;                   // node/engine/tool name, for logs
  std::vector<uint8_t> transport_address;  // e.g. the UCX worker address
  std::vector<uint8_t> auth_proof;         // empty when the topology sets no auth token
  bool operator==(const Hello&) const = default;
};

// Accepting side -> connecting side.
struct HelloAck {
  uint16_t version = kProtocolVersion;
  std::string peer_name;
  std::vector<uint8_t> transport_address;
  uint64_t session_id = 0;  // chosen by the acceptor; carried in every notification of this connection
  bool operator==(const HelloAck&) const = default;
};

// The receiver grants the sender write access to its KV layer buffers: one region per layer
// (several layers may lie in one registered allocation), and the layout they follow.
struct RegionGrant {
  uint64_t grant_id = 0;
  KvLayoutDesc layout;
  std::vector<RegionDescriptor> layer_regions;
  bool operator==(const RegionGrant&) const = default;
};

// Sender -> receiver: "I have a request of num_blocks blocks to stream in this layout".
struct StreamOffer {
  uint64_t request_id = 0;
  KvLayoutDesc layout;      // the sender's layout (num_blocks = the sender's pool size)
  uint32_t num_blocks = 0;  // blocks in this request
  uint64_t seed = 0;        // test/perf streams: the data generator's seed, for verification
  uint32_t flags = 0;       // kStreamVerify | kStreamShuffle
  // Engine streams: what the receiving engine needs to continue the request (kvfabric-engine:
  // the prompt's length and last token), opaque to the fabric; at most kMaxStreamContext bytes.
  std::vector<uint8_t> context;
  bool operator==(const StreamOffer&) const = default;
};
inline constexpr size_t kMaxStreamContext = 4096;
inline constexpr uint32_t kStreamVerify = 1u << 0;
inline constexpr uint32_t kStreamShuffle = 1u << 1;

// Receiver -> sender: where each block of the request goes (dst_blocks[i] receives the request's
// i-th block) in the regions of grant grant_id.
struct RecvPlan {
  uint64_t request_id = 0;
  uint64_t grant_id = 0;
  std::vector<uint32_t> dst_blocks;
  bool operator==(const RecvPlan&) const = default;
};

// Receiver -> sender when a stream ends: all layers arrived (and verified, when asked), or why not.
struct StreamResult {
  uint64_t request_id = 0;
  ErrorCode code = ErrorCode::kOk;
  std::string message;
  uint64_t bytes_received = 0;
  uint64_t bytes_verified = 0;
  std::vector<uint64_t> layer_arrival_ns;  // per layer, since the receiver saw the offer
  bool operator==(const StreamResult&) const = default;
};

// Either side: stop this request; what arrived is not complete.
struct Abort {
  uint64_t request_id = 0;
  ErrorCode code = ErrorCode::kAborted;
  std::string message;
  bool operator==(const Abort&) const = default;
};

// kvfabric-perf: the client asks the server for a target buffer of `bytes` for bw/lat runs.
enum class RunMode : uint8_t { kBandwidth = 0, kLatency = 1 };
struct RunRequest {
  uint64_t run_id = 0;
  RunMode mode = RunMode::kBandwidth;
  uint64_t bytes = 0;
  uint32_t iters = 0;
  bool operator==(const RunRequest&) const = default;
};
// Server -> client: the granted target (code != kOk: refused, with message).
struct RunResult {
  uint64_t run_id = 0;
  ErrorCode code = ErrorCode::kOk;
  std::string message;
  RegionDescriptor target;
  bool operator==(const RunResult&) const = default;
};

// Reply to a frame that could not be decoded or served; the connection may close after it.
struct ErrorReply {
  ErrorCode code = ErrorCode::kInternal;
  std::string message;
  bool operator==(const ErrorReply&) const = default;
};

struct Bye {
  std::string reason;
  bool operator==(const Bye&) const = default;
};

using Message = std::variant<Hello, HelloAck, RegionGrant, StreamOffer, RecvPlan, StreamResult, Abort,
                             RunRequest, RunResult, ErrorReply, Bye>;

MessageType message_type(const Message& message);
std::string_view message_type_name(MessageType type);

struct FrameHeader {
  uint32_t magic = kFrameMagic;
  uint16_t version = kProtocolVersion;
  MessageType type = MessageType::kHello;
  uint32_t payload_bytes = 0;
  uint32_t checksum = 0;
};

// (version << 16) | type: binds the checksum to the header fields that choose the decoder.
constexpr uint32_t frame_checksum_seed(MessageType type) {
  return (uint32_t{kProtocolVersion} << 16) | static_cast<uint16_t>(type);
}

// Whole frame: header + payload.
std::vector<uint8_t> encode_frame(const Message& message);
// Checks magic, version, known type, payload_bytes <= kMaxFramePayload. `bytes` must hold at
// least kFrameHeaderBytes (else kMalformed).
Result<FrameHeader> decode_frame_header(std::span<const uint8_t> bytes);
// Checks the checksum and decodes the payload exactly (no trailing bytes).
Result<Message> decode_payload(const FrameHeader& header, std::span<const uint8_t> payload);
// One whole frame, exactly (header + payload, nothing after).
Result<Message> decode_frame(std::span<const uint8_t> bytes);

}  // namespace kvf::protocol
