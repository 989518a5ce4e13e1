// kvfabric-gpu-kernel-sweep: tunes the GPU->GPU paged copy. In one process driving two GPUs (peer
// access on), it moves the Llama-3-8B request shape (--layers layers, K and V, --blocks blocks of
// --block-bytes each, into shuffled destination blocks) layer by layer with
//   push:   SegmentCopier on the source GPU writing over NVLink, for each KernelShape in the sweep
//   pull:   SegmentCopier on the destination GPU reading over NVLink
//   staged: gather kernel on the source GPU into a contiguous staging buffer, one copy-engine copy
//           to staging on the destination GPU, scatter kernel there (three streams, pipelined)
// and alternates every round with the anchors: one cudaMemcpyPeerAsync of the whole request
// (raw-1x) and one per layer (raw-layer). Prints the median GB/s of --rounds rounds per case and its
// ratio to raw-1x. Push, pull and staged results are checked against the source once.
// Exit: 0 measured and verified, 1 failed, 77 fewer than two GPUs.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cxxopts.hpp>

#include "kvf/gpudirect/segment_copier.h"

namespace {

using namespace kvf;
using gpudirect::CopySegment;
using gpudirect::KernelShape;
using gpudirect::SegmentCopier;

constexpr int kExitFailed = 1;
constexpr int kExitSkip = 77;

#define SWEEP_CUDA(call)                                                                         \
  do {                                                                                           \
    if (cudaError_t e = (call); e != cudaSuccess) {                                              \
      std::fprintf(stderr, "kvfabric-gpu-kernel-sweep: %s: %s\n", #call, cudaGetErrorString(e)); \
      std::exit(kExitFailed);                                                                    \
    }                                                                                            \
  } while (0)

void check(const Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "kvfabric-gpu-kernel-sweep: %s: %s\n", what, s.to_string().c_str());
    std::exit(kExitFailed);
  }
}

struct DeviceBuffer {
  int device = 0;
  uint8_t* ptr = nullptr;
  DeviceBuffer(int d, uint64_t bytes) : device(d) {
    SWEEP_CUDA(cudaSetDevice(d));
    SWEEP_CUDA(cudaMalloc(&ptr, bytes));
  }
  ~DeviceBuffer() {
    cudaSetDevice(device);
    cudaFree(ptr);
  }
  uint64_t at(uint64_t offset) const { return reinterpret_cast<uint64_t>(ptr) + offset; }
};

struct Shape {
  uint32_t layers = 32, blocks = 512, block_bytes = 32 << 10;
  uint32_t dst_blocks() const { return blocks * 2; }  // the receiver's pool is larger than the request
  uint64_t layer_bytes() const { return uint64_t{2} * blocks * block_bytes; }
  uint64_t request_bytes() const { return layer_bytes() * layers; }
};

// One layer's segments: K and V blocks of the source (contiguous) into permuted destination blocks.
std::vector<std::vector<CopySegment>> plan(const Shape& shape, const DeviceBuffer& src,
                                           const DeviceBuffer& dst, const std::vector<uint32_t>& perm) {
  std::vector<std::vector<CopySegment>> layers(shape.layers);
  for (uint32_t l = 0; l < shape.layers; ++l) {
    for (uint32_t kv = 0; kv < 2; ++kv) {
      const uint64_t src_base = (uint64_t{l} * 2 + kv) * shape.blocks * shape.block_bytes;
      const uint64_t dst_base = (uint64_t{l} * 2 + kv) * shape.dst_blocks() * shape.block_bytes;
      for (uint32_t b = 0; b < shape.blocks; ++b) {
        layers[l].push_back(CopySegment{src.at(src_base + uint64_t{b} * shape.block_bytes),
                                        dst.at(dst_base + uint64_t{perm[b]} * shape.block_bytes),
                                        shape.block_bytes});
      }
    }
  }
  return layers;
}

// Segments relative to other buffers: `to_staging` gathers a layer into staging (or scatters from it).
std::vector<CopySegment> restage(const std::vector<CopySegment>& layer, uint64_t staging, bool gather,
                                 uint64_t base_of_other) {
  std::vector<CopySegment> out;
  uint64_t offset = 0;
  for (const CopySegment& s : layer) {
    if (gather) {
      out.push_back(CopySegment{s.src, staging + offset, s.bytes});
    } else {
      out.push_back(CopySegment{staging + offset, s.dst + base_of_other, s.bytes});
    }
    offset += s.bytes;
  }
  return out;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void sync_both(int a, int b) {
  SWEEP_CUDA(cudaSetDevice(a));
  SWEEP_CUDA(cudaDeviceSynchronize());
  SWEEP_CUDA(cudaSetDevice(b));
  SWEEP_CUDA(cudaDeviceSynchronize());
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options options("kvfabric-gpu-kernel-sweep", "tunes the GPU->GPU paged copy against the raw link");
  options.add_options()("src-gpu", "source GPU", cxxopts::value<int>()->default_value("0"))            //
      ("dst-gpu", "destination GPU", cxxopts::value<int>()->default_value("1"))                        //
      ("layers", "layers", cxxopts::value<uint32_t>()->default_value("32"))                            //
      ("blocks", "blocks per layer (K and V each)", cxxopts::value<uint32_t>()->default_value("512"))  //
      ("block-bytes", "bytes per block", cxxopts::value<uint32_t>()->default_value("32768"))           //
      ("rounds", "rounds (cases alternate within each)", cxxopts::value<int>()->default_value("5"))    //
      ("iters", "requests per case per round", cxxopts::value<int>()->default_value("5"))              //
      ("quick", "only the default shapes, push/pull/staged")                                           //
      ("h,help", "help");
  const auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::printf("%s\n", options.help().c_str());
    return 0;
  }
  const int a = args["src-gpu"].as<int>(), b = args["dst-gpu"].as<int>();
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count < 2) {
    std::printf("kvfabric-gpu-kernel-sweep: needs two GPUs (found %d), skipped\n", count);
    return kExitSkip;
  }
  Shape shape{args["layers"].as<uint32_t>(), args["blocks"].as<uint32_t>(),
              args["block-bytes"].as<uint32_t>()};
  const int rounds = args["rounds"].as<int>(), iters = args["iters"].as<int>();
  SWEEP_CUDA(cudaSetDevice(a));
  cudaDeviceEnablePeerAccess(b, 0);
  cudaGetLastError();
  SWEEP_CUDA(cudaSetDevice(b));
  cudaDeviceEnablePeerAccess(a, 0);
  cudaGetLastError();

  const uint64_t src_bytes = shape.request_bytes();
  const uint64_t dst_bytes = uint64_t{shape.layers} * 2 * shape.dst_blocks() * shape.block_bytes;
  DeviceBuffer src(a, src_bytes), dst(b, dst_bytes), raw_dst(b, src_bytes);
  DeviceBuffer stage_a(a, 2 * shape.layer_bytes()), stage_b(b, 2 * shape.layer_bytes());
  {
    std::vector<uint8_t> host(src_bytes);
    std::mt19937_64 rng(42);
    for (uint64_t i = 0; i + 8 <= host.size(); i += 8) {
      const uint64_t v = rng();
      std::memcpy(&host[i], &v, 8);
    }
    SWEEP_CUDA(cudaSetDevice(a));
    SWEEP_CUDA(cudaMemcpy(src.ptr, host.data(), src_bytes, cudaMemcpyHostToDevice));
  }
  std::vector<uint32_t> perm(shape.dst_blocks());
  std::iota(perm.begin(), perm.end(), 0u);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(7));
  const auto layers = plan(shape, src, dst, perm);

  auto push = SegmentCopier::create(a);
  auto pull = SegmentCopier::create(b);
  auto gather = SegmentCopier::create(a);
  auto scatter = SegmentCopier::create(b);
  check(push.status(), "copier");
  check(pull.status(), "copier");
  check(gather.status(), "copier");
  check(scatter.status(), "copier");
  cudaStream_t sa, sa2, sb;
  SWEEP_CUDA(cudaSetDevice(a));
  SWEEP_CUDA(cudaStreamCreateWithFlags(&sa, cudaStreamNonBlocking));
  SWEEP_CUDA(cudaStreamCreateWithFlags(&sa2, cudaStreamNonBlocking));
  SWEEP_CUDA(cudaSetDevice(b));
  SWEEP_CUDA(cudaStreamCreateWithFlags(&sb, cudaStreamNonBlocking));
  // Staged: per layer slot s (two slots): gathered[s] on A after the gather, copied[s] after the CE
  // copy, scattered[s] on B after the scatter (the slot is free for the gather two layers on).
  std::vector<cudaEvent_t> gathered(2), copied(2), scattered(2);
  for (int s = 0; s < 2; ++s) {
    SWEEP_CUDA(cudaSetDevice(a));
    SWEEP_CUDA(cudaEventCreateWithFlags(&gathered[s], cudaEventDisableTiming));
    SWEEP_CUDA(cudaEventCreateWithFlags(&copied[s], cudaEventDisableTiming));
    SWEEP_CUDA(cudaSetDevice(b));
    SWEEP_CUDA(cudaEventCreateWithFlags(&scattered[s], cudaEventDisableTiming));
  }
  std::vector<std::vector<CopySegment>> gathers, scatters;
  for (uint32_t l = 0; l < shape.layers; ++l) {
    const uint64_t slot = (l % 2) * shape.layer_bytes();
    gathers.push_back(restage(layers[l], stage_a.at(slot), true, 0));
    scatters.push_back(restage(layers[l], stage_b.at(slot), false, 0));
  }

  using Case = std::pair<std::string, std::function<void()>>;
  std::vector<Case> cases;
  cases.push_back({"raw-1x", [&] {
                     SWEEP_CUDA(cudaSetDevice(a));
                     SWEEP_CUDA(cudaMemcpyPeerAsync(raw_dst.ptr, b, src.ptr, a, src_bytes, sa));
                   }});
  cases.push_back(
      {"raw-layer", [&] {
         SWEEP_CUDA(cudaSetDevice(a));
         for (uint32_t l = 0; l < shape.layers; ++l) {
           const uint64_t off = l * shape.layer_bytes();
           SWEEP_CUDA(cudaMemcpyPeerAsync(raw_dst.ptr + off, b, src.ptr + off, a, shape.layer_bytes(), sa));
         }
       }});
  auto copier_case = [&](SegmentCopier& c, cudaStream_t s, KernelShape k) {
    return [&c, s, k, &layers] {
      check(c.set_kernel_shape(k), "kernel shape");
      for (const auto& l : layers) check(c.copy(l, s), "copy");
    };
  };
  std::vector<KernelShape> shapes;
  if (args.count("quick")) {
    shapes = {KernelShape{}};
  } else {
    for (uint32_t threads : {512u, 256u}) {
      for (uint32_t unroll : {4u, 8u, 16u}) {
        for (uint32_t blocks : {0u, 264u, 132u, 64u, 32u})
          shapes.push_back(KernelShape{blocks, threads, unroll});
      }
    }
  }
  auto name = [](const char* dir, KernelShape k) {
    return std::string(dir) + "-t" + std::to_string(k.threads) + "-u" + std::to_string(k.unroll) + "-b" +
           (k.max_blocks ? std::to_string(k.max_blocks) : std::string("all"));
  };
  for (KernelShape k : shapes) cases.push_back({name("push", k), copier_case(**push, sa, k)});
  for (KernelShape k : {KernelShape{}, KernelShape{0, 512, 8}, KernelShape{0, 256, 16}}) {
    cases.push_back({name("pull", k), copier_case(**pull, sb, k)});
  }
  cases.push_back({"staged", [&] {
                     for (uint32_t l = 0; l < shape.layers; ++l) {
                       const int s = static_cast<int>(l % 2);
                       const uint64_t slot = s * shape.layer_bytes();
                       SWEEP_CUDA(cudaSetDevice(a));
                       if (l >= 2) SWEEP_CUDA(cudaStreamWaitEvent(sa, scattered[s], 0));
                       check((*gather)->copy(gathers[l], sa), "gather");
                       SWEEP_CUDA(cudaEventRecord(gathered[s], sa));
                       SWEEP_CUDA(cudaStreamWaitEvent(sa2, gathered[s], 0));
                       SWEEP_CUDA(cudaMemcpyPeerAsync(stage_b.ptr + slot, b, stage_a.ptr + slot, a,
                                                      shape.layer_bytes(), sa2));
                       SWEEP_CUDA(cudaEventRecord(copied[s], sa2));
                       SWEEP_CUDA(cudaSetDevice(b));
                       SWEEP_CUDA(cudaStreamWaitEvent(sb, copied[s], 0));
                       check((*scatter)->copy(scatters[l], sb), "scatter");
                       SWEEP_CUDA(cudaEventRecord(scattered[s], sb));
                     }
                   }});

  // Verification: each copier case once, destination poisoned first.
  auto verify = [&](const Case& c) {
    SWEEP_CUDA(cudaSetDevice(b));
    SWEEP_CUDA(cudaMemset(dst.ptr, 0xA5, dst_bytes));
    sync_both(a, b);
    c.second();
    sync_both(a, b);
    std::vector<uint8_t> s_host(src_bytes), d_host(dst_bytes);
    SWEEP_CUDA(cudaMemcpy(s_host.data(), src.ptr, src_bytes, cudaMemcpyDeviceToHost));
    SWEEP_CUDA(cudaMemcpy(d_host.data(), dst.ptr, dst_bytes, cudaMemcpyDeviceToHost));
    for (const auto& l : layers) {
      for (const CopySegment& seg : l) {
        if (std::memcmp(&s_host[seg.src - src.at(0)], &d_host[seg.dst - dst.at(0)], seg.bytes) != 0) {
          std::fprintf(stderr, "kvfabric-gpu-kernel-sweep: %s: bytes differ\n", c.first.c_str());
          std::exit(kExitFailed);
        }
      }
    }
    std::printf("verified: %s\n", c.first.c_str());
  };
  for (const Case& c : cases) {
    if (c.first.rfind("raw", 0) != 0 &&
        (c.first == "staged" || c.first.find("-t512-u4-ball") != std::string::npos)) {
      verify(c);
    }
  }

  std::map<std::string, std::vector<double>> gbps;
  for (int r = 0; r < rounds; ++r) {
    for (size_t i = 0; i < cases.size(); ++i) {
      // Alternate the order each round so drift does not favour one side.
      const Case& c = cases[r % 2 ? cases.size() - 1 - i : i];
      c.second();  // warm-up
      sync_both(a, b);
      const double t0 = now_s();
      for (int it = 0; it < iters; ++it) c.second();
      sync_both(a, b);
      gbps[c.first].push_back(double(src_bytes) * iters / (now_s() - t0) / 1e9);
    }
    std::fprintf(stderr, "kernel-sweep: round %d/%d\n", r + 1, rounds);
  }
  const double raw = median(gbps["raw-1x"]);
  std::printf("%-26s %10s %8s\n", "case", "GB/s", "ratio");
  for (const Case& c : cases) {
    const double m = median(gbps[c.first]);
    std::printf("%-26s %10.1f %8.3f\n", c.first.c_str(), m, m / raw);
  }
  return 0;
}
