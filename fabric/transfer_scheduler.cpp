#include "kvf/fabric/transfer_scheduler.h"

#include <algorithm>
#include <deque>
#include <future>
#include <mutex>
#include <unordered_map>

#include "kvf/protocol/notification.h"

namespace kvf::fabric {

// All fields but `stats` are touched only on the transport's progress thread.
struct TransferScheduler::State : std::enable_shared_from_this<TransferScheduler::State> {
  struct Pending {
    LayerSend send;
    LayerDone done;
  };
  struct InFlight {
    LayerSend send;
    LayerDone done;
    Status put_status;
    bool finished = false;
  };
  struct RequestKey {
    PeerId peer;
    uint64_t request_id;
    bool operator==(const RequestKey&) const = default;
  };
  struct RequestKeyHash {
    size_t operator()(const RequestKey& k) const { return std::hash<uint64_t>()(k.request_id * 31 + k.peer); }
  };

  Transport& transport;
  TransferSchedulerOptions options;
  std::deque<Pending> queue;
  uint64_t inflight_bytes = 0;
  // Requests that may not continue. Bounded: the oldest are forgotten first (a request is
  // normally finished long before kMaxRemembered newer ones have failed).
  static constexpr size_t kMaxRemembered = 4096;
  std::unordered_map<RequestKey, Status, RequestKeyHash> failed;
  std::deque<RequestKey> failed_order;
  bool shutting_down = false;
  mutable std::mutex stats_mutex;
  TransferSchedulerStats stats;

  State(Transport& t, TransferSchedulerOptions o) : transport(t), options(o) {
    if (options.max_inflight_bytes == 0) {
      options.max_inflight_bytes =
          std::max(TransferSchedulerOptions::kDefaultInflightBytes, transport.suggested_inflight_bytes());
    }
  }

  void dispatch() {
    while (!queue.empty() && !shutting_down) {
      Pending& front = queue.front();
      auto failure = failed.find({front.send.peer, front.send.plan.request_id});
      if (failure != failed.end()) {
        Pending p = std::move(front);
        queue.pop_front();
        finish_layer(p.send, p.done, failure->second, 0);
        continue;
      }
      uint64_t bytes = front.send.plan.total_bytes;
      if (inflight_bytes > 0 && inflight_bytes + bytes > options.max_inflight_bytes) return;
      Pending p = std::move(front);
      queue.pop_front();
      start(std::move(p));
    }
  }

  void start(Pending p) {
    auto flight =
        std::make_shared<InFlight>(InFlight{std::move(p.send), std::move(p.done), Status::Ok(), false});
    const LayerSend& s = flight->send;
    inflight_bytes += s.plan.total_bytes;
    std::vector<PutOp> ops;
    ops.reserve(s.plan.extents.size());
    for (const TransferExtent& e : s.plan.extents) {
      ops.push_back(PutOp{s.src_base + e.src_offset, s.src_region, s.dst_region, e.dst_offset, e.length});
    }
    auto self = shared_from_this();
    transport.put_after_event(s.peer, std::move(ops), s.ready_event, [flight](const Status& st) {
      if (!st.ok() && flight->put_status.ok()) flight->put_status = st;
    });
    transport.flush(s.peer, [self, flight](const Status& st) {
      Status outcome = flight->put_status.ok() ? st : flight->put_status;
      self->on_flushed(flight, outcome);
    });
    transport.post_after(options.layer_timeout, [self, flight] {
      if (flight->finished) return;
      self->on_flushed(
          flight, Status(ErrorCode::kTimeout,
                         "layer " + std::to_string(flight->send.plan.layer) + " of request " +
                             std::to_string(flight->send.plan.request_id) + " not remotely complete after " +
                             std::to_string(self->options.layer_timeout.count()) + " ms"));
    });
  }

  void on_flushed(const std::shared_ptr<InFlight>& flight, const Status& outcome) {
    if (flight->finished) return;  // a late completion after a timeout
    flight->finished = true;
    const LayerSend& s = flight->send;
    inflight_bytes -= s.plan.total_bytes;
    RequestKey key{s.peer, s.plan.request_id};
    auto failure = failed.find(key);
    Status status = failure != failed.end() ? failure->second : outcome;
    if (status.ok()) {
      protocol::Notification n{protocol::NotificationKind::kLayerReady, ErrorCode::kOk, s.session_id,
                               s.plan.request_id, s.plan.layer};
      auto bytes = protocol::encode_notification(n);
      transport.notify(s.peer, bytes, nullptr);
    } else if (failure == failed.end()) {
      fail_request(s.peer, s.session_id, s.plan.request_id, status);
    }
    finish_layer(s, flight->done, status, status.ok() ? s.plan.total_bytes : 0);
    dispatch();
  }

  void fail_request(PeerId peer, uint64_t session_id, uint64_t request_id, const Status& reason) {
    if (failed.emplace(RequestKey{peer, request_id}, reason).second)
      failed_order.push_back({peer, request_id});
    if (failed_order.size() > kMaxRemembered) {
      failed.erase(failed_order.front());
      failed_order.pop_front();
    }
    protocol::Notification n{protocol::NotificationKind::kRequestAbort, reason.code(), session_id, request_id,
                             0};
    auto bytes = protocol::encode_notification(n);
    transport.notify(peer, bytes, nullptr);
  }

  void finish_layer(const LayerSend& s, const LayerDone& done, const Status& status, uint64_t bytes) {
    {
      std::lock_guard lock(stats_mutex);
      if (status.ok()) {
        ++stats.layers_done;
        stats.bytes_done += bytes;
      } else {
        ++stats.layers_failed;
      }
    }
    if (done) done(s.plan.request_id, s.plan.layer, status);
  }
};

TransferScheduler::TransferScheduler(Transport& transport, TransferSchedulerOptions options)
    : state_(std::make_shared<State>(transport, options)) {}

TransferScheduler::~TransferScheduler() {
  // Queued layers fail; in-flight ones finish through their completions (which hold the state).
  std::promise<void> drained;
  auto state = state_;
  state->transport.post([state, &drained] {
    state->shutting_down = true;
    std::deque<State::Pending> queue;
    queue.swap(state->queue);
    for (auto& p : queue)
      state->finish_layer(p.send, p.done, Status(ErrorCode::kAborted, "scheduler shut down"), 0);
    drained.set_value();
  });
  drained.get_future().wait();
}

void TransferScheduler::submit(LayerSend layer, LayerDone done) {
  auto state = state_;
  state->transport.post([state, layer = std::move(layer), done = std::move(done)]() mutable {
    if (state->shutting_down) {
      state->finish_layer(layer, done, Status(ErrorCode::kAborted, "scheduler shut down"), 0);
      return;
    }
    state->queue.push_back(State::Pending{std::move(layer), std::move(done)});
    state->dispatch();
  });
}

void TransferScheduler::abort_request(PeerId peer, uint64_t session_id, uint64_t request_id, Status reason) {
  auto state = state_;
  state->transport.post([state, peer, session_id, request_id, reason = std::move(reason)] {
    if (state->failed.count({peer, request_id}) == 0)
      state->fail_request(peer, session_id, request_id, reason);
    state->dispatch();
  });
}

uint64_t TransferScheduler::max_inflight_bytes() const {
  return state_->options.max_inflight_bytes;  // fixed at construction
}
TransferSchedulerStats TransferScheduler::stats() const {
  std::lock_guard lock(state_->stats_mutex);
  return state_->stats;
}

}  // namespace kvf::fabric
