// The cuda_ipc staging messages (include/kvf/protocol/staging_messages.h): every kind round-trips, and every
// kind of damage a peer could send (truncation at any byte, trailing bytes, bad counts, unknown
// types and versions, oversized slots, pieces that overflow) is refused with kMalformed or
// kUnsupportedVersion instead of being acted on. The v3 hand-over fields (handover, ready_offset,
// use) round-trip, leave messages without them byte for byte v1/v2, and are checked on decode; so
// are v4's NCCL send sizes. A scatter that does not decode still yields the ids its refusal needs.
#include <random>

#include "catch.h"
#include "kvf/protocol/staging_messages.h"

using namespace kvf;
using namespace kvf::protocol::staging;

namespace {

constexpr size_t kMaxBlobBytes = 4096;  // staging_messages.cpp's bound on blobs

std::vector<Message> samples() {
  std::mt19937_64 rng(7);
  Scatter scatter{rng(), rng(), 3, {}};
  for (int i = 0; i < 100; ++i) scatter.pieces.push_back(ScatterPiece{(rng() >> 8) + 1, (rng() % 65536) + 1});
  const std::vector<std::vector<uint8_t>> events(4, std::vector<uint8_t>(64, 0x5a));
  // v3: GPU hand-over (samples 8..12; the ones above keep their indices).
  StagingRequest handover_events{rng(), 4, 32ull << 20, {1, 2, 3}, events, {}};
  handover_events.handover = std::vector<uint8_t>(64, 0x6b);
  StagingRequest handover_nccl{rng(), 2, 1ull << 20, {9}, {}, std::vector<uint8_t>(128, 3)};
  handover_nccl.handover = std::vector<uint8_t>(kMaxBlobBytes, 0x11);
  StagingOffer ready{rng(), 4, 32ull << 20, std::vector<uint8_t>(72, 0xab), 0, ""};
  ready.ready_offset = 4 * (32ull << 20);
  Scatter used{rng(), rng(), 2, {{0x10000, 4096}, {0x30000, 8192}}};
  used.use = 7;
  Scatter used_coded = used;  // the decoder takes a codec with a use (the transport pairs them)
  used_coded.codec = 3;
  used_coded.row_bytes = 256;
  used_coded.use = 0xfffffffe;
  return {
      StagingRequest{rng(), 4, 32ull << 20, {1, 2, 3, 4, 5}, events, {}},
      StagingRequest{rng(), 2, 1ull << 20, {9}, {}, std::vector<uint8_t>(128, 3)},
      StagingOffer{rng(), 4, 32ull << 20, std::vector<uint8_t>(72, 0xab), 0, ""},
      StagingOffer{rng(), 0, 0, {}, static_cast<uint32_t>(ErrorCode::kOutOfMemory), "no room"},
      scatter,
      Scattered{rng(), rng(), 2, 0, ""},
      Scattered{rng(), rng(), 1, static_cast<uint32_t>(ErrorCode::kInvalidArgument), "outside device memory"},
      StagingClosed{rng()},
      handover_events,
      handover_nccl,
      ready,
      used,
      used_coded};
}

uint16_t version_of(const std::vector<uint8_t>& bytes) {
  return static_cast<uint16_t>(bytes.at(4) | bytes.at(5) << 8);
}

bool refused(const std::vector<uint8_t>& bytes, const std::string& says) {
  Result<Message> r = decode(bytes);
  if (r.ok()) return false;
  CAPTURE(r.status().to_string());
  return r.status().code() == ErrorCode::kMalformed && r.status().message().find(says) != std::string::npos;
}

bool same(const Message& a, const Message& b) {
  return encode(a) == encode(b);
}

}  // namespace

TEST_CASE("staging messages round-trip and carry their magic") {
  for (const Message& m : samples()) {
    const std::vector<uint8_t> bytes = encode(m);
    REQUIRE(is_staging_message(bytes));
    Result<Message> back = decode(bytes);
    REQUIRE(back.ok());
    REQUIRE(back->index() == m.index());
    REQUIRE(same(*back, m));
  }
  const std::vector<Message> all = samples();
  const Scatter& original = std::get<Scatter>(all[4]);
  const Scatter decoded = std::get<Scatter>(decode(encode(original)).value());
  REQUIRE(decoded.pieces.size() == 100);
  REQUIRE(decoded.pieces[57].destination == original.pieces[57].destination);
  REQUIRE(decoded.pieces[57].bytes == original.pieces[57].bytes);
}

TEST_CASE("stream frames and notifications are not staging messages") {
  const std::vector<uint8_t> frame = {'K', 'V', 'F', '1', 2, 0, 1, 0};
  const std::vector<uint8_t> note = {'K', 'V', 'N', '1', 1, 0};
  REQUIRE_FALSE(is_staging_message(frame));
  REQUIRE_FALSE(is_staging_message(note));
  REQUIRE_FALSE(is_staging_message(std::vector<uint8_t>{'K', 'V'}));
}

TEST_CASE("every truncation and any trailing byte is refused") {
  for (const Message& m : samples()) {
    const std::vector<uint8_t> bytes = encode(m);
    for (size_t n = 0; n < bytes.size(); ++n) {
      Result<Message> r = decode(std::span(bytes).first(n));
      REQUIRE_FALSE(r.ok());
      REQUIRE(r.status().code() == ErrorCode::kMalformed);
    }
    std::vector<uint8_t> longer = bytes;
    longer.push_back(0);
    Result<Message> r = decode(longer);
    REQUIRE_FALSE(r.ok());
    REQUIRE(r.status().code() == ErrorCode::kMalformed);
  }
}

TEST_CASE("bad versions, types, counts and sizes are refused") {
  std::vector<uint8_t> bytes = encode(samples()[0]);
  bytes[4] = 9;  // version
  REQUIRE(decode(bytes).status().code() == ErrorCode::kUnsupportedVersion);

  bytes = encode(samples()[0]);
  bytes[6] = 77;  // type
  REQUIRE(decode(bytes).status().code() == ErrorCode::kMalformed);

  // A request for too many slots, or for slots larger than any GPU staging should be.
  const std::vector<std::vector<uint8_t>> four(4, std::vector<uint8_t>(64, 1));
  REQUIRE(decode(encode(StagingRequest{1, 4, 1 << 20, {1}, four, {}})).ok());
  REQUIRE_FALSE(decode(encode(StagingRequest{1, kMaxSlots + 1, 1 << 20, {1}, four, {}})).ok());
  REQUIRE_FALSE(decode(encode(StagingRequest{1, 4, kMaxSlotBytes + 1, {1}, four, {}})).ok());
  REQUIRE_FALSE(decode(encode(StagingRequest{1, 4, 1 << 20, {}, four, {}})).ok());
  // NCCL instead of events: the id alone; both is malformed; neither is host staging.
  const std::vector<uint8_t> id(128, 7);
  REQUIRE(decode(encode(StagingRequest{1, 4, 1 << 20, {1}, {}, id})).ok());
  REQUIRE_FALSE(decode(encode(StagingRequest{1, 4, 1 << 20, {1}, four, id})).ok());
  REQUIRE(decode(encode(StagingRequest{1, 4, 1 << 20, {1}, {}, {}})).ok());
  // One event per slot, none empty.
  REQUIRE_FALSE(decode(encode(StagingRequest{1, 3, 1 << 20, {1}, four, {}})).ok());
  REQUIRE_FALSE(decode(encode(StagingRequest{1, 1, 1 << 20, {1}, {{}}, {}})).ok());
  // An offer that says yes but gives nothing to map.
  REQUIRE_FALSE(decode(encode(StagingOffer{1, 4, 1 << 20, {}, 0, ""})).ok());
  // Error codes outside the enum.
  REQUIRE_FALSE(decode(encode(Scattered{1, 2, 0, 999, "x"})).ok());

  // Scatter pieces: none, empty, null destination, wrapping around the address space, and a
  // count that claims more pieces than the bytes hold.
  REQUIRE_FALSE(decode(encode(Scatter{1, 1, 0, {}})).ok());
  REQUIRE_FALSE(decode(encode(Scatter{1, 1, 0, {{0x1000, 0}}})).ok());
  REQUIRE_FALSE(decode(encode(Scatter{1, 1, 0, {{0, 16}}})).ok());
  REQUIRE_FALSE(decode(encode(Scatter{1, 1, 0, {{~0ull - 8, 16}}})).ok());
  REQUIRE_FALSE(decode(encode(Scatter{1, 1, 0, {{0x1000, kMaxSlotBytes}, {0x2000, 16}}})).ok());
  std::vector<uint8_t> scatter = encode(Scatter{1, 1, 0, {{0x1000, 16}}});
  scatter[28] = 2;  // count: 2 pieces, 1 present
  REQUIRE(decode(scatter).status().code() == ErrorCode::kMalformed);
}

TEST_CASE("random damage never crashes the decoder") {
  std::mt19937 rng(11);
  for (const Message& m : samples()) {
    const std::vector<uint8_t> bytes = encode(m);
    for (int round = 0; round < 2000; ++round) {
      std::vector<uint8_t> damaged = bytes;
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int i = 0; i < flips; ++i)
        damaged[rng() % damaged.size()] ^= static_cast<uint8_t>(1 + rng() % 255);
      Result<Message> r = decode(damaged);
      if (r.ok()) REQUIRE(encode(*r).size() == damaged.size());  // whatever decodes re-encodes to its size
    }
  }
}

TEST_CASE("v3 hand-over fields round-trip; without them every message is byte for byte v1 or v2") {
  const std::vector<std::vector<uint8_t>> events(4, std::vector<uint8_t>(64, 0x5a));
  const std::vector<uint8_t> freed = {0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6};

  // StagingRequest: v3 is v2's layout (codec u8, row_bytes u32, zero here) and the handover blob.
  StagingRequest request{1, 4, 32ull << 20, {1, 2, 3}, events, {}};
  const std::vector<uint8_t> request_v1 = encode(request);
  REQUIRE(version_of(request_v1) == 1);
  request.handover = freed;
  const std::vector<uint8_t> request_v3 = encode(request);
  REQUIRE(version_of(request_v3) == 3);
  REQUIRE(request_v3.size() == request_v1.size() + 1 + 4 + 4 + freed.size());
  REQUIRE(std::equal(request_v1.begin() + 6, request_v1.end(), request_v3.begin() + 6));
  REQUIRE(
      std::equal(freed.begin(), freed.end(), request_v3.end() - static_cast<std::ptrdiff_t>(freed.size())));
  const StagingRequest request_back = std::get<StagingRequest>(decode(request_v3).value());
  REQUIRE(request_back.handover == freed);
  REQUIRE(request_back.slot_events == events);
  REQUIRE(request_back.codec == 0);
  REQUIRE(request_back.row_bytes == 0);
  request.handover.clear();
  REQUIRE(encode(request) == request_v1);
  REQUIRE(std::get<StagingRequest>(decode(request_v1).value()).handover.empty());
  // The NCCL path can hand over too.
  StagingRequest nccl{1, 2, 1 << 20, {9}, {}, std::vector<uint8_t>(128, 7)};
  nccl.handover = freed;
  REQUIRE(std::get<StagingRequest>(decode(encode(nccl)).value()).handover == freed);
  // A host-staging request with a codec stays v2, byte for byte.
  const StagingRequest coded{1, 2, 1 << 20, {9, 9}, {}, {}, 4, 2048};
  const std::vector<uint8_t> coded_bytes = encode(coded);
  REQUIRE(version_of(coded_bytes) == 2);
  REQUIRE(coded_bytes.size() == 8 + 8 + 4 + 8 + 4 + 2 + 4 + 4 + 1 + 4);
  REQUIRE(std::get<StagingRequest>(decode(coded_bytes).value()).handover.empty());

  // StagingOffer: v3 is v1's layout and ready_offset (u64).
  StagingOffer offer{1, 4, 32ull << 20, std::vector<uint8_t>(72, 0xab), 0, "ok"};
  const std::vector<uint8_t> offer_v1 = encode(offer);
  REQUIRE(version_of(offer_v1) == 1);
  REQUIRE(offer_v1.size() == 8 + 8 + 4 + 8 + 4 + 72 + 4 + 4 + 2);
  offer.ready_offset = 4 * (32ull << 20) + 64;
  const std::vector<uint8_t> offer_v3 = encode(offer);
  REQUIRE(version_of(offer_v3) == 3);
  REQUIRE(offer_v3.size() == offer_v1.size() + 8);
  REQUIRE(std::equal(offer_v1.begin() + 6, offer_v1.end(), offer_v3.begin() + 6));
  REQUIRE(offer_v3[offer_v1.size()] == 64);  // little-endian 0x08000040
  REQUIRE(offer_v3[offer_v1.size() + 3] == 0x08);
  REQUIRE(std::get<StagingOffer>(decode(offer_v3).value()).ready_offset == offer.ready_offset);
  offer.ready_offset = 0;
  REQUIRE(encode(offer) == offer_v1);
  REQUIRE(std::get<StagingOffer>(decode(offer_v1).value()).ready_offset == 0);

  // Scatter: v3 is v2's layout (codec fields, zero or not) and use (u32).
  Scatter scatter{7, 8, 1, {{4096, 512}}};
  const std::vector<uint8_t> scatter_v1 = encode(scatter);
  REQUIRE(version_of(scatter_v1) == 1);
  REQUIRE(scatter_v1.size() == 8 + 8 + 8 + 4 + 4 + 16);
  scatter.use = 0x01020304;
  const std::vector<uint8_t> scatter_v3 = encode(scatter);
  REQUIRE(version_of(scatter_v3) == 3);
  REQUIRE(scatter_v3.size() == scatter_v1.size() + 5 + 4);
  REQUIRE(std::vector<uint8_t>(scatter_v3.end() - 4, scatter_v3.end()) == std::vector<uint8_t>{4, 3, 2, 1});
  const Scatter scatter_back = std::get<Scatter>(decode(scatter_v3).value());
  REQUIRE(scatter_back.use == 0x01020304);
  REQUIRE(scatter_back.codec == 0);
  REQUIRE(scatter_back.pieces.size() == 1);
  scatter.use = 0;
  REQUIRE(encode(scatter) == scatter_v1);
  REQUIRE(std::get<Scatter>(decode(scatter_v1).value()).use == 0);
  scatter.codec = 3;
  scatter.row_bytes = 256;
  const std::vector<uint8_t> scatter_v2 = encode(scatter);
  REQUIRE(version_of(scatter_v2) == 2);
  REQUIRE(scatter_v2.size() == scatter_v1.size() + 5);
  scatter.use = 9;
  const std::vector<uint8_t> coded_v3 = encode(scatter);
  REQUIRE(version_of(coded_v3) == 3);
  REQUIRE(std::equal(scatter_v2.begin() + 6, scatter_v2.end(), coded_v3.begin() + 6));
  REQUIRE(coded_v3.size() == scatter_v2.size() + 4);
  const Scatter coded_back = std::get<Scatter>(decode(coded_v3).value());
  REQUIRE(coded_back.use == 9);
  REQUIRE(coded_back.codec == 3);
  REQUIRE(coded_back.row_bytes == 256);

  // Scattered and StagingClosed have no v3 fields: always v1.
  REQUIRE(version_of(encode(Scattered{1, 2, 3, 0, ""})) == 1);
  REQUIRE(version_of(encode(StagingClosed{1})) == 1);

  // An older header over v3 bytes has trailing bytes; a v3 header over older bytes is truncated.
  for (const std::vector<uint8_t>& v3 : {request_v3, offer_v3, scatter_v3, coded_v3}) {
    for (uint8_t older : {uint8_t{1}, uint8_t{2}}) {
      std::vector<uint8_t> bytes = v3;
      bytes[4] = older;
      REQUIRE(decode(bytes).status().code() == ErrorCode::kMalformed);
    }
  }
  for (const std::vector<uint8_t>& old : {request_v1, coded_bytes, offer_v1, scatter_v1, scatter_v2}) {
    std::vector<uint8_t> bytes = old;
    bytes[4] = 3;
    REQUIRE(decode(bytes).status().code() == ErrorCode::kMalformed);
  }
}

TEST_CASE("v3 offers with a misaligned, too small or needless ready_offset are refused") {
  StagingOffer offer{1, 4, 1 << 20, std::vector<uint8_t>(72, 0xab), 0, ""};
  auto with = [&](uint64_t ready_offset) {
    StagingOffer o = offer;
    o.ready_offset = ready_offset;
    return encode(o);
  };
  REQUIRE(decode(with(4ull << 20)).ok());  // right after the slots
  REQUIRE(decode(with((4ull << 20) + (1ull << 21))).ok());
  REQUIRE(refused(with((4ull << 20) + 2), "not 4-byte aligned"));
  REQUIRE(refused(with((4ull << 20) + 1), "not 4-byte aligned"));
  REQUIRE(refused(with((4ull << 20) - 4), "inside the 4 slots"));
  REQUIRE(refused(with(4), "inside the 4 slots"));
  REQUIRE(refused(with(~uint64_t{3}), "pass the address space"));
  // A refusal carries no counters.
  StagingOffer refusal{1, 0, 0, {}, static_cast<uint32_t>(ErrorCode::kOutOfMemory), "no room"};
  refusal.ready_offset = 64;
  REQUIRE(refused(encode(refusal), "in a refusal"));
  // A v3 offer with ready_offset 0 is not how this build writes one: refused, so each offer has
  // one encoding.
  std::vector<uint8_t> zero = with(4ull << 20);
  std::fill(zero.end() - 8, zero.end(), uint8_t{0});
  REQUIRE(refused(zero, "0 in a v3 offer"));
}

TEST_CASE("v3 requests and scatters: oversize, empty or misplaced hand-over fields are refused") {
  const std::vector<std::vector<uint8_t>> events(2, std::vector<uint8_t>(64, 0x5a));
  StagingRequest request{1, 2, 1 << 20, {9}, events, {}};
  request.handover = std::vector<uint8_t>(kMaxBlobBytes, 1);
  REQUIRE(decode(encode(request)).ok());
  request.handover.push_back(1);
  REQUIRE(refused(encode(request), "handover: 4097 bytes, at most 4096"));
  // A hand-over needs GPU staging: host staging's slots are filled by UCX puts.
  StagingRequest host{1, 2, 1 << 20, {9}, {}, {}};
  host.handover = {1, 2, 3, 4};
  REQUIRE(refused(encode(host), "a hand-over on host staging"));
  // A codec is host staging's only, so it does not meet a hand-over either.
  StagingRequest coded = request;
  coded.handover = {1};
  coded.codec = 3;
  coded.row_bytes = 256;
  REQUIRE(refused(encode(coded), "only host staging encodes"));
  // A v3 request with an empty handover blob.
  request.handover = {0x42};
  std::vector<uint8_t> empty = encode(request);
  empty.pop_back();
  std::fill(empty.end() - 4, empty.end(), uint8_t{0});  // the blob's length: 0
  REQUIRE(refused(empty, "empty in a v3 request"));
  // A v3 scatter with use 0.
  Scatter scatter{1, 1, 0, {{0x1000, 16}}};
  scatter.use = 1;
  std::vector<uint8_t> unused = encode(scatter);
  REQUIRE(decode(unused).ok());
  std::fill(unused.end() - 4, unused.end(), uint8_t{0});
  REQUIRE(refused(unused, "0 in a v3 scatter"));
}

TEST_CASE("v4 NCCL sends round-trip after v3's fields; one send stays v1; bad send lists are refused") {
  Scatter scatter{1, 5, 2, {{0x10000, 4096}, {0x30000, 8192}}};
  const std::vector<uint8_t> v1 = encode(scatter);
  REQUIRE(version_of(v1) == 1);
  scatter.sends = {8192, 4096};
  const std::vector<uint8_t> v4 = encode(scatter);
  REQUIRE(version_of(v4) == 4);
  // v1's body, v2's codec fields (zero), v3's use (zero: nccl does no hand-over), then the sends.
  REQUIRE(v4.size() == v1.size() + 1 + 4 + 4 + 4 + 2 * 8);
  REQUIRE(std::equal(v1.begin() + 6, v1.end(), v4.begin() + 6));
  const Scatter back = std::get<Scatter>(decode(v4).value());
  REQUIRE(back.sends == scatter.sends);
  REQUIRE(back.use == 0);
  REQUIRE(back.pieces.size() == 2);
  REQUIRE(encode(back) == v4);
  // With a hand-over use as well, both come back.
  scatter.use = 9;
  REQUIRE(std::get<Scatter>(decode(encode(scatter)).value()).use == 9);
  scatter.use = 0;

  // Sends that do not add up to the pieces' bytes, an empty send, too many sends.
  Scatter bad = scatter;
  bad.sends = {8192, 4095};
  REQUIRE(refused(encode(bad), "12287 bytes sent for pieces of 12288"));
  bad.sends = {12288, 0};
  REQUIRE(refused(encode(bad), "sends[]: 0 bytes"));
  bad.sends.assign(kMaxSends + 1, 1);
  REQUIRE(refused(encode(bad), "65 sends"));
  // One send is written without the field; a v4 scatter that claims one is refused.
  std::vector<uint8_t> one = encode(Scatter{1, 5, 2, {{0x10000, 12288}}, 0, 0, 0, {6000, 6288}});
  REQUIRE(decode(one).ok());
  one.resize(one.size() - 4 - 16);  // the count and both sizes
  one.insert(one.end(), {uint8_t{1}, uint8_t{0}, uint8_t{0}, uint8_t{0}});
  for (int i = 0; i < 8; ++i) one.push_back(static_cast<uint8_t>(uint64_t{12288} >> (8 * i)));
  REQUIRE(refused(one, "1 sends"));
  // Sends of an encoded slot: only raw GPU staging sends in parts.
  Scatter coded = scatter;
  coded.codec = 3;
  coded.row_bytes = 256;
  REQUIRE(refused(encode(coded), "sends of an encoded slot"));
}

TEST_CASE("a scatter that does not decode still names what its refusal must answer") {
  Scatter scatter{0x1111, 0x2222, 3, {{0x1000, 16}}};
  std::vector<uint8_t> bytes = encode(scatter);
  bytes[4] = 9;  // a version this build does not read
  Result<Message> decoded = decode(bytes);
  REQUIRE(decoded.status().code() == ErrorCode::kUnsupportedVersion);
  auto ids = scatter_ids(bytes);
  REQUIRE(ids.has_value());
  CHECK(ids->sender == 0x1111);
  CHECK(ids->batch == 0x2222);
  CHECK(ids->slot == 3);
  CHECK(ids->version == 9);
  // The refusal round-trips and carries decode's reason.
  Result<Message> answer = decode(encode(refusal(*ids, decoded.status())));
  REQUIRE(answer.ok());
  const auto& refused = std::get<Scattered>(answer.value());
  CHECK(refused.sender == 0x1111);
  CHECK(refused.batch == 0x2222);
  CHECK(refused.slot == 3);
  CHECK(refused.error == static_cast<uint32_t>(ErrorCode::kUnsupportedVersion));
  CHECK(refused.message.find("version 9") != std::string::npos);

  // Only scatters, and only with all three ids present.
  for (const Message& m : samples()) {
    CHECK(scatter_ids(encode(m)).has_value() == std::holds_alternative<Scatter>(m));
  }
  const std::vector<uint8_t> whole = encode(scatter);
  for (size_t n = 0; n < 28; ++n) {
    CAPTURE(n);
    CHECK_FALSE(scatter_ids(std::span(whole).first(n)).has_value());
  }
  CHECK(scatter_ids(std::span(whole).first(28)).has_value());
}
