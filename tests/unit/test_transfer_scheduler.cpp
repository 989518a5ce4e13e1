// TransferScheduler over the in-process LocalTransport: ordering, LayerReady only after the
// bytes, failure and timeout paths.
#include <condition_variable>
#include <mutex>
#include <numeric>

#include "catch.h"
#include "kvf/fabric/local_transport.h"
#include "kvf/fabric/stream_pattern.h"
#include "kvf/fabric/transfer_scheduler.h"
#include "kvf/protocol/notification.h"

using namespace kvf;
using namespace kvf::fabric;
using namespace kvf::protocol;

namespace {

struct Collector {
  std::mutex m;
  std::condition_variable cv;
  std::vector<std::pair<uint32_t, Status>> layers;
  std::vector<Notification> notes;
  std::vector<bool> bytes_present_at_notify;

  LayerDone done() {
    return [this](uint64_t, uint32_t layer, const Status& s) {
      std::lock_guard lock(m);
      layers.emplace_back(layer, s);
      cv.notify_all();
    };
  }
  bool wait_layers(size_t n) {
    std::unique_lock lock(m);
    return cv.wait_for(lock, std::chrono::seconds(10), [&] { return layers.size() >= n; });
  }
  bool wait_notes(size_t n) {
    std::unique_lock lock(m);
    return cv.wait_for(lock, std::chrono::seconds(10), [&] { return notes.size() >= n; });
  }
};

// Memory first: members are destroyed in reverse, so the transports (whose threads may still run
// a late notification handler reading dst) stop before the memory goes.
struct Rig {
  KvLayout layout;
  gpudirect::MemoryRegion src;
  gpudirect::MemoryRegion dst;
  std::unique_ptr<LocalTransport> sender;
  std::unique_ptr<LocalTransport> receiver;
  PeerId peer = 0;
  std::vector<RemoteRegionId> dst_layers;
  std::vector<uint32_t> blocks;
  std::vector<uint32_t> dst_blocks;
};

Rig make_rig(const std::string& tag, Collector& c) {
  KvLayoutDesc d{KvLayoutKind::kFlashAttention, 4, 16, 16, 2, 64, 2};
  auto layout = KvLayout::create(d);
  REQUIRE(layout.ok());
  auto s = LocalTransport::create("s-" + tag);
  auto r = LocalTransport::create("r-" + tag);
  REQUIRE(s.ok());
  REQUIRE(r.ok());
  auto src = gpudirect::MemoryRegion::allocate_host(nullptr, layout->layer_bytes() * 4);
  auto dst = gpudirect::MemoryRegion::allocate_host(nullptr, layout->layer_bytes() * 4);
  REQUIRE(src.ok());
  REQUIRE(dst.ok());
  Rig rig{layout.value(),
          std::move(src.value()),
          std::move(dst.value()),
          std::move(s.value()),
          std::move(r.value()),
          0,
          {},
          {},
          {}};
  auto peer = rig.sender->connect(rig.receiver->address());
  REQUIRE(peer.ok());
  rig.peer = peer.value();
  for (uint32_t l = 0; l < 4; ++l) {
    auto id = rig.sender->import_region(
        rig.peer, rig.dst.descriptor(l, l * rig.layout.layer_bytes(), rig.layout.layer_bytes()));
    REQUIRE(id.ok());
    rig.dst_layers.push_back(id.value());
  }
  rig.blocks.resize(16);
  std::iota(rig.blocks.begin(), rig.blocks.end(), 0u);
  rig.dst_blocks = {5, 3, 7, 1, 0, 2, 4, 6, 15, 13, 11, 9, 8, 10, 12, 14};
  for (uint32_t l = 0; l < 4; ++l) {
    for (uint32_t b = 0; b < 16; ++b) {
      for (uint32_t p = 0; p < 2; ++p) {
        auto e = rig.layout.extent(b, static_cast<KvPart>(p));
        fill_pattern(rig.src.data() + l * rig.layout.layer_bytes() + e.offset, e.length,
                     PatternKey{1, l, b, p});
      }
    }
  }
  poison(rig.dst.data(), rig.dst.size());
  // On LayerReady, record whether the layer's bytes are already all in place.
  rig.receiver->set_notification_handler([&c, layout = rig.layout, dst = rig.dst.data(),
                                          dst_blocks = rig.dst_blocks](std::span<const uint8_t> bytes) {
    // No Catch2 assertions here: this runs on the transport's thread and Catch2 is not
    // thread-safe. A bad record is recorded and checked on the test thread.
    auto n = decode_notification(bytes);
    if (!n.ok()) {
      std::lock_guard lock(c.m);
      c.notes.push_back(Notification{NotificationKind::kPong, ErrorCode::kMalformed, 0, 0, 0});
      c.bytes_present_at_notify.push_back(false);
      c.cv.notify_all();
      return;
    }
    bool present = true;
    if (n->kind == NotificationKind::kLayerReady) {
      for (uint32_t b = 0; b < 16 && present; ++b) {
        for (uint32_t p = 0; p < 2; ++p) {
          auto e = layout.extent(dst_blocks[b], static_cast<KvPart>(p));
          if (find_pattern_mismatch(dst + n->layer * layout.layer_bytes() + e.offset, e.length,
                                    PatternKey{1, n->layer, b, p})) {
            present = false;
          }
        }
      }
    }
    std::lock_guard lock(c.m);
    c.notes.push_back(n.value());
    c.bytes_present_at_notify.push_back(present);
    c.cv.notify_all();
  });
  return rig;
}

LayerSend layer_send(Rig& rig, uint64_t request, uint32_t layer) {
  auto plan = build_layer_plan(request, layer, rig.layout, rig.layout, rig.blocks, rig.dst_blocks);
  REQUIRE(plan.ok());
  return LayerSend{plan.value(), rig.peer,
                   77,           rig.src.data() + layer * rig.layout.layer_bytes(),
                   &rig.src,     rig.dst_layers[layer]};
}

}  // namespace

TEST_CASE("layers complete in order and are announced only after their bytes landed") {
  Collector c;
  Rig rig = make_rig("order", c);
  TransferSchedulerOptions options;
  options.max_inflight_bytes = rig.layout.layer_bytes();  // one layer at a time: exercises the queue
  TransferScheduler scheduler(*rig.sender, options);
  for (uint32_t l = 0; l < 4; ++l) scheduler.submit(layer_send(rig, 5, l), c.done());
  REQUIRE(c.wait_layers(4));
  REQUIRE(c.wait_notes(4));
  for (uint32_t l = 0; l < 4; ++l) {
    REQUIRE(c.layers[l].first == l);
    REQUIRE(c.layers[l].second.ok());
    REQUIRE(c.notes[l].kind == NotificationKind::kLayerReady);
    REQUIRE(c.notes[l].layer == l);
    REQUIRE(c.notes[l].session_id == 77);
    REQUIRE(c.notes[l].request_id == 5);
    REQUIRE(c.bytes_present_at_notify[l]);
  }
  auto stats = scheduler.stats();
  REQUIRE(stats.layers_done == 4);
  REQUIRE(stats.bytes_done == 4 * rig.layout.layer_bytes());
}

TEST_CASE("a severed peer fails the request's layers and the receiver is never told they are ready") {
  Collector c;
  Rig rig = make_rig("sever", c);
  TransferScheduler scheduler(*rig.sender);
  scheduler.submit(layer_send(rig, 6, 0), c.done());
  REQUIRE(c.wait_layers(1));
  REQUIRE(c.layers[0].second.ok());
  rig.sender->sever(rig.peer);
  for (uint32_t l = 1; l < 4; ++l) scheduler.submit(layer_send(rig, 6, l), c.done());
  REQUIRE(c.wait_layers(4));
  for (uint32_t l = 1; l < 4; ++l) REQUIRE(c.layers[l].second.code() == ErrorCode::kPeerLost);
  REQUIRE(c.wait_notes(1));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::lock_guard lock(c.m);
  REQUIRE(c.notes.size() == 1);  // only layer 0 was announced
  REQUIRE(scheduler.stats().layers_failed == 3);
}

TEST_CASE("a stalled layer times out, fails the rest of its request, and the receiver gets an abort") {
  Collector c;
  Rig rig = make_rig("stall", c);
  TransferSchedulerOptions options;
  options.layer_timeout = std::chrono::milliseconds(200);
  TransferScheduler scheduler(*rig.sender, options);
  rig.sender->stall(rig.peer, true);
  for (uint32_t l = 0; l < 4; ++l) scheduler.submit(layer_send(rig, 8, l), c.done());
  REQUIRE(c.wait_layers(4));
  REQUIRE(c.layers[0].second.code() == ErrorCode::kTimeout);
  for (uint32_t l = 1; l < 4; ++l) REQUIRE_FALSE(c.layers[l].second.ok());
  // The abort notification goes out even while data is stalled.
  rig.sender->stall(rig.peer, false);
  REQUIRE(c.wait_notes(1));
  std::lock_guard lock(c.m);
  REQUIRE(c.notes[0].kind == NotificationKind::kRequestAbort);
  REQUIRE(c.notes[0].request_id == 8);
  REQUIRE(c.notes[0].code == ErrorCode::kTimeout);
}

TEST_CASE("abort_request fails queued layers; other requests go on") {
  Collector c;
  Rig rig = make_rig("abort", c);
  TransferScheduler scheduler(*rig.sender);
  rig.sender->stall(rig.peer, true);
  scheduler.abort_request(rig.peer, 77, 9, Status(ErrorCode::kAborted, "client went away"));
  scheduler.submit(layer_send(rig, 9, 0), c.done());
  REQUIRE(c.wait_layers(1));
  REQUIRE(c.layers[0].second.code() == ErrorCode::kAborted);
  rig.sender->stall(rig.peer, false);
  scheduler.submit(layer_send(rig, 10, 0), c.done());
  REQUIRE(c.wait_layers(2));
  REQUIRE(c.layers[1].second.ok());
}

TEST_CASE("the automatic window is 128 MiB or what the transport asks for; an explicit one stands") {
  auto t = LocalTransport::create("window");
  REQUIRE(t.ok());
  LocalTransport& transport = *t.value();
  constexpr uint64_t kMiB = 1ull << 20;
  {
    TransferScheduler scheduler(transport);
    REQUIRE(scheduler.max_inflight_bytes() == TransferSchedulerOptions::kDefaultInflightBytes);
    REQUIRE(scheduler.max_inflight_bytes() == 128 * kMiB);
  }
  transport.suggest_inflight(512 * kMiB);  // e.g. staged cuda_ipc: 2 rounds of 4 slots of 64 MiB
  {
    TransferScheduler scheduler(transport);
    REQUIRE(scheduler.max_inflight_bytes() == 512 * kMiB);
  }
  transport.suggest_inflight(32 * kMiB);  // less than the default: the default stays
  {
    TransferScheduler scheduler(transport);
    REQUIRE(scheduler.max_inflight_bytes() == 128 * kMiB);
  }
  transport.suggest_inflight(512 * kMiB);
  TransferSchedulerOptions explicit_window;
  explicit_window.max_inflight_bytes = 64 * kMiB;
  TransferScheduler scheduler(transport, explicit_window);
  REQUIRE(scheduler.max_inflight_bytes() == 64 * kMiB);
}
