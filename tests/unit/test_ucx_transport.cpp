// UcxTransport between two workers of one process (real UCX: shm/tcp on this machine).
#include <condition_variable>
#include <cstring>
#include <future>
#include <mutex>

#include "catch.h"
#include "completion_wait.h"
#include "kvf/fabric/stream_pattern.h"
#include "kvf/fabric/ucx_transport.h"

using namespace kvf;
using namespace kvf::fabric;

namespace {

// Two transports of one UCX context, `a` connected to `b` (its peer id `peer`).
struct ConnectedPair {
  std::shared_ptr<gpudirect::UcxContext> ucx;
  std::unique_ptr<UcxTransport> a;
  std::unique_ptr<UcxTransport> b;
  PeerId peer = 0;
};

ConnectedPair connected_pair(UcxTransportOptions options = {}) {
  auto ucx = gpudirect::UcxContext::create();
  REQUIRE(ucx.ok());
  auto a = UcxTransport::create(ucx.value(), options);
  auto b = UcxTransport::create(ucx.value(), options);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  auto peer = a.value()->connect(b.value()->address());
  REQUIRE(peer.ok());
  return {ucx.value(), std::move(a.value()), std::move(b.value()), peer.value()};
}

}  // namespace

TEST_CASE("UcxTransport puts bytes into a peer's region and flushes") {
  auto [ucx, a, b, peer] = connected_pair();
  const uint64_t bytes = 8 << 20;
  auto src = gpudirect::MemoryRegion::allocate_host(ucx, bytes);
  auto dst = gpudirect::MemoryRegion::allocate_host(ucx, bytes);
  REQUIRE(src.ok());
  REQUIRE(dst.ok());
  fill_pattern(src->data(), bytes, PatternKey{42, 1, 2, 0});
  poison(dst->data(), bytes);

  auto remote = a->import_region(peer, dst->descriptor(7));
  REQUIRE(remote.ok());

  // Two halves in swapped order, several chunks each.
  std::vector<PutOp> ops;
  const uint64_t chunk = 64 << 10;
  for (uint64_t off = 0; off < bytes; off += chunk) {
    uint64_t swapped = (off + bytes / 2) % bytes;
    ops.push_back(PutOp{src->data() + off, &src.value(), remote.value(), swapped, chunk});
  }
  REQUIRE(wait_for([&](Completion done) { a->put(peer, ops, done); }).ok());
  REQUIRE(wait_for([&](Completion done) { a->flush(peer, done); }).ok());
  REQUIRE(std::memcmp(dst->data(), src->data() + bytes / 2, bytes / 2) == 0);
  REQUIRE(std::memcmp(dst->data() + bytes / 2, src->data(), bytes / 2) == 0);

  SECTION("an op past the granted region fails the batch and posts nothing") {
    PutOp bad{src->data(), &src.value(), remote.value(), bytes - 8, 16};
    Status s = wait_for([&](Completion done) { a->put(peer, {bad}, done); });
    REQUIRE(s.code() == ErrorCode::kInvalidArgument);
  }

  SECTION("gets read a peer's region into poisoned local memory, in pieces and out of order") {
    auto back = gpudirect::MemoryRegion::allocate_host(ucx, bytes);
    REQUIRE(back.ok());
    poison(back->data(), bytes);
    std::vector<GetOp> gets;
    for (uint64_t off = 0; off < bytes; off += chunk) {
      gets.push_back(GetOp{back->data() + (bytes - chunk - off), &back.value(), remote.value(), off, chunk});
    }
    REQUIRE(wait_for([&](Completion done) { a->get(peer, gets, done); }).ok());
    // dst holds src's halves swapped; back holds dst's chunks in reverse order.
    for (uint64_t off = 0; off < bytes; off += chunk) {
      REQUIRE(std::memcmp(back->data() + (bytes - chunk - off), dst->data() + off, chunk) == 0);
    }
    GetOp bad{back->data(), &back.value(), remote.value(), bytes - 8, 16};
    Status s = wait_for([&](Completion done) { a->get(peer, {bad}, done); });
    REQUIRE(s.code() == ErrorCode::kInvalidArgument);
    GetOp unknown{back->data(), &back.value(), remote.value() + 100, 0, 16};
    s = wait_for([&](Completion done) { a->get(peer, {unknown}, done); });
    REQUIRE(s.code() == ErrorCode::kInvalidArgument);
  }

  SECTION("notifications arrive") {
    std::promise<std::vector<uint8_t>> got;
    b->set_notification_handler([&](std::span<const uint8_t> m) { got.set_value({m.begin(), m.end()}); });
    std::vector<uint8_t> msg{1, 2, 3, 4, 5};
    REQUIRE(wait_for([&](Completion done) { a->notify(peer, msg, done); }).ok());
    auto f = got.get_future();
    REQUIRE(f.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
    REQUIRE(f.get() == msg);
    b->set_notification_handler(nullptr);
  }

  SECTION("each knows its own progress thread, and only that one") {
    CHECK_FALSE(a->on_progress_thread());  // the test's own thread
    std::promise<std::pair<bool, bool>> seen;
    a->post([&] { seen.set_value({a->on_progress_thread(), b->on_progress_thread()}); });
    auto [own, other] = seen.get_future().get();
    CHECK(own);          // a task runs on a's progress thread
    CHECK_FALSE(other);  // which is not b's
  }
}

TEST_CASE("UcxTransport into a UCX-allocated peer region: copies through its mapping here, or through UCX") {
  // On one host UCX exports UCX-allocated memory as shared memory: the transport then copies into
  // (and out of) the peer's segment mapped here, unless told not to. Both ways must place every
  // byte where the ops say, and neither may pass the granted region.
  const bool mapped_copy = GENERATE(true, false);
  CAPTURE(mapped_copy);
  UcxTransportOptions options;
  options.copy_into_mapped_regions = mapped_copy;
  auto [ucx, a, b, peer] = connected_pair(options);
  const uint64_t bytes = 4 << 20;
  auto src = gpudirect::MemoryRegion::allocate_host(ucx, bytes);
  auto dst = gpudirect::MemoryRegion::allocate_ucx(ucx, bytes);
  auto back = gpudirect::MemoryRegion::allocate_host(ucx, bytes);
  REQUIRE((src.ok() && dst.ok() && back.ok()));
  fill_pattern(src->data(), bytes, PatternKey{7, 3, 1, 0});
  poison(dst->data(), bytes);
  poison(back->data(), bytes);
  auto remote = a->import_region(peer, dst->descriptor(1));
  REQUIRE(remote.ok());

  // Extents of uneven sizes, each to the mirror position, so an offset mistake cannot hide.
  std::vector<PutOp> puts;
  std::vector<GetOp> gets;
  uint64_t off = 0;
  for (uint64_t n = 1; off < bytes; ++n) {
    const uint64_t len = std::min<uint64_t>(bytes - off, 4096 * n + 13);
    puts.push_back(PutOp{src->data() + off, &src.value(), remote.value(), bytes - off - len, len});
    gets.push_back(GetOp{back->data() + off, &back.value(), remote.value(), bytes - off - len, len});
    off += len;
  }
  REQUIRE(wait_for([&](Completion done) { a->put(peer, puts, done); }).ok());
  REQUIRE(wait_for([&](Completion done) { a->flush(peer, done); }).ok());
  for (const PutOp& p : puts) {
    REQUIRE(std::memcmp(dst->data() + p.remote_offset, p.local, p.length) == 0);
  }
  REQUIRE(wait_for([&](Completion done) { a->get(peer, gets, done); }).ok());
  REQUIRE(std::memcmp(back->data(), src->data(), bytes) == 0);

  PutOp past{src->data(), &src.value(), remote.value(), bytes - 8, 16};
  CHECK(wait_for([&](Completion done) { a->put(peer, {past}, done); }).code() == ErrorCode::kInvalidArgument);
}
