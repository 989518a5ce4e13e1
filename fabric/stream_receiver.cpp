#include "kvf/fabric/stream_receiver.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <unordered_map>

#include <spdlog/spdlog.h>

#include "kvf/fabric/control_channel.h"
#include "kvf/fabric/cuda_ipc_transport.h"
#include "kvf/fabric/multi_transport.h"
#include "kvf/fabric/stream_pattern.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/memory_region.h"
#include "kvf/protocol/notification.h"

namespace kvf::fabric {
namespace {

using Clock = std::chrono::steady_clock;

// One thread that runs slow work (allocation, poisoning, verification) off the io and
// progress threads, in order.
class Worker {
 public:
  explicit Worker(std::function<void()> tick) : tick_(std::move(tick)), thread_([this] { run(); }) {}
  ~Worker() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void post(std::function<void()> fn) {
    {
      std::lock_guard lock(mutex_);
      tasks_.push_back(std::move(fn));
    }
    cv_.notify_one();
  }

 private:
  void run() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock lock(mutex_);
        cv_.wait_for(lock, std::chrono::milliseconds(500), [&] { return stop_ || !tasks_.empty(); });
        if (stop_ && tasks_.empty()) return;
        if (!tasks_.empty()) {
          fn = std::move(tasks_.front());
          tasks_.pop_front();
        }
      }
      if (fn) fn();
      tick_();
    }
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stop_ = false;
  std::function<void()> tick_;
  std::thread thread_;
};

// Fills a granted buffer with poison so that bytes that never arrive cannot pass verification.
Status poison_region(const gpudirect::MemoryRegion& region, uint64_t bytes) {
  if (region.kind() == protocol::MemoryKind::kCudaDevice) {
    return gpudirect::fill_device(region.data(), kPoisonByte, bytes);
  }
  poison(region.data(), bytes);
  return Status::Ok();
}

// Regions a peer was granted are not unmapped at once when their stream ends: a peer that died
// or misbehaved may still have puts in flight (over tcp, UCX writes them on our progress thread
// whenever they arrive, and a flush seen by the sender does not order them before our control
// messages). Writing into a retired region is harmless; into unmapped memory it would crash.
class RetiredRegions {
 public:
  explicit RetiredRegions(std::chrono::milliseconds grace) : grace_(grace) {}
  void retire(gpudirect::MemoryRegion region) {
    if (region.size() == 0) return;
    std::lock_guard lock(mutex_);
    retired_.push_back({Clock::now() + grace_, std::move(region)});
  }
  void prune() {
    std::deque<Entry> expired;
    {
      std::lock_guard lock(mutex_);
      auto now = Clock::now();
      while (!retired_.empty() && retired_.front().release_at <= now) {
        expired.push_back(std::move(retired_.front()));
        retired_.pop_front();
      }
    }
  }

 private:
  struct Entry {
    Clock::time_point release_at;
    gpudirect::MemoryRegion region;
  };
  std::chrono::milliseconds grace_;
  std::mutex mutex_;
  std::deque<Entry> retired_;
};

struct Stream {
  uint64_t request_id = 0;
  protocol::KvLayout layout;
  protocol::StreamOffer offer;
  std::optional<gpudirect::MemoryRegion> region;    // owned buffers (none in engine pool mode)
  const gpudirect::MemoryRegion* target = nullptr;  // where the bytes land: &region or the pool's
  std::vector<uint32_t> dst_blocks;
  std::vector<bool> arrived;
  uint32_t arrived_count = 0;
  Clock::time_point started;
  std::vector<uint64_t> arrival_ns;
  bool finished = false;
};

struct Session {
  uint64_t id = 0;
  std::string name;  // "peer-name@1.2.3.4:5678"
  std::shared_ptr<ControlConnection> connection;
  std::unordered_map<uint64_t, std::shared_ptr<Stream>> streams;
  std::optional<gpudirect::MemoryRegion> run_target;
  // Buffers of streams that completed cleanly, reused by the session's next streams the way an
  // engine reuses its KV pool (the sender keeps them mapped). Worker thread only.
  std::vector<gpudirect::MemoryRegion> free_pools;
  bool closed = false;
};

}  // namespace

class StreamReceiver::Impl {
 public:
  Impl(std::shared_ptr<gpudirect::UcxContext> ucx, Transport& transport, StreamReceiverOptions options)
      : ucx_(std::move(ucx)), transport_(transport), options_(std::move(options)) {}

  ~Impl() {
    if (server_) server_->stop();
    std::vector<std::shared_ptr<Session>> sessions;
    {
      std::lock_guard lock(mutex_);
      for (auto& [id, s] : sessions_) sessions.push_back(s);
    }
    // A StreamResult queued just before (the owner often destroys us from on_stream_done's wake-up)
    // must reach its sender before the control context stops.
    std::vector<std::shared_ptr<ControlConnection>> connections;
    for (auto& s : sessions) connections.push_back(s->connection);
    if (control_) {
      const auto unfinished =
          control_->close_and_wait(connections, Status(ErrorCode::kAborted, "receiver shutting down"),
                                   ControlOptions{}.write_timeout + std::chrono::seconds(1));
      for (const auto& c : unfinished) {
        spdlog::warn(
            "{}: the control connection from {} did not finish closing; its last replies may be lost",
            options_.name, c->remote());
      }
    }
    // Timers and notifications already queued on the transport's thread must not reach us.
    std::promise<void> fenced;
    transport_.post([this, &fenced] {
      *alive_ = false;
      fenced.set_value();
    });
    fenced.get_future().wait();
    transport_.set_notification_handler(nullptr);
    // Control handlers (a sender's connection closing, say) post to the worker: stop them before
    // the worker goes, or a late one posts to a destroyed worker.
    if (control_) control_->stop();
    worker_.reset();
    server_.reset();
    control_.reset();
  }

  Status start(const std::string& host, uint16_t port) {
    control_ = std::make_unique<ControlContext>();
    worker_ = std::make_unique<Worker>([this] { retired_.prune(); });
    transport_.set_notification_handler([this, alive = alive_](std::span<const uint8_t> bytes) {
      if (*alive) on_notification(bytes);
    });
    auto server =
        ControlServer::listen(control_->io(), host, port,
                              [this](std::shared_ptr<ControlConnection> c) { on_accept(std::move(c)); });
    if (!server.ok()) return server.status();
    server_ = std::move(server.value());
    return Status::Ok();
  }

  uint16_t port() const { return server_->port(); }

 private:
  void on_accept(std::shared_ptr<ControlConnection> connection) {
    auto session = std::make_shared<Session>();
    session->connection = connection;
    session->name = connection->remote();
    {
      std::lock_guard lock(mutex_);
      session->id = next_session_++;
      sessions_[session->id] = session;
    }
    std::weak_ptr<Session> weak = session;
    connection->start(
        [this, weak](const protocol::Message& m) {
          if (auto s = weak.lock()) on_message(s, m);
        },
        [this, weak](const Status& why) {
          if (auto s = weak.lock()) on_close(s, why);
        });
  }

  void on_message(const std::shared_ptr<Session>& session, const protocol::Message& message) {
    if (const auto* hello = std::get_if<protocol::Hello>(&message)) {
      if (hello->min_version > protocol::kProtocolVersion ||
          hello->max_version < protocol::kProtocolVersion) {
        session->connection->send(protocol::ErrorReply{
            ErrorCode::kUnsupportedVersion,
            "this receiver speaks version " + std::to_string(protocol::kProtocolVersion)});
        session->connection->close(Status(ErrorCode::kUnsupportedVersion, "version mismatch"));
        return;
      }
      // Both ends must share a transport; say so before the sender tries to connect to an
      // address its transport cannot read. (A MultiTransport's address lists several.)
      if (!transports_can_meet(hello->transport_address, transport_.address())) {
        std::string offered;
        for (const std::string& t : transports_offered(hello->transport_address))
          offered += (offered.empty() ? "" : ",") + t;
        session->connection->send(protocol::ErrorReply{
            ErrorCode::kUnavailable, "this receiver runs the " + std::string(transport_.name()) +
                                         " transport and the sender offers " + offered +
                                         ": start both with the same --transport (or a list sharing one)"});
        session->connection->close(Status(ErrorCode::kUnavailable, "transport mismatch"));
        return;
      }
      session->name = hello->peer_name + "@" + session->connection->remote();
      session->connection->send(
          protocol::HelloAck{protocol::kProtocolVersion, options_.name, transport_.address(), session->id});
      spdlog::info("{}: sender {} connected (session {})", options_.name, session->name, session->id);
    } else if (const auto* offer = std::get_if<protocol::StreamOffer>(&message)) {
      // Any task keeps the transport's progress thread spinning for a while (see
      // UcxTransportOptions::spin_before_sleep), so the stream's first data messages (staged
      // transports: the sender's Scatter) do not wait for it to wake from a sleep of up to
      // max_sleep. The sender does the same before its offer (send_pattern_stream). (On one H200 a
      // tenth of the Scatters reached the receiver's thread 1.0-1.4 ms after they were sent, with
      // and without this: that tail has another cause, perf/RESULTS.md session 9.)
      transport_.post([] {});
      worker_->post([this, session, offer = *offer] { accept_offer(session, offer); });
    } else if (const auto* run = std::get_if<protocol::RunRequest>(&message)) {
      worker_->post([this, session, run = *run] { accept_run(session, run); });
    } else if (const auto* abort = std::get_if<protocol::Abort>(&message)) {
      fail_stream(session, abort->request_id, Status(abort->code, "sender aborted: " + abort->message));
    } else if (std::holds_alternative<protocol::Bye>(message)) {
      session->connection->close(Status(ErrorCode::kAborted, "sender said bye"));
    } else {
      session->connection->send(protocol::ErrorReply{
          ErrorCode::kInvalidArgument,
          std::string("unexpected message ") +
              std::string(protocol::message_type_name(protocol::message_type(message)))});
    }
  }

  void on_close(const std::shared_ptr<Session>& session, const Status& why) {
    std::vector<std::shared_ptr<Stream>> open;
    {
      std::lock_guard lock(mutex_);
      session->closed = true;
      for (auto& [id, stream] : session->streams) {
        if (!stream->finished) open.push_back(stream);
      }
      sessions_.erase(session->id);
    }
    for (auto& stream : open) {
      fail_stream(session, stream->request_id,
                  Status(ErrorCode::kPeerLost,
                         "sender connection ended after " + std::to_string(stream->arrived_count) + "/" +
                             std::to_string(stream->arrived.size()) + " layers: " + why.message()));
    }
    spdlog::info("{}: session {} ({}) ended: {}", options_.name, session->id, session->name, why.to_string());
    // Regions are freed on the worker, after any verification still holding them.
    worker_->post([this, session] {
      for (auto& [id, stream] : session->streams) {
        if (options_.pool) release_later(stream);
        if (stream->region) retired_.retire(std::move(*stream->region));
      }
      session->streams.clear();
      if (session->run_target) retired_.retire(std::move(*session->run_target));
      session->run_target.reset();
      for (auto& pool : session->free_pools) retired_.retire(std::move(pool));
      session->free_pools.clear();
    });
  }

  void accept_offer(const std::shared_ptr<Session>& session, const protocol::StreamOffer& offer) {
    auto refuse = [&](ErrorCode code, const std::string& why) {
      session->connection->send(protocol::Abort{offer.request_id, code, why});
      spdlog::warn("{}: refused stream {} from {}: {}", options_.name, offer.request_id, session->name, why);
    };
    protocol::KvLayoutDesc desc = offer.layout;
    desc.num_blocks = offer.num_blocks;
    auto layout = protocol::KvLayout::create(desc);
    if (!layout.ok()) return refuse(ErrorCode::kInvalidArgument, "bad layout: " + layout.status().message());
    uint64_t total = layout->layer_bytes() * desc.num_layers;
    if (total / desc.num_layers != layout->layer_bytes() || total > options_.max_request_bytes) {
      return refuse(ErrorCode::kInvalidArgument, "request of " + std::to_string(total) +
                                                     " bytes exceeds this receiver's limit of " +
                                                     std::to_string(options_.max_request_bytes) + " bytes");
    }
    {
      std::lock_guard lock(mutex_);
      if (session->closed) return report_dropped(session, offer);
      if (session->streams.count(offer.request_id) != 0) {
        return refuse(ErrorCode::kInvalidArgument,
                      "request id " + std::to_string(offer.request_id) + " already in use");
      }
    }
    if (options_.pool) return accept_into_pool(session, offer, layout.value());
    std::optional<gpudirect::MemoryRegion> pool;
    for (auto it = session->free_pools.begin(); it != session->free_pools.end(); ++it) {
      if (it->size() >= total) {
        pool.emplace(std::move(*it));
        session->free_pools.erase(it);
        break;
      }
    }
    if (!pool) {
      auto region = options_.buffers.gpu
                        ? gpudirect::MemoryRegion::allocate_cuda(ucx_, options_.buffers.device, total)
                        : gpudirect::MemoryRegion::allocate_ucx(ucx_, total);
      if (!region.ok()) return refuse(ErrorCode::kOutOfMemory, region.status().message());
      pool.emplace(std::move(region.value()));
    }

    auto stream = std::make_shared<Stream>(
        Stream{offer.request_id, layout.value(), offer, std::move(*pool), nullptr, {}, {}, 0, {}, {}, false});
    stream->target = &*stream->region;
    if (Status s = poison_region(*stream->region, total); !s.ok()) {
      return refuse(ErrorCode::kInternal, "poisoning the granted buffer: " + s.message());
    }
    stream->dst_blocks.resize(offer.num_blocks);
    std::iota(stream->dst_blocks.begin(), stream->dst_blocks.end(), 0u);
    if ((offer.flags & protocol::kStreamShuffle) != 0) {
      std::mt19937_64 rng(offer.seed ^ 0x5DEECE66Dull);
      std::shuffle(stream->dst_blocks.begin(), stream->dst_blocks.end(), rng);
    }
    grant_and_plan(session, stream);
  }

  // Engine pool mode: the request's blocks come from the engine's block manager, and the grant is
  // the engine's own cache.
  void accept_into_pool(const std::shared_ptr<Session>& session, const protocol::StreamOffer& offer,
                        const protocol::KvLayout& request_layout) {
    auto refuse = [&](ErrorCode code, const std::string& why) {
      session->connection->send(protocol::Abort{offer.request_id, code, why});
      spdlog::warn("{}: refused stream {} from {}: {}", options_.name, offer.request_id, session->name, why);
    };
    const EnginePool& pool = *options_.pool;
    auto pool_layout = protocol::KvLayout::create(pool.layout);
    if (!pool_layout.ok())
      return refuse(ErrorCode::kInternal, "the engine pool's layout: " + pool_layout.status().message());
    if (!request_layout.same_block_geometry(pool_layout.value()) ||
        request_layout.desc().num_layers != pool.layout.num_layers) {
      return refuse(ErrorCode::kInvalidArgument, "the request's layout " + request_layout.to_string() +
                                                     " does not match this engine's " +
                                                     pool_layout->to_string());
    }
    if (offer.num_blocks > pool.layout.num_blocks) {
      return refuse(ErrorCode::kInvalidArgument, std::to_string(offer.num_blocks) +
                                                     " blocks, this engine has " +
                                                     std::to_string(pool.layout.num_blocks));
    }
    std::vector<uint32_t> blocks = pool.allocate(offer.request_id, offer.num_blocks);
    if (blocks.empty()) return refuse(ErrorCode::kOutOfMemory, "no free KV blocks for the request");
    if (blocks.size() != offer.num_blocks ||
        std::any_of(blocks.begin(), blocks.end(), [&](uint32_t b) { return b >= pool.layout.num_blocks; })) {
      if (pool.release) pool.release(offer.request_id, std::move(blocks));
      return refuse(ErrorCode::kInternal, "the engine's block manager gave a bad block list");
    }
    {
      std::lock_guard lock(mutex_);
      if (session->closed) {
        if (pool.release) pool.release(offer.request_id, std::move(blocks));
        return report_dropped(session, offer);
      }
    }
    auto stream = std::make_shared<Stream>(Stream{offer.request_id,
                                                  pool_layout.value(),
                                                  offer,
                                                  std::nullopt,
                                                  pool.region,
                                                  std::move(blocks),
                                                  {},
                                                  0,
                                                  {},
                                                  {},
                                                  false});
    grant_and_plan(session, stream);
  }

  void grant_and_plan(const std::shared_ptr<Session>& session, const std::shared_ptr<Stream>& stream) {
    const protocol::StreamOffer& offer = stream->offer;
    const protocol::KvLayout& layout = stream->layout;
    const protocol::KvLayoutDesc& desc = layout.desc();
    stream->arrived.assign(desc.num_layers, false);
    stream->arrival_ns.assign(desc.num_layers, 0);

    protocol::RegionGrant grant;
    grant.grant_id = offer.request_id;
    grant.layout = desc;
    for (uint32_t l = 0; l < desc.num_layers; ++l) {
      grant.layer_regions.push_back(
          stream->target->descriptor(l, l * layout.layer_bytes(), layout.layer_bytes()));
    }
    {
      std::lock_guard lock(mutex_);
      if (session->closed) return report_dropped(session, offer);
      stream->started = Clock::now();
      session->streams[offer.request_id] = stream;
    }
    session->connection->send(grant);
    session->connection->send(protocol::RecvPlan{offer.request_id, grant.grant_id, stream->dst_blocks});
    uint64_t session_id = session->id;
    transport_.post_after(
        options_.stream_timeout, [this, alive = alive_, session_id, request = offer.request_id, stream] {
          if (!*alive) return;
          std::shared_ptr<Session> s;
          {
            std::lock_guard lock(mutex_);
            if (stream->finished) return;
            auto it = sessions_.find(session_id);
            if (it != sessions_.end()) s = it->second;
          }
          if (s) {
            fail_stream(s, request,
                        Status(ErrorCode::kTimeout,
                               "stream incomplete after " + std::to_string(options_.stream_timeout.count()) +
                                   " ms (" + std::to_string(stream->arrived_count) + "/" +
                                   std::to_string(stream->arrived.size()) + " layers)"));
          }
        });
  }

  // An offer whose sender left while its buffer was being prepared: nobody is told otherwise.
  void report_dropped(const std::shared_ptr<Session>& session, const protocol::StreamOffer& offer) {
    spdlog::warn("{}: stream {} from {} dropped before it started: the sender's connection ended",
                 options_.name, offer.request_id, session->name);
    if (!options_.on_stream_done) return;
    StreamReport r;
    r.peer = session->name;
    r.request_id = offer.request_id;
    r.layers = offer.layout.num_layers;
    r.status = Status(ErrorCode::kPeerLost, "sender connection ended before the stream started");
    worker_->post([this, r] { options_.on_stream_done(r); });  // not under mutex_
  }

  void accept_run(const std::shared_ptr<Session>& session, const protocol::RunRequest& run) {
    protocol::RunResult result;
    result.run_id = run.run_id;
    if (run.bytes == 0 || run.bytes > options_.max_request_bytes) {
      result.code = ErrorCode::kInvalidArgument;
      result.message = "run size " + std::to_string(run.bytes) + " outside 1.." +
                       std::to_string(options_.max_request_bytes);
      session->connection->send(result);
      return;
    }
    if (!session->run_target || session->run_target->size() < run.bytes) {
      if (session->run_target) retired_.retire(std::move(*session->run_target));
      session->run_target.reset();
      auto region = gpudirect::MemoryRegion::allocate_ucx(ucx_, run.bytes);
      if (!region.ok()) {
        result.code = ErrorCode::kOutOfMemory;
        result.message = region.status().message();
        session->connection->send(result);
        return;
      }
      poison(region->data(), region->size());  // touch the pages before the timed run
      session->run_target.emplace(std::move(region.value()));
    }
    result.target = session->run_target->descriptor(run.run_id, 0, run.bytes);
    session->connection->send(result);
  }

  void on_notification(std::span<const uint8_t> bytes) {
    auto n = protocol::decode_notification(bytes);
    if (!n.ok()) {
      spdlog::warn("{}: dropped a malformed notification: {}", options_.name, n.status().message());
      return;
    }
    std::shared_ptr<Session> session;
    std::shared_ptr<Stream> stream;
    {
      std::lock_guard lock(mutex_);
      auto s = sessions_.find(n->session_id);
      if (s == sessions_.end()) return;  // the session ended; its streams are already failed
      session = s->second;
      auto it = session->streams.find(n->request_id);
      if (it == session->streams.end()) {
        spdlog::warn("{}: notification for unknown request {} from {}", options_.name, n->request_id,
                     session->name);
        return;
      }
      stream = it->second;
      if (stream->finished) return;
      if (n->kind == protocol::NotificationKind::kLayerReady) {
        if (n->layer >= stream->arrived.size() || stream->arrived[n->layer]) {
          stream->finished = true;
        } else {
          stream->arrived[n->layer] = true;
          stream->arrival_ns[n->layer] = static_cast<uint64_t>(
              std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - stream->started).count());
          if (++stream->arrived_count < stream->arrived.size()) return;
          stream->finished = true;
          worker_->post([this, session, stream] { complete(session, stream); });
          return;
        }
      }
    }
    if (n->kind == protocol::NotificationKind::kRequestAbort) {
      fail_stream(session, n->request_id, Status(n->code, "sender aborted the request"));
    } else if (n->kind == protocol::NotificationKind::kLayerReady) {
      finish_failed(session, stream,
                    Status(ErrorCode::kMalformed, "LayerReady for layer " + std::to_string(n->layer) +
                                                      " is out of range or repeated"));
    }
  }

  // Verifies (when asked) and reports a stream whose layers all arrived. Runs on the worker.
  void complete(const std::shared_ptr<Session>& session, const std::shared_ptr<Stream>& stream) {
    StreamReport report = base_report(session, *stream);
    report.status = Status::Ok();
    if ((stream->offer.flags & protocol::kStreamVerify) != 0) {
      report.verified = true;
      const auto& layout = stream->layout;
      const bool on_gpu = stream->target->kind() == protocol::MemoryKind::kCudaDevice;
      std::vector<uint8_t> host_copy(on_gpu ? layout.layer_bytes() : 0);
      for (uint32_t l = 0; l < layout.desc().num_layers && report.status.ok(); ++l) {
        const uint8_t* layer_base = stream->target->data() + l * layout.layer_bytes();
        if (on_gpu) {
          // The bytes are checked where they landed, read back after the LayerReady said so.
          if (Status s = gpudirect::copy_sync(host_copy.data(), layer_base, layout.layer_bytes()); !s.ok()) {
            report.status = Status(ErrorCode::kInternal,
                                   "reading back GPU layer " + std::to_string(l) + ": " + s.message());
            break;
          }
          layer_base = host_copy.data();
        }
        for (uint32_t i = 0; i < stream->dst_blocks.size() && report.status.ok(); ++i) {
          for (uint32_t p = 0; p < layout.parts(); ++p) {
            auto e = layout.extent(stream->dst_blocks[i], static_cast<protocol::KvPart>(p));
            auto bad = find_pattern_mismatch(layer_base + e.offset, e.length,
                                             PatternKey{stream->offer.seed, l, i, p});
            if (bad) {
              report.status =
                  Status(ErrorCode::kVerifyFailed,
                         "layer " + std::to_string(l) + " block " + std::to_string(i) + " (slot " +
                             std::to_string(stream->dst_blocks[i]) + ") part " + std::to_string(p) +
                             ": first wrong byte at offset " + std::to_string(*bad));
              break;
            }
            report.bytes_verified += e.length;
          }
        }
      }
    }
    send_result(session, report);
    drop_stream(session, stream->request_id, report.status.ok());
  }

  void fail_stream(const std::shared_ptr<Session>& session, uint64_t request_id, const Status& why) {
    std::shared_ptr<Stream> stream;
    {
      std::lock_guard lock(mutex_);
      auto it = session->streams.find(request_id);
      if (it == session->streams.end() || it->second->finished) return;
      stream = it->second;
      stream->finished = true;
    }
    finish_failed(session, stream, why);
  }

  void finish_failed(const std::shared_ptr<Session>& session, const std::shared_ptr<Stream>& stream,
                     const Status& why) {
    StreamReport report = base_report(session, *stream);
    report.status = why;
    spdlog::warn("{}: stream {} from {} failed: {}", options_.name, stream->request_id, session->name,
                 why.to_string());
    worker_->post([this, session, report, id = stream->request_id] {
      send_result(session, report);
      drop_stream(session, id, false);
    });
  }

  StreamReport base_report(const std::shared_ptr<Session>& session, const Stream& stream) {
    StreamReport r;
    r.peer = session->name;
    r.request_id = stream.request_id;
    r.layers = stream.layout.desc().num_layers;
    r.bytes = stream.layout.layer_bytes() * r.layers;
    std::lock_guard lock(mutex_);
    r.layer_arrival_ns = stream.arrival_ns;
    if (options_.pool) {
      r.blocks = stream.dst_blocks;
      r.context = stream.offer.context;
    }
    return r;
  }

  void send_result(const std::shared_ptr<Session>& session, const StreamReport& report) {
    protocol::StreamResult result;
    result.request_id = report.request_id;
    result.code = report.status.code();
    result.message = report.status.message();
    result.bytes_received = report.status.ok() ? report.bytes : 0;
    result.bytes_verified = report.bytes_verified;
    result.layer_arrival_ns = report.layer_arrival_ns;
    session->connection->send(result);
    if (options_.on_stream_done) options_.on_stream_done(report);
  }

  // Runs on the worker. A cleanly finished stream's buffer goes back to its session's pool; a
  // failed one's is retired (its sender may still have puts in flight).
  void drop_stream(const std::shared_ptr<Session>& session, uint64_t request_id, bool reusable) {
    std::shared_ptr<Stream> stream;
    {
      std::lock_guard lock(mutex_);
      auto it = session->streams.find(request_id);
      if (it == session->streams.end()) return;
      stream = std::move(it->second);
      session->streams.erase(it);
      reusable = reusable && !session->closed;
    }
    if (options_.pool) {
      // A finished stream's blocks are the engine's now (StreamReport::blocks); a failed one's go
      // back once no late put of its sender can land in them.
      if (!reusable) release_later(stream);
      return;
    }
    if (reusable) {
      session->free_pools.push_back(std::move(*stream->region));
    } else {
      retired_.retire(std::move(*stream->region));
    }
  }

  void release_later(const std::shared_ptr<Stream>& stream) {
    if (!options_.pool || !options_.pool->release || stream->dst_blocks.empty()) return;
    transport_.post_after(options_.retire_grace, [release = options_.pool->release, id = stream->request_id,
                                                  blocks = std::move(stream->dst_blocks)]() mutable {
      release(id, std::move(blocks));
    });
  }

  std::shared_ptr<gpudirect::UcxContext> ucx_;
  Transport& transport_;
  StreamReceiverOptions options_;
  std::unique_ptr<ControlContext> control_;
  std::unique_ptr<ControlServer> server_;
  RetiredRegions retired_{options_.retire_grace};
  std::unique_ptr<Worker> worker_;
  std::mutex mutex_;
  std::unordered_map<uint64_t, std::shared_ptr<Session>> sessions_;
  uint64_t next_session_ = 1;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);  // read and cleared on the transport thread
};

Result<std::unique_ptr<StreamReceiver>> StreamReceiver::start(std::shared_ptr<gpudirect::UcxContext> ucx,
                                                              Transport& transport, const std::string& host,
                                                              uint16_t port, StreamReceiverOptions options) {
  auto impl = std::make_unique<Impl>(std::move(ucx), transport, std::move(options));
  if (Status s = impl->start(host, port); !s.ok()) return s;
  return std::unique_ptr<StreamReceiver>(new StreamReceiver(std::move(impl)));
}

StreamReceiver::StreamReceiver(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
StreamReceiver::~StreamReceiver() = default;
uint16_t StreamReceiver::port() const {
  return impl_->port();
}

}  // namespace kvf::fabric
