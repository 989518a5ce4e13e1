#include "kvf/engines/store_connector.h"

#include <algorithm>
#include <cstring>

#include "kvf/gpudirect/cuda_memory.h"

namespace kvf::engines {

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
    if (gpudirect::pointer_is_device(layers[l])) {
      return Status(
          ErrorCode::kUnavailable,
          "layer buffer " + std::to_string(l) +
              " is GPU memory: the store connector's GPU path (through the pinned arena) is not built "
              "yet; host-memory engines only");
    }
  }
  return StoreConnector(client, std::move(options), std::move(layout.value()), std::move(layers));
}

StoreConnector::StoreConnector(store::StoreClient& client, StoreConnectorOptions options,
                               protocol::KvLayout layout, std::vector<uint8_t*> layers)
    : client_(&client),
      options_(std::move(options)),
      layout_(std::move(layout)),
      hasher_(protocol::model_fingerprint(options_.model, options_.layout), options_.chunk_tokens),
      layers_(std::move(layers)) {}

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

void StoreConnector::copy_layer(uint32_t chunk, uint32_t layer, std::span<const uint32_t> block_table,
                                uint8_t* chunk_bytes, bool to_store) const {
  const uint64_t part = layout_.part_bytes();
  const uint32_t parts = layout_.parts();
  uint8_t* at = chunk_bytes + uint64_t{layer} * blocks_per_chunk() * parts * part;
  for (uint32_t b = 0; b < blocks_per_chunk(); ++b) {
    const uint32_t block = block_table[uint64_t{chunk} * blocks_per_chunk() + b];
    for (uint32_t p = 0; p < parts; ++p) {
      const protocol::ByteExtent e = layout_.extent(block, static_cast<protocol::KvPart>(p));
      uint8_t* engine = layers_[layer] + e.offset;
      if (to_store) {
        std::memcpy(at, engine, e.length);
      } else {
        std::memcpy(engine, at, e.length);
      }
      at += e.length;
    }
  }
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
    for (uint32_t l = 0; l < options_.layout.num_layers; ++l) copy_layer(c, l, block_table, dst.data(), true);
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
    if (options_.verify_loads &&
        store::chunk_checksum(bytes.data(), bytes.size()) != lease.value().lease.checksum) {
      (void)client_->release(lease.value());
      release_all();
      return Status(ErrorCode::kVerifyFailed,
                    "chunk " + std::to_string(leases.size()) +
                        " does not match its checksum in the store; nothing loaded");
    }
    leases.push_back(lease.value());
  }
  const uint32_t chunks = static_cast<uint32_t>(leases.size());
  if (Status s = check_table(block_table, chunks); !s.ok()) {
    release_all();
    return s;
  }
  for (uint32_t l = 0; l < options_.layout.num_layers; ++l) {
    for (uint32_t c = 0; c < chunks; ++c) {
      // Bytes are read from the shared mapping; the const_cast only satisfies copy_layer's
      // signature, which writes the chunk side only when storing.
      auto* chunk = const_cast<uint8_t*>(client_->bytes(leases[c]).data());
      copy_layer(c, l, block_table, chunk, false);
    }
    if (on_layer) on_layer(l);
  }
  release_all();
  result.chunks = chunks;
  result.tokens = uint64_t{chunks} * options_.chunk_tokens;
  result.bytes = uint64_t{chunks} * chunk_bytes();
  return result;
}

}  // namespace kvf::engines
