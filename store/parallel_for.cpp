#include "kvf/store/parallel_for.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace kvf::store {

namespace {

// One parallel_for call. Its indices are taken with next.fetch_add, so each runs once; `helpers`
// counts the pool threads inside it (changed under the pool's mutex), and the caller returns only
// when it is zero and no helper can join any more (the job is out of the queue).
struct Job {
  const std::function<void(size_t)>* work = nullptr;
  size_t n = 0;
  size_t max_helpers = 0;
  std::atomic<size_t> next{0};
  size_t helpers = 0;

  void run_indices() {
    for (size_t i = next++; i < n; i = next++) (*work)(i);
  }
};

class WorkerPool {
 public:
  explicit WorkerPool(size_t threads) {
    for (size_t t = 0; t < threads; ++t) threads_.emplace_back([this] { serve(); });
  }
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;
  ~WorkerPool() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (std::thread& t : threads_) t.join();
  }

  void run(Job& job) {
    {
      std::lock_guard lock(mutex_);
      jobs_.push_back(&job);
    }
    if (job.max_helpers == 1) {
      work_cv_.notify_one();
    } else {
      work_cv_.notify_all();
    }
    job.run_indices();
    std::unique_lock lock(mutex_);
    unqueue(&job);
    idle_cv_.wait(lock, [&] { return job.helpers == 0; });
  }

 private:
  void serve() {
    std::unique_lock lock(mutex_);
    for (;;) {
      work_cv_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
      if (stop_) return;
      Job* job = jobs_.front();
      if (++job->helpers >= job->max_helpers) jobs_.pop_front();  // full: others take the next job
      lock.unlock();
      job->run_indices();
      lock.lock();
      unqueue(job);  // its indices are all taken: no one else need join
      if (--job->helpers == 0) idle_cv_.notify_all();
    }
  }

  void unqueue(Job* job) {
    auto it = std::find(jobs_.begin(), jobs_.end(), job);
    if (it != jobs_.end()) jobs_.erase(it);
  }

  std::mutex mutex_;
  std::condition_variable work_cv_;  // a job was queued, or stop
  std::condition_variable idle_cv_;  // a job's last helper left it
  std::deque<Job*> jobs_;            // jobs that take more helpers
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

WorkerPool& shared_pool() {
  static WorkerPool pool(default_parallel_threads() - 1);
  return pool;
}

}  // namespace

size_t default_parallel_threads() {
  return std::clamp<size_t>(std::thread::hardware_concurrency(), 1, 16);
}

void parallel_for(size_t n, const std::function<void(size_t)>& work, size_t max_threads) {
  const size_t threads = std::min(n, std::max<size_t>(max_threads, 1));
  if (threads <= 1) {
    for (size_t i = 0; i < n; ++i) work(i);
    return;
  }
  Job job;
  job.work = &work;
  job.n = n;
  job.max_helpers = threads - 1;
  shared_pool().run(job);
}

}  // namespace kvf::store
