// TaskQueue: the inbox of a progress thread. Any thread posts closures (now or after a delay);
// the one consumer thread runs them between its own polling. When the consumer sleeps (in epoll),
// a post wakes it through an eventfd; while it is awake, posting costs no system call.
// Thread rules: post/post_after from any thread; everything else from the consumer thread only.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <mutex>
#include <optional>
#include <queue>
#include <vector>

namespace kvf::fabric {

class TaskQueue {
 public:
  using Clock = std::chrono::steady_clock;

  TaskQueue();
  ~TaskQueue();
  TaskQueue(const TaskQueue&) = delete;
  TaskQueue& operator=(const TaskQueue&) = delete;

  void post(std::function<void()> fn);
  void post_after(std::chrono::nanoseconds delay, std::function<void()> fn);
  // Runs fn on the consumer thread and waits for its result: setup calls only, never from the
  // consumer thread itself.
  template <typename T>
  T call(const std::function<T()>& fn) {
    std::promise<T> promise;
    auto future = promise.get_future();
    post([&] { promise.set_value(fn()); });
    return future.get();
  }

  // Consumer side.
  bool run_pending();  // runs posted tasks and due timers; true if it ran any
  // Milliseconds until the next timer (rounded up), or -1 when there is none: an epoll timeout.
  int sleep_timeout_ms() const;
  int wake_fd() const { return event_fd_; }
  // Sleep protocol: begin_sleep() returns false if work arrived meanwhile (then don't sleep);
  // after waking, end_sleep() drains the eventfd.
  bool begin_sleep();
  void end_sleep();

 private:
  struct Timer {
    Clock::time_point due;
    uint64_t seq;
    std::function<void()> fn;
    bool operator>(const Timer& o) const { return due != o.due ? due > o.due : seq > o.seq; }
  };

  int event_fd_ = -1;
  std::atomic<bool> sleeping_{false};
  std::atomic<bool> has_tasks_{false};
  std::mutex mutex_;
  std::vector<std::function<void()>> tasks_;                               // guarded by mutex_
  std::vector<Timer> new_timers_;                                          // guarded by mutex_
  std::vector<std::function<void()>> running_;                             // consumer only
  std::priority_queue<Timer, std::vector<Timer>, std::greater<>> timers_;  // consumer only
  uint64_t timer_seq_ = 0;                                                 // guarded by mutex_
};

}  // namespace kvf::fabric
