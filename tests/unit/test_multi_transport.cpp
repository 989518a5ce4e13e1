// MultiTransport (include/kvf/fabric/multi_transport.h) over real parts: an in-process local
// transport and real UCX workers. Each peer gets the first transport of the sender's preference
// that the receiver offers too; bytes land verified in poisoned memory through whichever was
// chosen; completions of a non-first transport run on the first one's thread; no transport in
// common, unreadable addresses and unknown peers or regions are clear errors.
#include <cstring>
#include <future>
#include <random>
#include <thread>

#include "catch.h"
#include "completion_wait.h"
#include "kvf/fabric/local_transport.h"
#include "kvf/fabric/multi_transport.h"
#include "kvf/fabric/stream_pattern.h"
#include "kvf/fabric/ucx_transport.h"

using namespace kvf;
using namespace kvf::fabric;

namespace {

std::unique_ptr<Transport> local(const std::string& name) {
  auto t = LocalTransport::create(name);
  REQUIRE(t.ok());
  return std::move(t.value());
}

std::unique_ptr<Transport> ucx_transport(const std::shared_ptr<gpudirect::UcxContext>& ucx) {
  auto t = UcxTransport::create(ucx);
  REQUIRE(t.ok());
  return std::move(t.value());
}

std::unique_ptr<MultiTransport> multi(std::vector<std::unique_ptr<Transport>> inner) {
  auto m = MultiTransport::create(std::move(inner));
  REQUIRE(m.ok());
  return std::move(m.value());
}

// Puts `bytes` of a pattern from `sender` into `dst` (poisoned first) through `peer`, verified.
void put_and_verify(Transport& sender, PeerId peer, gpudirect::MemoryRegion& src,
                    gpudirect::MemoryRegion& dst, uint64_t seed) {
  const uint64_t bytes = src.size();
  fill_pattern(src.data(), bytes, PatternKey{seed, 1, 2, 0});
  poison(dst.data(), bytes);
  auto remote = sender.import_region(peer, dst.descriptor(3));
  REQUIRE(remote.ok());
  std::vector<PutOp> ops;
  const uint64_t chunk = 64 << 10;
  for (uint64_t off = 0; off < bytes; off += chunk) {
    ops.push_back(PutOp{src.data() + off, &src, remote.value(), bytes - chunk - off, chunk});  // reversed
  }
  REQUIRE(wait_for([&](Completion done) { sender.put(peer, ops, done); }).ok());
  REQUIRE(wait_for([&](Completion done) { sender.flush(peer, done); }).ok());
  for (uint64_t off = 0; off < bytes; off += chunk) {
    REQUIRE(std::memcmp(dst.data() + (bytes - chunk - off), src.data() + off, chunk) == 0);
  }
}

}  // namespace

TEST_CASE("a multi transport takes the first transport both sides offer, per peer") {
  auto ucx = gpudirect::UcxContext::create();
  REQUIRE(ucx.ok());
  const uint64_t bytes = 4 << 20;
  auto src = gpudirect::MemoryRegion::allocate_host(ucx.value(), bytes);
  auto dst = gpudirect::MemoryRegion::allocate_host(ucx.value(), bytes);
  REQUIRE(src.ok());
  REQUIRE(dst.ok());

  std::vector<std::unique_ptr<Transport>> sender_inner;
  sender_inner.push_back(local("multi-sender"));
  sender_inner.push_back(ucx_transport(ucx.value()));
  auto sender = multi(std::move(sender_inner));
  REQUIRE(sender->name() == "local,ucx");
  REQUIRE(transports_offered(sender->address()) == std::vector<std::string>{"local", "ucx"});

  SECTION("both offer local and ucx: local, the sender's first choice") {
    std::vector<std::unique_ptr<Transport>> inner;
    inner.push_back(ucx_transport(ucx.value()));
    inner.push_back(local("multi-receiver-1"));
    auto receiver = multi(std::move(inner));
    auto peer = sender->connect(receiver->address());
    REQUIRE(peer.ok());
    REQUIRE(sender->chosen(peer.value()) == "local");
    put_and_verify(*sender, peer.value(), src.value(), dst.value(), 11);
  }

  SECTION("a plain ucx receiver (not a multi address): ucx") {
    auto receiver = ucx_transport(ucx.value());
    auto peer = sender->connect(receiver->address());
    REQUIRE(peer.ok());
    REQUIRE(sender->chosen(peer.value()) == "ucx");
    put_and_verify(*sender, peer.value(), src.value(), dst.value(), 12);

    SECTION("completions and notifications of the second transport run on the first one's thread") {
      auto first = std::make_shared<std::promise<std::thread::id>>();
      sender->post([first] { first->set_value(std::this_thread::get_id()); });
      const std::thread::id primary = first->get_future().get();
      auto seen = std::make_shared<std::promise<std::thread::id>>();
      sender->flush(peer.value(), [seen](const Status&) { seen->set_value(std::this_thread::get_id()); });
      REQUIRE(seen->get_future().get() == primary);

      // A receiver that is a multi transport hands its second transport's notifications over too.
      std::vector<std::unique_ptr<Transport>> inner;
      inner.push_back(local("multi-receiver-2"));
      inner.push_back(ucx_transport(ucx.value()));
      auto multi_receiver = multi(std::move(inner));
      auto receiver_first = std::make_shared<std::promise<std::thread::id>>();
      multi_receiver->post([receiver_first] { receiver_first->set_value(std::this_thread::get_id()); });
      const std::thread::id receiver_primary = receiver_first->get_future().get();
      auto got = std::make_shared<std::promise<std::pair<std::vector<uint8_t>, std::thread::id>>>();
      multi_receiver->set_notification_handler([got](std::span<const uint8_t> m) {
        got->set_value({{m.begin(), m.end()}, std::this_thread::get_id()});
      });
      auto plain = ucx_transport(ucx.value());
      // A plain ucx sender connects to the list's ucx entry (a UCX worker must never see the list).
      REQUIRE(address_for(*plain, multi_receiver->address()) != multi_receiver->address());
      auto to_receiver = plain->connect(address_for(*plain, multi_receiver->address()));
      REQUIRE(to_receiver.ok());
      const std::vector<uint8_t> message = {1, 2, 3, 4, 5};
      REQUIRE(wait_for([&](Completion done) { plain->notify(to_receiver.value(), message, done); }).ok());
      auto future = got->get_future();
      REQUIRE(future.wait_for(std::chrono::seconds(20)) == std::future_status::ready);
      auto [bytes_got, thread] = future.get();
      REQUIRE(bytes_got == message);
      REQUIRE(thread == receiver_primary);
    }
  }

  SECTION("no transport in common: a clear error naming both sides' transports") {
    std::vector<std::unique_ptr<Transport>> local_only;
    local_only.push_back(local("multi-local-only"));
    auto only_local = multi(std::move(local_only));
    auto receiver = ucx_transport(ucx.value());
    auto peer = only_local->connect(receiver->address());
    REQUIRE_FALSE(peer.ok());
    REQUIRE(peer.status().code() == ErrorCode::kUnavailable);
    REQUIRE(peer.status().message().find("no transport in common") != std::string::npos);
    REQUIRE(peer.status().message().find("this side offers local, the peer ucx") != std::string::npos);
  }

  SECTION("unknown peers and regions fail through the completion") {
    Status s = wait_for([&](Completion done) { sender->put(999, {}, done); });
    REQUIRE(s.code() == ErrorCode::kInvalidArgument);
    auto receiver = ucx_transport(ucx.value());
    auto peer = sender->connect(receiver->address());
    REQUIRE(peer.ok());
    PutOp op{src->data(), &src.value(), 12345, 0, 16};
    s = wait_for([&](Completion done) { sender->put(peer.value(), {op}, done); });
    REQUIRE(s.code() == ErrorCode::kInvalidArgument);
    REQUIRE(s.message().find("not imported") != std::string::npos);
    REQUIRE(sender->import_region(777, dst->descriptor(1)).status().code() == ErrorCode::kInvalidArgument);
  }
}

TEST_CASE("multi transport addresses: what they offer, damaged ones offer nothing") {
  auto ucx = gpudirect::UcxContext::create();
  REQUIRE(ucx.ok());
  std::vector<std::unique_ptr<Transport>> inner;
  inner.push_back(local("multi-address"));
  inner.push_back(ucx_transport(ucx.value()));
  auto m = multi(std::move(inner));
  const std::vector<uint8_t> address = m->address();
  auto plain = ucx_transport(ucx.value());
  std::vector<std::unique_ptr<Transport>> other_inner;
  other_inner.push_back(ucx_transport(ucx.value()));
  auto other = multi(std::move(other_inner));

  REQUIRE(transports_can_meet(address, plain->address()));
  REQUIRE(transports_offered(plain->address()) == std::vector<std::string>{"ucx"});

  // Every truncation and random damage: parsing never crashes, and a damaged list offers nothing
  // or what it still names; connect refuses cleanly.
  std::mt19937 rng(5);
  for (size_t cut = 8; cut < address.size(); cut += 7) {
    std::vector<uint8_t> bad(address.begin(), address.begin() + static_cast<std::ptrdiff_t>(cut));
    REQUIRE(transports_offered(bad).empty());
    auto refused = other->connect(bad);
    REQUIRE(refused.status().code() == ErrorCode::kUnavailable);
  }
  for (int i = 0; i < 200; ++i) {
    std::vector<uint8_t> bad = address;
    bad[8 + rng() % (bad.size() - 8)] ^= static_cast<uint8_t>(1 + rng() % 255);
    (void)transports_offered(bad);
  }
  std::vector<uint8_t> future_version = address;
  future_version[4] = 9;
  REQUIRE(transports_offered(future_version).empty());
  REQUIRE_FALSE(transports_can_meet(future_version, plain->address()));

  std::vector<std::unique_ptr<Transport>> twice;
  twice.push_back(ucx_transport(ucx.value()));
  twice.push_back(ucx_transport(ucx.value()));
  REQUIRE(MultiTransport::create(std::move(twice)).status().code() == ErrorCode::kInvalidArgument);
  REQUIRE(MultiTransport::create({}).status().code() == ErrorCode::kInvalidArgument);
}
