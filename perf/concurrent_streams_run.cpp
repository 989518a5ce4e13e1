#include "concurrent_streams_run.h"

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace kvf::perf {

using fabric::PeerLink;
using Clock = std::chrono::steady_clock;

Result<ConcurrentStreamsFigures> run_concurrent_streams(
    std::vector<std::unique_ptr<PeerLink>>& links, fabric::Transport& transport,
    fabric::TransferScheduler& scheduler, const std::vector<gpudirect::MemoryRegion>& sources,
    const protocol::KvLayout& layout, uint64_t iters, bool verify, bool shuffle,
    const std::vector<uint32_t>& source_blocks, uint64_t& request_id, std::chrono::milliseconds timeout) {
  if (links.empty() || links.size() != sources.size()) {
    return Status(ErrorCode::kInvalidArgument, "run_concurrent_streams: one source per link, at least one");
  }
  const uint64_t request_bytes = layout.layer_bytes() * layout.desc().num_layers;
  const uint64_t first_request = request_id + 1;
  request_id += links.size() * iters;
  // Fills take far longer than a request on a GPU (the pattern is made on the host), so every
  // stream fills its source once, before the clock, and sends it `iters` times.
  for (size_t s = 0; s < links.size(); ++s) {
    for (uint32_t l = 0; l < layout.desc().num_layers; ++l) {
      if (Status st = fabric::fill_layer_pattern(sources[s], layout, l, first_request + s, source_blocks);
          !st.ok()) {
        return Status(st.code(), "stream " + std::to_string(s) + ", filling layer " + std::to_string(l) +
                                     ": " + st.message());
      }
    }
  }

  std::mutex mutex;
  std::condition_variable cv;
  bool go = false;
  Status first_error;
  ConcurrentStreamsFigures figures;
  auto stream = [&](size_t s) {
    {
      std::unique_lock lock(mutex);
      cv.wait(lock, [&] { return go; });
    }
    for (uint64_t it = 0; it < iters; ++it) {
      {
        std::lock_guard lock(mutex);
        if (!first_error.ok()) return;  // another stream failed: stop early
      }
      fabric::PatternStreamOptions options;
      options.request_id = first_request + links.size() * it + s;
      options.seed = first_request + s;
      options.verify = verify;
      options.shuffle = shuffle;
      options.source_blocks = source_blocks;
      options.timeout = timeout;
      auto outcome =
          fabric::send_pattern_stream(*links[s], transport, scheduler, sources[s], layout, options);
      std::lock_guard lock(mutex);
      if (!outcome.ok()) {
        if (first_error.ok()) {
          first_error =
              Status(outcome.status().code(), "stream " + std::to_string(s) + ", request " +
                                                  std::to_string(it + 1) + ": " + outcome.status().message());
        }
        return;
      }
      if (verify && outcome->result.bytes_verified != request_bytes) {
        if (first_error.ok()) {
          first_error =
              Status(ErrorCode::kVerifyFailed, "stream " + std::to_string(s) + ": the receiver verified " +
                                                   std::to_string(outcome->result.bytes_verified) + " of " +
                                                   std::to_string(request_bytes) + " bytes");
        }
        return;
      }
      figures.bytes_verified += outcome->result.bytes_verified;
      figures.request_seconds.push_back(outcome->seconds);
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(links.size());
  for (size_t s = 0; s < links.size(); ++s) threads.emplace_back(stream, s);
  const auto start = Clock::now();
  {
    std::lock_guard lock(mutex);
    go = true;
  }
  cv.notify_all();
  for (std::thread& t : threads) t.join();
  figures.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (!first_error.ok()) return first_error;
  figures.aggregate_gbps = static_cast<double>(request_bytes) *
                           static_cast<double>(figures.request_seconds.size()) / figures.seconds / 1e9;
  return figures;
}

}  // namespace kvf::perf
