// kvfabric-gpu-anchors: measures the raw GPU links that kvfabric is compared with, one mode per call.
//   kvfabric-gpu-anchors --mode peer-copy|nccl|pinned-h2d|pinned-d2h|gemm [--src-gpu 0] [--dst-gpu 1]
//                        [--bytes 1G] [--iters 20] [--warmup 3] [--tokens 8192 --layers 32] [--json FILE]
//                        [--idle-us N]
// peer-copy:  cudaMemcpyPeerAsync of one contiguous buffer, GPU src -> GPU dst, peer access enabled,
//             on a stream of GPU src (its copy engine pushes over NVLink). --idle-us N: each timed
//             copy follows N us with both GPUs idle (a request's first copy after idle time).
// nccl:       ncclSend on GPU src / ncclRecv on GPU dst, one process driving both ranks.
// pinned-h2d / pinned-d2h: cudaMemcpyAsync from / to cudaHostAlloc'd memory, on GPU src.
// gemm:       PrefillComputeLoad (Llama-3-8B prefill GEMMs) for --layers layers per iteration on
//             GPU src; reports TFLOPS, per-iteration and per-layer times.
// The one-GPU modes (pinned-*, gemm) use --src-gpu (default 0) whatever the direction, so that by
// default they run on the GPU a kvfabric run with default flags uses.
// Times come from CUDA events recorded between back-to-back iterations on the stream(s) doing the
// work: seconds is the whole timed run, p50/p99 the per-iteration times, GB/s = 1e9 bytes/s. Every
// copy mode checks the moved bytes once after timing and fails on a mismatch.
// Exit status: 0 measured (and verified), 1 failed, 2 bad usage or a mode this build lacks,
// 77 skipped (not enough GPUs).
#include <cuda_runtime.h>
#if KVF_HAVE_NCCL
#include <nccl.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "kvf/fabric/version.h"
#include "kvf/gpudirect/cuda_probe.h"
#include "perf_util.h"
#include "prefill_compute.h"

namespace {

using namespace kvf;

constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;
constexpr int kExitSkip = 77;
// Events are created up front, one per timed step and lane; this keeps their number bounded.
constexpr uint64_t kMaxTimedSteps = 1'000'000;

int fail(int code, const std::string& message) {
  std::fprintf(stderr, "kvfabric-gpu-anchors: %s\n", message.c_str());
  return code;
}

Status cuda_failure(cudaError_t err, const char* call) {
  return Status(
      err == cudaErrorMemoryAllocation ? ErrorCode::kOutOfMemory : ErrorCode::kInternal,
      std::string(call) + " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

#define KVF_CUDA(call)                                          \
  do {                                                          \
    if (cudaError_t kvf_err = (call); kvf_err != cudaSuccess) { \
      return cuda_failure(kvf_err, #call);                      \
    }                                                           \
  } while (0)

#if KVF_HAVE_NCCL
Status nccl_failure(ncclResult_t result, const char* call) {
  const char* detail = ncclGetLastError(nullptr);
  return Status(ErrorCode::kTransportError,
                std::string(call) + " failed: " + ncclGetErrorString(result) +
                    (detail != nullptr && *detail != '\0' ? std::string(": ") + detail : std::string()));
}

#define KVF_NCCL(call)                                           \
  do {                                                           \
    if (ncclResult_t kvf_res = (call); kvf_res != ncclSuccess) { \
      return nccl_failure(kvf_res, #call);                       \
    }                                                            \
  } while (0)
#endif

// --- owned CUDA objects. Teardown errors are ignored: there is nobody left to report them to, and
// after a failure they would only repeat the error that ended the run. ---------------------------

struct DeviceFree {
  int device = 0;
  void operator()(unsigned char* p) const {
    if (cudaSetDevice(device) == cudaSuccess) cudaFree(p);
  }
};
using DevicePtr = std::unique_ptr<unsigned char, DeviceFree>;

struct HostFree {
  void operator()(unsigned char* p) const { cudaFreeHost(p); }
};
using HostPtr = std::unique_ptr<unsigned char, HostFree>;

struct StreamDestroy {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
using StreamPtr = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDestroy>;

struct EventDestroy {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
using EventPtr = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDestroy>;

Result<DevicePtr> device_alloc(int device, uint64_t bytes) {
  KVF_CUDA(cudaSetDevice(device));
  void* p = nullptr;
  KVF_CUDA(cudaMalloc(&p, bytes));
  return DevicePtr(static_cast<unsigned char*>(p), DeviceFree{device});
}

// Portable: the same buffer serves copies to and from either GPU at full pinned speed.
Result<HostPtr> pinned_alloc(uint64_t bytes) {
  void* p = nullptr;
  KVF_CUDA(cudaHostAlloc(&p, bytes, cudaHostAllocPortable));
  return HostPtr(static_cast<unsigned char*>(p));
}

Result<StreamPtr> make_stream(int device) {
  KVF_CUDA(cudaSetDevice(device));
  cudaStream_t s = nullptr;
  KVF_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return StreamPtr(s);
}

Result<std::string> device_name(int device) {
  cudaDeviceProp prop{};
  KVF_CUDA(cudaGetDeviceProperties(&prop, device));
  return "GPU " + std::to_string(device) + " (" + prop.name + ")";
}

// --- random data and its check ------------------------------------------------------------------

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Random, not a pattern or zeros: nothing along the path may get away with moving less.
void fill_random(unsigned char* p, uint64_t bytes, uint64_t seed) {
  uint64_t state = seed;
  uint64_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t v = splitmix64(state);
    std::memcpy(p + i, &v, 8);
  }
  uint64_t v = splitmix64(state);
  std::memcpy(p + i, &v, bytes - i);
}

Status compare(const unsigned char* expected, const unsigned char* got, uint64_t bytes,
               const std::string& what) {
  if (std::memcmp(expected, got, bytes) == 0) return Status::Ok();
  uint64_t first = bytes;
  uint64_t differ = 0;
  for (uint64_t i = 0; i < bytes; ++i) {
    if (expected[i] != got[i]) {
      if (differ++ == 0) first = i;
    }
  }
  char detail[96];
  std::snprintf(detail, sizeof(detail), " (expected 0x%02x, got 0x%02x)", expected[first], got[first]);
  return Status(ErrorCode::kVerifyFailed, "VERIFY FAILED: " + what + ": " + std::to_string(differ) + " of " +
                                              std::to_string(bytes) + " bytes differ, the first at offset " +
                                              std::to_string(first) + detail);
}

// --- timing ---------------------------------------------------------------------------------------

struct Lane {
  int device;
  cudaStream_t stream;
};

struct Timing {
  double seconds = 0;           // first step's start to last step's end
  std::vector<double> step_us;  // per step
};

Result<Timing> time_steps_after_idle(const std::vector<Lane>& lanes, uint64_t warmup, uint64_t steps,
                                     const std::function<Status()>& step, std::chrono::microseconds idle) {
  for (uint64_t i = 0; i < warmup; ++i) {
    if (Status s = step(); !s.ok()) return s;
  }
  std::vector<EventPtr> begin, end;
  for (const Lane& lane : lanes) {
    KVF_CUDA(cudaSetDevice(lane.device));
    cudaEvent_t a = nullptr, b = nullptr;
    KVF_CUDA(cudaEventCreate(&a));
    KVF_CUDA(cudaEventCreate(&b));
    begin.emplace_back(a);
    end.emplace_back(b);
  }
  Timing t;
  for (uint64_t i = 0; i < steps; ++i) {
    for (const Lane& lane : lanes) KVF_CUDA(cudaStreamSynchronize(lane.stream));
    std::this_thread::sleep_for(idle);
    for (size_t l = 0; l < lanes.size(); ++l) KVF_CUDA(cudaEventRecord(begin[l].get(), lanes[l].stream));
    if (Status s = step(); !s.ok()) return s;
    for (size_t l = 0; l < lanes.size(); ++l) KVF_CUDA(cudaEventRecord(end[l].get(), lanes[l].stream));
    double slowest = 0;
    for (size_t l = 0; l < lanes.size(); ++l) {
      KVF_CUDA(cudaEventSynchronize(end[l].get()));
      float ms = 0;
      KVF_CUDA(cudaEventElapsedTime(&ms, begin[l].get(), end[l].get()));
      slowest = std::max(slowest, static_cast<double>(ms) * 1e3);
    }
    t.step_us.push_back(slowest);
    t.seconds += slowest / 1e6;
  }
  return t;
}

// Runs `step` warmup times, waits for it, then `steps` times back to back with an event on every
// lane between steps. A step's time is the slowest lane's (for nccl: sender or receiver); events
// are compared only within a lane, since CUDA cannot time events of two devices against each other.
// With `idle` > 0 every timed step instead starts after the lanes have sat idle that long (each
// step timed alone, `seconds` their sum): what a transfer that follows idle time pays.
Result<Timing> time_steps(const std::vector<Lane>& lanes, uint64_t warmup, uint64_t steps,
                          const std::function<Status()>& step,
                          std::chrono::microseconds idle = std::chrono::microseconds(0)) {
  if (idle.count() > 0) return time_steps_after_idle(lanes, warmup, steps, step, idle);
  std::vector<std::vector<EventPtr>> events(lanes.size());
  for (size_t l = 0; l < lanes.size(); ++l) {
    KVF_CUDA(cudaSetDevice(lanes[l].device));
    events[l].reserve(steps + 1);
    for (uint64_t i = 0; i <= steps; ++i) {
      cudaEvent_t e = nullptr;
      KVF_CUDA(cudaEventCreate(&e));
      events[l].emplace_back(e);
    }
  }
  for (uint64_t i = 0; i < warmup; ++i) {
    if (Status s = step(); !s.ok()) return s;
  }
  for (const auto& lane : lanes) KVF_CUDA(cudaStreamSynchronize(lane.stream));
  for (uint64_t i = 0; i <= steps; ++i) {
    for (size_t l = 0; l < lanes.size(); ++l) KVF_CUDA(cudaEventRecord(events[l][i].get(), lanes[l].stream));
    if (i == steps) break;
    if (Status s = step(); !s.ok()) return s;
  }
  for (const auto& lane : lanes) KVF_CUDA(cudaStreamSynchronize(lane.stream));
  Timing t;
  t.step_us.assign(steps, 0.0);
  for (size_t l = 0; l < lanes.size(); ++l) {
    float ms = 0;
    KVF_CUDA(cudaEventElapsedTime(&ms, events[l][0].get(), events[l][steps].get()));
    t.seconds = std::max(t.seconds, ms / 1e3);
    for (uint64_t i = 0; i < steps; ++i) {
      KVF_CUDA(cudaEventElapsedTime(&ms, events[l][i].get(), events[l][i + 1].get()));
      t.step_us[i] = std::max(t.step_us[i], ms * 1e3);
    }
  }
  return t;
}

// --- the modes --------------------------------------------------------------------------------------

struct Config {
  std::string mode;
  int src_gpu = 0;
  int dst_gpu = 1;
  uint64_t bytes = 0;
  uint64_t iters = 0;
  uint64_t warmup = 0;
  uint32_t tokens = 0;
  uint32_t layers = 0;
  std::chrono::microseconds idle{0};  // copy modes: idle time before every timed copy
};

struct Measurement {
  std::string mode;
  uint64_t bytes = 0;
  uint64_t iters = 0;
  double seconds = 0;
  double gbps = 0;
  double p50_us = 0;
  double p99_us = 0;
  // gemm only
  std::optional<double> tflops;
  uint32_t tokens = 0;
  uint32_t layers = 0;
  double layer_p50_us = 0;
  double layer_p99_us = 0;
};

Measurement copy_measurement(const Config& cfg, const Timing& t) {
  Measurement m;
  m.mode = cfg.mode;
  m.bytes = cfg.bytes;
  m.iters = cfg.iters;
  m.seconds = t.seconds;
  m.gbps = static_cast<double>(cfg.bytes) * static_cast<double>(cfg.iters) / t.seconds / 1e9;
  m.p50_us = perf::percentile(t.step_us, 50);
  m.p99_us = perf::percentile(t.step_us, 99);
  return m;
}

std::string plan(const Config& cfg) {
  return std::to_string(cfg.bytes) + " bytes x (" + std::to_string(cfg.warmup) + " warm-up + " +
         std::to_string(cfg.iters) + " timed)";
}

// Both directions: the driver may run a peer copy on either GPU's copy engine.
Status enable_peer_access(int a, int b) {
  for (auto [from, to] : {std::pair{a, b}, std::pair{b, a}}) {
    int can = 0;
    KVF_CUDA(cudaDeviceCanAccessPeer(&can, from, to));
    if (can == 0) {
      return Status(ErrorCode::kTransportError,
                    "GPU " + std::to_string(from) + " cannot access GPU " + std::to_string(to) +
                        " as a peer: a peer copy would be staged through the host and would not measure the "
                        "GPU-GPU link");
    }
    KVF_CUDA(cudaSetDevice(from));
    cudaError_t err = cudaDeviceEnablePeerAccess(to, 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled) {
      cudaGetLastError();  // not an error here; clear it so that it cannot surface from a later call
    } else if (err != cudaSuccess) {
      return cuda_failure(err, "cudaDeviceEnablePeerAccess(to, 0)");
    }
  }
  return Status::Ok();
}

// The buffers of a GPU-to-GPU anchor: random bytes at the source (kept in `reference`), zeros at
// the destination, so a copy that moved nothing fails verify().
struct PeerBuffers {
  HostPtr reference, readback;
  DevicePtr src, dst;

  static Result<PeerBuffers> make(const Config& cfg) {
    auto reference = pinned_alloc(cfg.bytes);
    if (!reference.ok()) return reference.status();
    auto readback = pinned_alloc(cfg.bytes);
    if (!readback.ok()) return readback.status();
    auto src = device_alloc(cfg.src_gpu, cfg.bytes);
    if (!src.ok()) return src.status();
    auto dst = device_alloc(cfg.dst_gpu, cfg.bytes);
    if (!dst.ok()) return dst.status();
    PeerBuffers b{std::move(reference.value()), std::move(readback.value()), std::move(src.value()),
                  std::move(dst.value())};
    fill_random(b.reference.get(), cfg.bytes, std::random_device{}());
    KVF_CUDA(cudaSetDevice(cfg.src_gpu));
    KVF_CUDA(cudaMemcpy(b.src.get(), b.reference.get(), cfg.bytes, cudaMemcpyHostToDevice));
    KVF_CUDA(cudaSetDevice(cfg.dst_gpu));
    KVF_CUDA(cudaMemset(b.dst.get(), 0, cfg.bytes));
    KVF_CUDA(cudaDeviceSynchronize());
    return b;
  }

  // The destination holds the source's bytes.
  Status verify(const Config& cfg, const std::string& what) {
    KVF_CUDA(cudaSetDevice(cfg.dst_gpu));
    KVF_CUDA(cudaMemcpy(readback.get(), dst.get(), cfg.bytes, cudaMemcpyDeviceToHost));
    return compare(reference.get(), readback.get(), cfg.bytes, what);
  }
};

Result<Measurement> run_peer_copy(const Config& cfg) {
  auto src_name = device_name(cfg.src_gpu);
  if (!src_name.ok()) return src_name.status();
  auto dst_name = device_name(cfg.dst_gpu);
  if (!dst_name.ok()) return dst_name.status();
  if (Status s = enable_peer_access(cfg.src_gpu, cfg.dst_gpu); !s.ok()) return s;
  std::printf("peer-copy: %s -> %s, cudaMemcpyPeerAsync on a stream of GPU %d, peer access on, %s\n",
              src_name->c_str(), dst_name->c_str(), cfg.src_gpu, plan(cfg).c_str());
  std::fflush(stdout);

  auto buffers = PeerBuffers::make(cfg);
  if (!buffers.ok()) return buffers.status();
  auto stream = make_stream(cfg.src_gpu);
  if (!stream.ok()) return stream.status();
  unsigned char* s_ptr = buffers->src.get();
  unsigned char* d_ptr = buffers->dst.get();
  cudaStream_t st = stream->get();

  auto timing = time_steps(
      {{cfg.src_gpu, st}}, cfg.warmup, cfg.iters,
      [&]() -> Status {
        KVF_CUDA(cudaMemcpyPeerAsync(d_ptr, cfg.dst_gpu, s_ptr, cfg.src_gpu, cfg.bytes, st));
        return Status::Ok();
      },
      cfg.idle);
  if (!timing.ok()) return timing.status();

  if (Status s = buffers->verify(cfg, "peer-copy at GPU " + std::to_string(cfg.dst_gpu)); !s.ok()) return s;
  return copy_measurement(cfg, timing.value());
}

Result<Measurement> run_pinned(const Config& cfg, bool to_device) {
  const int gpu = cfg.src_gpu;
  auto name = device_name(gpu);
  if (!name.ok()) return name.status();
  std::printf("%s: %s, cudaMemcpyAsync with pinned (cudaHostAlloc) host memory, %s\n", cfg.mode.c_str(),
              to_device ? ("host -> " + *name).c_str() : (*name + " -> host").c_str(), plan(cfg).c_str());
  std::fflush(stdout);

  auto reference = pinned_alloc(cfg.bytes);
  if (!reference.ok()) return reference.status();
  // h2d: the timed copies read `host`; d2h: they write it (it starts as zeros, not the data).
  auto host = pinned_alloc(cfg.bytes);
  if (!host.ok()) return host.status();
  auto dev = device_alloc(gpu, cfg.bytes);
  if (!dev.ok()) return dev.status();
  auto stream = make_stream(gpu);
  if (!stream.ok()) return stream.status();
  unsigned char* d_ptr = dev->get();
  unsigned char* h_ptr = host->get();
  cudaStream_t st = stream->get();

  fill_random(reference->get(), cfg.bytes, std::random_device{}());
  KVF_CUDA(cudaSetDevice(gpu));
  if (to_device) {
    std::memcpy(h_ptr, reference->get(), cfg.bytes);
    KVF_CUDA(cudaMemset(d_ptr, 0, cfg.bytes));
  } else {
    std::memset(h_ptr, 0, cfg.bytes);
    KVF_CUDA(cudaMemcpy(d_ptr, reference->get(), cfg.bytes, cudaMemcpyHostToDevice));
  }
  KVF_CUDA(cudaDeviceSynchronize());

  auto timing = time_steps({{gpu, st}}, cfg.warmup, cfg.iters, [&]() -> Status {
    if (to_device) {
      KVF_CUDA(cudaMemcpyAsync(d_ptr, h_ptr, cfg.bytes, cudaMemcpyHostToDevice, st));
    } else {
      KVF_CUDA(cudaMemcpyAsync(h_ptr, d_ptr, cfg.bytes, cudaMemcpyDeviceToHost, st));
    }
    return Status::Ok();
  });
  if (!timing.ok()) return timing.status();

  if (to_device) {
    KVF_CUDA(cudaMemcpy(h_ptr, d_ptr, cfg.bytes, cudaMemcpyDeviceToHost));  // h_ptr is spent now
  }
  if (Status s =
          compare(reference->get(), h_ptr, cfg.bytes,
                  to_device ? "pinned-h2d at GPU " + std::to_string(gpu) : "pinned-d2h in host memory");
      !s.ok())
    return s;
  return copy_measurement(cfg, timing.value());
}

#if KVF_HAVE_NCCL
struct CommsDestroy {
  std::vector<ncclComm_t> comms;
  ~CommsDestroy() {
    for (ncclComm_t c : comms) {
      if (c != nullptr) ncclCommDestroy(c);
    }
  }
};

Result<Measurement> run_nccl(const Config& cfg) {
  auto src_name = device_name(cfg.src_gpu);
  if (!src_name.ok()) return src_name.status();
  auto dst_name = device_name(cfg.dst_gpu);
  if (!dst_name.ok()) return dst_name.status();
  int version = 0;
  KVF_NCCL(ncclGetVersion(&version));
  const char* nvls = std::getenv("NCCL_NVLS_ENABLE");
  std::printf("nccl: %s -> %s, ncclSend/ncclRecv, NCCL %d (built with %d), NCCL_NVLS_ENABLE=%s, %s\n",
              src_name->c_str(), dst_name->c_str(), version, NCCL_VERSION_CODE,
              nvls != nullptr ? nvls : "(unset)", plan(cfg).c_str());
  std::fflush(stdout);

  auto buffers = PeerBuffers::make(cfg);
  if (!buffers.ok()) return buffers.status();
  auto src_stream = make_stream(cfg.src_gpu);
  if (!src_stream.ok()) return src_stream.status();
  auto dst_stream = make_stream(cfg.dst_gpu);
  if (!dst_stream.ok()) return dst_stream.status();

  // Rank 0 is GPU src, rank 1 GPU dst; one thread drives both, hence the group around each step.
  CommsDestroy comms;
  comms.comms.assign(2, nullptr);
  const int devices[2] = {cfg.src_gpu, cfg.dst_gpu};
  KVF_NCCL(ncclCommInitAll(comms.comms.data(), 2, devices));

  const unsigned char* s_ptr = buffers->src.get();
  unsigned char* d_ptr = buffers->dst.get();
  cudaStream_t s_st = src_stream->get();
  cudaStream_t d_st = dst_stream->get();
  auto timing =
      time_steps({{cfg.src_gpu, s_st}, {cfg.dst_gpu, d_st}}, cfg.warmup, cfg.iters, [&]() -> Status {
        KVF_NCCL(ncclGroupStart());
        KVF_NCCL(ncclSend(s_ptr, cfg.bytes, ncclInt8, 1, comms.comms[0], s_st));
        KVF_NCCL(ncclRecv(d_ptr, cfg.bytes, ncclInt8, 0, comms.comms[1], d_st));
        KVF_NCCL(ncclGroupEnd());
        return Status::Ok();
      });
  if (!timing.ok()) return timing.status();

  if (Status s = buffers->verify(cfg, "nccl recv at GPU " + std::to_string(cfg.dst_gpu)); !s.ok()) return s;
  return copy_measurement(cfg, timing.value());
}
#endif

Result<Measurement> run_gemm(const Config& cfg) {
  auto name = device_name(cfg.src_gpu);
  if (!name.ok()) return name.status();
  auto load = perf::PrefillComputeLoad::create(cfg.src_gpu, cfg.tokens);
  if (!load.ok()) return load.status();
  auto stream = make_stream(cfg.src_gpu);
  if (!stream.ok()) return stream.status();
  perf::PrefillComputeLoad& l = *load.value();
  std::printf(
      "gemm: %s, Llama-3-8B prefill GEMMs of %u tokens (%.2f TFLOP per layer), %u layers per iteration, "
      "%llu warm-up + %llu timed iterations, %.2f GiB of device memory\n",
      name->c_str(), cfg.tokens, l.layer_flops() / 1e12, cfg.layers,
      static_cast<unsigned long long>(cfg.warmup), static_cast<unsigned long long>(cfg.iters),
      static_cast<double>(l.device_bytes()) / (1ull << 30));
  std::fflush(stdout);

  cudaStream_t st = stream->get();
  // Each layer is one timed step, so that per-layer times come from the events too.
  auto timing = time_steps({{cfg.src_gpu, st}}, cfg.warmup * cfg.layers, cfg.iters * cfg.layers,
                           [&]() -> Status { return l.enqueue_layer(st); });
  if (!timing.ok()) return timing.status();

  std::vector<double> iter_us(cfg.iters, 0.0);
  for (uint64_t i = 0; i < timing->step_us.size(); ++i) iter_us[i / cfg.layers] += timing->step_us[i];
  Measurement m;
  m.mode = cfg.mode;
  m.bytes = 0;
  m.iters = cfg.iters;
  m.seconds = timing->seconds;
  m.gbps = 0;
  m.p50_us = perf::percentile(iter_us, 50);
  m.p99_us = perf::percentile(iter_us, 99);
  m.tflops =
      l.layer_flops() * static_cast<double>(cfg.layers) * static_cast<double>(cfg.iters) / m.seconds / 1e12;
  m.tokens = cfg.tokens;
  m.layers = cfg.layers;
  m.layer_p50_us = perf::percentile(timing->step_us, 50);
  m.layer_p99_us = perf::percentile(timing->step_us, 99);
  return m;
}

void print_table(const Measurement& m) {
  if (m.tflops) {
    std::printf("%-6s %8s %7s %7s %10s %8s %12s %12s %13s %13s\n", "mode", "tokens", "layers", "iters",
                "seconds", "TFLOPS", "iter_p50_ms", "iter_p99_ms", "layer_p50_us", "layer_p99_us");
    std::printf("%-6s %8u %7u %7llu %10.4f %8.1f %12.3f %12.3f %13.1f %13.1f\n", m.mode.c_str(), m.tokens,
                m.layers, static_cast<unsigned long long>(m.iters), m.seconds, *m.tflops, m.p50_us / 1e3,
                m.p99_us / 1e3, m.layer_p50_us, m.layer_p99_us);
  } else {
    std::printf("%-10s %12s %7s %10s %10s %10s %10s\n", "mode", "bytes", "iters", "seconds", "GB/s", "p50_us",
                "p99_us");
    std::printf("%-10s %12llu %7llu %10.4f %10.3f %10.1f %10.1f\n", m.mode.c_str(),
                static_cast<unsigned long long>(m.bytes), static_cast<unsigned long long>(m.iters), m.seconds,
                m.gbps, m.p50_us, m.p99_us);
    std::printf("verified: the %llu bytes at the destination match the source\n",
                static_cast<unsigned long long>(m.bytes));
  }
  std::fflush(stdout);
}

Status write_json(const std::string& path, const Measurement& m) {
  nlohmann::json entry = {{"mode", m.mode}, {"bytes", m.bytes},   {"iters", m.iters},  {"seconds", m.seconds},
                          {"gbps", m.gbps}, {"p50_us", m.p50_us}, {"p99_us", m.p99_us}};
  if (m.tflops) {
    entry["tflops"] = *m.tflops;
    entry["tokens"] = m.tokens;
    entry["layers"] = m.layers;
    entry["layer_p50_us"] = m.layer_p50_us;
    entry["layer_p99_us"] = m.layer_p99_us;
  }
  nlohmann::json out;
  out["results"] = nlohmann::json::array({entry});
  std::ofstream f(path);
  if (!f) return Status(ErrorCode::kInvalidArgument, "cannot write " + path);
  f << out.dump(2) << "\n";
  f.close();
  if (!f) return Status(ErrorCode::kInternal, "writing " + path + " failed");
  return Status::Ok();
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options options(
      "kvfabric-gpu-anchors",
      "Measures the raw GPU links kvfabric is compared with, one mode per call.\n"
      "  peer-copy: cudaMemcpyPeerAsync GPU src -> GPU dst     nccl: ncclSend/ncclRecv src -> dst\n"
      "  pinned-h2d: pinned host -> GPU src   pinned-d2h: GPU src -> pinned host\n"
      "  gemm: Llama-3-8B prefill GEMMs on GPU src\n"
      "Exit: 0 ok, 1 failed (or data mismatch), 2 bad usage / not built with NCCL, 77 skipped.");
  // clang-format off
  options.add_options()
      ("mode", "peer-copy | nccl | pinned-h2d | pinned-d2h | gemm", cxxopts::value<std::string>())
      ("src-gpu", "source GPU (peer-copy, nccl); the GPU of pinned-h2d, pinned-d2h, gemm", cxxopts::value<int>()->default_value("0"))
      ("dst-gpu", "destination GPU (peer-copy, nccl)", cxxopts::value<int>()->default_value("1"))
      ("bytes", "bytes per copy (K/M/G: powers of 1024)", cxxopts::value<std::string>()->default_value("1G"))
      ("iters", "timed iterations", cxxopts::value<uint64_t>()->default_value("20"))
      ("warmup", "untimed iterations first", cxxopts::value<uint64_t>()->default_value("3"))
      ("tokens", "gemm: prefill tokens", cxxopts::value<uint32_t>()->default_value("8192"))
      ("layers", "gemm: layers per iteration", cxxopts::value<uint32_t>()->default_value("32"))
      ("idle-us", "peer-copy: let the GPUs sit idle this long before every timed copy (what a transfer after idle time pays; 0: copies back to back)", cxxopts::value<uint64_t>()->default_value("0"))
      ("json", "also write the result as JSON to FILE", cxxopts::value<std::string>())
      ("version", "print the version")
      ("h,help", "print help");
  // clang-format on
  cxxopts::ParseResult args;
  try {
    args = options.parse(argc, argv);
  } catch (const std::exception& e) {
    return fail(kExitUsage, std::string(e.what()) + " (see --help)");
  }
  if (args.count("help") != 0) {
    std::printf("%s\n", options.help().c_str());
    return 0;
  }
  if (args.count("version") != 0) {
    std::printf("kvfabric-gpu-anchors %s\n", std::string(fabric::version()).c_str());
    return 0;
  }
  if (!args.unmatched().empty()) return fail(kExitUsage, "unexpected argument '" + args.unmatched()[0] + "'");

  Config cfg;
  if (args.count("mode") == 0)
    return fail(kExitUsage, "say --mode peer-copy|nccl|pinned-h2d|pinned-d2h|gemm");
  cfg.mode = args["mode"].as<std::string>();
  const bool two_gpus = cfg.mode == "peer-copy" || cfg.mode == "nccl";
  if (!two_gpus && cfg.mode != "pinned-h2d" && cfg.mode != "pinned-d2h" && cfg.mode != "gemm") {
    return fail(kExitUsage,
                "--mode must be peer-copy, nccl, pinned-h2d, pinned-d2h or gemm, got '" + cfg.mode + "'");
  }
  cfg.src_gpu = args["src-gpu"].as<int>();
  cfg.dst_gpu = args["dst-gpu"].as<int>();
  auto bytes = perf::parse_size(args["bytes"].as<std::string>());
  if (!bytes || *bytes == 0)
    return fail(kExitUsage, "--bytes: bad size '" + args["bytes"].as<std::string>() + "'");
  cfg.bytes = *bytes;
  cfg.iters = args["iters"].as<uint64_t>();
  cfg.warmup = args["warmup"].as<uint64_t>();
  cfg.tokens = args["tokens"].as<uint32_t>();
  cfg.layers = args["layers"].as<uint32_t>();
  cfg.idle = std::chrono::microseconds(args["idle-us"].as<uint64_t>());
  if (cfg.idle.count() > 0 && cfg.mode != "peer-copy")
    return fail(kExitUsage, "--idle-us is for --mode peer-copy");
  const uint64_t steps_per_iter = cfg.mode == "gemm" ? std::max<uint32_t>(cfg.layers, 1) : 1;
  if (cfg.iters == 0 || cfg.iters > kMaxTimedSteps / steps_per_iter) {
    return fail(kExitUsage, "--iters must be 1.." + std::to_string(kMaxTimedSteps / steps_per_iter) +
                                (cfg.mode == "gemm" ? " (at these --layers)" : ""));
  }
  if (cfg.warmup > kMaxTimedSteps / steps_per_iter) return fail(kExitUsage, "--warmup is too large");
  if (cfg.mode == "gemm" && (cfg.tokens == 0 || cfg.layers == 0)) {
    return fail(kExitUsage, "--tokens and --layers must be positive");
  }
  if (two_gpus && cfg.src_gpu == cfg.dst_gpu) return fail(kExitUsage, "--src-gpu and --dst-gpu must differ");

#if !KVF_HAVE_NCCL
  if (cfg.mode == "nccl") {
    return fail(kExitUsage,
                "--mode nccl: this build has no NCCL (nccl.h or libnccl was not found when configuring; "
                "install NCCL, e.g. libnccl-dev, and configure a fresh build directory)");
  }
#endif

  // Never NVLink multicast (NVLS) on the GPU machines; a value the user set is kept, and shown.
  setenv("NCCL_NVLS_ENABLE", "0", 0);

  const auto& cuda = gpudirect::cuda_availability();
  const int needed = two_gpus ? 2 : 1;
  if (cuda.device_count < needed) {
    std::printf("SKIP: needs %d GPU%s, found %d%s\n", needed, needed == 1 ? "" : "s", cuda.device_count,
                cuda.reason.empty() ? "" : (" (" + cuda.reason + ")").c_str());
    return kExitSkip;
  }
  for (auto [flag, gpu, used] :
       {std::tuple{"--src-gpu", cfg.src_gpu, true}, std::tuple{"--dst-gpu", cfg.dst_gpu, two_gpus}}) {
    if (used && (gpu < 0 || gpu >= cuda.device_count)) {
      return fail(kExitUsage, std::string(flag) + " " + std::to_string(gpu) + ": there are GPUs 0.." +
                                  std::to_string(cuda.device_count - 1));
    }
  }

  Result<Measurement> m = Status(ErrorCode::kInternal, "no mode ran");
  if (cfg.mode == "peer-copy") {
    m = run_peer_copy(cfg);
  } else if (cfg.mode == "nccl") {
#if KVF_HAVE_NCCL
    m = run_nccl(cfg);
#endif
  } else if (cfg.mode == "pinned-h2d" || cfg.mode == "pinned-d2h") {
    m = run_pinned(cfg, cfg.mode == "pinned-h2d");
  } else {
    m = run_gemm(cfg);
  }
  if (!m.ok()) return fail(kExitFailed, cfg.mode + ": " + m.status().to_string());
  print_table(m.value());
  if (args.count("json") != 0) {
    if (Status s = write_json(args["json"].as<std::string>(), m.value()); !s.ok()) {
      return fail(kExitFailed, s.message());
    }
  }
  return 0;
}
