// The ucx_staged transport with a KV codec (int8, fp8) between real UCX workers of one process:
// shuffled, whole-row extents of random bf16 land in poisoned memory exactly as the CPU codec's
// decode of the source (through slots that split them at row boundaries, with 0, 1 and 2 workers);
// a put that is not whole rows is refused naming the sizes; a receiver of another codec or row
// size refuses the sender with both named and keeps serving others; and a hand-made sender's
// malformed scatters (too large for the slot, rows cut, another codec, unregistered destinations)
// are answered with errors while nothing outside is written.
#include <cstring>
#include <deque>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>

#include "catch.h"
#include "completion_wait.h"
#include "kvf/fabric/staged_transport.h"
#include "kvf/fabric/stream_pattern.h"
#include "kvf/gpudirect/kv_codec.h"
#include "kvf/protocol/staging_messages.h"
#include "staged_transport_fixtures.h"

using namespace kvf;
using namespace kvf::fabric;
using kvf::test::staged;
using protocol::KvCodec;
namespace staging = protocol::staging;

namespace {

// Random finite bf16 (magnitudes 2^-8 .. 2^3), every 13th row zeros.
void fill_values(uint8_t* p, uint64_t bytes, uint32_t row_bytes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (uint64_t at = 0; at < bytes; at += 2) {
    const uint64_t r = rng();
    const auto v = static_cast<uint16_t>((r & 0x8000u) | (119u + r % 12) << 7 | ((r >> 20) & 0x7fu));
    std::memcpy(p + at, &v, 2);
  }
  for (uint64_t row = 0; row * row_bytes < bytes; row += 13) std::memset(p + row * row_bytes, 0, row_bytes);
}

// What a receiver holds after the codec: decode(encode(src)), row by row.
std::vector<uint8_t> through_codec(KvCodec codec, uint32_t row_bytes, const uint8_t* src, uint64_t bytes) {
  const uint32_t channels = row_bytes / 2;
  const uint64_t rows = bytes / row_bytes;
  std::vector<uint8_t> encoded(gpudirect::encoded_rows_bytes(channels, rows)), out(bytes);
  REQUIRE(gpudirect::encode_rows(codec, channels, {src, bytes}, rows, encoded).ok());
  REQUIRE(gpudirect::decode_rows(codec, channels, encoded, rows, out).ok());
  return out;
}

bool all_poison(const uint8_t* p, uint64_t bytes) {
  for (uint64_t i = 0; i < bytes; ++i) {
    if (p[i] != kPoisonByte) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("ucx_staged codec: shuffled whole-row extents land as the codec's decode") {
  auto ucx = gpudirect::UcxContext::create();
  REQUIRE(ucx.ok());
  const KvCodec codec = GENERATE(KvCodec::kInt8, KvCodec::kFp8);
  const uint32_t workers = GENERATE(0u, 1u, 2u);
  CAPTURE(protocol::codec_name(codec), workers);
  const uint32_t row_bytes = 256;  // 128 channels: an encoded row is 132 bytes
  StagedTransportOptions options;
  options.codec = codec;
  options.row_bytes = row_bytes;
  options.workers = workers;
  options.slot_bytes = 40000;  // not a multiple of 132: runs split at row boundaries, slots not full
  options.slots = 2;
  auto sender = staged(ucx.value(), options);
  auto receiver = staged(ucx.value(), options);

  const uint64_t extent = 16 * row_bytes, bytes = 256 * extent;  // 1 MiB of 4 KiB block parts
  auto src = gpudirect::MemoryRegion::allocate_host(ucx.value(), bytes);
  auto dst = gpudirect::MemoryRegion::allocate_host(ucx.value(), bytes + 4096);
  REQUIRE(src.ok());
  REQUIRE(dst.ok());
  auto peer = sender->connect(receiver->address());
  REQUIRE(peer.ok());
  auto remote = sender->import_region(peer.value(), dst->descriptor(1));
  REQUIRE(remote.ok());

  std::vector<uint64_t> order(bytes / extent);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(5));
  for (int round = 0; round < 2; ++round) {
    fill_values(src->data(), bytes, row_bytes, 100 + static_cast<uint64_t>(round));
    poison(dst->data(), dst->size());
    std::vector<PutOp> ops;
    for (uint64_t i = 0; i < order.size(); ++i) {
      ops.push_back(PutOp{src->data() + i * extent, &src.value(), remote.value(), order[i] * extent, extent});
    }
    // Two neighbours in both source and destination: one run across them.
    ops.push_back(PutOp{src->data(), &src.value(), remote.value(), 0, extent});
    ops.push_back(PutOp{src->data() + extent, &src.value(), remote.value(), extent, extent});
    REQUIRE(wait_for([&](Completion done) { sender->put(peer.value(), ops, done); }).ok());
    REQUIRE(wait_for([&](Completion done) { sender->flush(peer.value(), done); }).ok());
    const std::vector<uint8_t> expected = through_codec(codec, row_bytes, src->data(), bytes);
    REQUIRE(expected != std::vector<uint8_t>(src->data(), src->data() + bytes));  // lossy indeed
    for (uint64_t i = 0; i < order.size(); ++i) {
      if (order[i] < 2) continue;  // written again by the last two ops
      REQUIRE(std::memcmp(dst->data() + order[i] * extent, expected.data() + i * extent, extent) == 0);
    }
    REQUIRE(std::memcmp(dst->data(), expected.data(), 2 * extent) == 0);
    REQUIRE(all_poison(dst->data() + bytes, 4096));
  }

  SECTION("a put that is not whole rows is refused, naming the sizes; the lane keeps working") {
    PutOp bad{src->data(), &src.value(), remote.value(), 0, row_bytes + 2};
    Status s = wait_for([&](Completion done) { sender->put(peer.value(), {bad}, done); });
    REQUIRE(s.code() == ErrorCode::kInvalidArgument);
    REQUIRE(s.message().find(std::to_string(row_bytes + 2) + " bytes is not whole rows of " +
                             std::to_string(row_bytes)) != std::string::npos);
    PutOp good{src->data(), &src.value(), remote.value(), 0, row_bytes};
    REQUIRE(wait_for([&](Completion done) { sender->put(peer.value(), {good}, done); }).ok());
  }
}

TEST_CASE("ucx_staged codec: a receiver of another codec or row size refuses, naming both") {
  auto ucx = gpudirect::UcxContext::create();
  REQUIRE(ucx.ok());
  auto src = gpudirect::MemoryRegion::allocate_host(ucx.value(), 1 << 20);
  auto dst = gpudirect::MemoryRegion::allocate_host(ucx.value(), 1 << 20);
  REQUIRE(src.ok());
  REQUIRE(dst.ok());
  fill_values(src->data(), 1 << 20, 2048, 9);
  StagedTransportOptions int8;
  int8.codec = KvCodec::kInt8;
  int8.row_bytes = 2048;
  StagedTransportOptions fp8 = int8;
  fp8.codec = KvCodec::kFp8;
  StagedTransportOptions wide = int8;
  wide.row_bytes = 4096;

  struct Case {
    StagedTransportOptions sender, receiver;
    std::string says;
  };
  const std::vector<Case> cases = {
      {int8, fp8, "the sender encodes its slots as int8 (rows of 2048 bytes), this receiver takes fp8"},
      {StagedTransportOptions{}, int8, "the sender encodes its slots as identity, this receiver takes int8"},
      {int8, StagedTransportOptions{},
       "the sender encodes its slots as int8 (rows of 2048 bytes), this "
       "receiver takes identity"},
      {int8, wide, "int8 (rows of 2048 bytes), this receiver takes int8 (rows of 4096 bytes)"}};
  for (const Case& c : cases) {
    auto receiver = staged(ucx.value(), c.receiver);
    auto sender = staged(ucx.value(), c.sender);
    auto peer = sender->connect(receiver->address());
    REQUIRE(peer.ok());
    auto remote = sender->import_region(peer.value(), dst->descriptor(1));
    REQUIRE(remote.ok());
    Status s = wait_for([&](Completion done) {
      sender->put(peer.value(), {PutOp{src->data(), &src.value(), remote.value(), 0, 65536}}, done);
    });
    CAPTURE(s.to_string());
    REQUIRE(s.code() == ErrorCode::kInvalidArgument);
    REQUIRE(s.message().find(c.says) != std::string::npos);
    REQUIRE(s.message().find("same codec") != std::string::npos);

    // The receiver still serves a sender that matches it.
    auto good = staged(ucx.value(), c.receiver);
    auto peer2 = good->connect(receiver->address());
    REQUIRE(peer2.ok());
    auto remote2 = good->import_region(peer2.value(), dst->descriptor(2));
    REQUIRE(remote2.ok());
    poison(dst->data(), 65536);
    REQUIRE(wait_for([&](Completion done) {
              good->put(peer2.value(), {PutOp{src->data(), &src.value(), remote2.value(), 0, 65536}}, done);
            }).ok());
    REQUIRE(wait_for([&](Completion done) { good->flush(peer2.value(), done); }).ok());
    const std::vector<uint8_t> expected =
        c.receiver.codec == KvCodec::kIdentity
            ? std::vector<uint8_t>(src->data(), src->data() + 65536)
            : through_codec(c.receiver.codec, c.receiver.row_bytes, src->data(), 65536);
    REQUIRE(std::memcmp(dst->data(), expected.data(), 65536) == 0);
  }
}

TEST_CASE("ucx_staged codec: options are checked at create") {
  auto ucx = gpudirect::UcxContext::create();
  REQUIRE(ucx.ok());
  StagedTransportOptions o;
  o.codec = KvCodec::kZstd;
  REQUIRE(StagedTransport::create(ucx.value(), o).status().code() == ErrorCode::kInvalidArgument);
  o.codec = KvCodec::kInt8;
  o.row_bytes = 0;
  auto none = StagedTransport::create(ucx.value(), o);
  REQUIRE(none.status().code() == ErrorCode::kInvalidArgument);
  REQUIRE(none.status().message().find("row_bytes") != std::string::npos);
  o.row_bytes = 333;
  REQUIRE(StagedTransport::create(ucx.value(), o).status().code() == ErrorCode::kInvalidArgument);
  o.row_bytes = 2048;
  o.slot_bytes = 1000;  // less than one encoded row (1028 bytes)
  REQUIRE(StagedTransport::create(ucx.value(), o).status().code() == ErrorCode::kInvalidArgument);
  o.slot_bytes = 1 << 20;
  o.device = 0;
  REQUIRE(StagedTransport::create(ucx.value(), o).status().code() == ErrorCode::kUnavailable);
}

namespace {

// A sender made by hand: a plain UCX transport that speaks the staging messages itself, so the test
// can send the receiver scatters a real StagedTransport never would.
class FakeSender {
 public:
  FakeSender(const std::shared_ptr<gpudirect::UcxContext>& ucx, const StagedTransport& receiver) {
    auto t = UcxTransport::create(ucx);
    REQUIRE(t.ok());
    ucx_ = std::move(t.value());
    ucx_->set_notification_handler([this](std::span<const uint8_t> bytes) {
      auto m = staging::decode(bytes);
      std::lock_guard lock(mutex_);
      if (m.ok()) messages_.push_back(std::move(m.value()));
    });
    // A ucx_staged address: "KVST", version 1, the boot id, then the UCX address.
    const std::vector<uint8_t> theirs = receiver.address();
    uint32_t boot = 0;
    std::memcpy(&boot, theirs.data() + 6, 4);
    auto peer = ucx_->connect(std::span(theirs).subspan(10 + boot), ConnectOptions{true});
    REQUIRE(peer.ok());
    peer_ = peer.value();
    reply_.assign(theirs.begin(), theirs.begin() + 10 + boot);
    const std::vector<uint8_t> mine = ucx_->address();
    reply_.insert(reply_.end(), mine.begin(), mine.end());
  }

  template <typename T>
  T next() {
    for (int i = 0; i < 2000; ++i) {
      {
        std::lock_guard lock(mutex_);
        if (!messages_.empty()) {
          staging::Message m = std::move(messages_.front());
          messages_.pop_front();
          REQUIRE(std::holds_alternative<T>(m));
          return std::get<T>(m);
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    FAIL("no staging message within 10 s");
    return T{};
  }

  void send(const staging::Message& m) {
    REQUIRE(wait_for([&](Completion done) { ucx_->notify(peer_, staging::encode(m), done); }).ok());
  }

  UcxTransport& ucx() { return *ucx_; }
  PeerId peer() const { return peer_; }
  const std::vector<uint8_t>& reply_address() const { return reply_; }

 private:
  std::unique_ptr<UcxTransport> ucx_;
  PeerId peer_ = 0;
  std::vector<uint8_t> reply_;
  std::mutex mutex_;
  std::deque<staging::Message> messages_;
};

}  // namespace

TEST_CASE("ucx_staged codec: malformed scatters are answered with errors, nothing written") {
  auto ucx = gpudirect::UcxContext::create();
  REQUIRE(ucx.ok());
  StagedTransportOptions options;
  options.codec = KvCodec::kInt8;
  options.row_bytes = 256;
  auto receiver = staged(ucx.value(), options);
  FakeSender fake(ucx.value(), *receiver);

  const uint64_t slot_bytes = 64 << 10, token = 0x1234;
  fake.send(staging::StagingRequest{token, 2, slot_bytes, fake.reply_address(), {}, {}, 3, 256});
  const auto offer = fake.next<staging::StagingOffer>();
  REQUIRE(offer.error == 0);
  REQUIRE(offer.slots == 2);
  REQUIRE(offer.cuda_ipc.size() > 8);

  auto dst = gpudirect::MemoryRegion::allocate_host(ucx.value(), 1 << 20);
  REQUIRE(dst.ok());
  poison(dst->data(), dst->size());
  const uint64_t at = reinterpret_cast<uint64_t>(dst->data());
  auto scatter = [&](std::vector<staging::ScatterPiece> pieces, uint8_t codec, uint32_t row_bytes,
                     uint32_t slot) {
    static uint64_t batch = 0;
    fake.send(staging::Scatter{token, ++batch, slot, std::move(pieces), codec, row_bytes});
    auto answer = fake.next<staging::Scattered>();
    REQUIRE(answer.batch == batch);
    return answer;
  };

  SECTION("a real one decodes what the slot holds, piece by piece") {
    // 40 rows encoded as one run and 24 as another, put into slot 1 over UCX, scattered apart.
    auto src = gpudirect::MemoryRegion::allocate_host(ucx.value(), 64 * 256);
    REQUIRE(src.ok());
    fill_values(src->data(), src->size(), 256, 3);
    auto local = gpudirect::MemoryRegion::allocate_host(ucx.value(), slot_bytes);
    REQUIRE(local.ok());
    REQUIRE(
        gpudirect::encode_rows(KvCodec::kInt8, 128, {src->data(), 40 * 256}, 40, {local->data(), 40 * 132})
            .ok());
    REQUIRE(gpudirect::encode_rows(KvCodec::kInt8, 128, {src->data() + 40 * 256, 24 * 256}, 24,
                                   {local->data() + 40 * 132, 24 * 132})
                .ok());
    protocol::RegionDescriptor slots;
    std::memcpy(&slots.base_address, offer.cuda_ipc.data(), 8);
    slots.length = 2 * slot_bytes;
    slots.ucx_rkey.assign(offer.cuda_ipc.begin() + 8, offer.cuda_ipc.end());
    auto remote = fake.ucx().import_region(fake.peer(), slots);
    REQUIRE(remote.ok());
    REQUIRE(wait_for([&](Completion done) {
              fake.ucx().put(fake.peer(),
                             {PutOp{local->data(), &local.value(), remote.value(), slot_bytes, 64 * 132}},
                             done);
            }).ok());
    REQUIRE(wait_for([&](Completion done) { fake.ucx().flush(fake.peer(), done); }).ok());
    auto a = scatter({{at + 65536, 40 * 256}, {at + 8192, 24 * 256}}, 3, 256, 1);
    CAPTURE(a.message);
    REQUIRE(a.error == 0);
    const std::vector<uint8_t> expected = through_codec(KvCodec::kInt8, 256, src->data(), src->size());
    REQUIRE(std::memcmp(dst->data() + 65536, expected.data(), 40 * 256) == 0);
    REQUIRE(std::memcmp(dst->data() + 8192, expected.data() + 40 * 256, 24 * 256) == 0);
    REQUIRE(all_poison(dst->data(), 8192));
    REQUIRE(all_poison(dst->data() + 8192 + 24 * 256, 65536 - 8192 - 24 * 256));
    REQUIRE(all_poison(dst->data() + 65536 + 40 * 256, 4096));
  }

  SECTION("every malformed one is refused with a reason") {
    struct Bad {
      std::vector<staging::ScatterPiece> pieces;
      uint8_t codec;
      uint32_t row_bytes;
      uint32_t slot;
      std::string says;
    };
    const uint64_t rows_in_slot = slot_bytes / 132;  // 496 rows of 256 bytes fit a 64 KiB slot
    const std::vector<Bad> bad = {
        {{{at, (rows_in_slot + 1) * 256}}, 3, 256, 0, "more bytes than a slot holds"},
        {{{at, rows_in_slot * 256}, {at + rows_in_slot * 256, 256}},
         3,
         256,
         0,
         "more bytes than a slot holds"},
        {{{at, 300}}, 3, 256, 0, "not whole rows of 256 bytes"},
        {{{at, 256}}, 4, 256, 0, "a scatter of fp8 (rows of 256 bytes) from a sender that asked for int8"},
        {{{at, 512}}, 3, 512, 0, "a sender that asked for int8 (rows of 256 bytes)"},
        {{{at, 256}}, 0, 0, 0, "a scatter of identity"},
        {{{at, 256}}, 3, 256, 2, "no such slot"},
        {{{reinterpret_cast<uint64_t>(&options), 256}}, 3, 256, 0, "not host memory this process registered"},
    };
    for (const Bad& b : bad) {
      auto answer = scatter(b.pieces, b.codec, b.row_bytes, b.slot);
      CAPTURE(b.says, answer.message);
      REQUIRE(answer.error == static_cast<uint32_t>(ErrorCode::kInvalidArgument));
      REQUIRE(answer.message.find(b.says) != std::string::npos);
    }
    REQUIRE(all_poison(dst->data(), dst->size()));
  }
}
