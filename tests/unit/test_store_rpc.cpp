// The store RPC codec (engine <-> kvfabricd): every request and reply survives a round trip, and
// every kind of malformed input (header, checksum, payload) is an error naming the problem, never
// a crash, a read out of range or an oversized allocation.
#include <xxhash.h>

#include <cstring>
#include <string>
#include <vector>

#include "catch.h"
#include "kvf/protocol/store_rpc.h"

using namespace kvf;
using namespace kvf::protocol;
using namespace kvf::protocol::store_rpc;

namespace {

const ChunkKey kKey{0x0123456789abcdefull, 0xfedcba9876543210ull};
const ChunkKey kModel{0x1111222233334444ull, 0x5555666677778888ull};

void put_le(std::vector<uint8_t>& b, size_t at, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b[at + static_cast<size_t>(i)] = static_cast<uint8_t>(v >> (8 * i));
}

std::vector<uint8_t> le(uint64_t v, int n) {
  std::vector<uint8_t> b(static_cast<size_t>(n));
  put_le(b, 0, v, n);
  return b;
}

std::vector<uint8_t> cat(std::initializer_list<std::vector<uint8_t>> parts) {
  std::vector<uint8_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

// A frame around a hand-made payload with a correct checksum, so that it reaches the payload decoder.
std::vector<uint8_t> frame_with(FrameKind kind, Op op, const std::vector<uint8_t>& payload, uint64_t id = 7) {
  std::vector<uint8_t> f(kHeaderBytes);
  put_le(f, 0, kMagic, 4);
  f[4] = kVersion;
  f[5] = static_cast<uint8_t>(kind);
  f[6] = static_cast<uint8_t>(op);
  f[7] = 0;
  put_le(f, 8, id, 8);
  put_le(f, 16, payload.size(), 4);
  const uint32_t seed =
      (uint32_t{kVersion} << 16) | (uint32_t{static_cast<uint8_t>(kind)} << 8) | static_cast<uint8_t>(op);
  put_le(f, 20, XXH32(payload.data(), payload.size(), seed), 4);
  f.insert(f.end(), payload.begin(), payload.end());
  return f;
}

std::span<const uint8_t> payload_of(const std::vector<uint8_t>& frame) {
  return std::span<const uint8_t>(frame).subspan(kHeaderBytes);
}

Result<Request> decode_request_frame(const std::vector<uint8_t>& frame) {
  auto header = decode_header(frame);
  if (!header.ok()) return header.status();
  return decode_request(*header, payload_of(frame));
}

Result<Reply> decode_reply_frame(const std::vector<uint8_t>& frame) {
  auto header = decode_header(frame);
  if (!header.ok()) return header.status();
  return decode_reply(*header, payload_of(frame));
}

void require_error(const Status& s, ErrorCode code, std::string_view part) {
  INFO(s.to_string());
  REQUIRE_FALSE(s.ok());
  CHECK(s.code() == code);
  CHECK(s.message().find(part) != std::string::npos);
}

std::vector<Request> sample_requests() {
  return {
      {Op::kHello, 1, HelloRequest{"prefill0 pid 42"}},
      {Op::kReserve, 2, ReserveRequest{kKey, 1 << 20, kModel}},
      {Op::kReserve, 2, ReserveRequest{kKey, 1, {}}},
      {Op::kReserve, 2, ReserveRequest{kKey, 4096, kModel, KvCodec::kDrop}},
      {Op::kCommit, 3, CommitRequest{kKey, 99}},
      {Op::kAbort, 4, CommitRequest{kKey, 100}},
      {Op::kLookup, 5, LookupRequest{{kKey, ChunkKey{1, 2}, ChunkKey{3, 4}}}},
      {Op::kLookup, 6, LookupRequest{{}}},
      {Op::kAcquire, 7, KeyRequest{kKey}},
      {Op::kRelease, 8, ReleaseRequest{12345}},
      {Op::kPin, 9, KeyRequest{kKey}},
      {Op::kUnpin, 10, KeyRequest{kKey}},
      {Op::kClear, 11, ClearRequest{ClearScope::kAll, {}, {}}},
      {Op::kClear, 12, ClearRequest{ClearScope::kKeys, {kKey}, {}}},
      {Op::kClear, 13, ClearRequest{ClearScope::kModel, {}, kModel}},
      {Op::kStats, 0xffffffffffffffffull, EmptyRequest{}},
  };
}

std::vector<Reply> sample_replies() {
  return {
      {Op::kHello, 1, Status::Ok(),
       HelloReply{"node-a", "/kvfabric-node-a-12", ArenaBacking::kPosixShm, 1ull << 30, 3}},
      {Op::kHello, 1, Status::Ok(),
       HelloReply{"n", "/dev/hugepages/kvfabric-n-1", ArenaBacking::kHugetlbfs, 2 << 20, 1}},
      {Op::kReserve, 2, Status::Ok(), ReserveReply{5, 4096, 1 << 20}},
      {Op::kCommit, 3, Status::Ok(), EmptyReply{}},
      {Op::kLookup, 5, Status::Ok(), LookupReply{2}},
      {Op::kAcquire, 7, Status::Ok(), AcquireReply{8, 4096, 1 << 20, 0xabcdef}},
      {Op::kAcquire, 7, Status::Ok(), AcquireReply{8, 4096, 1 << 20, 0xabcdef, KvCodec::kInt8}},
      {Op::kClear, 11, Status::Ok(), ClearReply{3, 1, 3 << 20}},
      {Op::kStats, 12, Status::Ok(), StatsReply{{{"entries", 3}, {"bytes_used", 12345}}}},
      {Op::kReserve, 13, Status(ErrorCode::kOutOfMemory, "store full"), EmptyReply{}},
      {Op::kRelease, 14, Status(ErrorCode::kNotFound, "lease 3 is unknown"), EmptyReply{}},
  };
}

}  // namespace

TEST_CASE("store rpc: every request survives a round trip") {
  for (const Request& request : sample_requests()) {
    INFO(op_name(request.op));
    REQUIRE(request_body_matches(request.op, request.body));
    const std::vector<uint8_t> frame = encode_request(request);
    auto decoded = decode_request_frame(frame);
    REQUIRE(decoded.ok());
    CHECK(decoded->op == request.op);
    CHECK(decoded->id == request.id);
    CHECK(request_body_matches(decoded->op, decoded->body));
    // Exact decoding: re-encoding gives the same bytes.
    CHECK(encode_request(*decoded) == frame);
  }
}

TEST_CASE("store rpc: every reply survives a round trip, errors with their code and message") {
  for (const Reply& reply : sample_replies()) {
    INFO(op_name(reply.op));
    const std::vector<uint8_t> frame = encode_reply(reply);
    auto decoded = decode_reply_frame(frame);
    REQUIRE(decoded.ok());
    CHECK(decoded->op == reply.op);
    CHECK(decoded->id == reply.id);
    CHECK(decoded->status.code() == reply.status.code());
    CHECK(decoded->status.message() == reply.status.message());
    if (reply.status.ok()) CHECK(reply_body_matches(decoded->op, decoded->body));
    CHECK(encode_reply(*decoded) == frame);
  }
  auto hello = decode_reply_frame(encode_reply(sample_replies()[0]));
  REQUIRE(hello.ok());
  const auto& h = std::get<HelloReply>(hello->body);
  CHECK(h.arena_name == "/kvfabric-node-a-12");
  CHECK(h.arena_bytes == 1ull << 30);
  CHECK(h.client_id == 3);
}

TEST_CASE("store rpc: bad headers are refused before any payload is read") {
  const std::vector<uint8_t> good = encode_request({Op::kStats, 1, EmptyRequest{}});
  REQUIRE(decode_header(good).ok());

  require_error(decode_header(std::span(good).first(kHeaderBytes - 1)).status(), ErrorCode::kMalformed,
                "need 24 bytes, have 23");
  auto with = [&](size_t at, uint64_t v, int n) {
    std::vector<uint8_t> f = good;
    put_le(f, at, v, n);
    return decode_header(f).status();
  };
  require_error(with(0, 0x46545448, 4), ErrorCode::kMalformed, "bad magic 0x46545448");
  require_error(with(4, 1, 1), ErrorCode::kUnsupportedVersion, "version 1 is not supported");
  require_error(with(4, 2, 1), ErrorCode::kUnsupportedVersion, "version 2 is not supported");
  require_error(with(4, 4, 1), ErrorCode::kUnsupportedVersion, "version 4 is not supported");
  require_error(with(5, 3, 1), ErrorCode::kMalformed, "unknown frame kind 3");
  require_error(with(6, 0, 1), ErrorCode::kMalformed, "unknown op 0");
  require_error(with(6, 12, 1), ErrorCode::kMalformed, "unknown op 12");
  require_error(with(6, 255, 1), ErrorCode::kMalformed, "unknown op 255");
  require_error(with(7, 1, 1), ErrorCode::kMalformed, "reserved byte is 1");
  require_error(with(16, kMaxPayload + 1, 4), ErrorCode::kMalformed, "exceeds the limit of 1048576");
  require_error(with(16, 0xffffffffu, 4), ErrorCode::kMalformed, "exceeds the limit");
}

TEST_CASE("store rpc: a frame of another version gets an error reply that its sender can decode") {
  // A version 1 engine's reserve (key, bytes: no model), framed as version 1 did.
  std::vector<uint8_t> old = encode_request({Op::kReserve, 41, ReserveRequest{kKey, 4096, {}}});
  old.resize(kHeaderBytes);
  const std::vector<uint8_t> v1_payload = cat({le(kKey.hi, 8), le(kKey.lo, 8), le(4096, 8)});
  old[4] = 1;
  put_le(old, 16, v1_payload.size(), 4);
  put_le(old, 20, XXH32(v1_payload.data(), v1_payload.size(), (1u << 16) | (1u << 8) | 2u), 4);
  require_error(decode_header(old).status(), ErrorCode::kUnsupportedVersion, "version 1 is not supported");

  auto refusal = version_refusal(old);
  REQUIRE(refusal.has_value());
  CHECK(refusal->version == 1);
  CHECK(refusal->payload_bytes == v1_payload.size());
  // Read as a version 1 engine reads a reply: header fields, then checksum seeded with version 1.
  const std::vector<uint8_t>& f = refusal->reply;
  REQUIRE(f.size() > kHeaderBytes + 2);
  auto rd = [&](size_t at, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= uint64_t{f[at + static_cast<size_t>(i)]} << (8 * i);
    return v;
  };
  CHECK(rd(0, 4) == kMagic);
  CHECK(f[4] == 1);
  CHECK(f[5] == static_cast<uint8_t>(FrameKind::kReply));
  CHECK(f[6] == static_cast<uint8_t>(Op::kReserve));
  CHECK(rd(8, 8) == 41);
  CHECK(rd(16, 4) == f.size() - kHeaderBytes);
  CHECK(rd(20, 4) == XXH32(f.data() + kHeaderBytes, f.size() - kHeaderBytes, (1u << 16) | (2u << 8) | 2u));
  CHECK(rd(kHeaderBytes, 2) == static_cast<uint16_t>(ErrorCode::kUnsupportedVersion));
  const std::string message(f.begin() + kHeaderBytes + 6, f.end());
  CHECK(rd(kHeaderBytes + 2, 4) == message.size());
  CHECK(message.find("store rpc version 1 is not supported: this kvfabricd speaks version 3") !=
        std::string::npos);

  // A current frame, a bad magic or a short header is not refused for its version.
  CHECK_FALSE(version_refusal(encode_request({Op::kStats, 1, EmptyRequest{}})).has_value());
  std::vector<uint8_t> bad_magic = old;
  bad_magic[0] ^= 0xff;
  CHECK_FALSE(version_refusal(bad_magic).has_value());
  CHECK_FALSE(version_refusal(std::span(old).first(kHeaderBytes - 1)).has_value());
}

TEST_CASE("store rpc: payloads that do not match their header are refused") {
  const std::vector<uint8_t> frame = encode_request({Op::kReserve, 1, ReserveRequest{kKey, 4096, {}}});
  auto header = decode_header(frame);
  REQUIRE(header.ok());

  // Length and checksum.
  require_error(decode_request(*header, payload_of(frame).first(10)).status(), ErrorCode::kMalformed,
                "header says 41 payload bytes, got 10");
  std::vector<uint8_t> flipped = frame;
  flipped.back() ^= 0x01;
  require_error(decode_request_frame(flipped).status(), ErrorCode::kMalformed, "checksum mismatch");
  // A reply frame is not a request and a request frame is not a reply.
  require_error(decode_reply(*header, payload_of(frame)).status(), ErrorCode::kMalformed,
                "frame is not a reply");
  const std::vector<uint8_t> reply = encode_reply({Op::kStats, 1, Status::Ok(), StatsReply{}});
  require_error(decode_request_frame(reply).status(), ErrorCode::kMalformed, "frame is not a request");
}

TEST_CASE("store rpc: malformed request payloads name the field") {
  auto request = [](Op op, const std::vector<uint8_t>& payload) {
    return decode_request_frame(frame_with(FrameKind::kRequest, op, payload)).status();
  };
  const std::vector<uint8_t> key = cat({le(kKey.hi, 8), le(kKey.lo, 8)});

  require_error(request(Op::kReserve, cat({key})), ErrorCode::kMalformed, "reserve request.bytes: truncated");
  require_error(request(Op::kReserve, cat({key, le(0, 8)})), ErrorCode::kMalformed,
                "bytes: a chunk of zero bytes");
  require_error(request(Op::kReserve, cat({key, le(1, 8)})), ErrorCode::kMalformed,
                "reserve request.model: truncated");  // a version 1 reserve's payload
  require_error(request(Op::kReserve, cat({key, le(1, 8), key})), ErrorCode::kMalformed,
                "reserve request.codec: truncated");  // a version 2 reserve's payload
  require_error(request(Op::kReserve, cat({key, le(1, 8), key, le(8, 1)})), ErrorCode::kMalformed,
                "reserve request.codec: unknown codec 8");
  require_error(request(Op::kReserve, cat({key, le(1, 8), key, le(0, 1), le(0, 1)})), ErrorCode::kMalformed,
                "1 trailing bytes after the payload");
  require_error(request(Op::kCommit, le(1, 7)), ErrorCode::kMalformed, "commit request.key: truncated");
  require_error(request(Op::kAcquire, {}), ErrorCode::kMalformed, "acquire request.key: truncated");
  require_error(request(Op::kRelease, le(1, 4)), ErrorCode::kMalformed,
                "release request.lease_id: truncated");
  require_error(request(Op::kStats, le(0, 1)), ErrorCode::kMalformed, "trailing bytes");
  // A hostile count is caught before anything is allocated.
  require_error(request(Op::kLookup, le(0xffffffffu, 4)), ErrorCode::kMalformed,
                "lookup request.keys: count 4294967295 of 16-byte items exceeds remaining 0 bytes");
  require_error(request(Op::kLookup, cat({le(2, 4), key})), ErrorCode::kMalformed,
                "exceeds remaining 16 bytes");
  const std::vector<uint8_t> zero_key = le(0, 16);
  require_error(request(Op::kClear, cat({le(3, 1), le(0, 4), zero_key})), ErrorCode::kMalformed,
                "clear request.scope: unknown clear scope 3");
  require_error(request(Op::kClear, cat({le(0, 1), le(1, 4), key, zero_key})), ErrorCode::kMalformed,
                "clear request.keys: must be empty unless the scope is keys");
  require_error(request(Op::kClear, cat({le(2, 1), le(1, 4), key, key})), ErrorCode::kMalformed,
                "must be empty unless the scope is keys");
  require_error(request(Op::kClear, cat({le(1, 1), le(1, 4), key, key})), ErrorCode::kMalformed,
                "clear request.model: must be zero unless the scope is model");
  require_error(request(Op::kClear, cat({le(0, 1), le(0, 4), key})), ErrorCode::kMalformed,
                "must be zero unless the scope is model");
  require_error(request(Op::kClear, cat({le(1, 1), le(0, 4)})), ErrorCode::kMalformed,
                "clear request.model: truncated");  // a version 1 clear's payload
  auto by_model =
      decode_request_frame(frame_with(FrameKind::kRequest, Op::kClear, cat({le(2, 1), le(0, 4), key})));
  REQUIRE(by_model.ok());
  CHECK(std::get<ClearRequest>(by_model->body).scope == ClearScope::kModel);
  CHECK(std::get<ClearRequest>(by_model->body).model == kKey);
  require_error(request(Op::kHello, le(5000, 4)), ErrorCode::kMalformed, "hello request.client_name");
  std::vector<uint8_t> long_name = le(5000, 4);
  long_name.resize(4 + 5000, 'a');
  require_error(request(Op::kHello, long_name), ErrorCode::kMalformed, "exceeds limit 4096");
}

TEST_CASE("store rpc: malformed reply payloads name the field") {
  auto reply = [](Op op, const std::vector<uint8_t>& payload) {
    return decode_reply_frame(frame_with(FrameKind::kReply, op, payload)).status();
  };
  require_error(reply(Op::kStats, {}), ErrorCode::kMalformed, "stats reply.code: truncated");
  require_error(reply(Op::kRelease, cat({le(999, 2), le(0, 4)})), ErrorCode::kMalformed,
                "unknown error code 999");
  require_error(reply(Op::kRelease, cat({le(8, 2), le(3, 4), {'a', 'b', 'c'}, le(0, 1)})),
                ErrorCode::kMalformed, "trailing bytes");
  require_error(reply(Op::kAcquire, cat({le(0, 2), le(1, 8), le(2, 8)})), ErrorCode::kMalformed,
                "acquire reply.length: truncated");
  require_error(reply(Op::kAcquire, cat({le(0, 2), le(1, 8), le(2, 8), le(3, 8), le(4, 8)})),
                ErrorCode::kMalformed, "acquire reply.codec: truncated");  // a version 2 reply
  require_error(reply(Op::kAcquire, cat({le(0, 2), le(1, 8), le(2, 8), le(3, 8), le(4, 8), le(200, 1)})),
                ErrorCode::kMalformed, "acquire reply.codec: unknown codec 200");
  require_error(
      reply(Op::kHello, cat({le(0, 2), le(1, 4), {'n'}, le(1, 4), {'/'}, le(7, 1), le(1, 8), le(1, 8)})),
      ErrorCode::kMalformed, "hello reply.backing: unknown arena backing 7");
  require_error(reply(Op::kStats, cat({le(0, 2), le(1, 4), le(3, 4), {'B', 'a', 'd'}, le(1, 8)})),
                ErrorCode::kMalformed, "stats reply.counters[0].name: counter names are");
  require_error(reply(Op::kStats, cat({le(0, 2), le(300, 4), std::vector<uint8_t>(300 * 13, 0)})),
                ErrorCode::kMalformed, "count 300 exceeds 256");
}

TEST_CASE("store rpc: no truncation or single-byte corruption of a valid frame crashes the decoder") {
  std::vector<std::vector<uint8_t>> frames;
  for (const auto& r : sample_requests()) frames.push_back(encode_request(r));
  for (const auto& r : sample_replies()) frames.push_back(encode_reply(r));
  size_t decoded = 0, refused = 0;
  for (const auto& frame : frames) {
    for (size_t cut = 0; cut < frame.size(); ++cut) {
      std::vector<uint8_t> part(frame.begin(), frame.begin() + static_cast<std::ptrdiff_t>(cut));
      auto header = decode_header(part);
      if (!header.ok()) {
        ++refused;
        continue;
      }
      // The header is whole; a short payload must be refused.
      CHECK_FALSE(decode_request(*header, std::span<const uint8_t>(part).subspan(kHeaderBytes)).ok());
      CHECK_FALSE(decode_reply(*header, std::span<const uint8_t>(part).subspan(kHeaderBytes)).ok());
      ++refused;
    }
    for (size_t at = 0; at < frame.size(); ++at) {
      for (uint8_t bit : {uint8_t{0x01}, uint8_t{0x80}}) {
        std::vector<uint8_t> bad = frame;
        bad[at] ^= bit;
        auto header = decode_header(bad);
        if (!header.ok()) {
          ++refused;
          continue;
        }
        auto payload = std::span<const uint8_t>(bad).subspan(kHeaderBytes);
        auto request = header->kind == FrameKind::kRequest ? decode_request(*header, payload).status()
                                                           : decode_reply(*header, payload).status();
        // Flipping the request id changes nothing the checksum covers: that frame still decodes.
        (request.ok() ? decoded : refused)++;
      }
    }
  }
  CHECK(refused > 0);
  CHECK(decoded > 0);
}
