#include "overlap_run.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include "kvf/gpudirect/cuda_memory.h"
#include "perf_util.h"
#if KVF_HAVE_CUDA
#include "prefill_compute.h"
#endif

namespace kvf::perf {

#if !KVF_HAVE_CUDA

Result<OverlapFigures> run_overlap(fabric::PeerLink&, fabric::Transport&, fabric::TransferScheduler&,
                                   const gpudirect::MemoryRegion&, const protocol::KvLayout&, int, uint32_t,
                                   uint64_t, bool, uint64_t&) {
  return Status(ErrorCode::kUnavailable, "the overlap run needs a CUDA build");
}

#else

namespace {
using Clock = std::chrono::steady_clock;
}

Result<OverlapFigures> run_overlap(fabric::PeerLink& link, fabric::Transport& transport,
                                   fabric::TransferScheduler& scheduler,
                                   const gpudirect::MemoryRegion& source, const protocol::KvLayout& layout,
                                   int device, uint32_t tokens, uint64_t iters, bool shuffle,
                                   uint64_t& request_id) {
  const uint32_t layers = layout.desc().num_layers;
  auto load = PrefillComputeLoad::create(device, tokens);
  if (!load.ok()) return load.status();
  auto stream = gpudirect::CudaStream::create(device);
  if (!stream.ok()) return stream.status();
  std::vector<gpudirect::CudaEvent> layer_done;
  for (uint32_t l = 0; l < layers; ++l) {
    auto e = gpudirect::CudaEvent::create(device);
    if (!e.ok()) return e.status();
    layer_done.push_back(std::move(e.value()));
  }
  auto t0 = gpudirect::CudaEvent::create(device, true);
  auto t1 = gpudirect::CudaEvent::create(device, true);
  if (!t0.ok() || !t1.ok()) return Status(ErrorCode::kInternal, "cannot create CUDA timing events");
  uint64_t seed = request_id;
  for (uint32_t l = 0; l < layers; ++l) {
    if (Status s = fabric::fill_layer_pattern(source, layout, l, seed); !s.ok()) return s;
  }
  fabric::PatternStreamOptions options;
  options.seed = seed;
  options.verify = false;
  options.shuffle = shuffle;

  // 1. The request alone.
  std::vector<double> transfer_s;
  for (uint64_t i = 0; i < iters; ++i) {
    options.request_id = ++request_id;
    auto outcome = fabric::send_pattern_stream(link, transport, scheduler, source, layout, options);
    if (!outcome.ok()) return outcome.status();
    transfer_s.push_back(outcome->seconds);
  }
  // 2. The compute alone (one warm-up pass first: cuBLAS picks its kernels then).
  auto compute_pass = [&](bool record_layers) -> Status {
    if (Status s = t0->record(stream->handle()); !s.ok()) return s;
    for (uint32_t l = 0; l < layers; ++l) {
      if (Status s = load.value()->enqueue_layer(stream->handle()); !s.ok()) return s;
      if (record_layers) {
        if (Status s = layer_done[l].record(stream->handle()); !s.ok()) return s;
      }
    }
    return t1->record(stream->handle());
  };
  std::vector<double> alone_ms;
  for (uint64_t i = 0; i < iters + 1; ++i) {
    if (Status s = compute_pass(false); !s.ok()) return s;
    if (Status s = t1->synchronize(); !s.ok()) return s;
    auto ms = t1->elapsed_ms_since(t0.value());
    if (!ms.ok()) return ms.status();
    if (i > 0) alone_ms.push_back(ms.value());
  }
  // 3. Both: each layer's transfer waits for that layer's compute event.
  std::vector<double> with_ms, tail_us;
  for (uint64_t i = 0; i < iters; ++i) {
    options.request_id = ++request_id;
    std::atomic<bool> watching{true};
    std::atomic<int64_t> compute_done_ns{0};
    std::thread watcher;
    Status enqueue_status;
    options.before_layer = [&](uint32_t l) -> void* {
      if (l == 0) {
        if (Status s = t0->record(stream->handle()); !s.ok()) enqueue_status = s;
      }
      if (Status s = load.value()->enqueue_layer(stream->handle()); !s.ok()) enqueue_status = s;
      if (Status s = layer_done[l].record(stream->handle()); !s.ok()) enqueue_status = s;
      if (l + 1 == layers) {
        if (Status s = t1->record(stream->handle()); !s.ok()) enqueue_status = s;
        // When did the last layer's compute finish, on the host clock? A thread watches its event.
        watcher = std::thread([&] {
          while (watching.load()) {
            auto ready = gpudirect::event_done(layer_done[layers - 1].handle());
            if (!ready.ok() || ready.value()) {
              compute_done_ns = Clock::now().time_since_epoch().count();
              return;
            }
          }
        });
      }
      return layer_done[l].handle();
    };
    auto outcome = fabric::send_pattern_stream(link, transport, scheduler, source, layout, options);
    watching = false;
    if (watcher.joinable()) watcher.join();
    if (!outcome.ok()) return outcome.status();
    if (!enqueue_status.ok()) return enqueue_status;
    if (Status s = t1->synchronize(); !s.ok()) return s;
    auto ms = t1->elapsed_ms_since(t0.value());
    if (!ms.ok()) return ms.status();
    with_ms.push_back(ms.value());
    auto last_done = outcome->start + std::chrono::duration_cast<Clock::duration>(
                                          std::chrono::duration<double>(outcome->layer_done_s.back()));
    double tail = static_cast<double>(last_done.time_since_epoch().count() - compute_done_ns.load()) / 1e3;
    tail_us.push_back(tail);
    std::printf("  overlap request %llu/%llu: compute %.2f ms, tail %.1f us\n",
                static_cast<unsigned long long>(i + 1), static_cast<unsigned long long>(iters), ms.value(),
                tail);
    std::fflush(stdout);
  }
  OverlapFigures f;
  double transfer = percentile(transfer_s, 50);
  f.transfer_gbps = static_cast<double>(layout.layer_bytes() * layers) / transfer / 1e9;
  f.layer_transfer_us = transfer / layers * 1e6;
  f.compute_alone_ms = percentile(alone_ms, 50);
  f.compute_with_transfer_ms = percentile(with_ms, 50);
  f.slowdown_pct = (f.compute_with_transfer_ms / f.compute_alone_ms - 1) * 100;
  f.tail_us = percentile(tail_us, 50);
  f.tail_ratio = f.tail_us / f.layer_transfer_us;
  return f;
}

#endif

}  // namespace kvf::perf
