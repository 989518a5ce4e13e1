#include "kvf/engines/kv_connector.h"

#include <spdlog/spdlog.h>

#include "kvf/fabric/control_channel.h"
#include "kvf/fabric/cuda_ipc_transport.h"
#include "kvf/fabric/stream_receiver.h"
#include "kvf/fabric/stream_sender.h"
#include "kvf/fabric/transfer_scheduler.h"
#include "kvf/fabric/ucx_transport.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/memory_region.h"
#include "kvf/gpudirect/ucx_context.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

namespace kvf::engines {
namespace {

std::string request_name(RequestId id) {
  return "request " + std::to_string(id);
}

}  // namespace

struct KvConnector::Impl {
  enum class JobKind { kLoad, kStore };
  struct Job {
    JobKind kind;
    RequestId request;
    std::vector<uint32_t> tokens;
    std::vector<uint32_t> blocks;
    uint32_t max_chunks = 0;
    // GPU caches: the layers' write events the engine's stream recorded (a store waits for them).
    std::vector<std::shared_ptr<gpudirect::CudaEvent>> events;
  };
  struct Request {
    std::vector<uint32_t> prompt;
    std::vector<uint32_t> blocks;
    bool allocated = false;
    uint64_t computed = 0;     // tokens the engine had itself when it asked
    uint64_t matched = 0;      // the lookup's answer: whole-chunk tokens the store holds
    uint64_t load_tokens = 0;  // computed + external: the prefix the load places (0: no load)
    uint64_t loaded = 0;
    std::vector<bool> saved;
    // GPU caches: per layer, the event recorded on the engine's stream at save_kv_layer (null: the
    // engine said the layer was complete when it saved it).
    std::vector<std::shared_ptr<gpudirect::CudaEvent>> layer_events;
    uint32_t layers_saved = 0;
    uint32_t chunks_stored = 0;
    bool load_queued = false;   // set up, not started yet
    bool load_started = false;  // handed to the worker
    bool load_ended = false;
    uint32_t load_layers_done = 0;
    Status load_status;
    bool store_queued = false;  // queued or running
    bool job_running = false;   // the worker is in a job of this request now
    bool finished = false;      // request_finished said "free later"
    bool aborted = false;
    bool send_started = false;  // PD: a stream to a decode engine runs or ran
    bool send_ended = false;
    Status send_status;
  };

  KvConnectorOptions options;
  std::optional<StoreConnector> store;
  std::optional<protocol::ChunkHasher> hasher;  // the store connector's keys, for lookups
  uint32_t layers = 0;
  uint32_t block_tokens = 0;
  bool registered = false;

  mutable std::mutex mutex;
  std::condition_variable changed;
  std::unordered_map<RequestId, Request> requests;
  std::deque<Job> jobs;
  std::vector<RequestId> to_start;  // loads set up since the last start_load_kv
  std::vector<RequestId> started;   // loads of the last start_load_kv (wait_for_layer_load)
  uint64_t stores_outstanding = 0;
  Status save_failure;
  FinishedRequests finished;
  std::vector<uint32_t> load_error_blocks;
  bool stopping = false;
  std::thread worker;

  // PD: the caches registered with UCX (and exported for CUDA IPC when they are GPU memory), a
  // transport (cuda_ipc for GPU caches: same host, GPU to GPU; UCX for host caches), and (decode
  // side) the receiver of streams.
  Status pd_unavailable = Status(ErrorCode::kUnavailable, "PD needs register_kv_caches first");
  uint8_t* caches_base = nullptr;
  int caches_device = -1;  // the GPU holding the caches; -1: host memory
  std::optional<protocol::KvLayout> layout;
  std::shared_ptr<gpudirect::UcxContext> ucx;
  std::unique_ptr<fabric::Transport> transport;
  std::optional<gpudirect::MemoryRegion> region;
  std::unique_ptr<fabric::StreamReceiver> receiver;
  std::unordered_map<RequestId, ReceivedKv> received;
  // One thread per stream; a finished one is joined at the next send_kv_to (so a long-running
  // prefill engine does not pile up ended threads) or at destruction.
  struct Sender {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::vector<Sender> senders;

  // Under the lock: UCX, the transport and the caches' registration, made on first use.
  Status ensure_transport() {
    if (transport) return Status::Ok();
    if (!pd_unavailable.ok()) return pd_unavailable;
    auto context = gpudirect::UcxContext::create();
    if (!context.ok()) return context.status();
    const uint64_t bytes = layout->layer_bytes() * layers;
    if (caches_device >= 0) {
      fabric::CudaIpcTransportOptions cuda;
      cuda.device = caches_device;
      auto made = fabric::CudaIpcTransport::create(context.value(), cuda);
      if (!made.ok()) return made.status();
      auto caches_region = gpudirect::MemoryRegion::register_cuda(context.value(), caches_base, bytes);
      if (!caches_region.ok()) return caches_region.status();
      transport = std::move(made.value());
      region.emplace(std::move(caches_region.value()));
    } else {
      auto made = fabric::UcxTransport::create(context.value());
      if (!made.ok()) return made.status();
      auto caches_region = gpudirect::MemoryRegion::register_external(context.value(), caches_base, bytes,
                                                                      protocol::MemoryKind::kHost);
      if (!caches_region.ok()) return caches_region.status();
      transport = std::move(made.value());
      region.emplace(std::move(caches_region.value()));
    }
    ucx = std::move(context.value());
    return Status::Ok();
  }

  // Runs on a sender thread: the request's blocks to the decode engine, each layer once saved.
  void send(RequestId id, std::string host, uint16_t port, std::vector<uint32_t> blocks,
            std::vector<uint8_t> context) {
    Status status;
    auto link = fabric::PeerLink::connect(*transport, host, port, options.name, std::chrono::seconds(10));
    if (!link.ok()) {
      status = link.status();
    } else {
      fabric::TransferScheduler scheduler(*transport);
      fabric::PatternStreamOptions o;
      o.request_id = id;
      o.verify = false;
      o.shuffle = false;
      o.source_blocks = std::move(blocks);
      o.context = std::move(context);
      // The layers' events stay alive here until the stream has ended (the transfer waits on them
      // on the GPU after before_layer returns).
      auto events = std::make_shared<std::vector<std::shared_ptr<gpudirect::CudaEvent>>>();
      o.before_layer = [this, id, events](uint32_t layer) -> void* {
        std::unique_lock lock(mutex);
        changed.wait(lock, [&] {
          auto it = requests.find(id);
          return stopping || it == requests.end() || it->second.aborted || it->second.saved[layer];
        });
        auto it = requests.find(id);
        if (it == requests.end() || layer >= it->second.layer_events.size() ||
            !it->second.layer_events[layer])
          return nullptr;
        events->push_back(it->second.layer_events[layer]);
        return events->back()->handle();
      };
      // An aborted request, or a connector going away, ends the stream before an unsaved layer.
      o.cancelled = [this, id]() -> Status {
        std::lock_guard lock(mutex);
        auto it = requests.find(id);
        if (stopping) return Status(ErrorCode::kAborted, "the engine connector is shutting down");
        if (it == requests.end() || it->second.aborted)
          return Status(ErrorCode::kAborted, request_name(id) + " was aborted by the prefill engine");
        return Status::Ok();
      };
      auto outcome = fabric::send_pattern_stream(*link.value(), *transport, scheduler, *region, *layout, o);
      if (!outcome.ok()) {
        status = outcome.status();
      } else if (outcome->result.code != ErrorCode::kOk) {
        status = Status(outcome->result.code, "the decode engine: " + outcome->result.message);
      }
    }
    if (!status.ok()) {
      status = Status(status.code(), "sending " + request_name(id) + " to " + host + ":" +
                                         std::to_string(port) + ": " + status.message());
      spdlog::warn("kv connector: {}", status.to_string());
    }
    std::lock_guard lock(mutex);
    if (auto it = requests.find(id); it != requests.end()) {
      it->second.send_ended = true;
      it->second.send_status = status;
    }
    settle(id);
    changed.notify_all();
  }

  static bool pending(const Request& r) {
    return r.job_running || r.store_queued || (r.load_started && !r.load_ended) ||
           (r.send_started && !r.send_ended);
  }

  // Under the lock: the request, aborted or not; kNotFound when unknown.
  Result<Request*> known(RequestId id) {
    auto it = requests.find(id);
    if (it == requests.end())
      return Status(ErrorCode::kNotFound, request_name(id) + " is not known to the connector");
    return &it->second;
  }

  // Under the lock: the request, or why a call naming it is refused.
  Result<Request*> find(RequestId id) {
    auto r = known(id);
    if (r.ok() && r.value()->aborted) return Status(ErrorCode::kAborted, request_name(id) + " was aborted");
    return r;
  }

  Status need_registered(const char* call) const {
    if (!registered) {
      return Status(ErrorCode::kInvalidArgument,
                    std::string(call) + " before register_kv_caches: register the KV caches first");
    }
    return Status::Ok();
  }

  // Under the lock: need_registered, then find.
  Result<Request*> registered_request(const char* call, RequestId id) {
    if (Status s = need_registered(call); !s.ok()) return s;
    return find(id);
  }

  // Under the lock, after a request's work changed: a finished request with nothing pending is
  // reported (its blocks may be freed) and forgotten.
  void settle(RequestId id) {
    auto it = requests.find(id);
    if (it == requests.end()) return;
    Request& r = it->second;
    if (!r.finished || pending(r)) return;
    finished.sending.push_back(id);
    requests.erase(it);
  }

  void run() {
    std::unique_lock lock(mutex);
    for (;;) {
      changed.wait(lock, [&] { return stopping || !jobs.empty(); });
      if (stopping) return;
      Job job = std::move(jobs.front());
      jobs.pop_front();
      auto it = requests.find(job.request);
      if (it == requests.end()) continue;
      it->second.job_running = true;
      lock.unlock();
      if (job.kind == JobKind::kLoad) {
        run_load(job, lock);
      } else {
        run_store(job, lock);
      }
      // run_* return holding the lock.
      if (auto r = requests.find(job.request); r != requests.end()) r->second.job_running = false;
      settle(job.request);
      changed.notify_all();
    }
  }

  void run_load(const Job& job, std::unique_lock<std::mutex>& lock) {
    auto result = store->load_layers(
        job.tokens, job.blocks,
        [&](uint32_t layer) {
          std::lock_guard guard(mutex);
          if (auto it = requests.find(job.request); it != requests.end()) {
            it->second.load_layers_done = layer + 1;
            changed.notify_all();
          }
        },
        job.max_chunks);
    lock.lock();
    auto it = requests.find(job.request);
    if (it == requests.end()) return;
    Request& r = it->second;
    Status status = result.ok() ? Status::Ok() : result.status();
    const uint64_t wanted = uint64_t{job.max_chunks} * options.chunk_tokens;
    if (status.ok() && result->tokens < wanted) {
      status = Status(ErrorCode::kNotFound, "the store held " + std::to_string(result->tokens) + " of the " +
                                                std::to_string(wanted) +
                                                " tokens it matched (evicted or cleared since)");
    }
    r.loaded = result.ok() ? result->tokens : 0;
    r.load_status = status;
    r.load_ended = true;
    r.load_layers_done = layers;
    if (!status.ok() && !r.aborted) {
      // Every block the load was to fill past what arrived is suspect: the engine recomputes them.
      const uint64_t first = r.loaded / block_tokens;
      const uint64_t end = (wanted + block_tokens - 1) / block_tokens;
      for (uint64_t b = first; b < end && b < job.blocks.size(); ++b)
        load_error_blocks.push_back(job.blocks[b]);
      spdlog::warn("kv connector: load of {} failed: {}", request_name(job.request), status.to_string());
    }
    finished.receiving.push_back(job.request);
  }

  void run_store(const Job& job, std::unique_lock<std::mutex>& lock) {
    // GPU caches: the store reads the blocks once the engine's writes of every layer are done.
    for (const auto& event : job.events) {
      if (Status s = event->synchronize(); !s.ok()) {
        lock.lock();
        --stores_outstanding;
        if (auto it = requests.find(job.request); it != requests.end()) it->second.store_queued = false;
        if (save_failure.ok())
          save_failure = Status(s.code(), "storing " + request_name(job.request) +
                                              ": waiting for layer writes: " + s.message());
        return;
      }
    }
    auto result = store->store(job.tokens, job.blocks);
    lock.lock();
    --stores_outstanding;
    auto it = requests.find(job.request);
    if (it != requests.end()) {
      it->second.store_queued = false;
      if (result.ok()) it->second.chunks_stored += result->stored;
    }
    if (!result.ok() && save_failure.ok()) {
      save_failure = Status(result.status().code(),
                            "storing " + request_name(job.request) + ": " + result.status().message());
    }
  }
};

Result<std::unique_ptr<KvConnector>> KvConnector::create(KvConnectorOptions options) {
  if (options.store != nullptr && options.model.empty()) {
    return Status(ErrorCode::kInvalidArgument, "a connector with a store needs the model's name");
  }
  if (options.chunk_tokens == 0)
    return Status(ErrorCode::kInvalidArgument, "chunk_tokens must be at least 1");
  if (!options.listen.empty() && (!options.allocate_blocks || !options.release_blocks)) {
    return Status(ErrorCode::kInvalidArgument,
                  "a connector that listens for PD streams needs allocate_blocks and release_blocks");
  }
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  Impl* raw = impl.get();
  impl->worker = std::thread([raw] { raw->run(); });
  return std::unique_ptr<KvConnector>(new KvConnector(std::move(impl)));
}

KvConnector::KvConnector(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

KvConnector::~KvConnector() {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->stopping = true;
  }
  impl_->changed.notify_all();
  impl_->worker.join();
  for (Impl::Sender& sender : impl_->senders) sender.thread.join();  // an unsaved stream ends now
  impl_->receiver.reset();
  impl_->transport.reset();
  impl_->region.reset();
}

Status KvConnector::register_kv_caches(const KvCacheView& caches) {
  std::lock_guard lock(impl_->mutex);
  Impl& m = *impl_;
  if (m.registered) return Status(ErrorCode::kInvalidArgument, "the KV caches are registered already");
  const protocol::KvLayoutDesc& desc = caches.layout.desc();
  if (caches.layers.size() != desc.num_layers || desc.num_layers == 0) {
    return Status(ErrorCode::kInvalidArgument, std::to_string(caches.layers.size()) +
                                                   " layer buffers for a layout of " +
                                                   std::to_string(desc.num_layers) + " layers");
  }
  for (size_t l = 0; l < caches.layers.size(); ++l) {
    if (caches.layers[l] == nullptr)
      return Status(ErrorCode::kInvalidArgument, "layer buffer " + std::to_string(l) + " is null");
  }
  if (m.options.chunk_tokens % desc.block_tokens != 0) {
    return Status(ErrorCode::kInvalidArgument, "chunk_tokens " + std::to_string(m.options.chunk_tokens) +
                                                   " is not a whole number of " +
                                                   std::to_string(desc.block_tokens) + "-token blocks");
  }
  if (m.options.store != nullptr) {
    StoreConnectorOptions so;
    so.model = m.options.model;
    so.layout = desc;
    so.chunk_tokens = m.options.chunk_tokens;
    so.verify_loads = m.options.verify_loads;
    so.memory = m.options.memory;
    auto made = StoreConnector::create(*m.options.store, so, caches.layers);
    if (!made.ok()) return made.status();
    m.store.emplace(std::move(made.value()));
    m.hasher.emplace(protocol::model_fingerprint(m.options.model, desc), m.options.chunk_tokens);
  }
  m.layers = desc.num_layers;
  m.block_tokens = desc.block_tokens;
  m.layout.emplace(caches.layout);
  m.caches_base = caches.layers[0];
  m.pd_unavailable = Status::Ok();
  for (size_t l = 1; l < caches.layers.size(); ++l) {
    if (caches.layers[l] != caches.layers[0] + l * caches.layout.layer_bytes()) {
      m.pd_unavailable = Status(ErrorCode::kUnavailable,
                                "PD needs the layer buffers back to back in one allocation (layer " +
                                    std::to_string(l) + " is elsewhere)");
      break;
    }
  }
  if (auto device = gpudirect::device_of(caches.layers[0]); device.ok()) m.caches_device = device.value();
  m.registered = true;
  if (!m.options.listen.empty()) {
    Status started = [&]() -> Status {
      auto endpoint = fabric::parse_host_port(m.options.listen);
      if (!endpoint.ok()) return Status(endpoint.status().code(), "listen: " + endpoint.status().message());
      if (Status s = m.ensure_transport(); !s.ok()) return s;
      fabric::StreamReceiverOptions ro;
      ro.name = m.options.name;
      ro.pool = fabric::EnginePool{
          &*m.region, desc, [this](uint64_t id, uint32_t n) { return impl_->options.allocate_blocks(id, n); },
          [this](uint64_t id, std::vector<uint32_t> b) { impl_->options.release_blocks(id, std::move(b)); }};
      ro.on_stream_done = [this](const fabric::StreamReport& report) {
        Impl& impl = *impl_;
        if (!report.status.ok()) {
          spdlog::warn("kv connector: stream of {} from {} failed: {}", request_name(report.request_id),
                       report.peer, report.status.to_string());
          return;  // the receiver hands its blocks back (release_blocks) after its grace period
        }
        ReceivedKv kv{report.request_id, report.blocks, report.context, {}};
        for (uint64_t ns : report.layer_arrival_ns)
          kv.layer_arrival_ms.push_back(static_cast<double>(ns) / 1e6);
        std::lock_guard guard(impl.mutex);
        impl.received[report.request_id] = std::move(kv);
        impl.finished.receiving.push_back(report.request_id);
        impl.changed.notify_all();
      };
      auto receiver =
          fabric::StreamReceiver::start(m.ucx, *m.transport, endpoint->first, endpoint->second, ro);
      if (!receiver.ok()) return receiver.status();
      m.receiver = std::move(receiver.value());
      return Status::Ok();
    }();
    if (!started.ok()) {
      m.registered = false;
      m.store.reset();
      m.hasher.reset();
      return Status(started.code(),
                    "listening for PD streams on " + m.options.listen + ": " + started.message());
    }
  }
  return Status::Ok();
}

Result<uint64_t> KvConnector::get_num_new_matched_tokens(RequestId request, std::span<const uint32_t> prompt,
                                                         uint64_t num_computed_tokens) {
  Impl& m = *impl_;
  {
    std::lock_guard lock(m.mutex);
    if (Status s = m.need_registered("get_num_new_matched_tokens"); !s.ok()) return s;
    if (auto it = m.requests.find(request); it != m.requests.end()) {
      if (it->second.aborted) return Status(ErrorCode::kAborted, request_name(request) + " was aborted");
      if (it->second.allocated) {
        return Status(
            ErrorCode::kInvalidArgument,
            request_name(request) + " has its blocks already (update_state_after_alloc was called)");
      }
    }
    if (num_computed_tokens > prompt.size()) {
      return Status(ErrorCode::kInvalidArgument, std::to_string(num_computed_tokens) +
                                                     " computed tokens for a prompt of " +
                                                     std::to_string(prompt.size()));
    }
  }
  // The lookup talks to the daemon: outside the lock, so other requests are not held up. The
  // worker may be using the store connector now (one call at a time), so the lookup goes through
  // the client, which serializes its calls; the keys are the ones the store connector makes.
  uint64_t matched = 0;
  if (m.store) {
    // Never the whole prompt: its last token is computed, so the engine has logits to sample from.
    const uint64_t usable =
        prompt.empty() ? 0 : (prompt.size() - 1) / m.options.chunk_tokens * m.options.chunk_tokens;
    if (usable > 0) {
      auto keys = m.hasher->hash(prompt.first(usable));
      auto found = m.options.store->lookup(keys);
      if (found.ok()) {
        matched = uint64_t{found.value()} * m.options.chunk_tokens;
      } else {
        spdlog::warn("kv connector: store lookup for {} failed ({}); computing the prompt",
                     request_name(request), found.status().to_string());
      }
    }
  }
  std::lock_guard lock(m.mutex);
  auto [it, fresh] = m.requests.try_emplace(request);
  Impl::Request& r = it->second;
  if (r.aborted) return Status(ErrorCode::kAborted, request_name(request) + " was aborted");
  r.prompt.assign(prompt.begin(), prompt.end());
  r.computed = num_computed_tokens;
  r.matched = matched;
  return matched > num_computed_tokens ? matched - num_computed_tokens : 0;
}

Status KvConnector::update_state_after_alloc(RequestId request, std::span<const uint32_t> block_table,
                                             uint64_t num_external_tokens) {
  std::lock_guard lock(impl_->mutex);
  Impl& m = *impl_;
  auto found = m.registered_request("update_state_after_alloc", request);
  if (!found.ok()) return found.status();
  Impl::Request& r = *found.value();
  if (r.allocated)
    return Status(ErrorCode::kInvalidArgument, request_name(request) + " has its blocks already");
  const uint64_t can_load = r.matched > r.computed ? r.matched - r.computed : 0;
  if (num_external_tokens > can_load) {
    return Status(ErrorCode::kInvalidArgument,
                  request_name(request) + ": " + std::to_string(num_external_tokens) +
                      " external tokens asked, the store matched " + std::to_string(can_load));
  }
  const uint64_t load_tokens = num_external_tokens == 0 ? 0 : r.computed + num_external_tokens;
  if (uint64_t{block_table.size()} * m.block_tokens < load_tokens) {
    return Status(ErrorCode::kInvalidArgument,
                  request_name(request) + ": " + std::to_string(block_table.size()) + " blocks cannot hold " +
                      std::to_string(load_tokens) + " tokens");
  }
  r.blocks.assign(block_table.begin(), block_table.end());
  r.allocated = true;
  r.saved.assign(m.layers, false);
  r.load_tokens = load_tokens;
  if (load_tokens > 0) {
    r.load_queued = true;
    m.to_start.push_back(request);
  }
  return Status::Ok();
}

Result<bool> KvConnector::request_finished(RequestId request) {
  std::lock_guard lock(impl_->mutex);
  Impl& m = *impl_;
  auto found = m.known(request);
  if (!found.ok()) return found.status();
  Impl::Request& r = *found.value();
  if (r.finished) return Status(ErrorCode::kInvalidArgument, request_name(request) + " was finished already");
  if (!Impl::pending(r)) {
    std::erase(m.to_start, request);
    m.requests.erase(request);
    return false;
  }
  r.finished = true;
  return true;
}

Status KvConnector::abort(RequestId request) {
  std::lock_guard lock(impl_->mutex);
  Impl& m = *impl_;
  auto found = m.known(request);
  if (!found.ok()) return found.status();
  Impl::Request& r = *found.value();
  if (r.aborted) return Status::Ok();
  r.aborted = true;
  std::erase(m.to_start, request);
  for (auto job = m.jobs.begin(); job != m.jobs.end();) {
    if (job->request != request) {
      ++job;
      continue;
    }
    if (job->kind == Impl::JobKind::kStore) {
      --m.stores_outstanding;
      r.store_queued = false;
    } else {
      r.load_ended = true;
      r.load_status = Status(ErrorCode::kAborted, request_name(request) + " was aborted");
      r.load_layers_done = m.layers;
    }
    job = m.jobs.erase(job);
  }
  m.changed.notify_all();
  return Status::Ok();
}

Status KvConnector::start_load_kv() {
  std::lock_guard lock(impl_->mutex);
  Impl& m = *impl_;
  if (Status s = m.need_registered("start_load_kv"); !s.ok()) return s;
  m.started.clear();
  for (RequestId id : m.to_start) {
    auto it = m.requests.find(id);
    if (it == m.requests.end() || it->second.aborted || !it->second.load_queued) continue;
    Impl::Request& r = it->second;
    r.load_queued = false;
    r.load_started = true;
    m.jobs.push_back(Impl::Job{Impl::JobKind::kLoad,
                               id,
                               r.prompt,
                               r.blocks,
                               static_cast<uint32_t>(r.load_tokens / m.options.chunk_tokens),
                               {}});
    m.started.push_back(id);
  }
  m.to_start.clear();
  m.changed.notify_all();
  return Status::Ok();
}

Status KvConnector::wait_for_layer_load(uint32_t layer) {
  std::unique_lock lock(impl_->mutex);
  Impl& m = *impl_;
  if (Status s = m.need_registered("wait_for_layer_load"); !s.ok()) return s;
  if (layer >= m.layers) {
    return Status(ErrorCode::kInvalidArgument, "layer " + std::to_string(layer) +
                                                   " out of range (the caches have " +
                                                   std::to_string(m.layers) + ")");
  }
  m.changed.wait(lock, [&] {
    return std::all_of(m.started.begin(), m.started.end(), [&](RequestId id) {
      auto it = m.requests.find(id);
      return it == m.requests.end() || it->second.aborted || it->second.load_ended ||
             it->second.load_layers_done > layer;
    });
  });
  return Status::Ok();
}

Status KvConnector::wait_for_load(RequestId request) {
  std::unique_lock lock(impl_->mutex);
  Impl& m = *impl_;
  auto found = m.find(request);
  if (!found.ok()) return found.status();
  if (found.value()->load_tokens == 0) return Status::Ok();
  if (found.value()->load_queued) {
    return Status(ErrorCode::kInvalidArgument,
                  request_name(request) + ": its load has not been started (call start_load_kv first)");
  }
  m.changed.wait(lock, [&] {
    auto it = m.requests.find(request);
    return it == m.requests.end() || it->second.aborted || it->second.load_ended;
  });
  auto it = m.requests.find(request);
  if (it == m.requests.end())
    return Status(ErrorCode::kNotFound, request_name(request) + " was forgotten while waiting");
  if (it->second.aborted) return Status(ErrorCode::kAborted, request_name(request) + " was aborted");
  return it->second.load_status;
}

Status KvConnector::save_kv_layer(RequestId request, uint32_t layer) {
  return save_kv_layer(request, layer, nullptr);
}

Status KvConnector::save_kv_layer(RequestId request, uint32_t layer, void* cuda_stream) {
  std::lock_guard lock(impl_->mutex);
  Impl& m = *impl_;
  auto found = m.registered_request("save_kv_layer", request);
  if (!found.ok()) return found.status();
  Impl::Request& r = *found.value();
  if (layer >= m.layers) {
    return Status(ErrorCode::kInvalidArgument, request_name(request) + ": layer " + std::to_string(layer) +
                                                   " out of range (the caches have " +
                                                   std::to_string(m.layers) + ")");
  }
  if (!r.allocated) {
    return Status(ErrorCode::kInvalidArgument,
                  request_name(request) + " has no blocks yet (call update_state_after_alloc first)");
  }
  if (r.saved[layer]) {
    return Status(ErrorCode::kInvalidArgument,
                  request_name(request) + ": layer " + std::to_string(layer) + " was saved already");
  }
  if (cuda_stream != nullptr) {
    if (m.caches_device < 0) {
      return Status(
          ErrorCode::kInvalidArgument,
          request_name(request) + ": save_kv_layer with a CUDA stream, but the caches are host memory");
    }
    auto event = gpudirect::CudaEvent::create(m.caches_device);
    if (!event.ok()) return event.status();
    if (Status s = event->record(cuda_stream); !s.ok()) return s;
    r.layer_events.resize(m.layers);
    r.layer_events[layer] = std::make_shared<gpudirect::CudaEvent>(std::move(event.value()));
  }
  r.saved[layer] = true;
  ++r.layers_saved;
  if (r.layers_saved == m.layers && m.store && r.prompt.size() >= m.options.chunk_tokens) {
    Impl::Job job{Impl::JobKind::kStore, request, r.prompt, r.blocks, 0, {}};
    for (const auto& event : r.layer_events)
      if (event) job.events.push_back(event);
    m.jobs.push_back(std::move(job));
    r.store_queued = true;
    ++m.stores_outstanding;
  }
  m.changed.notify_all();  // the worker, and a PD stream waiting for this layer
  return Status::Ok();
}

Status KvConnector::wait_for_save() {
  std::unique_lock lock(impl_->mutex);
  Impl& m = *impl_;
  m.changed.wait(lock, [&] { return m.stores_outstanding == 0; });
  return std::exchange(m.save_failure, Status::Ok());
}

Status KvConnector::send_kv_to(RequestId request, const std::string& peer, std::vector<uint8_t> context) {
  std::lock_guard lock(impl_->mutex);
  Impl& m = *impl_;
  auto found = m.registered_request("send_kv_to", request);
  if (!found.ok()) return found.status();
  Impl::Request& r = *found.value();
  if (!r.allocated) {
    return Status(ErrorCode::kInvalidArgument,
                  request_name(request) + " has no blocks yet (call update_state_after_alloc first)");
  }
  if (r.send_started)
    return Status(ErrorCode::kInvalidArgument, request_name(request) + " is being sent already");
  if (r.layers_saved > 0) {
    return Status(ErrorCode::kInvalidArgument,
                  request_name(request) + ": send_kv_to must come before its first save_kv_layer");
  }
  auto endpoint = fabric::parse_host_port(peer);
  if (!endpoint.ok()) return Status(endpoint.status().code(), "send_kv_to: " + endpoint.status().message());
  if (Status s = m.ensure_transport(); !s.ok()) return s;
  r.send_started = true;
  std::erase_if(m.senders, [](Impl::Sender& sender) {
    if (!sender.done->load()) return false;
    sender.thread.join();  // it has returned from send(): at most its last instructions are left
    return true;
  });
  auto done = std::make_shared<std::atomic<bool>>(false);
  std::thread thread([&m, done, request, host = endpoint->first, port = endpoint->second, blocks = r.blocks,
                      context = std::move(context)]() mutable {
    m.send(request, std::move(host), port, std::move(blocks), std::move(context));
    done->store(true);
  });
  m.senders.push_back(Impl::Sender{std::move(thread), std::move(done)});
  return Status::Ok();
}

Status KvConnector::wait_for_send(RequestId request) {
  std::unique_lock lock(impl_->mutex);
  Impl& m = *impl_;
  auto found = m.known(request);
  if (!found.ok()) return found.status();
  if (!found.value()->send_started)
    return Status(ErrorCode::kInvalidArgument, request_name(request) + " is not being sent (send_kv_to)");
  m.changed.wait(lock, [&] {
    auto r = m.requests.find(request);
    return r == m.requests.end() || r->second.send_ended;
  });
  auto r = m.requests.find(request);
  if (r == m.requests.end()) return Status::Ok();  // finished and forgotten meanwhile
  return r->second.send_status;
}

uint16_t KvConnector::listen_port() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->receiver ? impl_->receiver->port() : 0;
}

Result<ReceivedKv> KvConnector::take_received(RequestId request) {
  std::lock_guard lock(impl_->mutex);
  auto it = impl_->received.find(request);
  if (it == impl_->received.end()) {
    return Status(ErrorCode::kNotFound, request_name(request) + " has not arrived (or was taken already)");
  }
  ReceivedKv kv = std::move(it->second);
  impl_->received.erase(it);
  return kv;
}

FinishedRequests KvConnector::get_finished() {
  std::lock_guard lock(impl_->mutex);
  return std::exchange(impl_->finished, FinishedRequests{});
}

std::vector<uint32_t> KvConnector::get_block_ids_with_load_errors() {
  std::lock_guard lock(impl_->mutex);
  return std::exchange(impl_->load_error_blocks, {});
}

Result<RequestProgress> KvConnector::progress(RequestId request) const {
  std::lock_guard lock(impl_->mutex);
  auto found = impl_->known(request);
  if (!found.ok()) return found.status();
  const Impl::Request& r = *found.value();
  return RequestProgress{
      r.matched, r.loaded, r.layers_saved, r.chunks_stored, r.load_ended && !r.load_status.ok(), r.aborted};
}

uint32_t KvConnector::num_layers() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->layers;
}

}  // namespace kvf::engines
