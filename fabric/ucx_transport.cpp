#include "kvf/fabric/ucx_transport.h"

#include <sys/epoll.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <future>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>

#include <spdlog/spdlog.h>

#include "process_mappings.h"
#include "task_queue.h"

namespace kvf::fabric {
namespace {

constexpr unsigned kNotificationAmId = 0x4b56;  // 'KV'

// Whether UCX_TLS leaves UCX a shared-memory transport to use between processes of one host.
// UCX 1.13 cannot watch shm lanes for peer failure, and its tcp transport without peer-failure
// mode crashed (in uct_tcp_iface_progress) after peers came and went, so same-host peers get
// peer-failure mode exactly when they will talk tcp anyway.
bool ucx_tls_allows_shared_memory() {
  const char* env = std::getenv("UCX_TLS");
  if (env == nullptr || *env == '\0') return true;
  std::string tls(env);
  bool exclude = tls[0] == '^';
  if (exclude) tls.erase(0, 1);
  bool named = false;
  size_t start = 0;
  while (start <= tls.size()) {
    size_t comma = tls.find(',', start);
    std::string item = tls.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (item == "all" || item == "sm" || item == "shm" || item == "posix" || item == "sysv" ||
        item == "cma" || item == "xpmem" || item == "knem") {
      named = true;
    }
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return exclude ? !named : named;
}

Status ucx_error(const char* what, ucs_status_t status) {
  ErrorCode code = ErrorCode::kTransportError;
  switch (status) {
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
      code = ErrorCode::kPeerLost;
      break;
    case UCS_ERR_CANCELED:
      code = ErrorCode::kAborted;
      break;
    case UCS_ERR_TIMED_OUT:
      code = ErrorCode::kTimeout;
      break;
    default:
      break;
  }
  return Status(code, std::string(what) + ": " + gpudirect::ucx_status_string(status));
}

// Counts the ops of one put() call; completes the caller once all are done.
struct PutBatch {
  size_t remaining = 0;
  Status status;
  Completion done;
  void complete_one(const Status& s) {
    if (!s.ok() && status.ok()) status = s;
    if (--remaining == 0) {
      Completion cb = std::move(done);
      Status final_status = status;
      delete this;
      if (cb) cb(final_status);
    }
  }
};

struct RemoteRegion {
  ucp_rkey_h rkey = nullptr;
  uint64_t base = 0;
  uint64_t length = 0;
  // The region as mapped into this process (same-host shared memory), or null: see
  // UcxTransportOptions::copy_into_mapped_regions.
  uint8_t* mapped = nullptr;
};

bool is_host_memory(const gpudirect::MemoryRegion* region) {
  return region != nullptr && region->kind() != protocol::MemoryKind::kCudaDevice;
}

struct QueuedOp {
  // kGet reuses `op` with `local` as the destination (GetOp's non-const pointer, stored const).
  enum class Kind : uint8_t { kPut, kGet, kFlush } kind = Kind::kPut;
  PutOp op;
  PutBatch* batch = nullptr;
  Completion flush_done;
};

}  // namespace

class UcxTransport::Impl {
 public:
  struct Peer {
    Impl* owner = nullptr;
    PeerId id = 0;
    ucp_ep_h ep = nullptr;
    bool closed = false;
    Status failure;
    std::deque<QueuedOp> queue;
    size_t outstanding_puts = 0;
    std::vector<RemoteRegion> regions;
    struct UnpackedRkey {
      ucp_rkey_h handle = nullptr;  // owned
      // The mapping here that holds the peer's segment, once a region of it was mapped here
      // (see mapped_here): looked up once per rkey, since reading /proc/self/maps per region
      // would cost the progress thread milliseconds per request.
      std::optional<MappingBounds> mapping;
    };
    std::map<std::vector<uint8_t>, UnpackedRkey> rkeys;
    // Puts are grouped in epochs, one per flush: a flush completes only when UCX's flush has
    // completed AND every put of its epoch and the earlier ones has completed locally, so no
    // source buffer is still read by UCX when the caller hears "flushed" (seen with UCX 1.13
    // over tcp: an ep flush completing while a put still sat in the transport's pending queue).
    struct Epoch {
      size_t outstanding = 0;
      bool flush_done = false;
      Status status;
      Completion done;
    };
    std::deque<Epoch> epochs = std::deque<Epoch>(1);
    bool pumping = false;
    uint64_t first_epoch = 0;  // id of epochs.front()
  };

  // A UCX request's callback context: what to do when it completes.
  struct RequestContext {
    Peer* peer = nullptr;
    enum class Kind : uint8_t { kPut, kFlush, kNotify } kind = Kind::kPut;
    PutBatch* batch = nullptr;
    Completion done;
    std::vector<uint8_t> payload;  // notify: the bytes UCX reads until completion
    uint64_t epoch = 0;            // put and flush: the epoch it belongs to
  };

  Impl(std::shared_ptr<gpudirect::UcxContext> context, UcxTransportOptions options)
      : context_(std::move(context)), options_(options) {}

  Status init() {
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;  // only the progress thread touches the worker
    ucs_status_t st = ucp_worker_create(context_->handle(), &wp, &worker_);
    if (st != UCS_OK) return ucx_error("ucp_worker_create", st);

    ucp_address_t* addr = nullptr;
    size_t addr_len = 0;
    st = ucp_worker_get_address(worker_, &addr, &addr_len);
    if (st != UCS_OK) return ucx_error("ucp_worker_get_address", st);
    auto* b = reinterpret_cast<uint8_t*>(addr);
    address_.assign(b, b + addr_len);
    ucp_worker_release_address(worker_, addr);

    ucp_am_handler_param_t am{};
    am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                    UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
    am.id = kNotificationAmId;
    am.cb = &Impl::on_active_message;
    am.arg = this;
    am.flags = UCP_AM_FLAG_WHOLE_MSG;
    st = ucp_worker_set_am_recv_handler(worker_, &am);
    if (st != UCS_OK) return ucx_error("ucp_worker_set_am_recv_handler", st);

    int worker_fd = -1;
    st = ucp_worker_get_efd(worker_, &worker_fd);
    have_efd_ = st == UCS_OK;  // without it the thread still sleeps, only in max_sleep steps
    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd_ < 0) return Status(ErrorCode::kInternal, "epoll_create1 failed");
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = worker_fd;
    if (have_efd_) epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, worker_fd, &ev);
    ev.data.fd = tasks_.wake_fd();
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, tasks_.wake_fd(), &ev);

    thread_ = std::thread([this] { run(); });
    return Status::Ok();
  }

  ~Impl() {
    if (thread_.joinable()) {
      // Close endpoints on the progress thread, then stop it.
      std::promise<void> closed;
      tasks_.post([this, &closed] {
        for (auto& [id, peer] : peers_)
          close_peer(*peer, Status(ErrorCode::kAborted, "transport shutting down"), /*force=*/false);
        closed.set_value();
      });
      closed.get_future().wait();
      stop_.store(true);
      tasks_.post([] {});
      thread_.join();
    }
    // Close requests may still be completing; drive them briefly.
    // Graceful closes need both workers to progress; give them up to a second.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
    while (pending_closes_ > 0 && worker_ != nullptr && std::chrono::steady_clock::now() < deadline) {
      ucp_worker_progress(worker_);
      reap_closes();
    }
    if (worker_ != nullptr) ucp_worker_destroy(worker_);
    for (RequestContext* ctx : free_contexts_) delete ctx;
    if (epoll_fd_ >= 0) close(epoll_fd_);
  }

  template <typename T>
  T call(std::function<T()> fn) {
    return tasks_.call<T>(fn);
  }

  Result<PeerId> connect(std::span<const uint8_t> address, const ConnectOptions& connect_options) {
    std::vector<uint8_t> addr(address.begin(), address.end());
    bool watch = options_.peer_failure == PeerFailureDetection::kOn ||
                 (options_.peer_failure == PeerFailureDetection::kAuto &&
                  (!connect_options.same_host || !ucx_tls_allows_shared_memory()));
    return call<Result<PeerId>>([this, addr, watch]() -> Result<PeerId> {
      auto peer = std::make_unique<Peer>();
      peer->owner = this;
      peer->id = next_peer_id_++;
      ucp_ep_params_t ep{};
      ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
      ep.address = reinterpret_cast<const ucp_address_t*>(addr.data());
      if (watch) {
        ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
        ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
        ep.err_handler.cb = &Impl::on_endpoint_error;
        ep.err_handler.arg = peer.get();
      }
      ucs_status_t st = ucp_ep_create(worker_, &ep, &peer->ep);
      if (st != UCS_OK) return ucx_error("ucp_ep_create", st);
      PeerId id = peer->id;
      peers_.emplace(id, std::move(peer));
      return id;
    });
  }

  Result<RemoteRegionId> import_region(PeerId peer_id, const protocol::RegionDescriptor& region) {
    return call<Result<RemoteRegionId>>([&]() -> Result<RemoteRegionId> {
      Peer* peer = find_peer(peer_id);
      if (peer == nullptr)
        return Status(ErrorCode::kNotFound, "import_region: unknown peer " + std::to_string(peer_id));
      if (peer->closed) return peer->failure;
      if (region.ucx_rkey.empty())
        return Status(ErrorCode::kInvalidArgument, "import_region: descriptor has no UCX rkey");
      // One unpacked rkey per distinct packed rkey: a receiver that grants the same buffers
      // again (a KV pool) costs no new unpack, and over shared memory the peer's segment stays
      // mapped here with its page tables warm.
      Peer::UnpackedRkey& rkey = peer->rkeys[region.ucx_rkey];
      if (rkey.handle == nullptr) {
        ucs_status_t st = ucp_ep_rkey_unpack(peer->ep, region.ucx_rkey.data(), &rkey.handle);
        if (st != UCS_OK) {
          peer->rkeys.erase(region.ucx_rkey);
          return ucx_error("ucp_ep_rkey_unpack", st);
        }
      }
      peer->regions.push_back(
          RemoteRegion{rkey.handle, region.base_address, region.length, mapped_here(rkey, region)});
      return static_cast<RemoteRegionId>(peer->regions.size() - 1);
    });
  }

  // Where UCX mapped the region into this process, if it did and the whole described range lies
  // inside that mapping (UCX does not check a remote address against its segment's length).
  uint8_t* mapped_here(Peer::UnpackedRkey& rkey, const protocol::RegionDescriptor& region) const {
    if (!options_.copy_into_mapped_regions || region.kind == protocol::MemoryKind::kCudaDevice ||
        region.length == 0) {
      return nullptr;
    }
    void* local = nullptr;
    if (ucp_rkey_ptr(rkey.handle, region.base_address, &local) != UCS_OK || local == nullptr) return nullptr;
    if (!rkey.mapping || !rkey.mapping->holds(local, 1)) rkey.mapping = mapping_containing(local);
    if (!rkey.mapping || !rkey.mapping->holds(local, region.length)) {
      spdlog::warn(
          "ucx: a peer's region of {} bytes is longer than UCX's mapping of it here; its puts go "
          "through UCX",
          region.length);
      return nullptr;
    }
    return static_cast<uint8_t*>(local);
  }

  void disconnect(PeerId peer_id) {
    tasks_.post([this, peer_id] {
      if (Peer* peer = find_peer(peer_id))
        close_peer(*peer, Status(ErrorCode::kAborted, "disconnected locally"), /*force=*/false);
    });
  }

  void get(PeerId peer_id, std::vector<GetOp> ops, Completion done) {
    std::vector<PutOp> as_puts;
    as_puts.reserve(ops.size());
    for (const GetOp& g : ops)
      as_puts.push_back(PutOp{g.local, g.local_region, g.remote, g.remote_offset, g.length});
    transfer(QueuedOp::Kind::kGet, peer_id, std::move(as_puts), std::move(done));
  }

  void put(PeerId peer_id, std::vector<PutOp> ops, Completion done) {
    transfer(QueuedOp::Kind::kPut, peer_id, std::move(ops), std::move(done));
  }

  void transfer(QueuedOp::Kind kind, PeerId peer_id, std::vector<PutOp> ops, Completion done) {
    tasks_.post([this, kind, peer_id, ops = std::move(ops), done = std::move(done)]() mutable {
      const char* what = kind == QueuedOp::Kind::kGet ? "get" : "put";
      Peer* peer = find_peer(peer_id);
      if (peer == nullptr)
        return done(
            Status(ErrorCode::kNotFound, std::string(what) + ": unknown peer " + std::to_string(peer_id)));
      if (peer->closed) return done(peer->failure);
      if (ops.empty()) return done(Status::Ok());
      for (const PutOp& op : ops) {
        if (op.remote >= peer->regions.size()) {
          return done(Status(ErrorCode::kInvalidArgument,
                             std::string(what) + ": unknown remote region " + std::to_string(op.remote)));
        }
        const RemoteRegion& r = peer->regions[op.remote];
        if (op.length > r.length || op.remote_offset > r.length - op.length) {
          return done(Status(ErrorCode::kInvalidArgument,
                             std::string(what) + ": " + std::to_string(op.length) + " bytes at offset " +
                                 std::to_string(op.remote_offset) + " overrun the granted region of " +
                                 std::to_string(r.length) + " bytes"));
        }
      }
      auto* batch = new PutBatch{ops.size(), Status::Ok(), std::move(done)};
      for (const PutOp& op : ops) peer->queue.push_back(QueuedOp{kind, op, batch, nullptr});
      pump(*peer);
    });
  }

  void flush(PeerId peer_id, Completion done) {
    tasks_.post([this, peer_id, done = std::move(done)]() mutable {
      Peer* peer = find_peer(peer_id);
      if (peer == nullptr)
        return done(Status(ErrorCode::kNotFound, "flush: unknown peer " + std::to_string(peer_id)));
      if (peer->closed) return done(peer->failure);
      peer->queue.push_back(QueuedOp{QueuedOp::Kind::kFlush, {}, nullptr, std::move(done)});
      pump(*peer);
    });
  }

  void notify(PeerId peer_id, std::span<const uint8_t> bytes, Completion done) {
    std::vector<uint8_t> copy(bytes.begin(), bytes.end());
    tasks_.post([this, peer_id, copy = std::move(copy), done = std::move(done)]() mutable {
      Peer* peer = find_peer(peer_id);
      if (peer == nullptr) {
        if (done) done(Status(ErrorCode::kNotFound, "notify: unknown peer " + std::to_string(peer_id)));
        return;
      }
      if (peer->closed) {
        if (done) done(peer->failure);
        return;
      }
      auto* ctx =
          new RequestContext{peer, RequestContext::Kind::kNotify, nullptr, std::move(done), std::move(copy)};
      ucp_request_param_t param{};
      param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
      param.flags = UCP_AM_SEND_FLAG_EAGER;
      param.cb.send = &Impl::on_request_done;
      param.user_data = ctx;
      ucs_status_ptr_t req = ucp_am_send_nbx(peer->ep, kNotificationAmId, nullptr, 0, ctx->payload.data(),
                                             ctx->payload.size(), &param);
      finish_post(req, ctx, "ucp_am_send_nbx");
    });
  }

  void set_notification_handler(NotificationHandler handler) {
    tasks_.post(
        [this, handler = std::move(handler)]() mutable { notification_handler_ = std::move(handler); });
  }
  void set_peer_failure_handler(PeerFailureHandler handler) {
    tasks_.post([this, handler = std::move(handler)]() mutable { failure_handler_ = std::move(handler); });
  }

  void post(std::function<void()> fn) { tasks_.post(std::move(fn)); }
  bool on_progress_thread() const { return std::this_thread::get_id() == thread_.get_id(); }
  void post_after(std::chrono::nanoseconds delay, std::function<void()> fn) {
    tasks_.post_after(delay, std::move(fn));
  }

  const std::vector<uint8_t>& address() const { return address_; }

 private:
  Peer* find_peer(PeerId id) {
    auto it = peers_.find(id);
    return it == peers_.end() ? nullptr : it->second.get();
  }

  // Posts queued ops in order while the window allows. A flush is posted as soon as everything
  // before it has been posted: UCX then completes it after those ops are remotely complete.
  void pump(Peer& peer) {
    if (peer.pumping) return;  // a completion inside a post: the outer loop carries on
    peer.pumping = true;
    pump_loop(peer);
    peer.pumping = false;
  }

  void pump_loop(Peer& peer) {
    while (!peer.queue.empty() && !peer.closed) {
      QueuedOp& front = peer.queue.front();
      if (front.kind != QueuedOp::Kind::kFlush) {
        if (peer.outstanding_puts >= options_.max_outstanding_puts) return;
        QueuedOp item = std::move(front);
        peer.queue.pop_front();
        post_put(peer, item);
      } else {
        QueuedOp item = std::move(front);
        peer.queue.pop_front();
        uint64_t epoch_id = peer.first_epoch + peer.epochs.size() - 1;
        Peer::Epoch& epoch = peer.epochs.back();
        epoch.done = std::move(item.flush_done);
        peer.epochs.emplace_back();
        auto* ctx = new RequestContext{&peer, RequestContext::Kind::kFlush, nullptr, nullptr, {}, epoch_id};
        ucp_request_param_t param{};
        param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
        param.cb.send = &Impl::on_request_done;
        param.user_data = ctx;
        ++in_flight_;
        finish_post(ucp_ep_flush_nbx(peer.ep, &param), ctx, "ucp_ep_flush_nbx");
      }
    }
  }

  void post_put(Peer& peer, const QueuedOp& item) {
    const PutOp& op = item.op;
    const RemoteRegion& r = peer.regions[op.remote];
    RequestContext* ctx = acquire_context();
    ctx->peer = &peer;
    ctx->kind = RequestContext::Kind::kPut;
    ctx->batch = item.batch;
    ctx->epoch = peer.first_epoch + peer.epochs.size() - 1;
    ++peer.epochs.back().outstanding;
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    param.cb.send = &Impl::on_request_done;
    param.user_data = ctx;
    if (op.local_region != nullptr && op.local_region->registered()) {
      param.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
      param.memh = op.local_region->ucx_memh();
    }
    ++peer.outstanding_puts;
    ++in_flight_;
    if (r.mapped != nullptr && is_host_memory(op.local_region)) {
      uint8_t* remote = r.mapped + op.remote_offset;
      if (item.kind == QueuedOp::Kind::kGet) {
        std::memcpy(const_cast<void*>(op.local), remote, op.length);
      } else {
        std::memcpy(remote, op.local, op.length);
      }
      complete(ctx, Status::Ok());
      return;
    }
    if (item.kind == QueuedOp::Kind::kGet) {
      // A get's request completes when the bytes are in local memory.
      ucs_status_ptr_t req = ucp_get_nbx(peer.ep, const_cast<void*>(op.local), op.length,
                                         r.base + op.remote_offset, r.rkey, &param);
      finish_post(req, ctx, "ucp_get_nbx");
      return;
    }
    ucs_status_ptr_t req =
        ucp_put_nbx(peer.ep, op.local, op.length, r.base + op.remote_offset, r.rkey, &param);
    finish_post(req, ctx, "ucp_put_nbx");
  }

  // Handles the three outcomes of a UCX post: done at once, failed at once, or in progress.
  void finish_post(ucs_status_ptr_t req, RequestContext* ctx, const char* what) {
    if (req == nullptr) {
      complete(ctx, Status::Ok());
    } else if (UCS_PTR_IS_ERR(req)) {
      complete(ctx, ucx_error(what, UCS_PTR_STATUS(req)));
    }
    // else: in progress; the callback completes it and frees the request (freeing it here would
    // silence the callback).
  }

  static void on_request_done(void* request, ucs_status_t status, void* user_data) {
    auto* ctx = static_cast<RequestContext*>(user_data);
    ucp_request_free(request);
    ctx->peer->owner->complete(ctx, status == UCS_OK ? Status::Ok() : ucx_error("request", status));
  }

  // Put contexts are recycled: at small sizes a heap allocation per put is a visible cost.
  RequestContext* acquire_context() {
    if (free_contexts_.empty()) return new RequestContext{};
    RequestContext* ctx = free_contexts_.back();
    free_contexts_.pop_back();
    return ctx;
  }

  void complete(RequestContext* ctx, const Status& status) {
    Peer& peer = *ctx->peer;
    if (ctx->kind == RequestContext::Kind::kPut) {
      --peer.outstanding_puts;
      --in_flight_;
      Peer::Epoch& epoch = peer.epochs[ctx->epoch - peer.first_epoch];
      --epoch.outstanding;
      if (!status.ok() && epoch.status.ok()) epoch.status = status;
      PutBatch* batch = ctx->batch;
      free_contexts_.push_back(ctx);
      batch->complete_one(status);
      if (epoch.outstanding == 0) complete_epochs(peer);
      pump(peer);
      return;
    }
    std::unique_ptr<RequestContext> owned(ctx);
    if (ctx->kind == RequestContext::Kind::kFlush) {
      --in_flight_;
      Peer::Epoch& epoch = peer.epochs[ctx->epoch - peer.first_epoch];
      epoch.flush_done = true;
      if (!status.ok() && epoch.status.ok()) epoch.status = status;
      complete_epochs(peer);
    } else if (ctx->done) {  // kNotify
      ctx->done(status);
    }
  }

  // Completes flushes in order: an epoch is done when its flush and all its puts are.
  void complete_epochs(Peer& peer) {
    while (peer.epochs.size() > 1) {
      Peer::Epoch& front = peer.epochs.front();
      if (!front.flush_done || front.outstanding != 0) return;
      Completion done = std::move(front.done);
      Status status = front.status;
      peer.epochs.pop_front();
      ++peer.first_epoch;
      if (!status.ok()) peer.epochs.front().status = status;  // later flushes report it too
      if (done) done(status);
    }
  }

  static ucs_status_t on_active_message(void* arg, const void* /*header*/, size_t /*header_length*/,
                                        void* data, size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<Impl*>(arg);
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0) {
      spdlog::warn("ucx: dropping a {}-byte notification that arrived as rendezvous", length);
      return UCS_OK;
    }
    if (self->notification_handler_) {
      self->notification_handler_(std::span<const uint8_t>(static_cast<const uint8_t*>(data), length));
    }
    return UCS_OK;
  }

  static void on_endpoint_error(void* arg, ucp_ep_h /*ep*/, ucs_status_t status) {
    auto* peer = static_cast<Peer*>(arg);
    Impl* self = peer->owner;
    Status failure = ucx_error("peer connection failed", status);
    failure = Status(ErrorCode::kPeerLost, failure.message());
    spdlog::warn("ucx: peer {} lost: {}", peer->id, failure.message());
    self->close_peer(*peer, failure, /*force=*/true);
    if (self->failure_handler_) self->failure_handler_(peer->id, failure);
  }

  // Fails what is queued, releases rkeys and closes the endpoint. Outstanding UCX requests
  // complete through their callbacks (with errors when the peer is gone).
  // A healthy peer is closed gracefully (flushed, then disconnected in step with the peer's
  // worker): a forced close left UCX 1.13's tcp transport on the other side with a
  // half-torn-down endpoint that crashed it later. A failed peer is closed by force.
  void close_peer(Peer& peer, const Status& reason, bool force) {
    if (peer.closed) return;
    peer.closed = true;
    peer.failure = reason;
    std::deque<QueuedOp> queued;
    queued.swap(peer.queue);
    for (QueuedOp& item : queued) {
      if (item.kind != QueuedOp::Kind::kFlush) {
        item.batch->complete_one(reason);
      } else if (item.flush_done) {
        item.flush_done(reason);
      }
    }
    for (auto& [packed, rkey] : peer.rkeys) ucp_rkey_destroy(rkey.handle);
    peer.rkeys.clear();
    peer.regions.clear();
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    ucs_status_ptr_t req = ucp_ep_close_nbx(peer.ep, &param);
    if (req != nullptr && !UCS_PTR_IS_ERR(req)) {
      ++pending_closes_;
      closing_requests_.push_back(req);
    }
  }

  void reap_closes() {
    for (auto it = closing_requests_.begin(); it != closing_requests_.end();) {
      if (ucp_request_check_status(*it) != UCS_INPROGRESS) {
        ucp_request_free(*it);
        --pending_closes_;
        it = closing_requests_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void run() {
    auto last_activity = std::chrono::steady_clock::now();
    epoll_event events[4];
    while (!stop_.load(std::memory_order_relaxed)) {
      bool did = tasks_.run_pending();
      unsigned progressed = ucp_worker_progress(worker_);
      if (!closing_requests_.empty()) reap_closes();
      auto now = std::chrono::steady_clock::now();
      if (did || progressed != 0) {
        last_activity = now;
        continue;
      }
      if (in_flight_ > 0 || now - last_activity < options_.spin_before_sleep) continue;
      if (have_efd_ && ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
      if (!tasks_.begin_sleep()) continue;
      // UCX does not signal its event fd for every kind of traffic (one-sided puts over tcp land
      // only when the target progresses, without a wakeup), so sleeps are bounded.
      int timeout = tasks_.sleep_timeout_ms();
      int cap = static_cast<int>(options_.max_sleep.count());
      if (timeout < 0 || timeout > cap) timeout = cap;
      epoll_wait(epoll_fd_, events, 4, timeout);
      tasks_.end_sleep();
      // No reset of last_activity here: a wake-up that finds nothing to do goes back to sleep
      // at once (resetting it made an idle process spin two thirds of the time).
    }
  }

  std::shared_ptr<gpudirect::UcxContext> context_;
  UcxTransportOptions options_;
  ucp_worker_h worker_ = nullptr;
  int epoll_fd_ = -1;
  std::vector<uint8_t> address_;
  TaskQueue tasks_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  // Progress-thread state.
  std::unordered_map<PeerId, std::unique_ptr<Peer>> peers_;
  PeerId next_peer_id_ = 1;
  size_t in_flight_ = 0;
  bool have_efd_ = false;
  size_t pending_closes_ = 0;
  std::vector<void*> closing_requests_;
  std::vector<RequestContext*> free_contexts_;
  NotificationHandler notification_handler_;
  PeerFailureHandler failure_handler_;
};

Result<std::unique_ptr<UcxTransport>> UcxTransport::create(std::shared_ptr<gpudirect::UcxContext> context,
                                                           UcxTransportOptions options) {
  if (!context) return Status(ErrorCode::kInvalidArgument, "UcxTransport needs a UCX context");
  auto impl = std::make_unique<Impl>(std::move(context), options);
  if (Status s = impl->init(); !s.ok()) return s;
  return std::unique_ptr<UcxTransport>(new UcxTransport(std::move(impl)));
}

UcxTransport::UcxTransport(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
UcxTransport::~UcxTransport() = default;

std::vector<uint8_t> UcxTransport::address() const {
  return impl_->address();
}
Result<PeerId> UcxTransport::connect(std::span<const uint8_t> address, const ConnectOptions& options) {
  return impl_->connect(address, options);
}
Result<RemoteRegionId> UcxTransport::import_region(PeerId peer, const protocol::RegionDescriptor& region) {
  return impl_->import_region(peer, region);
}
void UcxTransport::disconnect(PeerId peer) {
  impl_->disconnect(peer);
}
void UcxTransport::get(PeerId peer, std::vector<GetOp> ops, Completion done) {
  impl_->get(peer, std::move(ops), std::move(done));
}
void UcxTransport::put(PeerId peer, std::vector<PutOp> ops, Completion done) {
  impl_->put(peer, std::move(ops), std::move(done));
}
void UcxTransport::flush(PeerId peer, Completion done) {
  impl_->flush(peer, std::move(done));
}
void UcxTransport::notify(PeerId peer, std::span<const uint8_t> bytes, Completion done) {
  impl_->notify(peer, bytes, std::move(done));
}
void UcxTransport::set_notification_handler(NotificationHandler handler) {
  impl_->set_notification_handler(std::move(handler));
}
void UcxTransport::set_peer_failure_handler(PeerFailureHandler handler) {
  impl_->set_peer_failure_handler(std::move(handler));
}
void UcxTransport::post(std::function<void()> fn) {
  impl_->post(std::move(fn));
}
void UcxTransport::post_after(std::chrono::nanoseconds delay, std::function<void()> fn) {
  impl_->post_after(delay, std::move(fn));
}
bool UcxTransport::on_progress_thread() const {
  return impl_->on_progress_thread();
}

}  // namespace kvf::fabric
