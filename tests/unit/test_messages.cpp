#include <xxhash.h>

#include <cstring>

#include "../fuzz/sample_messages.h"
#include "catch.h"
#include "kvf/protocol/messages.h"

using namespace kvf;
using namespace kvf::protocol;
using kvf::protocol::testing::MessageFactory;
using kvf::protocol::testing::sample_messages;

namespace {

void put_u32(std::vector<uint8_t>& b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + static_cast<size_t>(i)] = static_cast<uint8_t>(v >> (8 * i));
}

// A frame around a hand-made payload, with a correct checksum: reaches the payload decoder.
std::vector<uint8_t> frame_with_payload(MessageType type, const std::vector<uint8_t>& payload) {
  std::vector<uint8_t> f = encode_frame(Bye{});
  f.resize(kFrameHeaderBytes);
  f[6] = static_cast<uint8_t>(type);
  f[7] = 0;
  put_u32(f, 8, static_cast<uint32_t>(payload.size()));
  put_u32(f, 12, XXH32(payload.data(), payload.size(), frame_checksum_seed(type)));
  f.insert(f.end(), payload.begin(), payload.end());
  return f;
}

// n little-endian bytes of v; n may exceed 8 to write zero padding.
std::vector<uint8_t> le(uint64_t v, int n) {
  std::vector<uint8_t> b;
  for (int i = 0; i < n; ++i) b.push_back(i < 8 ? static_cast<uint8_t>(v >> (8 * i)) : uint8_t{0});
  return b;
}

std::vector<uint8_t> cat(std::initializer_list<std::vector<uint8_t>> parts) {
  std::vector<uint8_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

Status decode_error(const std::vector<uint8_t>& frame) {
  Result<Message> r = decode_frame(frame);
  REQUIRE_FALSE(r.ok());
  return r.status();
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

}  // namespace

TEST_CASE("message type names and the variant order agree") {
  for (const Message& m : sample_messages(1)) {
    REQUIRE(message_type_name(message_type(m)) != "unknown");
  }
  REQUIRE(message_type(Hello{}) == MessageType::kHello);
  REQUIRE(message_type(Bye{}) == MessageType::kBye);
  REQUIRE(message_type(RunResult{}) == MessageType::kRunResult);
  REQUIRE(message_type_name(MessageType::kRecvPlan) == "RecvPlan");
}

TEST_CASE("every message type round-trips with random contents") {
  for (uint64_t seed = 1; seed <= 50; ++seed) {
    for (const Message& m : sample_messages(seed)) {
      const std::vector<uint8_t> frame = encode_frame(m);
      Result<Message> back = decode_frame(frame);
      INFO(message_type_name(message_type(m)) << " seed " << seed << ": " << back.status().to_string());
      REQUIRE(back.ok());
      REQUIRE(*back == m);
      REQUIRE(encode_frame(*back) == frame);  // the encoding is canonical

      Result<FrameHeader> h = decode_frame_header(frame);
      REQUIRE(h.ok());
      REQUIRE(h->magic == kFrameMagic);
      REQUIRE(h->version == kProtocolVersion);
      REQUIRE(h->type == message_type(m));
      REQUIRE(h->payload_bytes == frame.size() - kFrameHeaderBytes);
      Result<Message> piece = decode_payload(*h, std::span<const uint8_t>(frame).subspan(kFrameHeaderBytes));
      REQUIRE(piece.ok());
      REQUIRE(*piece == m);
    }
  }
}

TEST_CASE("default-constructed messages round-trip") {
  const std::vector<Message> defaults = {Hello{},     HelloAck{},     RegionGrant{}, StreamOffer{},
                                         RecvPlan{},  StreamResult{}, Abort{},       RunRequest{},
                                         RunResult{}, ErrorReply{},   Bye{}};
  for (const Message& m : defaults) {
    Result<Message> back = decode_frame(encode_frame(m));
    REQUIRE(back.ok());
    REQUIRE(*back == m);
  }
}

TEST_CASE("the header layout is the documented one") {
  const std::vector<uint8_t> f = encode_frame(Bye{"ok"});
  const std::vector<uint8_t> payload = {2, 0, 0, 0, 'o', 'k'};
  REQUIRE(f.size() == kFrameHeaderBytes + payload.size());
  REQUIRE(std::vector<uint8_t>(f.begin(), f.begin() + 4) == std::vector<uint8_t>{'K', 'V', 'F', '1'});
  REQUIRE(f[4] == kProtocolVersion);
  REQUIRE(f[5] == 0);
  REQUIRE(f[6] == static_cast<uint8_t>(MessageType::kBye));
  REQUIRE(f[7] == 0);
  REQUIRE(std::vector<uint8_t>(f.begin() + 8, f.begin() + 12) == le(payload.size(), 4));
  REQUIRE(std::vector<uint8_t>(f.begin() + 12, f.begin() + 16) ==
          le(XXH32(payload.data(), payload.size(), frame_checksum_seed(MessageType::kBye)), 4));
  REQUIRE(std::vector<uint8_t>(f.begin() + 16, f.end()) == payload);
}

TEST_CASE("every truncation of a valid frame fails cleanly") {
  for (const Message& m : sample_messages(7)) {
    const std::vector<uint8_t> frame = encode_frame(m);
    for (size_t n = 0; n < frame.size(); ++n) {
      std::vector<uint8_t> cut(frame.begin(), frame.begin() + static_cast<std::ptrdiff_t>(n));
      Result<Message> r = decode_frame(cut);
      REQUIRE_FALSE(r.ok());
      REQUIRE(r.status().code() == ErrorCode::kMalformed);
      REQUIRE_FALSE(r.status().message().empty());
      if (n >= kFrameHeaderBytes) {
        // The payload alone, cut short, under the header of the whole frame.
        Result<FrameHeader> h = decode_frame_header(frame);
        REQUIRE(h.ok());
        REQUIRE_FALSE(decode_payload(*h, std::span<const uint8_t>(cut).subspan(kFrameHeaderBytes)).ok());
      }
    }
  }
}

TEST_CASE("every single-byte corruption is detected") {
  for (uint64_t seed : {3u, 11u}) {
    for (const Message& m : sample_messages(seed)) {
      const std::vector<uint8_t> frame = encode_frame(m);
      for (size_t at = 0; at < frame.size(); ++at) {
        for (int x = 1; x < 256; ++x) {
          std::vector<uint8_t> bad = frame;
          bad[at] = static_cast<uint8_t>(bad[at] ^ x);
          Result<Message> r = decode_frame(bad);
          INFO(message_type_name(message_type(m)) << " byte " << at << " xor " << x);
          // The checksum is seeded with version and type, so header corruption is caught too.
          REQUIRE_FALSE(r.ok());
        }
      }
    }
  }
}

TEST_CASE("payload corruption is reported as a checksum mismatch") {
  std::vector<uint8_t> f = encode_frame(Bye{"goodbye"});
  f.back() ^= 0x20;
  const Status s = decode_error(f);
  REQUIRE(s.code() == ErrorCode::kMalformed);
  REQUIRE(contains(s.message(), "checksum mismatch"));
}

TEST_CASE("decode_frame_header checks each field") {
  const std::vector<uint8_t> good = encode_frame(Abort{42, ErrorCode::kTimeout, "slow"});

  SECTION("short input") {
    for (size_t n = 0; n < kFrameHeaderBytes; ++n) {
      Result<FrameHeader> h = decode_frame_header(std::span<const uint8_t>(good).first(n));
      REQUIRE_FALSE(h.ok());
      REQUIRE(h.status().code() == ErrorCode::kMalformed);
    }
    REQUIRE(decode_frame_header(std::span<const uint8_t>(good).first(kFrameHeaderBytes)).ok());
  }
  SECTION("bad magic") {
    std::vector<uint8_t> f = good;
    put_u32(f, 0, 0xdeadbeef);
    const Status s = decode_error(f);
    REQUIRE(s.code() == ErrorCode::kMalformed);
    REQUIRE(contains(s.message(), "bad magic 0xdeadbeef"));
  }
  SECTION("wrong version") {
    std::vector<uint8_t> f = good;
    f[4] = static_cast<uint8_t>(kProtocolVersion + 1);
    const Status s = decode_error(f);
    REQUIRE(s.code() == ErrorCode::kUnsupportedVersion);
    REQUIRE(contains(s.message(), "version " + std::to_string(kProtocolVersion + 1)));
    REQUIRE(contains(s.message(), "version " + std::to_string(kProtocolVersion)));
  }
  SECTION("unknown type") {
    for (int t : {0, 12, 255, 256, 65535}) {
      std::vector<uint8_t> f = good;
      f[6] = static_cast<uint8_t>(t);
      f[7] = static_cast<uint8_t>(t >> 8);
      const Status s = decode_error(f);
      REQUIRE(s.code() == ErrorCode::kMalformed);
      REQUIRE(contains(s.message(), "unknown message type " + std::to_string(t)));
    }
  }
  SECTION("payload over the limit") {
    std::vector<uint8_t> f = good;
    put_u32(f, 8, kMaxFramePayload + 1);
    Result<FrameHeader> h = decode_frame_header(f);
    REQUIRE_FALSE(h.ok());
    REQUIRE(h.status().code() == ErrorCode::kMalformed);
    REQUIRE(contains(h.status().message(), "exceeds the limit"));
    put_u32(f, 8, kMaxFramePayload);
    REQUIRE(decode_frame_header(f).ok());  // the limit itself is allowed
  }
}

TEST_CASE("frames of the wrong length are rejected") {
  std::vector<uint8_t> f = encode_frame(RecvPlan{1, 2, {3, 4, 5}});
  SECTION("trailing bytes after the frame") {
    f.push_back(0);
    const Status s = decode_error(f);
    REQUIRE(s.code() == ErrorCode::kMalformed);
    REQUIRE(contains(s.message(), "1 trailing bytes after the frame"));
  }
  SECTION("payload shorter than the header says") {
    f.pop_back();
    REQUIRE(contains(decode_error(f).message(), "truncated frame"));
  }
  SECTION("decode_payload given more or fewer bytes than the header says") {
    Result<FrameHeader> h = decode_frame_header(f);
    REQUIRE(h.ok());
    std::vector<uint8_t> payload(f.begin() + kFrameHeaderBytes, f.end());
    payload.push_back(0);
    REQUIRE_FALSE(decode_payload(*h, payload).ok());
    payload.resize(payload.size() - 2);
    REQUIRE_FALSE(decode_payload(*h, payload).ok());
  }
}

TEST_CASE("trailing bytes inside a checksummed payload are rejected") {
  const std::vector<uint8_t> good = encode_frame(Bye{"x"});
  std::vector<uint8_t> payload(good.begin() + kFrameHeaderBytes, good.end());
  payload.push_back(7);
  const Status s = decode_error(frame_with_payload(MessageType::kBye, payload));
  REQUIRE(s.code() == ErrorCode::kMalformed);
  REQUIRE(contains(s.message(), "Bye: 1 trailing bytes after the payload"));
}

TEST_CASE("hostile counts are rejected before allocating") {
  SECTION("RecvPlan.dst_blocks") {
    const auto p = cat({le(1, 8), le(2, 8), le(4000000000u, 4), le(0, 12)});
    const Status s = decode_error(frame_with_payload(MessageType::kRecvPlan, p));
    REQUIRE(s.code() == ErrorCode::kMalformed);
    REQUIRE(s.message() ==
            "RecvPlan.dst_blocks: count 4000000000 of 4-byte items exceeds remaining 12 bytes");
  }
  SECTION("count exactly one item too many") {
    const auto p = cat({le(1, 8), le(2, 8), le(4, 4), le(0, 12)});
    REQUIRE(contains(decode_error(frame_with_payload(MessageType::kRecvPlan, p)).message(), "count 4"));
    const auto ok = cat({le(1, 8), le(2, 8), le(3, 4), le(0, 12)});
    REQUIRE(decode_frame(frame_with_payload(MessageType::kRecvPlan, ok)).ok());
  }
  SECTION("StreamResult.layer_arrival_ns") {
    const auto p = cat({le(1, 8), le(0, 2), le(0, 4), le(0, 8), le(0, 8), le(0xffffffffu, 4)});
    REQUIRE(decode_error(frame_with_payload(MessageType::kStreamResult, p)).message() ==
            "StreamResult.layer_arrival_ns: count 4294967295 of 8-byte items exceeds remaining 0 bytes");
  }
  SECTION("RegionGrant.layer_regions") {
    const auto p = cat({le(1, 8), le(0, 25), le(100000000, 4), le(0, 33)});
    REQUIRE(
        contains(decode_error(frame_with_payload(MessageType::kRegionGrant, p)).message(),
                 "RegionGrant.layer_regions: count 100000000 of 33-byte items exceeds remaining 33 bytes"));
  }
  SECTION("byte vectors and strings") {
    const auto hello = cat({le(1, 2), le(1, 2), le(0, 4), le(0xfffffff0u, 4)});
    REQUIRE(decode_error(frame_with_payload(MessageType::kHello, hello)).message() ==
            "Hello.transport_address: count 4294967280 exceeds remaining 0 bytes");
    const auto bye = cat({le(3, 4), {'a', 'b'}});
    REQUIRE(decode_error(frame_with_payload(MessageType::kBye, bye)).message() ==
            "Bye.reason: count 3 exceeds remaining 2 bytes");
  }
  SECTION("strings over kMaxStringBytes") {
    std::vector<uint8_t> p = le(kMaxStringBytes + 1, 4);
    p.resize(p.size() + kMaxStringBytes + 1, 'a');
    REQUIRE(contains(decode_error(frame_with_payload(MessageType::kBye, p)).message(),
                     "Bye.reason: string length 4097 exceeds limit 4096"));
    Result<Message> ok = decode_frame(encode_frame(Bye{std::string(kMaxStringBytes, 'a')}));
    REQUIRE(ok.ok());
  }
  SECTION("an element of a list is named with its index") {
    RegionGrant g{5, {}, {RegionDescriptor{}, RegionDescriptor{}}};
    std::vector<uint8_t> f = encode_frame(g);
    std::vector<uint8_t> p(f.begin() + kFrameHeaderBytes, f.end());
    // The second descriptor's kind byte: grant_id, layout, count, first descriptor, 3 u64s.
    const size_t kind_at = 8 + 25 + 4 + 33 + 24;
    p[kind_at] = 9;
    REQUIRE(decode_error(frame_with_payload(MessageType::kRegionGrant, p)).message() ==
            "RegionGrant.layer_regions[1].kind: unknown memory kind 9");
  }
}

TEST_CASE("enum values outside their enum are rejected") {
  auto payload_of = [](const Message& m) {
    std::vector<uint8_t> f = encode_frame(m);
    return std::vector<uint8_t>(f.begin() + kFrameHeaderBytes, f.end());
  };
  SECTION("ErrorCode") {
    auto p = payload_of(ErrorReply{ErrorCode::kInternal, "x"});
    p[0] = 14;
    REQUIRE(decode_error(frame_with_payload(MessageType::kErrorReply, p)).message() ==
            "ErrorReply.code: unknown error code 14");
  }
  SECTION("KvLayoutKind") {
    auto p = payload_of(StreamOffer{});
    p[8] = 3;
    REQUIRE(decode_error(frame_with_payload(MessageType::kStreamOffer, p)).message() ==
            "StreamOffer.layout.kind: unknown layout kind 3");
  }
  SECTION("RunMode") {
    auto p = payload_of(RunRequest{});
    p[8] = 2;
    REQUIRE(decode_error(frame_with_payload(MessageType::kRunRequest, p)).message() ==
            "RunRequest.mode: unknown run mode 2");
  }
  SECTION("MemoryKind inside RunResult.target") {
    RunResult m;
    m.message = "m";
    auto p = payload_of(m);
    p[8 + 2 + 5 + 24] = 4;
    REQUIRE(decode_error(frame_with_payload(MessageType::kRunResult, p)).message() ==
            "RunResult.target.kind: unknown memory kind 4");
  }
  SECTION("unknown StreamOffer flags") {
    StreamOffer m;
    m.flags = kStreamVerify;
    auto p = payload_of(m);
    p[p.size() - 8] |= 0x80;  // flags u32, then the empty context's u32 length
    REQUIRE(decode_error(frame_with_payload(MessageType::kStreamOffer, p)).message() ==
            "StreamOffer.flags: unknown flag bits 0x00000080");
  }
  SECTION("a StreamOffer context over its limit") {
    StreamOffer m;
    m.context.assign(kMaxStreamContext + 1, 7);
    REQUIRE(decode_error(frame_with_payload(MessageType::kStreamOffer, payload_of(m))).message() ==
            "StreamOffer.context: " + std::to_string(kMaxStreamContext + 1) + " bytes, at most " +
                std::to_string(kMaxStreamContext));
  }
}

TEST_CASE("decode_payload rejects a header of no known type") {
  FrameHeader h;
  h.type = static_cast<MessageType>(99);
  h.checksum = XXH32(nullptr, 0, frame_checksum_seed(h.type));  // so that only the type is wrong
  Result<Message> r = decode_payload(h, {});
  REQUIRE_FALSE(r.ok());
  REQUIRE(r.status().code() == ErrorCode::kMalformed);
  REQUIRE(contains(r.status().message(), "unknown message type 99"));
}
