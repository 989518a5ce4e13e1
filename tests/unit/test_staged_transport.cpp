// StagedTransport ("ucx_staged", the host-staged path) between two real UCX workers of one process,
// KV in host memory (the CPU gathers and scatters; on a GPU the copy kernel does, through the same
// protocol): many small shuffled extents land verified in poisoned memory through slots smaller
// than one put; a destination the receiver never registered is refused and the lane keeps
// working; a receiver without room fails the puts with the reason instead of holding them; a peer
// of another transport is refused at connect; a scatter the receiver cannot read is answered with
// the reason.
#include <condition_variable>
#include <cstring>
#include <future>
#include <mutex>
#include <numeric>
#include <random>

#include "catch.h"
#include "completion_wait.h"
#include "kvf/fabric/staged_transport.h"
#include "kvf/fabric/stream_pattern.h"
#include "kvf/fabric/ucx_transport.h"
#include "kvf/protocol/staging_messages.h"
#include "staged_transport_fixtures.h"

using namespace kvf;
using namespace kvf::fabric;
using kvf::test::staged;

TEST_CASE("ucx_staged: shuffled small extents through slots land verified") {
  auto ucx = gpudirect::UcxContext::create();
  REQUIRE(ucx.ok());
  StagedTransportOptions options;
  options.slot_bytes = 256 << 10;  // a 4 MiB put crosses in 16 slots, 2 at a time
  options.slots = 2;
  auto sender = staged(ucx.value(), options);
  auto receiver = staged(ucx.value(), options);
  REQUIRE(sender->name() == "ucx_staged");
  REQUIRE(is_staged_transport_address(sender->address()));

  const uint64_t bytes = 4 << 20, extent = 16 << 10;
  auto src = gpudirect::MemoryRegion::allocate_host(ucx.value(), bytes);
  auto dst = gpudirect::MemoryRegion::allocate_host(ucx.value(), bytes);
  REQUIRE(src.ok());
  REQUIRE(dst.ok());
  auto peer = sender->connect(receiver->address());
  REQUIRE(peer.ok());
  auto remote = sender->import_region(peer.value(), dst->descriptor(1));
  REQUIRE(remote.ok());

  std::vector<uint64_t> order(bytes / extent);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(3));
  for (int round = 0; round < 2; ++round) {
    fill_pattern(src->data(), bytes, PatternKey{77, static_cast<uint32_t>(round), 0, 0});
    poison(dst->data(), bytes);
    std::vector<PutOp> ops;
    for (uint64_t i = 0; i < order.size(); ++i) {
      ops.push_back(PutOp{src->data() + i * extent, &src.value(), remote.value(), order[i] * extent, extent});
    }
    REQUIRE(wait_for([&](Completion done) { sender->put(peer.value(), ops, done); }).ok());
    REQUIRE(wait_for([&](Completion done) { sender->flush(peer.value(), done); }).ok());
    for (uint64_t i = 0; i < order.size(); ++i) {
      REQUIRE(std::memcmp(dst->data() + order[i] * extent, src->data() + i * extent, extent) == 0);
    }
  }

  SECTION("a destination the receiver never registered is refused; the lane keeps working") {
    std::vector<uint8_t> unregistered(1 << 20, 0x11);
    protocol::RegionDescriptor fake = dst->descriptor(2);
    fake.base_address = reinterpret_cast<uint64_t>(unregistered.data());
    fake.length = unregistered.size();
    auto bad = sender->import_region(peer.value(), fake);
    REQUIRE(bad.ok());
    PutOp op{src->data(), &src.value(), bad.value(), 0, 4096};
    Status s = wait_for([&](Completion done) { sender->put(peer.value(), {op}, done); });
    REQUIRE(s.code() == ErrorCode::kInvalidArgument);
    REQUIRE(s.message().find("not host memory this process registered") != std::string::npos);
    REQUIRE(unregistered[0] == 0x11);
    PutOp good{src->data(), &src.value(), remote.value(), 0, 4096};
    REQUIRE(wait_for([&](Completion done) { sender->put(peer.value(), {good}, done); }).ok());
  }

  SECTION("after a disconnect a new connection stages again") {
    sender->disconnect(peer.value());
    auto again = sender->connect(receiver->address());
    REQUIRE(again.ok());
    auto region = sender->import_region(again.value(), dst->descriptor(3));
    REQUIRE(region.ok());
    poison(dst->data(), bytes);
    PutOp op{src->data(), &src.value(), region.value(), 0, bytes};
    REQUIRE(wait_for([&](Completion done) { sender->put(again.value(), {op}, done); }).ok());
    REQUIRE(std::memcmp(dst->data(), src->data(), bytes) == 0);
  }

  SECTION("puts outside the imported region fail at once, nothing sent") {
    PutOp op{src->data(), &src.value(), remote.value(), bytes - 8, 16};
    REQUIRE(wait_for([&](Completion done) { sender->put(peer.value(), {op}, done); }).code() ==
            ErrorCode::kInvalidArgument);
  }
}

TEST_CASE("ucx_staged: a receiver without room or without an answer fails the puts with the reason") {
  auto ucx = gpudirect::UcxContext::create();
  REQUIRE(ucx.ok());
  auto src = gpudirect::MemoryRegion::allocate_host(ucx.value(), 1 << 20);
  auto dst = gpudirect::MemoryRegion::allocate_host(ucx.value(), 1 << 20);
  REQUIRE(src.ok());
  REQUIRE(dst.ok());

  SECTION("no room") {
    StagedTransportOptions small;
    small.receive_limit = 1 << 20;  // below 4 slots of 8 MiB
    auto sender = staged(ucx.value(), {});
    auto receiver = staged(ucx.value(), small);
    auto peer = sender->connect(receiver->address());
    REQUIRE(peer.ok());
    auto remote = sender->import_region(peer.value(), dst->descriptor(1));
    REQUIRE(remote.ok());
    Status s = wait_for([&](Completion done) {
      sender->put(peer.value(), {PutOp{src->data(), &src.value(), remote.value(), 0, 4096}}, done);
    });
    REQUIRE(s.code() == ErrorCode::kOutOfMemory);
    REQUIRE(s.message().find("limit") != std::string::npos);
    // Later puts fail the same way at once, and flush says so too.
    REQUIRE(wait_for([&](Completion done) { sender->flush(peer.value(), done); }).code() ==
            ErrorCode::kOutOfMemory);
  }

  SECTION("a peer that is not a ucx_staged transport is refused at connect, with the fix") {
    auto sender = staged(ucx.value(), {});
    auto plain = UcxTransport::create(ucx.value());
    REQUIRE(plain.ok());
    auto peer = sender->connect(plain.value()->address());
    REQUIRE_FALSE(peer.ok());
    REQUIRE(peer.status().message().find("--transport ucx_staged") != std::string::npos);
  }
}

namespace {
// A ucx_staged address is its header (magic, version u16, boot id length u32, boot id) and then
// the UCX worker's address (fabric/staged_transport.cpp). The test below speaks the staging
// protocol itself from a plain UcxTransport, so it splits and rebuilds such addresses.
size_t staged_header_bytes(const std::vector<uint8_t>& a) {
  REQUIRE(a.size() > 10);
  const uint32_t boot = a[6] | a[7] << 8 | a[8] << 16 | static_cast<uint32_t>(a[9]) << 24;
  REQUIRE(a.size() > 10 + boot);
  return 10 + boot;
}
}  // namespace

TEST_CASE("ucx_staged: a scatter the receiver cannot read is answered with the reason, not dropped") {
  namespace staging = protocol::staging;
  auto ucx = gpudirect::UcxContext::create();
  REQUIRE(ucx.ok());
  auto receiver = staged(ucx.value(), {});
  // The "sender": a plain UCX transport that writes the staging messages by hand and sees every
  // answer as a notification.
  auto plain = UcxTransport::create(ucx.value());
  REQUIRE(plain.ok());
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<std::vector<uint8_t>> answers;  // raw: decoded on the test's thread
  plain.value()->set_notification_handler([&](std::span<const uint8_t> bytes) {
    std::lock_guard lock(mutex);
    answers.emplace_back(bytes.begin(), bytes.end());
    cv.notify_all();
  });
  auto next_answer = [&]() -> staging::Message {
    std::unique_lock lock(mutex);
    REQUIRE(cv.wait_for(lock, std::chrono::seconds(10), [&] { return !answers.empty(); }));
    auto m = staging::decode(answers.front());
    answers.erase(answers.begin());
    REQUIRE(m.ok());
    return std::move(m.value());
  };
  const std::vector<uint8_t> theirs = receiver->address();
  const size_t header = staged_header_bytes(theirs);
  auto peer = plain.value()->connect(std::span(theirs).subspan(header), ConnectOptions{true});
  REQUIRE(peer.ok());
  std::vector<uint8_t> reply(theirs.begin(), theirs.begin() + static_cast<std::ptrdiff_t>(header));
  const std::vector<uint8_t> mine = plain.value()->address();
  reply.insert(reply.end(), mine.begin(), mine.end());

  const uint64_t token = 0x5eed;
  auto send = [&](const std::vector<uint8_t>& bytes) {
    REQUIRE(wait_for([&](Completion done) { plain.value()->notify(peer.value(), bytes, done); }).ok());
  };
  send(staging::encode(staging::StagingRequest{token, 2, 1 << 20, reply, {}, {}}));
  auto offer = next_answer();
  REQUIRE(std::holds_alternative<staging::StagingOffer>(offer));
  REQUIRE(std::get<staging::StagingOffer>(offer).error == 0);

  SECTION("a newer version") {
    std::vector<uint8_t> scatter = staging::encode(staging::Scatter{token, 42, 1, {{0x1000, 16}}});
    scatter[4] = 9;  // version 9
    send(scatter);
    auto answer = next_answer();
    REQUIRE(std::holds_alternative<staging::Scattered>(answer));
    const auto& refused = std::get<staging::Scattered>(answer);
    CHECK(refused.sender == token);
    CHECK(refused.batch == 42);
    CHECK(refused.slot == 1);
    CHECK(refused.error == static_cast<uint32_t>(ErrorCode::kUnsupportedVersion));
    CHECK(refused.message.find("version 9") != std::string::npos);
  }
  SECTION("damaged pieces") {
    std::vector<uint8_t> scatter = staging::encode(staging::Scatter{token, 43, 0, {{0x1000, 16}}});
    scatter[28] = 2;  // count: 2 pieces, 1 present
    send(scatter);
    auto answer = next_answer();
    REQUIRE(std::holds_alternative<staging::Scattered>(answer));
    CHECK(std::get<staging::Scattered>(answer).batch == 43);
    CHECK(std::get<staging::Scattered>(answer).error == static_cast<uint32_t>(ErrorCode::kMalformed));
  }
  SECTION("from a sender it never offered staging: nothing to answer through, and it keeps serving") {
    std::vector<uint8_t> scatter = staging::encode(staging::Scatter{token + 1, 44, 0, {{0x1000, 16}}});
    scatter[4] = 9;
    send(scatter);
    // Asked again, the known sender still gets its offer: the receiver took the stray scatter in stride.
    send(staging::encode(staging::StagingRequest{token, 2, 1 << 20, reply, {}, {}}));
    auto again = next_answer();
    REQUIRE(std::holds_alternative<staging::StagingOffer>(again));
    CHECK(std::get<staging::StagingOffer>(again).sender == token);
  }
}
