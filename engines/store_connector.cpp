#include "kvf/engines/store_connector.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <thread>

#include "gpu_store_path.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/cuda_probe.h"

namespace kvf::engines {

namespace {

// The index of the first chunk whose bytes do not hash to its recorded checksum, or none. A long
// prefix is gigabytes (16k tokens of Llama-3-8B: 2 GiB), more than one core hashes in the time the
// copies take, so the chunks are checked on several threads at once (memory bandwidth, not one
// core, is then the limit).
std::optional<size_t> first_bad_chunk(std::span<const uint8_t* const> chunks,
                                      std::span<const uint64_t> expected, uint64_t chunk_bytes) {
  const size_t n = chunks.size();
  std::vector<char> bad(n, 0);
  const size_t threads = std::min<size_t>({n, std::max(1u, std::thread::hardware_concurrency()), size_t{8}});
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t c = next++; c < n; c = next++)
      bad[c] = store::chunk_checksum(chunks[c], chunk_bytes) != expected[c] ? 1 : 0;
  };
  std::vector<std::thread> helpers;
  for (size_t t = 1; t < threads; ++t) helpers.emplace_back(work);
  work();
  for (std::thread& t : helpers) t.join();
  for (size_t c = 0; c < n; ++c)
    if (bad[c] != 0) return c;
  return std::nullopt;
}

}  // namespace
namespace {

uint64_t address(const void* p) {
  return reinterpret_cast<uint64_t>(p);
}

// Where the layer buffers are: -1 for host memory, else the GPU holding all of them. Checks that
// each GPU buffer is one allocation at least a layer long, so no kernel can fault on them.
Result<int> layers_device(const std::vector<uint8_t*>& layers, LayerMemory memory, uint64_t layer_bytes) {
  if (memory == LayerMemory::kHost) return -1;
  if (memory == LayerMemory::kAuto) {
    size_t on_gpu = 0;
    for (const uint8_t* l : layers) on_gpu += gpudirect::pointer_is_device(l) ? 1 : 0;
    if (on_gpu == 0) return -1;
    if (on_gpu != layers.size()) {
      return Status(ErrorCode::kInvalidArgument, std::to_string(on_gpu) + " of " +
                                                     std::to_string(layers.size()) +
                                                     " layer buffers are GPU memory: they must all be host "
                                                     "memory or all be memory of one GPU");
    }
  }
  const gpudirect::CudaAvailability& cuda = gpudirect::cuda_availability();
  if (cuda.device_count == 0) {
    return Status(ErrorCode::kUnavailable,
                  "the layer buffers are GPU memory, but CUDA is not available here: " + cuda.reason);
  }
  int device = -1;
  for (size_t l = 0; l < layers.size(); ++l) {
    auto alloc = gpudirect::device_allocation_of(layers[l]);
    if (!alloc.ok()) {
      return Status(alloc.status().code(), "layer buffer " + std::to_string(l) +
                                               " was declared GPU memory: " + alloc.status().message());
    }
    if (device >= 0 && alloc->device != device) {
      return Status(ErrorCode::kInvalidArgument, "layer buffer " + std::to_string(l) + " is on GPU " +
                                                     std::to_string(alloc->device) + ", layer 0 on GPU " +
                                                     std::to_string(device) + ": one GPU per connector");
    }
    device = alloc->device;
    const uint64_t offset = address(layers[l]) - alloc->base;
    if (offset > alloc->bytes || layer_bytes > alloc->bytes - offset) {
      return Status(ErrorCode::kInvalidArgument,
                    "layer buffer " + std::to_string(l) + " lies in a " + std::to_string(alloc->bytes) +
                        "-byte allocation at offset " + std::to_string(offset) + ": too short for a " +
                        std::to_string(layer_bytes) + "-byte layer");
    }
  }
  return device;
}

}  // namespace

Result<StoreConnector> StoreConnector::create(store::StoreClient& client, StoreConnectorOptions options,
                                              std::vector<uint8_t*> layers) {
  auto layout = protocol::KvLayout::create(options.layout);
  if (!layout.ok()) return layout.status();
  if (layers.size() != options.layout.num_layers) {
    return Status(ErrorCode::kInvalidArgument, std::to_string(layers.size()) +
                                                   " layer buffers for a layout of " +
                                                   std::to_string(options.layout.num_layers) + " layers");
  }
  if (options.chunk_tokens == 0 || options.chunk_tokens % options.layout.block_tokens != 0) {
    return Status(ErrorCode::kInvalidArgument,
                  "chunk_tokens " + std::to_string(options.chunk_tokens) + " is not a whole number of " +
                      std::to_string(options.layout.block_tokens) + "-token blocks");
  }
  for (size_t l = 0; l < layers.size(); ++l) {
    if (layers[l] == nullptr) {
      return Status(ErrorCode::kInvalidArgument, "layer buffer " + std::to_string(l) + " is null");
    }
  }
  auto device = layers_device(layers, options.memory, layout->layer_bytes());
  if (!device.ok()) return device.status();
  std::unique_ptr<GpuStorePath> gpu;
  if (device.value() >= 0) {
    auto path = GpuStorePath::create(device.value(), options.layout.num_layers);
    if (!path.ok()) {
      return Status(path.status().code(), "the store connector's GPU path on GPU " +
                                              std::to_string(device.value()) + ": " +
                                              path.status().message());
    }
    gpu = std::move(path.value());
  }
  return StoreConnector(client, std::move(options), std::move(layout.value()), std::move(layers),
                        std::move(gpu));
}

StoreConnector::StoreConnector(store::StoreClient& client, StoreConnectorOptions options,
                               protocol::KvLayout layout, std::vector<uint8_t*> layers,
                               std::unique_ptr<GpuStorePath> gpu)
    : client_(&client),
      options_(std::move(options)),
      layout_(std::move(layout)),
      hasher_(protocol::model_fingerprint(options_.model, options_.layout), options_.chunk_tokens),
      layers_(std::move(layers)),
      gpu_(std::move(gpu)) {}

StoreConnector::StoreConnector(StoreConnector&&) noexcept = default;
StoreConnector& StoreConnector::operator=(StoreConnector&&) noexcept = default;
StoreConnector::~StoreConnector() = default;

int StoreConnector::device() const {
  return gpu_ ? gpu_->device() : -1;
}

uint32_t StoreConnector::blocks_per_chunk() const {
  return options_.chunk_tokens / options_.layout.block_tokens;
}

uint64_t StoreConnector::chunk_bytes() const {
  return uint64_t{options_.layout.num_layers} * blocks_per_chunk() * layout_.parts() * layout_.part_bytes();
}

Status StoreConnector::check_table(std::span<const uint32_t> block_table, uint32_t chunks) const {
  const uint64_t need = uint64_t{chunks} * blocks_per_chunk();
  if (block_table.size() < need) {
    return Status(ErrorCode::kInvalidArgument, "block table of " + std::to_string(block_table.size()) +
                                                   " blocks for " + std::to_string(chunks) + " chunks (" +
                                                   std::to_string(need) + " blocks)");
  }
  for (uint64_t i = 0; i < need; ++i) {
    if (block_table[i] >= options_.layout.num_blocks) {
      return Status(ErrorCode::kInvalidArgument,
                    "block_table[" + std::to_string(i) + "] = " + std::to_string(block_table[i]) +
                        " is outside the " + std::to_string(options_.layout.num_blocks) + "-block pool");
    }
  }
  return Status::Ok();
}

void StoreConnector::layer_segments(uint32_t chunk, uint32_t layer, std::span<const uint32_t> block_table,
                                    uint64_t chunk_base, bool to_store,
                                    std::vector<gpudirect::CopySegment>& out) const {
  const uint64_t part = layout_.part_bytes();
  const uint32_t parts = layout_.parts();
  // A chunk is [layer][block of the chunk][part]: each layer's blocks' parts in layout order.
  uint64_t at = chunk_base + uint64_t{layer} * blocks_per_chunk() * parts * part;
  const uint64_t engine_base = address(layers_[layer]);
  for (uint32_t b = 0; b < blocks_per_chunk(); ++b) {
    const uint32_t block = block_table[uint64_t{chunk} * blocks_per_chunk() + b];
    for (uint32_t p = 0; p < parts; ++p) {
      const protocol::ByteExtent e = layout_.extent(block, static_cast<protocol::KvPart>(p));
      const uint64_t engine = engine_base + e.offset;
      const uint64_t src = to_store ? engine : at;
      const uint64_t dst = to_store ? at : engine;
      // Adjacent blocks in both places become one segment (fewer, longer copies).
      if (!out.empty() && out.back().src + out.back().bytes == src &&
          out.back().dst + out.back().bytes == dst) {
        out.back().bytes += e.length;
      } else {
        out.push_back(gpudirect::CopySegment{src, dst, e.length});
      }
      at += e.length;
    }
  }
}

Status StoreConnector::store_chunk(uint32_t chunk, std::span<const uint32_t> block_table,
                                   std::span<uint8_t> chunk_bytes) {
  std::vector<gpudirect::CopySegment> segments;
  if (!gpu_) {
    for (uint32_t l = 0; l < options_.layout.num_layers; ++l) {
      layer_segments(chunk, l, block_table, address(chunk_bytes.data()), true, segments);
    }
    gpudirect::copy_segments_cpu(segments);
    return Status::Ok();
  }
  if (Status s = gpu_->pin(client_->arena(), chunk_bytes.data(), chunk_bytes.size()); !s.ok()) return s;
  const uint64_t base = gpu_->device_address(chunk_bytes.data());
  for (uint32_t l = 0; l < options_.layout.num_layers; ++l)
    layer_segments(chunk, l, block_table, base, true, segments);
  const Status launched = gpu_->launch(segments);
  // Always waited for, also after a failed launch: the caller aborts the reservation on error, and
  // no kernel may still write into bytes the store then hands to someone else.
  const Status done = gpu_->synchronize();
  return launched.ok() ? done : launched;
}

Result<uint64_t> StoreConnector::lookup(std::span<const uint32_t> tokens) {
  const std::vector<protocol::ChunkKey> keys = hasher_.hash(tokens);
  if (keys.empty()) return uint64_t{0};
  auto matched = client_->lookup(keys);
  if (!matched.ok()) return matched.status();
  return static_cast<uint64_t>(matched.value()) * options_.chunk_tokens;
}

Result<StoreResult> StoreConnector::store(std::span<const uint32_t> tokens,
                                          std::span<const uint32_t> block_table) {
  const std::vector<protocol::ChunkKey> keys = hasher_.hash(tokens);
  const uint32_t chunks =
      static_cast<uint32_t>(std::min<uint64_t>(keys.size(), block_table.size() / blocks_per_chunk()));
  if (Status s = check_table(block_table, chunks); !s.ok()) return s;
  StoreResult result;
  for (uint32_t c = 0; c < chunks; ++c) {
    auto r = client_->reserve(keys[c], chunk_bytes(), hasher_.model());
    if (!r.ok()) {
      if (r.status().code() == ErrorCode::kAborted) {  // stored (or being stored) by someone
        ++result.already_stored;
        continue;
      }
      return Status(r.status().code(), "storing chunk " + std::to_string(c) + ": " + r.status().message());
    }
    std::span<uint8_t> dst = client_->bytes(r.value());
    if (dst.size() != chunk_bytes()) {
      (void)client_->abort(r.value());
      return Status(ErrorCode::kPeerLost,
                    "storing chunk " + std::to_string(c) +
                        ": the reservation belongs to an older connection to the daemon");
    }
    if (Status s = store_chunk(c, block_table, dst); !s.ok()) {
      (void)client_->abort(r.value());
      return Status(s.code(), "storing chunk " + std::to_string(c) + ": " + s.message());
    }
    if (Status s = client_->commit(r.value()); !s.ok()) {
      return Status(s.code(), "committing chunk " + std::to_string(c) + ": " + s.message());
    }
    ++result.stored;
    result.bytes += chunk_bytes();
  }
  return result;
}

Result<LoadResult> StoreConnector::load(std::span<const uint32_t> tokens,
                                        std::span<const uint32_t> block_table, uint32_t max_chunks) {
  return load_layers(tokens, block_table, nullptr, max_chunks);
}

Result<LoadResult> StoreConnector::load_layers(std::span<const uint32_t> tokens,
                                               std::span<const uint32_t> block_table,
                                               const std::function<void(uint32_t)>& on_layer,
                                               uint32_t max_chunks) {
  std::vector<protocol::ChunkKey> keys = hasher_.hash(tokens);
  keys.resize(std::min<size_t>({keys.size(), max_chunks, block_table.size() / blocks_per_chunk()}));
  LoadResult result;
  if (keys.empty()) return result;
  // Leases on the whole prefix first: from then on no chunk of it can be evicted or rewritten.
  std::vector<store::ClientLease> leases;
  std::vector<const uint8_t*> chunk_data;  // each lease's bytes in the mapped arena
  auto release_all = [&] {
    for (const auto& l : leases) (void)client_->release(l);
  };
  for (const auto& key : keys) {
    auto lease = client_->acquire(key);
    if (!lease.ok()) {
      if (lease.status().code() == ErrorCode::kNotFound) break;  // the stored prefix ends here
      release_all();
      return lease.status();
    }
    std::span<const uint8_t> bytes = client_->bytes(lease.value());
    if (bytes.size() != chunk_bytes()) {
      (void)client_->release(lease.value());
      release_all();
      return Status(ErrorCode::kMalformed, "chunk " + std::to_string(leases.size()) + " holds " +
                                               std::to_string(bytes.size()) + " bytes, " +
                                               std::to_string(chunk_bytes()) +
                                               " expected (stored with another layout or chunk size?)");
    }
    leases.push_back(lease.value());
    chunk_data.push_back(bytes.data());
  }
  const uint32_t chunks = static_cast<uint32_t>(leases.size());
  if (options_.verify_loads) {
    std::vector<uint64_t> expected;
    for (const auto& l : leases) expected.push_back(l.lease.checksum);
    if (auto bad = first_bad_chunk(chunk_data, expected, chunk_bytes()); bad.has_value()) {
      release_all();
      return Status(
          ErrorCode::kVerifyFailed,
          "chunk " + std::to_string(*bad) + " does not match its checksum in the store; nothing loaded");
    }
  }
  if (Status s = check_table(block_table, chunks); !s.ok()) {
    release_all();
    return s;
  }
  const Status copied = gpu_ ? load_chunks_gpu(block_table, chunk_data, on_layer)
                             : load_chunks(block_table, chunk_data, on_layer);
  release_all();
  if (!copied.ok()) return copied;
  result.chunks = chunks;
  result.tokens = uint64_t{chunks} * options_.chunk_tokens;
  result.bytes = uint64_t{chunks} * chunk_bytes();
  return result;
}

Status StoreConnector::load_chunks(std::span<const uint32_t> block_table,
                                   std::span<const uint8_t* const> chunks,
                                   const std::function<void(uint32_t)>& on_layer) {
  std::vector<gpudirect::CopySegment> segments;
  for (uint32_t l = 0; l < options_.layout.num_layers; ++l) {
    segments.clear();
    for (uint32_t c = 0; c < chunks.size(); ++c) {
      layer_segments(c, l, block_table, address(chunks[c]), false, segments);
    }
    gpudirect::copy_segments_cpu(segments);
    if (on_layer) on_layer(l);
  }
  return Status::Ok();
}

Status StoreConnector::load_chunks_gpu(std::span<const uint32_t> block_table,
                                       std::span<const uint8_t* const> chunks,
                                       const std::function<void(uint32_t)>& on_layer) {
  // The kernel copies all segments of a launch in parallel: two chunks' pieces landing in one
  // block would race (on the CPU the later one wins), so a repeated block is refused.
  const uint64_t blocks = uint64_t{static_cast<uint32_t>(chunks.size())} * blocks_per_chunk();
  std::vector<bool> seen(options_.layout.num_blocks, false);
  for (uint64_t i = 0; i < blocks; ++i) {
    if (seen[block_table[i]]) {
      return Status(ErrorCode::kInvalidArgument, "block " + std::to_string(block_table[i]) +
                                                     " appears twice among the " + std::to_string(blocks) +
                                                     " blocks to load");
    }
    seen[block_table[i]] = true;
  }
  // Every leased chunk lies in the client's current arena; one registration covers them all.
  if (Status s = gpu_->pin(client_->arena(), chunks[0], chunk_bytes()); !s.ok()) return s;
  for (const uint8_t* chunk : chunks) {
    if (!gpu_->pinned(chunk, chunk_bytes())) {
      return Status(ErrorCode::kPeerLost,
                    "the leased chunks lie in two arenas (the store client reconnected)");
    }
  }
  const uint32_t layers = options_.layout.num_layers;
  std::vector<gpudirect::CopySegment> segments;
  uint32_t reported = 0;
  // Reports, in order, the layers whose copies have finished; waits for them only when `wait`.
  auto report = [&](uint32_t up_to, bool wait) -> Status {
    while (reported < up_to) {
      if (wait) {
        if (Status s = gpu_->wait_layer(reported); !s.ok()) return s;
      } else {
        auto done = gpu_->layer_done(reported);
        if (!done.ok()) return done.status();
        if (!done.value()) break;
      }
      on_layer(reported++);
    }
    return Status::Ok();
  };
  Status failed;
  for (uint32_t l = 0; l < layers && failed.ok(); ++l) {
    segments.clear();
    for (uint32_t c = 0; c < chunks.size(); ++c) {
      layer_segments(c, l, block_table, gpu_->device_address(chunks[c]), false, segments);
    }
    failed = gpu_->launch(segments);
    if (failed.ok() && on_layer) failed = gpu_->mark_layer(l);
    // Layers already in place are reported while later ones are still being launched.
    if (failed.ok() && on_layer) failed = report(l + 1, false);
  }
  if (failed.ok() && on_layer) failed = report(layers, true);
  // Always waited for, also after a failure: the leases are released next, and no kernel may
  // read bytes the store then hands to a writer.
  const Status done = gpu_->synchronize();
  return failed.ok() ? done : failed;
}

}  // namespace kvf::engines
