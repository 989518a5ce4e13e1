#include "task_queue.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <stdexcept>

namespace kvf::fabric {

TaskQueue::TaskQueue() {
  event_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (event_fd_ < 0) throw std::runtime_error("eventfd failed");  // setup only
}

TaskQueue::~TaskQueue() {
  if (event_fd_ >= 0) close(event_fd_);
}

void TaskQueue::post(std::function<void()> fn) {
  {
    std::lock_guard lock(mutex_);
    tasks_.push_back(std::move(fn));
    has_tasks_.store(true, std::memory_order_seq_cst);
  }
  if (sleeping_.load(std::memory_order_seq_cst)) {
    uint64_t one = 1;
    ssize_t rc = write(event_fd_, &one, sizeof(one));
    (void)rc;  // EAGAIN means the counter is already non-zero: the consumer will wake anyway
  }
}

void TaskQueue::post_after(std::chrono::nanoseconds delay, std::function<void()> fn) {
  auto due = Clock::now() + delay;
  {
    std::lock_guard lock(mutex_);
    new_timers_.push_back(Timer{due, timer_seq_++, std::move(fn)});
    has_tasks_.store(true, std::memory_order_seq_cst);
  }
  if (sleeping_.load(std::memory_order_seq_cst)) {
    uint64_t one = 1;
    ssize_t rc = write(event_fd_, &one, sizeof(one));
    (void)rc;
  }
}

bool TaskQueue::run_pending() {
  bool ran = false;
  if (has_tasks_.load(std::memory_order_acquire)) {
    std::vector<Timer> fresh;
    {
      std::lock_guard lock(mutex_);
      running_.swap(tasks_);
      fresh.swap(new_timers_);
      has_tasks_.store(false, std::memory_order_relaxed);
    }
    for (auto& t : fresh) timers_.push(std::move(t));
    for (auto& fn : running_) fn();
    ran = !running_.empty();
    running_.clear();
  }
  if (!timers_.empty()) {
    auto now = Clock::now();
    while (!timers_.empty() && timers_.top().due <= now) {
      auto fn = std::move(const_cast<Timer&>(timers_.top()).fn);
      timers_.pop();
      fn();
      ran = true;
    }
  }
  return ran;
}

int TaskQueue::sleep_timeout_ms() const {
  if (timers_.empty()) return -1;
  auto left = timers_.top().due - Clock::now();
  if (left <= Clock::duration::zero()) return 0;
  return static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(left).count());
}

bool TaskQueue::begin_sleep() {
  sleeping_.store(true, std::memory_order_seq_cst);
  if (has_tasks_.load(std::memory_order_seq_cst)) {
    sleeping_.store(false, std::memory_order_relaxed);
    return false;
  }
  return true;
}

void TaskQueue::end_sleep() {
  sleeping_.store(false, std::memory_order_relaxed);
  uint64_t value = 0;
  ssize_t rc = read(event_fd_, &value, sizeof(value));
  (void)rc;
}

}  // namespace kvf::fabric
