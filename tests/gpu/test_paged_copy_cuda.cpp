// SegmentCopier on a real GPU: gather → scatter and direct copies of paged KV, run by the kernel
// (copy) and by the copy engines (copy_with_copy_engines), must leave device memory bitwise equal
// to what copy_segments_cpu makes of the same request in host memory, poison included. Covers the
// three layouts, odd sizes and misaligned layer bases (every vector width of the kernel), several
// launches per call, a Llama-3-8B-sized request, and copies between two GPUs when there are two.
// The seed is printed; KVF_TEST_SEED=<n> repeats a run.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "catch.h"
#include "kvf/gpudirect/cuda_probe.h"
#include "kvf/gpudirect/paged_copy.h"
#include "kvf/gpudirect/segment_copier.h"
#include "paged_copy_fixtures.h"

using namespace kvf;
using namespace kvf::gpudirect;
using namespace kvf::protocol;
using namespace kvf::test;

#define CUDA_REQUIRE(call)                                        \
  do {                                                            \
    const cudaError_t cuda_require_err_ = (call);                 \
    INFO(#call << ": " << cudaGetErrorString(cuda_require_err_)); \
    REQUIRE(cuda_require_err_ == cudaSuccess);                    \
  } while (0)

namespace {

// cudaMalloc'd bytes on one device.
class DeviceMemory {
 public:
  DeviceMemory(int device, uint64_t bytes) : device_(device), bytes_(bytes) {
    CUDA_REQUIRE(cudaSetDevice(device));
    CUDA_REQUIRE(cudaMalloc(&data_, bytes));
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {
    if (data_ != nullptr && cudaSetDevice(device_) == cudaSuccess) cudaFree(data_);
  }
  uint64_t address(uint64_t offset = 0) const { return reinterpret_cast<uintptr_t>(data_) + offset; }
  void fill(uint8_t byte) {
    CUDA_REQUIRE(cudaMemset(data_, byte, bytes_));
    CUDA_REQUIRE(cudaDeviceSynchronize());
  }
  void upload(const std::vector<uint8_t>& host) {
    REQUIRE(host.size() == bytes_);
    CUDA_REQUIRE(cudaMemcpy(data_, host.data(), bytes_, cudaMemcpyHostToDevice));
  }
  std::vector<uint8_t> download() const {
    std::vector<uint8_t> host(bytes_);
    CUDA_REQUIRE(cudaMemcpy(host.data(), data_, bytes_, cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  int device_;
  uint64_t bytes_;
  void* data_ = nullptr;
};

// The layer buffers of one side, in host memory and (mirrored byte for byte) on a device: one
// allocation each, layer l at l * stride, `gap` bytes between layers that nobody may write. An
// odd gap misaligns the layer bases, so pieces reach the kernel at every relative alignment.
struct Side {
  Side(const KvLayout& layout, int device, uint64_t gap)
      : stride(layout.layer_bytes() + gap),
        host(stride * layout.desc().num_layers, kPoison),
        dev(device, stride * layout.desc().num_layers) {
    for (uint32_t l = 0; l < layout.desc().num_layers; ++l) {
      host_bases.push_back(reinterpret_cast<uintptr_t>(host.data()) + l * stride);
      dev_bases.push_back(dev.address(l * stride));
    }
    dev.fill(kPoison);
  }
  void randomize_both(std::mt19937_64& rng) {
    randomize(host, rng);
    dev.upload(host);
  }

  uint64_t stride;
  std::vector<uint8_t> host;
  DeviceMemory dev;
  std::vector<uint64_t> host_bases;
  std::vector<uint64_t> dev_bases;
};

// Contiguous staging, `offset` bytes into its allocation (misaligned when odd), poisoned.
struct Staging {
  Staging(int device, uint64_t bytes, uint64_t at_offset)
      : offset(at_offset), host(bytes + at_offset, kPoison), dev(device, bytes + at_offset) {
    dev.fill(kPoison);
  }
  uint64_t host_at() const { return reinterpret_cast<uintptr_t>(host.data()) + offset; }
  uint64_t dev_at() const { return dev.address(offset); }

  uint64_t offset;
  std::vector<uint8_t> host;
  DeviceMemory dev;
};

enum class Engine { kKernel, kKernelDefaultStream, kCopyEngines, kCopyEnginesDefaultStream };

const char* engine_name(Engine e) {
  switch (e) {
    case Engine::kKernel:
      return "kernel";
    case Engine::kKernelDefaultStream:
      return "kernel on the legacy default stream";
    case Engine::kCopyEngines:
      return "copy engines (batched)";
    case Engine::kCopyEnginesDefaultStream:
      return "copy engines on the legacy default stream (one copy each)";
  }
  return "?";
}

constexpr Engine kEngines[] = {Engine::kKernel, Engine::kKernelDefaultStream, Engine::kCopyEngines,
                               Engine::kCopyEnginesDefaultStream};

// A stream on the copier's device, destroyed on that device.
class Stream {
 public:
  explicit Stream(int device) : device_(device) {
    CUDA_REQUIRE(cudaSetDevice(device));
    CUDA_REQUIRE(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() {
    if (stream_ != nullptr && cudaSetDevice(device_) == cudaSuccess) cudaStreamDestroy(stream_);
  }
  cudaStream_t get() const { return stream_; }

 private:
  int device_;
  cudaStream_t stream_ = nullptr;
};

std::vector<CopySegment> require_ok(Result<std::vector<CopySegment>> r) {
  INFO(r.status().to_string());
  REQUIRE(r.ok());
  return std::move(r).value();
}

// Runs segments on the GPU with `engine` and waits for them.
void run_on_gpu(SegmentCopier& copier, Engine engine, const Stream& stream,
                const std::vector<CopySegment>& segments) {
  Status s;
  switch (engine) {
    case Engine::kKernel:
      s = copier.copy(segments, stream.get());
      break;
    case Engine::kKernelDefaultStream:
      s = copier.copy(segments, nullptr);
      break;
    case Engine::kCopyEngines:
      s = copier.copy_with_copy_engines(segments, stream.get());
      break;
    case Engine::kCopyEnginesDefaultStream:
      s = copier.copy_with_copy_engines(segments, nullptr);
      break;
  }
  INFO(s.to_string());
  REQUIRE(s.ok());
  CUDA_REQUIRE(cudaSetDevice(copier.device()));
  CUDA_REQUIRE(cudaDeviceSynchronize());
}

std::unique_ptr<SegmentCopier> make_copier(int device, uint32_t max_segments = 1u << 16, uint32_t slots = 8) {
  auto r = SegmentCopier::create(device, max_segments, slots);
  INFO(r.status().to_string());
  REQUIRE(r.ok());
  return std::move(r).value();
}

// Byte-compares a device buffer with its host mirror; on a mismatch reports the first differing
// offset rather than dumping megabytes.
void require_same(const DeviceMemory& dev, const std::vector<uint8_t>& host, const char* what) {
  const std::vector<uint8_t> got = dev.download();
  REQUIRE(got.size() == host.size());
  const auto diff = std::mismatch(got.begin(), got.end(), host.begin());
  if (diff.first != got.end()) {
    const auto at = static_cast<uint64_t>(diff.first - got.begin());
    FAIL(what << ": first difference at byte " << at << " of " << got.size() << ": GPU " << int{*diff.first}
              << ", CPU " << int{*diff.second});
  }
}

struct Request {
  uint32_t first_layer;
  uint32_t layer_count;
  std::vector<uint32_t> src_blocks;
  std::vector<uint32_t> dst_blocks;
};

Request random_request(const KvLayout& src, const KvLayout& dst, uint32_t nblocks, std::mt19937_64& rng) {
  const uint32_t layers = src.desc().num_layers;
  const uint32_t first = static_cast<uint32_t>(rng() % layers);
  const uint32_t count = 1 + static_cast<uint32_t>(rng() % (layers - first));
  return {first, count, shuffled_blocks(src.desc().num_blocks, nblocks, rng),
          shuffled_blocks(dst.desc().num_blocks, nblocks, rng)};
}

// gather (src → staging) then scatter (staging → dst), on the CPU and on the GPU, and compare.
void check_gather_scatter(SegmentCopier& copier, Engine engine, const Stream& stream, const KvLayout& sl,
                          Side& src, const KvLayout& dl, Side& dst, Staging& staging, const Request& rq) {
  const uint64_t bytes = uint64_t{rq.layer_count} * sl.parts() * rq.src_blocks.size() * sl.part_bytes();
  auto build = [&](bool host) {
    const uint64_t at = host ? staging.host_at() : staging.dev_at();
    auto g = require_ok(gather_segments(sl, host ? src.host_bases : src.dev_bases, rq.src_blocks,
                                        rq.first_layer, rq.layer_count, at, bytes));
    auto s = require_ok(scatter_segments(dl, host ? dst.host_bases : dst.dev_bases, rq.dst_blocks,
                                         rq.first_layer, rq.layer_count, at, bytes));
    return std::pair{std::move(g), std::move(s)};
  };
  auto [host_gather, host_scatter] = build(true);
  copy_segments_cpu(host_gather);
  copy_segments_cpu(host_scatter);
  auto [dev_gather, dev_scatter] = build(false);
  REQUIRE(dev_gather.size() == host_gather.size());
  run_on_gpu(copier, engine, stream, dev_gather);
  run_on_gpu(copier, engine, stream, dev_scatter);
  require_same(staging.dev, staging.host, "staging");
  require_same(dst.dev, dst.host, "destination");
}

void check_direct(SegmentCopier& copier, Engine engine, const Stream& stream, const KvLayout& sl, Side& src,
                  const KvLayout& dl, Side& dst, const Request& rq) {
  copy_segments_cpu(require_ok(direct_segments(sl, src.host_bases, rq.src_blocks, dl, dst.host_bases,
                                               rq.dst_blocks, rq.first_layer, rq.layer_count)));
  run_on_gpu(copier, engine, stream,
             require_ok(direct_segments(sl, src.dev_bases, rq.src_blocks, dl, dst.dev_bases, rq.dst_blocks,
                                        rq.first_layer, rq.layer_count)));
  require_same(dst.dev, dst.host, "destination");
}

// Enables access from `from` to `to`'s memory; false when the pair cannot.
bool enable_peer(int from, int to) {
  int can = 0;
  CUDA_REQUIRE(cudaDeviceCanAccessPeer(&can, from, to));
  if (can == 0) return false;
  CUDA_REQUIRE(cudaSetDevice(from));
  const cudaError_t err = cudaDeviceEnablePeerAccess(to, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();  // clears the (harmless) error so later checks do not see it
    return true;
  }
  CUDA_REQUIRE(err);
  return true;
}

// Prints how long the kernel and the copy engines take for `segs` (the interval includes issuing
// the work from the host: that is the cost a cost model compares). Not checked: timings vary.
void print_timings(SegmentCopier& copier, const Stream& stream, const std::vector<CopySegment>& segs,
                   const char* what) {
  cudaEvent_t start = nullptr;
  cudaEvent_t stop = nullptr;
  CUDA_REQUIRE(cudaSetDevice(copier.device()));
  CUDA_REQUIRE(cudaEventCreate(&start));
  CUDA_REQUIRE(cudaEventCreate(&stop));
  std::printf("%s: %zu segments, %.1f MiB\n", what, segs.size(),
              static_cast<double>(total_bytes(segs)) / (1 << 20));
  for (Engine engine : {Engine::kKernel, Engine::kCopyEngines, Engine::kCopyEnginesDefaultStream}) {
    const cudaStream_t on = engine == Engine::kCopyEnginesDefaultStream ? nullptr : stream.get();
    float best_ms = 1e30f;
    for (int rep = 0; rep < 4; ++rep) {  // the first one warms up
      CUDA_REQUIRE(cudaEventRecord(start, on));
      Status s = engine == Engine::kKernel ? copier.copy(segs, on) : copier.copy_with_copy_engines(segs, on);
      REQUIRE(s.ok());
      CUDA_REQUIRE(cudaEventRecord(stop, on));
      CUDA_REQUIRE(cudaEventSynchronize(stop));
      float ms = 0;
      CUDA_REQUIRE(cudaEventElapsedTime(&ms, start, stop));
      if (rep > 0) best_ms = std::min(best_ms, ms);
    }
    std::printf("  %s: %.3f ms = %.1f GB/s (bytes moved, best of 3)\n", engine_name(engine),
                static_cast<double>(best_ms), static_cast<double>(total_bytes(segs)) / best_ms / 1e6);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

}  // namespace

TEST_CASE("GPU gather and scatter match the CPU bitwise, for every layout, engine and alignment") {
  std::mt19937_64 rng(test_seed("test_paged_copy_cuda"));
  auto copier = make_copier(0);
  Stream stream(0);
  // (src gap, dst gap, staging offset): aligned; then bases at 4-, 8- and 12-byte offsets against
  // odd ones, which sends pieces through the 16-, 8-, 4- and 1-byte paths of the kernel.
  const std::vector<std::array<uint64_t, 3>> gaps = {{256, 256, 0}, {4, 1, 8}, {20, 4, 3}};
  for (const KvLayoutDesc& shape : paged_shapes()) {
    const KvLayout sl = make_layout(shape);
    const KvLayout dl = make_layout(with_blocks(shape, shape.num_blocks + 11));
    for (const auto& [src_gap, dst_gap, staging_offset] : gaps) {
      for (Engine engine : kEngines) {
        INFO(sl.to_string() << ", gaps " << src_gap << "/" << dst_gap << "/" << staging_offset << ", "
                            << engine_name(engine));
        Side src(sl, 0, src_gap);
        src.randomize_both(rng);
        Side dst(dl, 0, dst_gap);
        const uint32_t nblocks = 1 + static_cast<uint32_t>(rng() % shape.num_blocks);
        const Request rq = random_request(sl, dl, nblocks, rng);
        Staging staging(0, uint64_t{rq.layer_count} * sl.block_bytes() * nblocks + 64, staging_offset);
        check_gather_scatter(*copier, engine, stream, sl, src, dl, dst, staging, rq);
      }
    }
  }
}

TEST_CASE("GPU direct copies match the CPU bitwise, for every layout, engine and alignment") {
  std::mt19937_64 rng(test_seed("test_paged_copy_cuda") + 1);
  auto copier = make_copier(0);
  Stream stream(0);
  const std::vector<std::pair<uint64_t, uint64_t>> gaps = {{256, 256}, {4, 1}, {8, 0}, {12, 3}};
  for (const KvLayoutDesc& shape : paged_shapes()) {
    const KvLayout sl = make_layout(shape);
    const KvLayout dl = make_layout(with_blocks(shape, shape.num_blocks * 2));
    for (const auto& [src_gap, dst_gap] : gaps) {
      for (Engine engine : kEngines) {
        INFO(sl.to_string() << ", gaps " << src_gap << "/" << dst_gap << ", " << engine_name(engine));
        Side src(sl, 0, src_gap);
        src.randomize_both(rng);
        Side dst(dl, 0, dst_gap);
        const Request rq = random_request(sl, dl, 1 + static_cast<uint32_t>(rng() % shape.num_blocks), rng);
        check_direct(*copier, engine, stream, sl, src, dl, dst, rq);
      }
    }
  }
}

TEST_CASE("A call with more segments than one launch takes cycles through the slots") {
  std::mt19937_64 rng(test_seed("test_paged_copy_cuda") + 2);
  // 7 segments a launch and 2 slots: a shuffled request needs many launches, and the third one
  // already reuses the first slot.
  auto copier = make_copier(0, 7, 2);
  Stream stream(0);
  const KvLayoutDesc shape{KvLayoutKind::kFlashAttention, 4, 37, 16, 2, 64, 2};
  const KvLayout layout = make_layout(shape);
  Side src(layout, 0, 64);
  src.randomize_both(rng);
  Side dst(layout, 0, 64);
  const Request rq{0, 4, shuffled_blocks(37, 37, rng), shuffled_blocks(37, 37, rng)};
  const auto segs = require_ok(
      direct_segments(layout, src.dev_bases, rq.src_blocks, layout, dst.dev_bases, rq.dst_blocks, 0, 4));
  const uint64_t pieces = split_segments(segs, SegmentCopier::kMaxSegmentBytes).size();
  const uint64_t before = copier->kernel_launches();
  copy_segments_cpu(require_ok(
      direct_segments(layout, src.host_bases, rq.src_blocks, layout, dst.host_bases, rq.dst_blocks, 0, 4)));
  run_on_gpu(*copier, Engine::kKernel, stream, segs);
  REQUIRE(copier->kernel_launches() - before == (pieces + 6) / 7);
  require_same(dst.dev, dst.host, "destination");
}

TEST_CASE("A resident plan copies every layer from its own bases and matches the CPU") {
  std::mt19937_64 rng(test_seed("test_paged_copy_cuda") + 5);
  auto copier = make_copier(0);
  Stream stream(0);
  for (const KvLayoutDesc& shape : paged_shapes()) {
    const KvLayout layout = make_layout(shape);
    INFO(layout.to_string());
    Side src(layout, 0, 48);
    src.randomize_both(rng);
    Side dst(layout, 0, 48);
    const uint32_t blocks = shape.num_blocks;
    const Request rq{0, shape.num_layers, shuffled_blocks(blocks, blocks, rng),
                     shuffled_blocks(blocks, blocks, rng)};
    // The plan of layer 0, relative to layer 0's bases, serves every layer.
    const auto layer0 = require_ok(
        direct_segments(layout, src.dev_bases, rq.src_blocks, layout, dst.dev_bases, rq.dst_blocks, 0, 1));
    std::vector<CopySegment> relative;
    for (const CopySegment& seg : layer0) {
      relative.push_back(CopySegment{seg.src - src.dev_bases[0], seg.dst - dst.dev_bases[0], seg.bytes});
    }
    auto plan = copier->make_resident(relative);
    INFO(plan.status().to_string());
    REQUIRE(plan.ok());
    for (uint32_t l = 0; l < shape.num_layers; ++l) {
      Status st = copier->copy_resident(plan.value(), src.dev_bases[l], dst.dev_bases[l], stream.get());
      INFO(st.to_string());
      REQUIRE(st.ok());
    }
    CUDA_REQUIRE(cudaStreamSynchronize(stream.get()));
    copy_segments_cpu(require_ok(direct_segments(layout, src.host_bases, rq.src_blocks, layout,
                                                 dst.host_bases, rq.dst_blocks, 0, shape.num_layers)));
    require_same(dst.dev, dst.host, "destination");
    REQUIRE_FALSE(copier->copy_resident(plan.value(), 0, dst.dev_bases[0], stream.get()).ok());
  }
}

TEST_CASE("SegmentCopier refuses bad arguments without touching the GPU") {
  REQUIRE(SegmentCopier::create(0, 0, 8).status().code() == ErrorCode::kInvalidArgument);
  REQUIRE(SegmentCopier::create(0, 16, 0).status().code() == ErrorCode::kInvalidArgument);
  REQUIRE(SegmentCopier::create(cuda_availability().device_count).status().code() == ErrorCode::kUnavailable);
  auto copier = make_copier(0);
  const std::vector<CopySegment> null_dst = {{0x1000, 0, 16}};
  Status s = copier->copy(null_dst, nullptr);
  REQUIRE(s.code() == ErrorCode::kInvalidArgument);
  REQUIRE(s.message().find("null destination") != std::string::npos);
  REQUIRE(copier->copy_with_copy_engines(null_dst, nullptr).code() == ErrorCode::kInvalidArgument);
  REQUIRE(copier->copy({}, nullptr).ok());  // nothing to do is not an error
  const std::vector<CopySegment> empty = {{0, 0, 0}};
  REQUIRE(copier->copy(empty, nullptr).ok());
  REQUIRE(copier->copy_with_copy_engines(empty, nullptr).ok());
}

TEST_CASE("A Llama-3-8B-sized request (32 layers, 512 blocks of 64 KiB, shuffled) matches the CPU") {
  std::mt19937_64 rng(test_seed("test_paged_copy_cuda") + 3);
  auto copier = make_copier(0);
  Stream stream(0);
  // 32 layers x 8 KV heads x head dim 128 x bf16 x 16-token blocks: 32 KiB per (block, part),
  // 32 MiB per layer, 1 GiB per side.
  const KvLayoutDesc shape{KvLayoutKind::kFlashAttention, 32, 512, 16, 8, 128, 2};
  const KvLayout layout = make_layout(shape);
  Side src(layout, 0, 4096);
  src.randomize_both(rng);
  const Request all{0, 32, shuffled_blocks(512, 512, rng), shuffled_blocks(512, 512, rng)};

  SECTION("direct, kernel") {
    Side dst(layout, 0, 4096);
    check_direct(*copier, Engine::kKernel, stream, layout, src, layout, dst, all);
  }
  SECTION("direct, copy engines") {
    Side dst(layout, 0, 4096);
    check_direct(*copier, Engine::kCopyEngines, stream, layout, src, layout, dst, all);
  }
  SECTION("gather and scatter of 300 blocks, kernel") {
    Side dst(layout, 0, 4096);
    const Request part{0, 32, shuffled_blocks(512, 300, rng), shuffled_blocks(512, 300, rng)};
    Staging staging(0, uint64_t{32} * layout.block_bytes() * 300, 0);
    check_gather_scatter(*copier, Engine::kKernel, stream, layout, src, layout, dst, staging, part);
  }
  SECTION("timing (printed, not checked)") {
    Side dst(layout, 0, 4096);
    const auto segs = require_ok(
        direct_segments(layout, src.dev_bases, all.src_blocks, layout, dst.dev_bases, all.dst_blocks, 0, 32));
    print_timings(*copier, stream, segs, "one GPU, shuffled direct copy");
  }
}

TEST_CASE("Copies between two GPUs (peer access) match the CPU") {
  if (cuda_availability().device_count < 2) {
    WARN("one GPU only: copies between GPUs not tested");
    return;
  }
  std::mt19937_64 rng(test_seed("test_paged_copy_cuda") + 4);
  // Push: the kernel runs on the source GPU and writes the peer; pull: on the destination GPU,
  // reading the peer. The copy engines take both the same way.
  for (auto [src_dev, dst_dev, copier_dev] : {std::array<int, 3>{0, 1, 0}, {0, 1, 1}}) {
    const int other = copier_dev == src_dev ? dst_dev : src_dev;
    if (!enable_peer(copier_dev, other)) {
      WARN("GPU " << copier_dev << " cannot access GPU " << other << ": peer copies not tested");
      continue;
    }
    auto copier = make_copier(copier_dev);
    Stream stream(copier_dev);
    std::vector<KvLayoutDesc> shapes = paged_shapes();
    shapes.push_back({KvLayoutKind::kFlashInfer, 8, 256, 16, 8, 128, 2});  // 8 x 16 MiB
    for (const KvLayoutDesc& shape : shapes) {
      const KvLayout sl = make_layout(shape);
      const KvLayout dl = make_layout(with_blocks(shape, shape.num_blocks + 3));
      for (Engine engine : {Engine::kKernel, Engine::kCopyEngines}) {
        INFO("GPU " << src_dev << " -> GPU " << dst_dev << " run by GPU " << copier_dev << ", "
                    << sl.to_string() << ", " << engine_name(engine));
        Side src(sl, src_dev, 4);
        src.randomize_both(rng);
        Side dst(dl, dst_dev, 0);
        check_direct(*copier, engine, stream, sl, src, dl, dst,
                     random_request(sl, dl, 1 + static_cast<uint32_t>(rng() % shape.num_blocks), rng));
      }
    }
    const KvLayout big = make_layout(shapes.back());
    Side src(big, src_dev, 0);
    Side dst(big, dst_dev, 0);
    const uint32_t n = big.desc().num_blocks;
    const auto segs =
        require_ok(direct_segments(big, src.dev_bases, shuffled_blocks(n, n, rng), big, dst.dev_bases,
                                   shuffled_blocks(n, n, rng), 0, big.desc().num_layers));
    const std::string what = "GPU " + std::to_string(src_dev) + " -> GPU " + std::to_string(dst_dev) +
                             " run by GPU " + std::to_string(copier_dev) + ", shuffled direct copy";
    print_timings(*copier, stream, segs, what.c_str());
  }
}
