#include "kvf/fabric/stream_sender.h"

#include "kvf/fabric/multi_transport.h"

#include <condition_variable>
#include <future>
#include <mutex>

#include <spdlog/spdlog.h>

#include "kvf/fabric/multi_transport.h"
#include "kvf/fabric/stream_pattern.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "local_host.h"

namespace kvf::fabric {
namespace {

using Clock = std::chrono::steady_clock;

std::string describe(const protocol::Message& m) {
  return std::string(protocol::message_type_name(protocol::message_type(m)));
}

}  // namespace

Result<std::unique_ptr<PeerLink>> PeerLink::connect(Transport& transport, const std::string& host,
                                                    uint16_t port, const std::string& my_name,
                                                    std::chrono::milliseconds timeout) {
  auto control = BlockingControlClient::connect(host, port, timeout);
  if (!control.ok()) return control.status();
  protocol::Hello hello;
  hello.peer_name = my_name;
  hello.transport_address = transport.address();
  if (Status s = control->send(hello, timeout); !s.ok()) return s;
  auto reply = control->receive(timeout);
  if (!reply.ok()) {
    return Status(reply.status().code(), "no handshake reply from " + host + ":" + std::to_string(port) +
                                             ": " + reply.status().message());
  }
  const auto* ack = std::get_if<protocol::HelloAck>(&reply.value());
  if (ack == nullptr) {
    if (const auto* err = std::get_if<protocol::ErrorReply>(&reply.value())) {
      return Status(err->code, host + ":" + std::to_string(port) + " refused the handshake: " + err->message);
    }
    return Status(ErrorCode::kMalformed, "expected HelloAck from " + host + ":" + std::to_string(port) +
                                             ", got " + describe(reply.value()));
  }
  ConnectOptions connect_options;
  connect_options.same_host = is_this_host(host);
  // A receiver offering several transports lists them; a plain transport gets its own entry.
  const std::vector<uint8_t> address = address_for(transport, ack->transport_address);
  if (address.empty()) {
    return Status(ErrorCode::kUnavailable, host + ":" + std::to_string(port) + " offers no " +
                                               std::string(transport.name()) + " transport");
  }
  auto peer = transport.connect(address, connect_options);
  if (!peer.ok()) return peer.status();
  // Finish UCX's connection setup now (a flush completes only once the endpoint is wired up):
  // UCX 1.13 aborts the *receiver* on an assertion if a sender dies while a wire-up reply to it
  // is still pending (fixed upstream in openucx/ucx#8175), so that window must stay short.
  auto wired = std::make_shared<std::promise<Status>>();
  auto wired_future = wired->get_future();
  transport.flush(peer.value(), [wired](const Status& s) { wired->set_value(s); });
  if (wired_future.wait_for(timeout) != std::future_status::ready) {
    transport.disconnect(peer.value());
    return Status(ErrorCode::kTimeout, "UCX connection to " + host + ":" + std::to_string(port) +
                                           " not set up within " + std::to_string(timeout.count()) + " ms");
  }
  if (Status s = wired_future.get(); !s.ok()) {
    transport.disconnect(peer.value());
    return Status(s.code(), "UCX connection to " + host + ":" + std::to_string(port) + ": " + s.message());
  }
  return std::unique_ptr<PeerLink>(
      new PeerLink(transport, std::move(control.value()), peer.value(), ack->session_id, ack->peer_name));
}

PeerLink::~PeerLink() {
  (void)control_.send(protocol::Bye{"done"}, std::chrono::milliseconds(1000));
  control_.close();
  transport_.disconnect(peer_);
}

Result<protocol::Message> PeerLink::expect(std::chrono::milliseconds timeout) {
  auto m = control_.receive(timeout);
  if (!m.ok()) return Status(m.status().code(), remote_name_ + ": " + m.status().message());
  if (const auto* err = std::get_if<protocol::ErrorReply>(&m.value())) {
    return Status(err->code, remote_name_ + " replied with an error: " + err->message);
  }
  return m;
}

Status fill_layer_pattern(const gpudirect::MemoryRegion& source, const protocol::KvLayout& layout,
                          uint32_t layer, uint64_t seed, std::span<const uint32_t> source_blocks) {
  const uint32_t pool_blocks = layout.desc().num_blocks;
  for (uint32_t b : source_blocks) {
    if (b >= pool_blocks) {
      return Status(ErrorCode::kInvalidArgument, "source block " + std::to_string(b) +
                                                     " outside the pool of " + std::to_string(pool_blocks));
    }
  }
  if (source.size() < (uint64_t{layer} + 1) * layout.layer_bytes()) {
    return Status(ErrorCode::kInvalidArgument, "fill_layer_pattern: layer " + std::to_string(layer) +
                                                   " lies past the end of the source region");
  }
  uint8_t* target = source.data() + layer * layout.layer_bytes();
  const bool on_gpu = source.kind() == protocol::MemoryKind::kCudaDevice;
  // GPU memory is filled through a host copy of the layer.
  std::vector<uint8_t> host(on_gpu ? layout.layer_bytes() : 0);
  uint8_t* base = on_gpu ? host.data() : target;
  const auto blocks = static_cast<uint32_t>(source_blocks.empty() ? pool_blocks : source_blocks.size());
  for (uint32_t i = 0; i < blocks; ++i) {
    const uint32_t b = source_blocks.empty() ? i : source_blocks[i];
    for (uint32_t p = 0; p < layout.parts(); ++p) {
      auto e = layout.extent(b, static_cast<protocol::KvPart>(p));
      fill_pattern(base + e.offset, e.length, PatternKey{seed, layer, i, p});
    }
  }
  if (on_gpu) return gpudirect::copy_sync(target, host.data(), layout.layer_bytes());
  return Status::Ok();
}

Result<PatternStreamOutcome> send_pattern_stream(PeerLink& link, Transport& transport,
                                                 TransferScheduler& scheduler,
                                                 const gpudirect::MemoryRegion& source,
                                                 const protocol::KvLayout& layout,
                                                 const PatternStreamOptions& options) {
  const auto& desc = layout.desc();
  if (source.size() < layout.layer_bytes() * desc.num_layers) {
    return Status(ErrorCode::kInvalidArgument, "source region smaller than the request");
  }
  for (uint32_t b : options.source_blocks) {
    if (b >= desc.num_blocks) {
      return Status(
          ErrorCode::kInvalidArgument,
          "source block " + std::to_string(b) + " outside the pool of " + std::to_string(desc.num_blocks));
    }
  }
  if (options.context.size() > protocol::kMaxStreamContext) {
    return Status(ErrorCode::kInvalidArgument,
                  "stream context over " + std::to_string(protocol::kMaxStreamContext) + " bytes");
  }
  const auto request_blocks =
      static_cast<uint32_t>(options.source_blocks.empty() ? desc.num_blocks : options.source_blocks.size());
  protocol::StreamOffer offer;
  offer.request_id = options.request_id;
  offer.layout = desc;
  offer.num_blocks = request_blocks;
  offer.context = options.context;
  offer.seed = options.seed;
  offer.flags =
      (options.verify ? protocol::kStreamVerify : 0u) | (options.shuffle ? protocol::kStreamShuffle : 0u);
  // Any task keeps the transport's progress thread spinning for a while (UcxTransportOptions::
  // spin_before_sleep), so the request's first layer should not wait for the thread to wake from
  // its sleep. Traces on 2x H200 (KVF_CUDA_IPC_TRACE=2) showed the first put taken ~90 us after
  // the request began, when the sender had handed over every layer already (perf/RESULTS.md).
  transport.post([] {});
  if (Status s = link.control().send(offer); !s.ok()) return s;

  std::optional<protocol::RegionGrant> grant;
  std::optional<protocol::RecvPlan> plan;
  while (!grant || !plan) {
    auto m = link.expect(options.timeout);
    if (!m.ok()) return m.status();
    if (auto* g = std::get_if<protocol::RegionGrant>(&m.value())) {
      grant = std::move(*g);
    } else if (auto* r = std::get_if<protocol::RecvPlan>(&m.value())) {
      plan = std::move(*r);
    } else if (auto* a = std::get_if<protocol::Abort>(&m.value())) {
      return Status(a->code, link.remote_name() + " refused the stream: " + a->message);
    } else {
      return Status(ErrorCode::kMalformed,
                    "unexpected " + describe(m.value()) + " while waiting for the grant");
    }
  }
  auto dst_layout = protocol::KvLayout::create(grant->layout);
  if (!dst_layout.ok())
    return Status(ErrorCode::kMalformed, "receiver granted a bad layout: " + dst_layout.status().message());
  if (grant->layer_regions.size() != desc.num_layers) {
    return Status(ErrorCode::kMalformed, "receiver granted " + std::to_string(grant->layer_regions.size()) +
                                             " layer regions for " + std::to_string(desc.num_layers) +
                                             " layers");
  }
  std::vector<RemoteRegionId> dst_regions;
  for (const auto& region : grant->layer_regions) {
    if (region.length < dst_layout->layer_bytes()) {
      return Status(ErrorCode::kMalformed,
                    "granted region " + std::to_string(region.region_id) + " is smaller than a layer");
    }
    auto id = transport.import_region(link.peer(), region);
    if (!id.ok()) return id.status();
    dst_regions.push_back(id.value());
  }
  std::vector<uint32_t> src_blocks = options.source_blocks;
  if (src_blocks.empty()) {
    src_blocks.resize(desc.num_blocks);
    for (uint32_t i = 0; i < desc.num_blocks; ++i) src_blocks[i] = i;
  }
  if (plan->dst_blocks.size() != src_blocks.size()) {
    return Status(ErrorCode::kMalformed, "the receiver planned " + std::to_string(plan->dst_blocks.size()) +
                                             " blocks for a request of " + std::to_string(src_blocks.size()));
  }

  std::mutex mutex;
  std::condition_variable cv;
  uint32_t finished = 0;
  Status first_error;
  PatternStreamOutcome outcome;
  outcome.layer_done_s.assign(desc.num_layers, 0);
  outcome.layer_ready_s.assign(desc.num_layers, 0);
  const auto start = Clock::now();
  outcome.start = start;
  // Every layer is its own buffer with the same layout and the same block mapping, so one plan
  // (offsets within a layer) serves them all: building it costs tens of microseconds per 1024
  // extents, which a GPU link moving a layer in ~100 us cannot hide 32 times over.
  auto request_plan =
      build_layer_plan(options.request_id, 0, layout, dst_layout.value(), src_blocks, plan->dst_blocks);
  if (!request_plan.ok()) {
    scheduler.abort_request(link.peer(), link.session_id(), options.request_id, request_plan.status());
    return request_plan.status();
  }
  for (uint32_t l = 0; l < desc.num_layers; ++l) {
    void* ready_event = options.before_layer ? options.before_layer(l) : nullptr;
    if (Status cancelled = options.cancelled ? options.cancelled() : Status::Ok(); !cancelled.ok()) {
      // Nothing more is sent; the receiver is told, so it never takes the request as complete.
      {
        std::unique_lock lock(mutex);
        cv.wait(lock, [&] { return finished == l; });
      }
      scheduler.abort_request(link.peer(), link.session_id(), options.request_id, cancelled);
      return cancelled;
    }
    outcome.layer_ready_s[l] = std::chrono::duration<double>(Clock::now() - start).count();
    TransferPlan layer_plan = request_plan.value();
    layer_plan.layer = l;
    LayerSend send{std::move(layer_plan),
                   link.peer(),
                   link.session_id(),
                   source.data() + l * layout.layer_bytes(),
                   &source,
                   dst_regions[l],
                   ready_event};
    scheduler.submit(std::move(send), [&](uint64_t, uint32_t layer, const Status& st) {
      std::lock_guard lock(mutex);
      outcome.layer_done_s[layer] = std::chrono::duration<double>(Clock::now() - start).count();
      if (!st.ok() && first_error.ok()) first_error = st;
      ++finished;
      cv.notify_all();
    });
  }
  {
    std::unique_lock lock(mutex);
    if (!cv.wait_for(lock, options.timeout, [&] { return finished == desc.num_layers; })) {
      // The scheduler's own layer timeout fires first in practice; this guards the wait itself.
      lock.unlock();
      scheduler.abort_request(link.peer(), link.session_id(), options.request_id,
                              Status(ErrorCode::kTimeout, "stream timed out"));
      lock.lock();
      cv.wait(lock, [&] { return finished == desc.num_layers; });
      return Status(ErrorCode::kTimeout,
                    "stream of request " + std::to_string(options.request_id) + " timed out");
    }
    outcome.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    if (!first_error.ok()) return first_error;
  }
  for (;;) {
    auto m = link.expect(options.timeout);
    if (!m.ok()) return m.status();
    if (auto* r = std::get_if<protocol::StreamResult>(&m.value())) {
      if (r->request_id != options.request_id) continue;
      outcome.result = std::move(*r);
      break;
    }
    if (auto* a = std::get_if<protocol::Abort>(&m.value())) {
      return Status(a->code, link.remote_name() + " aborted the stream: " + a->message);
    }
  }
  if (outcome.result.code != ErrorCode::kOk) {
    return Status(outcome.result.code, link.remote_name() + " reports: " + outcome.result.message);
  }
  return outcome;
}

}  // namespace kvf::fabric
