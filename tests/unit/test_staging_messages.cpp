// The cuda_ipc staging messages (include/kvf/protocol/staging_messages.h): every kind round-trips, and every
// kind of damage a peer could send (truncation at any byte, trailing bytes, bad counts, unknown
// types and versions, oversized slots, pieces that overflow) is refused with kMalformed or
// kUnsupportedVersion instead of being acted on.
#include <random>

#include "catch.h"
#include "kvf/protocol/staging_messages.h"

using namespace kvf;
using namespace kvf::protocol::staging;

namespace {

std::vector<Message> samples() {
  std::mt19937_64 rng(7);
  Scatter scatter{rng(), rng(), 3, {}};
  for (int i = 0; i < 100; ++i) scatter.pieces.push_back(ScatterPiece{(rng() >> 8) + 1, (rng() % 65536) + 1});
  const std::vector<std::vector<uint8_t>> events(4, std::vector<uint8_t>(64, 0x5a));
  return {
      StagingRequest{rng(), 4, 32ull << 20, {1, 2, 3, 4, 5}, events, {}},
      StagingRequest{rng(), 2, 1ull << 20, {9}, {}, std::vector<uint8_t>(128, 3)},
      StagingOffer{rng(), 4, 32ull << 20, std::vector<uint8_t>(72, 0xab), 0, ""},
      StagingOffer{rng(), 0, 0, {}, static_cast<uint32_t>(ErrorCode::kOutOfMemory), "no room"},
      scatter,
      Scattered{rng(), rng(), 2, 0, ""},
      Scattered{rng(), rng(), 1, static_cast<uint32_t>(ErrorCode::kInvalidArgument), "outside device memory"},
      StagingClosed{rng()}};
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
