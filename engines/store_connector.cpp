#include "kvf/engines/store_connector.h"

#include <algorithm>
#include <cstring>
#include <optional>

#include "gpu_store_path.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/cuda_probe.h"
#include "kvf/gpudirect/kv_codec.h"
#include "kvf/gpudirect/kv_codec_cuda.h"
#include "kvf/store/chunk_checksum.h"
#include "kvf/store/parallel_for.h"

namespace kvf::engines {

namespace {

// The index of the first chunk whose bytes do not hash to its recorded checksum, or none. A long
// prefix is gigabytes (16k tokens of Llama-3-8B: 2 GiB), more than one core hashes in the time the
// copies take, so the chunks are checked on the worker pool, each chunk's segments too (a short
// prefix's few chunks then still use every thread).
std::optional<size_t> first_bad_chunk(std::span<const uint8_t* const> chunks,
                                      std::span<const uint64_t> expected, std::span<const uint64_t> lengths) {
  const size_t n = chunks.size();
  std::vector<char> bad(n, 0);
  store::parallel_for(n, [&](size_t c) {
    bad[c] = store::chunk_checksum_parallel(chunks[c], lengths[c]) != expected[c] ? 1 : 0;
  });
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

Status StoreConnector::begin_store_chunk(uint32_t chunk, std::span<const uint32_t> block_table,
                                         std::span<uint8_t> chunk_bytes, uint32_t slot) {
  std::vector<gpudirect::CopySegment> segments;
  if (!gpu_) {
    for (uint32_t l = 0; l < options_.layout.num_layers; ++l) {
      layer_segments(chunk, l, block_table, address(chunk_bytes.data()), true, segments);
    }
    gpudirect::copy_segments_cpu(segments);
    return Status::Ok();
  }
  if (!gpu_->pinned(chunk_bytes.data(), chunk_bytes.size())) {
    // A new registration replaces the old one: no copy may still use it.
    if (Status s = gpu_->synchronize(); !s.ok()) return s;
    if (Status s = gpu_->pin(client_->arena(), chunk_bytes.data(), chunk_bytes.size()); !s.ok()) return s;
  }
  const uint64_t base = gpu_->device_address(chunk_bytes.data());
  for (uint32_t l = 0; l < options_.layout.num_layers; ++l)
    layer_segments(chunk, l, block_table, base, true, segments);
  if (Status s = gpu_->launch(segments); !s.ok()) return s;
  return gpu_->mark_chunk(slot);
}

Status StoreConnector::finish_store_chunk(uint32_t slot) const {
  return gpu_ ? gpu_->wait_chunk(slot) : Status::Ok();
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
  // Chunk c's copy runs (on the GPU) while chunk c-1 is committed (the daemon hashes it): one chunk
  // is written but not committed at a time, in `pending`, and each commit waits for its own copy.
  struct Written {
    uint32_t chunk = 0;
    store::ClientReservation reservation;
    uint32_t slot = 0;
  };
  std::optional<Written> pending;
  StoreResult result;
  // On an error: no copy may still write into a reservation that is given back (aborted), then
  // every reservation not committed is.
  auto fail = [&](Status why, std::optional<Written> current) -> Status {
    if (gpu_) (void)gpu_->synchronize();
    if (pending) (void)client_->abort(pending->reservation);
    if (current) (void)client_->abort(current->reservation);
    return why;
  };
  // Commits `pending` once its copy has finished. A failed copy leaves it pending (fail() aborts it);
  // from the commit on the daemon decides its fate.
  auto commit_pending = [&]() -> Status {
    const Written w = *pending;
    if (Status s = finish_store_chunk(w.slot); !s.ok()) {
      return Status(s.code(), "storing chunk " + std::to_string(w.chunk) + ": " + s.message());
    }
    pending.reset();
    if (Status s = client_->commit(w.reservation); !s.ok()) {
      return Status(s.code(), "committing chunk " + std::to_string(w.chunk) + ": " + s.message());
    }
    ++result.stored;
    result.bytes += chunk_bytes();
    return Status::Ok();
  };
  for (uint32_t c = 0; c < chunks; ++c) {
    auto r = client_->reserve(keys[c], chunk_bytes(), hasher_.model());
    if (!r.ok() && r.status().code() == ErrorCode::kOutOfMemory && pending) {
      // The pending chunk cannot be evicted before its commit, and an arena with room for one chunk
      // needs it to be: commit it, then ask again.
      if (Status s = commit_pending(); !s.ok()) return fail(s, std::nullopt);
      r = client_->reserve(keys[c], chunk_bytes(), hasher_.model());
    }
    if (!r.ok()) {
      if (r.status().code() == ErrorCode::kAborted) {  // stored (or being stored) by someone
        ++result.already_stored;
        continue;
      }
      // The chunks before this one are whole: the one still pending is committed, as they were.
      const Status why(r.status().code(), "storing chunk " + std::to_string(c) + ": " + r.status().message());
      if (pending) {
        if (Status s = commit_pending(); !s.ok()) return fail(s, std::nullopt);
      }
      return why;
    }
    const Written current{c, r.value(), pending ? 1 - pending->slot : 0};
    std::span<uint8_t> dst = client_->bytes(current.reservation);
    if (dst.size() != chunk_bytes()) {
      return fail(
          Status(ErrorCode::kPeerLost, "storing chunk " + std::to_string(c) +
                                           ": the reservation belongs to an older connection to the daemon"),
          current);
    }
    if (Status s = begin_store_chunk(c, block_table, dst, current.slot); !s.ok()) {
      return fail(Status(s.code(), "storing chunk " + std::to_string(c) + ": " + s.message()), current);
    }
    if (pending) {
      if (Status s = commit_pending(); !s.ok()) return fail(s, current);
    }
    pending = current;
  }
  if (pending) {
    if (Status s = commit_pending(); !s.ok()) return fail(s, std::nullopt);
  }
  return result;
}

protocol::KvChunkGeometry StoreConnector::chunk_geometry() const {
  const protocol::KvLayoutDesc& d = options_.layout;
  return protocol::KvChunkGeometry{d.num_layers,   layout_.parts(),         blocks_per_chunk(),
                                   d.block_tokens, d.kv_heads * d.head_dim, d.dtype_bytes};
}

Status StoreConnector::check_stored_chunk(size_t index, std::span<const uint8_t> bytes,
                                          protocol::KvCodec codec) const {
  if (codec == protocol::KvCodec::kIdentity) {
    if (bytes.size() == chunk_bytes()) return Status::Ok();
    return Status(ErrorCode::kMalformed, "chunk " + std::to_string(index) + " holds " +
                                             std::to_string(bytes.size()) + " bytes, " +
                                             std::to_string(chunk_bytes()) +
                                             " expected (stored with another layout or chunk size?)");
  }
  // An encoded chunk says what it holds: it must be this engine's chunk shape, in the codec the
  // store recorded. The decoder checks the rest.
  auto header = protocol::read_chunk_header(bytes);
  if (!header.ok()) {
    return Status(header.status().code(),
                  "chunk " + std::to_string(index) + ": " + header.status().message());
  }
  if (header->params.codec != codec) {
    return Status(ErrorCode::kMalformed, "chunk " + std::to_string(index) + " is recorded as " +
                                             std::string(protocol::codec_name(codec)) +
                                             " but its bytes say " +
                                             std::string(protocol::codec_name(header->params.codec)));
  }
  if (!(header->geometry == chunk_geometry())) {
    return Status(ErrorCode::kMalformed,
                  "chunk " + std::to_string(index) +
                      " was encoded for another chunk shape (model layout or chunk size)");
  }
  return Status::Ok();
}

Status StoreConnector::decode_chunks(std::vector<const uint8_t*>& chunks,
                                     std::span<const uint64_t> stored_bytes,
                                     std::span<const protocol::KvCodec> codecs) {
  decoded_range_ = {};
  std::vector<size_t> encoded;
  for (size_t c = 0; c < chunks.size(); ++c) {
    // On the GPU path fixed-rate chunks are decoded by the GPU, fused with the scatter.
    if (codecs[c] == protocol::KvCodec::kIdentity || (gpu_ && protocol::codec_is_fixed_rate(codecs[c])))
      continue;
    encoded.push_back(c);
  }
  if (encoded.empty()) return Status::Ok();
  const uint64_t need = encoded.size() * chunk_bytes();
  uint8_t* scratch = nullptr;
  if (gpu_) {
    // The copy kernels read decoded chunks from mapped pinned memory, as they read the arena.
    if (!decode_pinned_ || decode_pinned_->size() < need) {
      decode_pinned_.reset();
      auto allocated = gpudirect::PinnedBuffer::allocate(need);
      if (!allocated.ok()) return allocated.status();
      decode_pinned_.emplace(std::move(allocated.value()));
    }
    scratch = static_cast<uint8_t*>(decode_pinned_->data());
  } else {
    if (decode_host_.size() < need) decode_host_.resize(need);
    scratch = decode_host_.data();
  }
  std::vector<Status> results(encoded.size());
  store::parallel_for(encoded.size(), [&](size_t i) {
    const size_t c = encoded[i];
    results[i] = gpudirect::decode_chunk(std::span(chunks[c], stored_bytes[c]),
                                         std::span(scratch + i * chunk_bytes(), chunk_bytes()));
  });
  for (size_t i = 0; i < encoded.size(); ++i) {
    if (!results[i].ok()) {
      return Status(results[i].code(), "decoding chunk " + std::to_string(encoded[i]) + " (" +
                                           std::string(protocol::codec_name(codecs[encoded[i]])) +
                                           "): " + results[i].message());
    }
    chunks[encoded[i]] = scratch + i * chunk_bytes();
  }
  decoded_range_ = {scratch, need};
  return Status::Ok();
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
  std::vector<uint64_t> stored_bytes;     // each chunk's length in the store
  std::vector<protocol::KvCodec> codecs;  // how each is encoded
  for (const auto& key : keys) {
    auto lease = client_->acquire(key);
    if (!lease.ok()) {
      if (lease.status().code() == ErrorCode::kNotFound) break;  // the stored prefix ends here
      release_all();
      return lease.status();
    }
    std::span<const uint8_t> bytes = client_->bytes(lease.value());
    const protocol::KvCodec codec = lease.value().lease.codec;
    if (Status s = check_stored_chunk(leases.size(), bytes, codec); !s.ok()) {
      (void)client_->release(lease.value());
      release_all();
      return s;
    }
    leases.push_back(lease.value());
    chunk_data.push_back(bytes.data());
    stored_bytes.push_back(bytes.size());
    codecs.push_back(codec);
  }
  const uint32_t chunks = static_cast<uint32_t>(leases.size());
  if (options_.verify_loads) {
    std::vector<uint64_t> expected;
    for (const auto& l : leases) expected.push_back(l.lease.checksum);
    if (auto bad = first_bad_chunk(chunk_data, expected, stored_bytes); bad.has_value()) {
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
  // Compressed chunks are decoded (on the CPU, several at once) into scratch memory the copies
  // then read instead of the arena.
  if (Status s = decode_chunks(chunk_data, stored_bytes, codecs); !s.ok()) {
    release_all();
    return s;
  }
  const Status copied = gpu_ ? load_chunks_gpu(block_table, chunk_data, stored_bytes, codecs, on_layer)
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
                                       std::span<const uint64_t> stored_bytes,
                                       std::span<const protocol::KvCodec> codecs,
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
  // Every chunk not decoded into the (mapped, pinned) scratch lies in the client's current arena;
  // one registration covers them all.
  auto decoded = [&](const uint8_t* chunk) {
    return chunk >= decoded_range_.data() && chunk < decoded_range_.data() + decoded_range_.size();
  };
  for (size_t c = 0; c < chunks.size(); ++c) {
    if (decoded(chunks[c])) continue;
    if (Status s = gpu_->pin(client_->arena(), chunks[c], stored_bytes[c]); !s.ok()) return s;
    break;
  }
  for (size_t c = 0; c < chunks.size(); ++c) {
    if (!decoded(chunks[c]) && !gpu_->pinned(chunks[c], stored_bytes[c])) {
      return Status(ErrorCode::kPeerLost,
                    "the leased chunks lie in two arenas (the store client reconnected)");
    }
  }
  // Chunks still encoded (fixed-rate codecs, left in the arena by decode_chunks) are decoded by the
  // GPU straight into their blocks, all layers at once, ahead of the other chunks' layer copies: each
  // layer's event is recorded behind them.
  std::vector<bool> fused(chunks.size(), false);
  std::vector<void*> layer_base(layers_.begin(), layers_.end());
  for (size_t c = 0; c < chunks.size(); ++c) {
    if (decoded(chunks[c]) || codecs[c] == protocol::KvCodec::kIdentity) continue;
    auto header = protocol::read_chunk_header(std::span(chunks[c], stored_bytes[c]));
    if (!header.ok()) return header.status();
    const gpudirect::PagedChunks paged{options_.layout, layer_base,
                                       block_table.subspan(c * blocks_per_chunk(), blocks_per_chunk()),
                                       blocks_per_chunk()};
    if (Status s = gpu_->launch_decode(header->params, paged, chunks[c]); !s.ok()) {
      (void)gpu_->synchronize();
      return Status(s.code(), "decoding chunk " + std::to_string(c) + " on the GPU: " + s.message());
    }
    fused[c] = true;
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
      if (fused[c]) continue;
      // Mapped pinned memory has the same address on the GPU (unified addressing).
      const uint64_t base = decoded(chunks[c]) ? address(chunks[c]) : gpu_->device_address(chunks[c]);
      layer_segments(c, l, block_table, base, false, segments);
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
