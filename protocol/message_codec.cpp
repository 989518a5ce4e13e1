// The payload of each control message: one encode/decode pair per message, fields in
// declaration order, primitives as in wire_codec.h.
#include "message_codec.h"

#include <utility>

namespace kvf::protocol {
namespace {

using wire::Reader;
using wire::Writer;

// Encoded sizes of the smallest list items, for the count checks before allocation.
constexpr size_t kRegionDescriptorMinBytes = 8 + 8 + 8 + 1 + 4 + 4;

// --- shared pieces -----------------------------------------------------------------------------

bool known_error_code(uint16_t v) {
  // error_code_name covers every enumerator (the compiler warns on a missing case), so this
  // check follows the enum without a second list to keep in sync.
  return error_code_name(static_cast<ErrorCode>(v)) != "unknown";
}

void put(Writer& w, ErrorCode c) {
  w.u16(static_cast<uint16_t>(c));
}
bool get(Reader& r, std::string_view field, ErrorCode& out) {
  uint16_t v = 0;
  if (!r.u16(field, v)) return false;
  if (!known_error_code(v)) return r.fail(field, "unknown error code " + std::to_string(v));
  out = static_cast<ErrorCode>(v);
  return true;
}

void put(Writer& w, const KvLayoutDesc& d) {
  w.u8(static_cast<uint8_t>(d.kind));
  w.u32(d.num_layers);
  w.u32(d.num_blocks);
  w.u32(d.block_tokens);
  w.u32(d.kv_heads);
  w.u32(d.head_dim);
  w.u32(d.dtype_bytes);
}
// Only the encoding is checked here; whether the numbers make a usable layout is
// KvLayout::create's call, made by whoever uses the layout.
bool get(Reader& r, KvLayoutDesc& d) {
  uint8_t kind = 0;
  if (!r.u8("layout.kind", kind)) return false;
  if (kind > static_cast<uint8_t>(KvLayoutKind::kMla)) {
    return r.fail("layout.kind", "unknown layout kind " + std::to_string(kind));
  }
  d.kind = static_cast<KvLayoutKind>(kind);
  return r.u32("layout.num_layers", d.num_layers) && r.u32("layout.num_blocks", d.num_blocks) &&
         r.u32("layout.block_tokens", d.block_tokens) && r.u32("layout.kv_heads", d.kv_heads) &&
         r.u32("layout.head_dim", d.head_dim) && r.u32("layout.dtype_bytes", d.dtype_bytes);
}

void put(Writer& w, const RegionDescriptor& d) {
  w.u64(d.region_id);
  w.u64(d.base_address);
  w.u64(d.length);
  w.u8(static_cast<uint8_t>(d.kind));
  w.bytes(d.ucx_rkey);
  w.bytes(d.cuda_ipc);
}
// The caller names the descriptor with Reader::enter().
bool get(Reader& r, RegionDescriptor& d) {
  uint8_t kind = 0;
  if (!(r.u64("region_id", d.region_id) && r.u64("base_address", d.base_address) &&
        r.u64("length", d.length) && r.u8("kind", kind))) {
    return false;
  }
  if (kind > static_cast<uint8_t>(MemoryKind::kCudaDevice)) {
    return r.fail("kind", "unknown memory kind " + std::to_string(kind));
  }
  d.kind = static_cast<MemoryKind>(kind);
  if (!r.bytes("ucx_rkey", d.ucx_rkey) || !r.bytes("cuda_ipc", d.cuda_ipc)) return false;
  r.leave();
  return true;
}

// --- one encode/decode pair per message ------------------------------------------------------

void put(Writer& w, const Hello& m) {
  w.u16(m.min_version);
  w.u16(m.max_version);
  w.string(m.peer_name);
  w.bytes(m.transport_address);
  w.bytes(m.auth_proof);
}
bool get(Reader& r, Hello& m) {
  return r.u16("min_version", m.min_version) && r.u16("max_version", m.max_version) &&
         r.string("peer_name", m.peer_name) && r.bytes("transport_address", m.transport_address) &&
         r.bytes("auth_proof", m.auth_proof);
}

void put(Writer& w, const HelloAck& m) {
  w.u16(m.version);
  w.string(m.peer_name);
  w.bytes(m.transport_address);
  w.u64(m.session_id);
}
bool get(Reader& r, HelloAck& m) {
  return r.u16("version", m.version) && r.string("peer_name", m.peer_name) &&
         r.bytes("transport_address", m.transport_address) && r.u64("session_id", m.session_id);
}

void put(Writer& w, const RegionGrant& m) {
  w.u64(m.grant_id);
  put(w, m.layout);
  w.count(m.layer_regions.size());
  for (const auto& d : m.layer_regions) put(w, d);
}
bool get(Reader& r, RegionGrant& m) {
  uint32_t n = 0;
  if (!(r.u64("grant_id", m.grant_id) && get(r, m.layout) &&
        r.count("layer_regions", kRegionDescriptorMinBytes, n))) {
    return false;
  }
  m.layer_regions.resize(n);
  for (uint32_t i = 0; i < n; ++i) {
    r.enter("layer_regions", i);
    if (!get(r, m.layer_regions[i])) return false;
  }
  return true;
}

void put(Writer& w, const StreamOffer& m) {
  w.u64(m.request_id);
  put(w, m.layout);
  w.u32(m.num_blocks);
  w.u64(m.seed);
  w.u32(m.flags);
  w.bytes(m.context);
}
bool get(Reader& r, StreamOffer& m) {
  if (!(r.u64("request_id", m.request_id) && get(r, m.layout) && r.u32("num_blocks", m.num_blocks) &&
        r.u64("seed", m.seed) && r.u32("flags", m.flags) && r.bytes("context", m.context))) {
    return false;
  }
  if (m.context.size() > kMaxStreamContext)
    return r.fail("context",
                  std::to_string(m.context.size()) + " bytes, at most " + std::to_string(kMaxStreamContext));
  // Unknown bits would be silently ignored by this receiver; a peer of the same protocol
  // version never sets them, so they mean corruption or a bug.
  constexpr uint32_t kKnownFlags = kStreamVerify | kStreamShuffle;
  if ((m.flags & ~kKnownFlags) != 0)
    return r.fail("flags", "unknown flag bits " + wire::hex32(m.flags & ~kKnownFlags));
  return true;
}

void put(Writer& w, const RecvPlan& m) {
  w.u64(m.request_id);
  w.u64(m.grant_id);
  w.count(m.dst_blocks.size());
  for (uint32_t b : m.dst_blocks) w.u32(b);
}
bool get(Reader& r, RecvPlan& m) {
  uint32_t n = 0;
  if (!(r.u64("request_id", m.request_id) && r.u64("grant_id", m.grant_id) && r.count("dst_blocks", 4, n))) {
    return false;
  }
  m.dst_blocks.resize(n);
  for (auto& b : m.dst_blocks) r.u32("dst_blocks", b);  // cannot fail: count was checked
  return r.ok();
}

void put(Writer& w, const StreamResult& m) {
  w.u64(m.request_id);
  put(w, m.code);
  w.string(m.message);
  w.u64(m.bytes_received);
  w.u64(m.bytes_verified);
  w.count(m.layer_arrival_ns.size());
  for (uint64_t t : m.layer_arrival_ns) w.u64(t);
}
bool get(Reader& r, StreamResult& m) {
  uint32_t n = 0;
  if (!(r.u64("request_id", m.request_id) && get(r, "code", m.code) && r.string("message", m.message) &&
        r.u64("bytes_received", m.bytes_received) && r.u64("bytes_verified", m.bytes_verified) &&
        r.count("layer_arrival_ns", 8, n))) {
    return false;
  }
  m.layer_arrival_ns.resize(n);
  for (auto& t : m.layer_arrival_ns) r.u64("layer_arrival_ns", t);
  return r.ok();
}

void put(Writer& w, const Abort& m) {
  w.u64(m.request_id);
  put(w, m.code);
  w.string(m.message);
}
bool get(Reader& r, Abort& m) {
  return r.u64("request_id", m.request_id) && get(r, "code", m.code) && r.string("message", m.message);
}

void put(Writer& w, const RunRequest& m) {
  w.u64(m.run_id);
  w.u8(static_cast<uint8_t>(m.mode));
  w.u64(m.bytes);
  w.u32(m.iters);
}
bool get(Reader& r, RunRequest& m) {
  uint8_t mode = 0;
  if (!(r.u64("run_id", m.run_id) && r.u8("mode", mode))) return false;
  if (mode > static_cast<uint8_t>(RunMode::kLatency))
    return r.fail("mode", "unknown run mode " + std::to_string(mode));
  m.mode = static_cast<RunMode>(mode);
  return r.u64("bytes", m.bytes) && r.u32("iters", m.iters);
}

void put(Writer& w, const RunResult& m) {
  w.u64(m.run_id);
  put(w, m.code);
  w.string(m.message);
  put(w, m.target);
}
bool get(Reader& r, RunResult& m) {
  if (!(r.u64("run_id", m.run_id) && get(r, "code", m.code) && r.string("message", m.message))) return false;
  r.enter("target");
  return get(r, m.target);
}

void put(Writer& w, const ErrorReply& m) {
  put(w, m.code);
  w.string(m.message);
}
bool get(Reader& r, ErrorReply& m) {
  return get(r, "code", m.code) && r.string("message", m.message);
}

void put(Writer& w, const Bye& m) {
  w.string(m.reason);
}
bool get(Reader& r, Bye& m) {
  return r.string("reason", m.reason);
}

template <typename T>
Result<Message> decode_as(std::span<const uint8_t> payload, MessageType type) {
  Reader r(payload, message_type_name(type));
  T m;
  get(r, m);
  Status s = r.finish();
  if (!s.ok()) return s;
  return Message(std::move(m));
}

}  // namespace

void encode_message_payload(const Message& message, wire::Writer& w) {
  std::visit([&](const auto& m) { put(w, m); }, message);
}

Result<Message> decode_message_payload(MessageType type, std::span<const uint8_t> payload) {
  switch (type) {
    case MessageType::kHello:
      return decode_as<Hello>(payload, type);
    case MessageType::kHelloAck:
      return decode_as<HelloAck>(payload, type);
    case MessageType::kRegionGrant:
      return decode_as<RegionGrant>(payload, type);
    case MessageType::kStreamOffer:
      return decode_as<StreamOffer>(payload, type);
    case MessageType::kRecvPlan:
      return decode_as<RecvPlan>(payload, type);
    case MessageType::kStreamResult:
      return decode_as<StreamResult>(payload, type);
    case MessageType::kAbort:
      return decode_as<Abort>(payload, type);
    case MessageType::kRunRequest:
      return decode_as<RunRequest>(payload, type);
    case MessageType::kRunResult:
      return decode_as<RunResult>(payload, type);
    case MessageType::kErrorReply:
      return decode_as<ErrorReply>(payload, type);
    case MessageType::kBye:
      return decode_as<Bye>(payload, type);
  }
  return Status(ErrorCode::kMalformed, "unknown message type " + std::to_string(static_cast<uint16_t>(type)));
}

}  // namespace kvf::protocol
