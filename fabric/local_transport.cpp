#include "kvf/fabric/local_transport.h"

#include <sys/epoll.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <future>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "task_queue.h"

namespace kvf::fabric {
namespace {

std::mutex registry_mutex;
std::map<std::string, std::weak_ptr<LocalTransport::Impl>>& registry() {
  static std::map<std::string, std::weak_ptr<LocalTransport::Impl>> table;
  return table;
}

}  // namespace

class LocalTransport::Impl : public std::enable_shared_from_this<LocalTransport::Impl> {
 public:
  struct Peer {
    std::weak_ptr<Impl> remote;
    std::vector<protocol::RegionDescriptor> regions;
    bool failed = false;
    bool stalled = false;
    Status failure;
  };

  explicit Impl(std::string name) : name_(std::move(name)) {}

  void start() {
    thread_ = std::thread([this] {
      while (!stop_.load()) {
        if (tasks_.run_pending()) continue;
        if (!tasks_.begin_sleep()) continue;
        epoll_event ev{};
        int ep = epoll_create1(EPOLL_CLOEXEC);
        ev.events = EPOLLIN;
        ev.data.fd = tasks_.wake_fd();
        epoll_ctl(ep, EPOLL_CTL_ADD, tasks_.wake_fd(), &ev);
        epoll_wait(ep, &ev, 1, tasks_.sleep_timeout_ms());
        close(ep);
        tasks_.end_sleep();
      }
    });
  }

  void stop() {
    stop_.store(true);
    tasks_.post([] {});
    if (thread_.joinable()) thread_.join();
  }

  template <typename T>
  T call(std::function<T()> fn) {
    return tasks_.call<T>(fn);
  }

  Peer* find(PeerId id) {
    auto it = peers_.find(id);
    return it == peers_.end() ? nullptr : &it->second;
  }

  void fail(PeerId id, Peer& peer, const Status& reason) {
    if (peer.failed) return;
    peer.failed = true;
    peer.failure = reason;
    if (failure_handler_) failure_handler_(id, reason);
  }

  std::string name_;
  TaskQueue tasks_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::unordered_map<PeerId, Peer> peers_;  // progress thread only
  PeerId next_peer_ = 1;
  NotificationHandler notification_handler_;
  PeerFailureHandler failure_handler_;
};

Result<std::unique_ptr<LocalTransport>> LocalTransport::create(const std::string& name) {
  auto impl = std::make_shared<Impl>(name);
  {
    std::lock_guard lock(registry_mutex);
    auto& slot = registry()[name];
    if (!slot.expired()) return Status(ErrorCode::kInvalidArgument, "local transport '" + name + "' exists");
    slot = impl;
  }
  impl->start();
  return std::unique_ptr<LocalTransport>(new LocalTransport(impl));
}

LocalTransport::LocalTransport(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

LocalTransport::~LocalTransport() {
  {
    std::lock_guard lock(registry_mutex);
    registry().erase(impl_->name_);
  }
  impl_->stop();
}

std::vector<uint8_t> LocalTransport::address() const {
  return {impl_->name_.begin(), impl_->name_.end()};
}

Result<PeerId> LocalTransport::connect(std::span<const uint8_t> address, const ConnectOptions& /*options*/) {
  std::string name(address.begin(), address.end());
  std::shared_ptr<Impl> remote;
  {
    std::lock_guard lock(registry_mutex);
    auto it = registry().find(name);
    if (it != registry().end()) remote = it->second.lock();
  }
  if (!remote) return Status(ErrorCode::kPeerLost, "no local transport named '" + name + "'");
  return impl_->call<Result<PeerId>>([&]() -> Result<PeerId> {
    PeerId id = impl_->next_peer_++;
    impl_->peers_[id].remote = remote;
    return id;
  });
}

Result<RemoteRegionId> LocalTransport::import_region(PeerId peer, const protocol::RegionDescriptor& region) {
  return impl_->call<Result<RemoteRegionId>>([&]() -> Result<RemoteRegionId> {
    Impl::Peer* p = impl_->find(peer);
    if (p == nullptr) return Status(ErrorCode::kNotFound, "unknown peer");
    p->regions.push_back(region);
    return static_cast<RemoteRegionId>(p->regions.size() - 1);
  });
}

void LocalTransport::disconnect(PeerId peer) {
  impl_->tasks_.post([impl = impl_, peer] { impl->peers_.erase(peer); });
}

void LocalTransport::put(PeerId peer, std::vector<PutOp> ops, Completion done) {
  impl_->tasks_.post([impl = impl_, peer, ops = std::move(ops), done = std::move(done)] {
    Impl::Peer* p = impl->find(peer);
    if (p == nullptr) return done(Status(ErrorCode::kNotFound, "put: unknown peer"));
    if (p->failed) return done(p->failure);
    if (p->stalled) return;  // never completes
    for (const PutOp& op : ops) {
      if (op.remote >= p->regions.size())
        return done(Status(ErrorCode::kInvalidArgument, "put: unknown region"));
      const auto& r = p->regions[op.remote];
      if (op.length > r.length || op.remote_offset > r.length - op.length) {
        return done(Status(ErrorCode::kInvalidArgument, "put: extent overruns the granted region"));
      }
    }
    for (const PutOp& op : ops) {
      const auto& r = p->regions[op.remote];
      std::memcpy(reinterpret_cast<void*>(r.base_address + op.remote_offset), op.local, op.length);
    }
    done(Status::Ok());
  });
}

void LocalTransport::flush(PeerId peer, Completion done) {
  impl_->tasks_.post([impl = impl_, peer, done = std::move(done)] {
    Impl::Peer* p = impl->find(peer);
    if (p == nullptr) return done(Status(ErrorCode::kNotFound, "flush: unknown peer"));
    if (p->failed) return done(p->failure);
    if (p->stalled) return;
    done(Status::Ok());
  });
}

void LocalTransport::notify(PeerId peer, std::span<const uint8_t> bytes, Completion done) {
  std::vector<uint8_t> copy(bytes.begin(), bytes.end());
  impl_->tasks_.post([impl = impl_, peer, copy = std::move(copy), done = std::move(done)] {
    Impl::Peer* p = impl->find(peer);
    Status st;
    if (p == nullptr) {
      st = Status(ErrorCode::kNotFound, "notify: unknown peer");
    } else if (p->failed) {
      st = p->failure;
    } else if (auto remote = p->remote.lock()) {
      remote->tasks_.post([remote, copy] {
        if (remote->notification_handler_) remote->notification_handler_(copy);
      });
    } else {
      st = Status(ErrorCode::kPeerLost, "peer transport is gone");
    }
    if (done) done(st);
  });
}

void LocalTransport::set_notification_handler(NotificationHandler handler) {
  impl_->tasks_.post([impl = impl_, handler = std::move(handler)]() mutable {
    impl->notification_handler_ = std::move(handler);
  });
}

void LocalTransport::set_peer_failure_handler(PeerFailureHandler handler) {
  impl_->tasks_.post([impl = impl_, handler = std::move(handler)]() mutable {
    impl->failure_handler_ = std::move(handler);
  });
}

void LocalTransport::post(std::function<void()> fn) {
  impl_->tasks_.post(std::move(fn));
}
void LocalTransport::post_after(std::chrono::nanoseconds delay, std::function<void()> fn) {
  impl_->tasks_.post_after(delay, std::move(fn));
}

void LocalTransport::sever(PeerId peer) {
  impl_->tasks_.post([impl = impl_, peer] {
    if (Impl::Peer* p = impl->find(peer)) impl->fail(peer, *p, Status(ErrorCode::kPeerLost, "link severed"));
  });
}

void LocalTransport::stall(PeerId peer, bool on) {
  impl_->tasks_.post([impl = impl_, peer, on] {
    if (Impl::Peer* p = impl->find(peer)) p->stalled = on;
  });
}

}  // namespace kvf::fabric
