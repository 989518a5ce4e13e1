#include "local_copy_run.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>

#include <nlohmann/json.hpp>

#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/cuda_probe.h"
#include "kvf/gpudirect/paged_copy.h"
#include "kvf/gpudirect/segment_copier.h"
#include "kvf/protocol/kv_layout.h"
#include "perf_util.h"

namespace kvf::perf {
namespace {

int fail(const std::string& message, int code = 1) {
  std::fprintf(stderr, "kvfabric-perf local: %s\n", message.c_str());
  return code;
}

void fill_random(std::vector<uint8_t>& v, uint64_t seed) {
  std::mt19937_64 rng(seed);
  size_t words = v.size() / 8;
  for (size_t i = 0; i < words; ++i) {
    uint64_t x = rng();
    std::memcpy(v.data() + i * 8, &x, 8);
  }
  for (size_t i = words * 8; i < v.size(); ++i) v[i] = static_cast<uint8_t>(rng());
}

}  // namespace

int run_local_copy(const cxxopts::ParseResult& args) {
  const std::string mode = args["mode"].as<std::string>();
  if (mode != "gather" && mode != "scatter")
    return fail("--mode must be gather or scatter, got '" + mode + "'", 2);
  const std::string mem = args["mem"].as<std::string>();
  if (mem.rfind("cuda:", 0) != 0) return fail("local copies move GPU blocks: say --mem cuda:N", 2);
  const int device = std::atoi(mem.c_str() + 5);
  if (gpudirect::cuda_availability().device_count <= device) {
    return fail("no GPU " + std::to_string(device) + " (" + gpudirect::cuda_availability().reason + ")", 2);
  }
  const std::string copy_method = args["copy"].as<std::string>();
  if (copy_method != "auto" && copy_method != "kernel" && copy_method != "ce" && copy_method != "ce1")
    return fail("--copy must be auto, kernel, ce or ce1", 2);
  auto layout = layers_layout(args["layers"].as<uint32_t>(), args["blocks"].as<uint32_t>(),
                              args["block-bytes"].as<std::string>());
  if (!layout.ok()) return fail(layout.status().message(), 2);
  const protocol::KvLayoutDesc& desc = layout->desc();
  const uint64_t block_bytes = layout->part_bytes();
  const uint64_t layer_bytes = layout->layer_bytes();
  const uint64_t total = layer_bytes * desc.num_layers;

  auto gpu = gpudirect::DeviceBuffer::allocate(device, total);
  if (!gpu.ok()) return fail(gpu.status().to_string());
  auto pinned = gpudirect::PinnedBuffer::allocate(total);
  if (!pinned.ok()) return fail(pinned.status().to_string());
  auto stream = gpudirect::CudaStream::create(device);
  if (!stream.ok()) return fail(stream.status().to_string());
  auto copier = gpudirect::SegmentCopier::create(device);
  if (!copier.ok()) return fail(copier.status().to_string());

  // The request's blocks, in the order the engine's block table lists them.
  std::vector<uint32_t> blocks(desc.num_blocks);
  std::iota(blocks.begin(), blocks.end(), 0u);
  if (args["shuffle"].as<bool>()) std::shuffle(blocks.begin(), blocks.end(), std::mt19937_64(7));

  auto segments_for = [&](uint64_t paged_base, uint64_t staging) {
    std::vector<uint64_t> bases(desc.num_layers);
    for (uint32_t l = 0; l < desc.num_layers; ++l) bases[l] = paged_base + l * layer_bytes;
    return mode == "gather"
               ? gpudirect::gather_segments(layout.value(), bases, blocks, 0, desc.num_layers, staging, total)
               : gpudirect::scatter_segments(layout.value(), bases, blocks, 0, desc.num_layers, staging,
                                             total);
  };
  auto segments =
      segments_for(reinterpret_cast<uint64_t>(gpu->data()), reinterpret_cast<uint64_t>(pinned->data()));
  if (!segments.ok()) return fail(segments.status().to_string());
  const bool use_ce = copy_method == "ce" || copy_method == "ce1";
  auto run_once = [&]() -> Status {
    return use_ce ? copier.value()->copy_with_copy_engines(segments.value(), stream->handle(),
                                                           copy_method == "ce")
                  : copier.value()->copy(segments.value(), stream->handle());
  };

  std::printf("local %s: %u layers x %u blocks x 2 x %llu bytes = %.1f MiB, GPU %d %s pinned host, %s, %s\n",
              mode.c_str(), desc.num_layers, desc.num_blocks, static_cast<unsigned long long>(block_bytes),
              static_cast<double>(total) / (1 << 20), device, mode == "gather" ? "->" : "<-",
              args["shuffle"].as<bool>() ? "shuffled blocks" : "blocks in order",
              use_ce ? "copy engines" : "copy kernel");

  // Random data at the source, poison at the destination; then one copy, checked against the CPU
  // version of the same segments run on host mirrors.
  std::vector<uint8_t> source(total), expected(total, 0xA5), got(total);
  fill_random(source, 0x5eed + total);
  void* src_ptr = mode == "gather" ? gpu->data() : pinned->data();
  void* dst_ptr = mode == "gather" ? pinned->data() : gpu->data();
  if (Status s = gpudirect::copy_sync(src_ptr, source.data(), total); !s.ok()) return fail(s.to_string());
  if (mode == "gather") {
    std::memset(pinned->data(), 0xA5, total);
  } else if (Status s = gpudirect::fill_device(gpu->data(), 0xA5, total); !s.ok()) {
    return fail(s.to_string());
  }
  if (Status s = run_once(); !s.ok()) return fail(s.to_string());
  if (Status s = stream->synchronize(); !s.ok()) return fail(s.to_string());
  if (args["verify"].as<bool>()) {
    auto host_segments = mode == "gather" ? segments_for(reinterpret_cast<uint64_t>(source.data()),
                                                         reinterpret_cast<uint64_t>(expected.data()))
                                          : segments_for(reinterpret_cast<uint64_t>(expected.data()),
                                                         reinterpret_cast<uint64_t>(source.data()));
    if (!host_segments.ok()) return fail(host_segments.status().to_string());
    gpudirect::copy_segments_cpu(host_segments.value());
    if (Status s = gpudirect::copy_sync(got.data(), dst_ptr, total); !s.ok()) return fail(s.to_string());
    auto bad = std::mismatch(got.begin(), got.end(), expected.begin());
    if (bad.first != got.end()) {
      return fail("VERIFY FAILED: first wrong byte at offset " + std::to_string(bad.first - got.begin()) +
                  " of the destination");
    }
    std::printf("every byte verified (%llu bytes, random source, poisoned destination)\n",
                static_cast<unsigned long long>(total));
  }

  auto start = gpudirect::CudaEvent::create(device, true);
  auto stop = gpudirect::CudaEvent::create(device, true);
  if (!start.ok() || !stop.ok()) return fail("cannot create CUDA events");
  uint64_t iters = args["iters"].as<uint64_t>();
  if (iters == 0) iters = 20;
  std::vector<double> micros;
  for (uint64_t i = 0; i < iters + 2; ++i) {  // two warm-up copies
    if (Status s = start->record(stream->handle()); !s.ok()) return fail(s.to_string());
    if (Status s = run_once(); !s.ok()) return fail(s.to_string());
    if (Status s = stop->record(stream->handle()); !s.ok()) return fail(s.to_string());
    if (Status s = stop->synchronize(); !s.ok()) return fail(s.to_string());
    auto ms = stop->elapsed_ms_since(start.value());
    if (!ms.ok()) return fail(ms.status().to_string());
    if (i >= 2) micros.push_back(static_cast<double>(ms.value()) * 1000.0);
  }
  double p50 = percentile(micros, 50), p99 = percentile(micros, 99);
  double seconds = std::accumulate(micros.begin(), micros.end(), 0.0) / 1e6;
  // As the anchors report it: all bytes over all timed copies.
  double gbps = static_cast<double>(total) * static_cast<double>(iters) / seconds / 1e9;
  std::printf("%-8s %12s %8s %10s %10s %10s\n%-8s %12llu %8llu %10.2f %10.1f %10.1f\n", "mode", "bytes",
              "iters", "GB/s", "p50_us", "p99_us", mode.c_str(), static_cast<unsigned long long>(total),
              static_cast<unsigned long long>(iters), gbps, p50, p99);
  if (args.count("json") != 0) {
    nlohmann::json j;
    j["results"] = nlohmann::json::array({{{"mode", mode},
                                           {"bytes", total},
                                           {"iters", iters},
                                           {"seconds", seconds},
                                           {"gbps", gbps},
                                           {"p50_us", p50},
                                           {"p99_us", p99}}});
    if (Status s = perf::write_json_file(args["json"].as<std::string>(), j); !s.ok())
      return fail(s.message());
  }
  return 0;
}

}  // namespace kvf::perf
