#include "kvf/protocol/store_rpc.h"

#include <xxhash.h>

#include <algorithm>

#include "kvf/protocol/messages.h"
#include "wire_codec.h"

namespace kvf::protocol::store_rpc {

using wire::hex32;
using wire::Reader;
using wire::Writer;

namespace {

constexpr uint32_t kMaxCounters = 256;
constexpr size_t kMaxCounterName = 64;

bool known_op(uint8_t v) {
  return v >= static_cast<uint8_t>(Op::kHello) && v <= static_cast<uint8_t>(Op::kStats);
}

uint32_t checksum_seed(uint8_t version, FrameKind kind, Op op) {
  return (uint32_t{version} << 16) | (uint32_t{static_cast<uint8_t>(kind)} << 8) | static_cast<uint8_t>(op);
}

void put_key(Writer& w, const ChunkKey& k) {
  w.u64(k.hi);
  w.u64(k.lo);
}

bool get_key(Reader& r, std::string_view field, ChunkKey& out) {
  // Two reads, one field name: a truncated key is reported as the key.
  return r.u64(field, out.hi) && r.u64(field, out.lo);
}

void put_keys(Writer& w, const std::vector<ChunkKey>& keys) {
  w.count(keys.size());
  for (const auto& k : keys) put_key(w, k);
}

bool get_keys(Reader& r, std::string_view field, std::vector<ChunkKey>& out) {
  uint32_t n = 0;
  if (!r.count(field, 16, n)) return false;
  if (n > kMaxKeys)
    return r.fail(field, "count " + std::to_string(n) + " exceeds " + std::to_string(kMaxKeys));
  out.resize(n);
  for (auto& k : out) {
    if (!get_key(r, field, k)) return false;
  }
  return true;
}

std::vector<uint8_t> frame(FrameKind kind, Op op, uint64_t id, const std::vector<uint8_t>& payload) {
  Writer h;
  h.u32(kMagic);
  h.u8(kVersion);
  h.u8(static_cast<uint8_t>(kind));
  h.u8(static_cast<uint8_t>(op));
  h.u8(0);
  h.u64(id);
  h.u32(static_cast<uint32_t>(payload.size()));
  h.u32(XXH32(payload.data(), payload.size(), checksum_seed(kVersion, kind, op)));
  std::vector<uint8_t> out = h.take();
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

Status check_payload(const FrameHeader& h, std::span<const uint8_t> payload, std::string_view what) {
  if (payload.size() != h.payload_bytes) {
    return Status(ErrorCode::kMalformed, std::string(what) + ": header says " +
                                             std::to_string(h.payload_bytes) + " payload bytes, got " +
                                             std::to_string(payload.size()));
  }
  const uint32_t sum = XXH32(payload.data(), payload.size(), checksum_seed(h.version, h.kind, h.op));
  if (sum != h.checksum) {
    return Status(ErrorCode::kMalformed, std::string(what) + ": checksum mismatch (header " +
                                             hex32(h.checksum) + ", payload hashes to " + hex32(sum) + ")");
  }
  return Status::Ok();
}

struct RequestEncoder {
  Writer& w;
  void operator()(const HelloRequest& m) { w.string(m.client_name); }
  void operator()(const ReserveRequest& m) {
    put_key(w, m.key);
    w.u64(m.bytes);
    put_key(w, m.model);
    w.u8(static_cast<uint8_t>(m.codec));
  }
  void operator()(const CommitRequest& m) {
    put_key(w, m.key);
    w.u64(m.reservation_id);
  }
  void operator()(const LookupRequest& m) { put_keys(w, m.keys); }
  void operator()(const KeyRequest& m) { put_key(w, m.key); }
  void operator()(const ReleaseRequest& m) { w.u64(m.lease_id); }
  void operator()(const ClearRequest& m) {
    w.u8(static_cast<uint8_t>(m.scope));
    put_keys(w, m.keys);
    put_key(w, m.model);
  }
  void operator()(const EmptyRequest&) {}
};

struct ReplyEncoder {
  Writer& w;
  void operator()(const EmptyReply&) {}
  void operator()(const HelloReply& m) {
    w.string(m.node);
    w.string(m.arena_name);
    w.u8(static_cast<uint8_t>(m.backing));
    w.u64(m.arena_bytes);
    w.u64(m.client_id);
  }
  void operator()(const ReserveReply& m) {
    w.u64(m.reservation_id);
    w.u64(m.offset);
    w.u64(m.length);
  }
  void operator()(const LookupReply& m) { w.u32(m.matched); }
  void operator()(const AcquireReply& m) {
    w.u64(m.lease_id);
    w.u64(m.offset);
    w.u64(m.length);
    w.u64(m.checksum);
    w.u8(static_cast<uint8_t>(m.codec));
  }
  void operator()(const ClearReply& m) {
    w.u64(m.removed);
    w.u64(m.deferred);
    w.u64(m.bytes);
  }
  void operator()(const StatsReply& m) {
    w.count(m.counters.size());
    for (const auto& [name, value] : m.counters) {
      w.string(name);
      w.u64(value);
    }
  }
};

bool get_codec(Reader& r, KvCodec& out) {
  uint8_t codec = 0;
  if (!r.u8("codec", codec)) return false;
  if (codec >= kKvCodecCount) {
    return r.fail("codec", "unknown codec " + std::to_string(codec) + " (0.." +
                               std::to_string(kKvCodecCount - 1) + ")");
  }
  out = static_cast<KvCodec>(codec);
  return true;
}

bool valid_counter_name(const std::string& s) {
  return !s.empty() && s.size() <= kMaxCounterName && std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
  });
}

Result<RequestBody> decode_request_body(Op op, Reader& r) {
  switch (op) {
    case Op::kHello: {
      HelloRequest m;
      r.string("client_name", m.client_name);
      return RequestBody(std::move(m));
    }
    case Op::kReserve: {
      ReserveRequest m;
      get_key(r, "key", m.key);
      r.u64("bytes", m.bytes);
      if (r.ok() && m.bytes == 0) r.fail("bytes", "a chunk of zero bytes");
      get_key(r, "model", m.model);
      get_codec(r, m.codec);
      return RequestBody(m);
    }
    case Op::kCommit:
    case Op::kAbort: {
      CommitRequest m;
      get_key(r, "key", m.key);
      r.u64("reservation_id", m.reservation_id);
      return RequestBody(m);
    }
    case Op::kLookup: {
      LookupRequest m;
      get_keys(r, "keys", m.keys);
      return RequestBody(std::move(m));
    }
    case Op::kAcquire:
    case Op::kPin:
    case Op::kUnpin: {
      KeyRequest m;
      get_key(r, "key", m.key);
      return RequestBody(m);
    }
    case Op::kRelease: {
      ReleaseRequest m;
      r.u64("lease_id", m.lease_id);
      return RequestBody(m);
    }
    case Op::kClear: {
      ClearRequest m;
      uint8_t scope = 0;
      if (r.u8("scope", scope) && scope > static_cast<uint8_t>(ClearScope::kModel)) {
        r.fail("scope", "unknown clear scope " + std::to_string(scope) + " (0 all, 1 keys, 2 model)");
      }
      m.scope = static_cast<ClearScope>(scope);
      get_keys(r, "keys", m.keys);
      if (r.ok() && m.scope != ClearScope::kKeys && !m.keys.empty()) {
        r.fail("keys", "must be empty unless the scope is keys");
      }
      get_key(r, "model", m.model);
      if (r.ok() && m.scope != ClearScope::kModel && !m.model.is_zero()) {
        r.fail("model", "must be zero unless the scope is model");
      }
      return RequestBody(std::move(m));
    }
    case Op::kStats:
      return RequestBody(EmptyRequest{});
  }
  return Status(ErrorCode::kMalformed, "request: unknown op");
}

Result<ReplyBody> decode_reply_body(Op op, Reader& r) {
  switch (op) {
    case Op::kHello: {
      HelloReply m;
      uint8_t backing = 0;
      r.string("node", m.node);
      r.string("arena_name", m.arena_name);
      if (r.u8("backing", backing) && backing > static_cast<uint8_t>(ArenaBacking::kHugetlbfs)) {
        r.fail("backing", "unknown arena backing " + std::to_string(backing));
      }
      m.backing = static_cast<ArenaBacking>(backing);
      r.u64("arena_bytes", m.arena_bytes);
      r.u64("client_id", m.client_id);
      return ReplyBody(std::move(m));
    }
    case Op::kReserve: {
      ReserveReply m;
      r.u64("reservation_id", m.reservation_id);
      r.u64("offset", m.offset);
      r.u64("length", m.length);
      return ReplyBody(m);
    }
    case Op::kLookup: {
      LookupReply m;
      r.u32("matched", m.matched);
      return ReplyBody(m);
    }
    case Op::kAcquire: {
      AcquireReply m;
      r.u64("lease_id", m.lease_id);
      r.u64("offset", m.offset);
      r.u64("length", m.length);
      r.u64("checksum", m.checksum);
      get_codec(r, m.codec);
      return ReplyBody(m);
    }
    case Op::kClear: {
      ClearReply m;
      r.u64("removed", m.removed);
      r.u64("deferred", m.deferred);
      r.u64("bytes", m.bytes);
      return ReplyBody(m);
    }
    case Op::kStats: {
      StatsReply m;
      uint32_t n = 0;
      // A pair is at least a 4-byte length, one character and a u64.
      if (r.count("counters", 13, n)) {
        if (n > kMaxCounters) {
          r.fail("counters", "count " + std::to_string(n) + " exceeds " + std::to_string(kMaxCounters));
        }
        for (uint32_t i = 0; i < n && r.ok(); ++i) {
          r.enter("counters", i);
          std::string name;
          uint64_t value = 0;
          if (r.string("name", name) && !valid_counter_name(name)) {
            r.fail("name", "counter names are 1..64 characters of [a-z0-9_]");
          }
          r.u64("value", value);
          r.leave();
          m.counters.emplace_back(std::move(name), value);
        }
      }
      return ReplyBody(std::move(m));
    }
    case Op::kCommit:
    case Op::kAbort:
    case Op::kRelease:
    case Op::kPin:
    case Op::kUnpin:
      return ReplyBody(EmptyReply{});
  }
  return Status(ErrorCode::kMalformed, "reply: unknown op");
}

}  // namespace

std::string_view op_name(Op op) {
  switch (op) {
    case Op::kHello:
      return "hello";
    case Op::kReserve:
      return "reserve";
    case Op::kCommit:
      return "commit";
    case Op::kAbort:
      return "abort";
    case Op::kLookup:
      return "lookup";
    case Op::kAcquire:
      return "acquire";
    case Op::kRelease:
      return "release";
    case Op::kPin:
      return "pin";
    case Op::kUnpin:
      return "unpin";
    case Op::kClear:
      return "clear";
    case Op::kStats:
      return "stats";
  }
  return "unknown";
}

bool request_body_matches(Op op, const RequestBody& body) {
  switch (op) {
    case Op::kHello:
      return std::holds_alternative<HelloRequest>(body);
    case Op::kReserve:
      return std::holds_alternative<ReserveRequest>(body);
    case Op::kCommit:
    case Op::kAbort:
      return std::holds_alternative<CommitRequest>(body);
    case Op::kLookup:
      return std::holds_alternative<LookupRequest>(body);
    case Op::kAcquire:
    case Op::kPin:
    case Op::kUnpin:
      return std::holds_alternative<KeyRequest>(body);
    case Op::kRelease:
      return std::holds_alternative<ReleaseRequest>(body);
    case Op::kClear:
      return std::holds_alternative<ClearRequest>(body);
    case Op::kStats:
      return std::holds_alternative<EmptyRequest>(body);
  }
  return false;
}

bool reply_body_matches(Op op, const ReplyBody& body) {
  switch (op) {
    case Op::kHello:
      return std::holds_alternative<HelloReply>(body);
    case Op::kReserve:
      return std::holds_alternative<ReserveReply>(body);
    case Op::kLookup:
      return std::holds_alternative<LookupReply>(body);
    case Op::kAcquire:
      return std::holds_alternative<AcquireReply>(body);
    case Op::kClear:
      return std::holds_alternative<ClearReply>(body);
    case Op::kStats:
      return std::holds_alternative<StatsReply>(body);
    case Op::kCommit:
    case Op::kAbort:
    case Op::kRelease:
    case Op::kPin:
    case Op::kUnpin:
      return std::holds_alternative<EmptyReply>(body);
  }
  return false;
}

std::vector<uint8_t> encode_request(const Request& request) {
  Writer w;
  std::visit(RequestEncoder{w}, request.body);
  return frame(FrameKind::kRequest, request.op, request.id, w.buffer());
}

std::vector<uint8_t> encode_reply(const Reply& reply) {
  Writer w;
  w.u16(static_cast<uint16_t>(reply.status.code()));
  if (!reply.status.ok()) {
    // Messages are for people; cut rather than refuse a long one (the decoder caps strings).
    std::string message = reply.status.message();
    if (message.size() > kMaxStringBytes) message.resize(kMaxStringBytes);
    w.string(message);
  } else {
    std::visit(ReplyEncoder{w}, reply.body);
  }
  return frame(FrameKind::kReply, reply.op, reply.id, w.buffer());
}

Result<FrameHeader> decode_header(std::span<const uint8_t> bytes) {
  if (bytes.size() < kHeaderBytes) {
    return Status(ErrorCode::kMalformed, "store rpc header: need " + std::to_string(kHeaderBytes) +
                                             " bytes, have " + std::to_string(bytes.size()));
  }
  Reader r(bytes.first(kHeaderBytes), "store rpc header");
  uint32_t magic = 0;
  uint8_t kind = 0;
  uint8_t op = 0;
  uint8_t reserved = 0;
  FrameHeader h;
  r.u32("magic", magic);
  r.u8("version", h.version);
  r.u8("kind", kind);
  r.u8("op", op);
  r.u8("reserved", reserved);
  r.u64("request_id", h.request_id);
  r.u32("payload_bytes", h.payload_bytes);
  r.u32("checksum", h.checksum);
  if (Status s = r.finish(); !s.ok()) return s;
  if (magic != kMagic) {
    return Status(ErrorCode::kMalformed,
                  "store rpc header: bad magic " + hex32(magic) + " (expected " + hex32(kMagic) + ")");
  }
  if (h.version != kVersion) {
    return Status(ErrorCode::kUnsupportedVersion, "store rpc header: version " + std::to_string(h.version) +
                                                      " is not supported (this side speaks version " +
                                                      std::to_string(kVersion) + ")");
  }
  if (kind != static_cast<uint8_t>(FrameKind::kRequest) && kind != static_cast<uint8_t>(FrameKind::kReply)) {
    return Status(ErrorCode::kMalformed, "store rpc header: unknown frame kind " + std::to_string(kind));
  }
  h.kind = static_cast<FrameKind>(kind);
  if (!known_op(op))
    return Status(ErrorCode::kMalformed, "store rpc header: unknown op " + std::to_string(op));
  h.op = static_cast<Op>(op);
  if (reserved != 0) {
    return Status(ErrorCode::kMalformed, "store rpc header: reserved byte is " + std::to_string(reserved));
  }
  if (h.payload_bytes > kMaxPayload) {
    return Status(ErrorCode::kMalformed, "store rpc header: payload of " + std::to_string(h.payload_bytes) +
                                             " bytes exceeds the limit of " + std::to_string(kMaxPayload));
  }
  return h;
}

std::optional<VersionRefusal> version_refusal(std::span<const uint8_t> header_bytes) {
  if (header_bytes.size() < kHeaderBytes) return std::nullopt;
  Reader r(header_bytes.first(kHeaderBytes), "store rpc header");
  uint32_t magic = 0;
  uint8_t version = 0;
  uint8_t kind = 0;
  uint8_t op = 0;
  uint8_t reserved = 0;
  uint64_t id = 0;
  uint32_t payload_bytes = 0;
  r.u32("magic", magic);
  r.u8("version", version);
  r.u8("kind", kind);
  r.u8("op", op);
  r.u8("reserved", reserved);
  r.u64("request_id", id);
  r.u32("payload_bytes", payload_bytes);
  if (!r.ok() || magic != kMagic || version == kVersion) return std::nullopt;
  // An error reply: code u16, message string; the layout every version shares.
  const std::string message = "store rpc version " + std::to_string(version) +
                              " is not supported: this kvfabricd speaks version " + std::to_string(kVersion) +
                              " (engines and kvfabricd must come from the same kvfabric release)";
  Writer p;
  p.u16(static_cast<uint16_t>(ErrorCode::kUnsupportedVersion));
  p.string(message);
  const std::vector<uint8_t>& payload = p.buffer();
  Writer h;
  h.u32(kMagic);
  h.u8(version);
  h.u8(static_cast<uint8_t>(FrameKind::kReply));
  h.u8(op);
  h.u8(0);
  h.u64(id);
  h.u32(static_cast<uint32_t>(payload.size()));
  h.u32(XXH32(payload.data(), payload.size(),
              (uint32_t{version} << 16) | (uint32_t{static_cast<uint8_t>(FrameKind::kReply)} << 8) | op));
  VersionRefusal out;
  out.version = version;
  out.payload_bytes = payload_bytes;
  out.reply = h.take();
  out.reply.insert(out.reply.end(), payload.begin(), payload.end());
  return out;
}

Result<Request> decode_request(const FrameHeader& header, std::span<const uint8_t> payload) {
  const std::string what = std::string(op_name(header.op)) + " request";
  if (header.kind != FrameKind::kRequest)
    return Status(ErrorCode::kMalformed, what + ": frame is not a request");
  if (Status s = check_payload(header, payload, what); !s.ok()) return s;
  Reader r(payload, what);
  auto body = decode_request_body(header.op, r);
  if (!body.ok()) return body.status();
  if (Status s = r.finish(); !s.ok()) return s;
  return Request{header.op, header.request_id, std::move(body.value())};
}

Result<Reply> decode_reply(const FrameHeader& header, std::span<const uint8_t> payload) {
  const std::string what = std::string(op_name(header.op)) + " reply";
  if (header.kind != FrameKind::kReply) return Status(ErrorCode::kMalformed, what + ": frame is not a reply");
  if (Status s = check_payload(header, payload, what); !s.ok()) return s;
  Reader r(payload, what);
  uint16_t code = 0;
  r.u16("code", code);
  Reply reply;
  reply.op = header.op;
  reply.id = header.request_id;
  if (r.ok() && code != 0) {
    if (error_code_name(static_cast<ErrorCode>(code)) == "unknown") {
      r.fail("code", "unknown error code " + std::to_string(code));
    }
    std::string message;
    r.string("message", message);
    if (Status s = r.finish(); !s.ok()) return s;
    reply.status = Status(static_cast<ErrorCode>(code), std::move(message));
    reply.body = EmptyReply{};
    return reply;
  }
  auto body = decode_reply_body(header.op, r);
  if (!body.ok()) return body.status();
  if (Status s = r.finish(); !s.ok()) return s;
  reply.body = std::move(body.value());
  return reply;
}

}  // namespace kvf::protocol::store_rpc
