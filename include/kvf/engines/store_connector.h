// StoreConnector: what an engine calls to reuse prefixes through its node's store (kvfabricd).
// The engine registers its paged KV layer buffers once; per request it then
//   lookup(tokens)                      how many leading tokens the store holds (whole chunks)
//   store(tokens, block_table)          its computed blocks -> the store, chunk by chunk (each
//                                       recorded under the model's fingerprint, so that the
//                                       daemon's /clear {"model": ...} finds them)
//   load(tokens, block_table)           the stored prefix -> its blocks (all layers at once)
//   load_layers(..., on_layer)          the same, layer by layer: on_layer(l) runs as soon as
//                                       layer l of every loaded chunk is in place, so the engine
//                                       can start computing layer l while later ones load
// A chunk is chunk_tokens tokens (a whole number of blocks); its bytes in the store are, for each
// layer, for each of its blocks, each part (K, V; the latent for MLA) as the layout places it,
// so any engine with the same model and block geometry loads what another stored, whatever
// block ids either used. Bytes move between the engine's buffers and the store's shared arena
// in place (no copy through the daemon); every loaded chunk is checked against the checksum the
// store recorded at commit before any byte of it reaches the engine's blocks.
// Host memory only in this version: layer buffers in GPU memory are refused with kUnavailable
// (the pinned-arena GPU path is not built yet).
// Thread rules: one request at a time per connector (calls are not synchronized); several
// connectors may share one StoreClient.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "kvf/protocol/chunk_key.h"
#include "kvf/protocol/kv_layout.h"
#include "kvf/protocol/status.h"
#include "kvf/store/store_client.h"

namespace kvf::engines {

struct StoreConnectorOptions {
  std::string model;  // the model's name, as in the topology (it is part of every chunk key)
  protocol::KvLayoutDesc layout;
  uint32_t chunk_tokens = protocol::kDefaultChunkTokens;
  bool verify_loads = true;  // check each chunk's checksum before scattering it
};

struct LoadResult {
  uint32_t chunks = 0;  // loaded, from the first
  uint64_t tokens = 0;  // chunks * chunk_tokens
  uint64_t bytes = 0;
};

struct StoreResult {
  uint32_t stored = 0;          // chunks written by this call
  uint32_t already_stored = 0;  // chunks the store had (from this or another engine)
  uint64_t bytes = 0;
};

class StoreConnector {
 public:
  // `layers`: the engine's layer buffers, one per layer, each layout.layer_bytes() long; they
  // must outlive the connector. kInvalidArgument for a count or size mismatch, a chunk that is
  // not a whole number of blocks; kUnavailable for GPU memory.
  static Result<StoreConnector> create(store::StoreClient& client, StoreConnectorOptions options,
                                       std::vector<uint8_t*> layers);

  const protocol::KvLayout& layout() const { return layout_; }
  uint64_t chunk_bytes() const;
  uint32_t blocks_per_chunk() const;

  // Full chunks of `tokens` the store holds, from the first, in tokens.
  Result<uint64_t> lookup(std::span<const uint32_t> tokens);
  // `block_table[i]` is the engine block holding tokens [i*block_tokens, (i+1)*block_tokens).
  // Stores every full chunk the table covers; chunks already stored are skipped.
  Result<StoreResult> store(std::span<const uint32_t> tokens, std::span<const uint32_t> block_table);
  // Loads the longest stored prefix (at most max_chunks chunks) into the blocks of block_table.
  Result<LoadResult> load(std::span<const uint32_t> tokens, std::span<const uint32_t> block_table,
                          uint32_t max_chunks = UINT32_MAX);
  Result<LoadResult> load_layers(std::span<const uint32_t> tokens, std::span<const uint32_t> block_table,
                                 const std::function<void(uint32_t layer)>& on_layer,
                                 uint32_t max_chunks = UINT32_MAX);

 private:
  StoreConnector(store::StoreClient& client, StoreConnectorOptions options, protocol::KvLayout layout,
                 std::vector<uint8_t*> layers);
  Status check_table(std::span<const uint32_t> block_table, uint32_t chunks) const;
  // Copies layer `layer` of chunk `chunk` between the arena bytes and the engine's blocks.
  void copy_layer(uint32_t chunk, uint32_t layer, std::span<const uint32_t> block_table, uint8_t* chunk_bytes,
                  bool to_store) const;

  store::StoreClient* client_;
  StoreConnectorOptions options_;
  protocol::KvLayout layout_;
  protocol::ChunkHasher hasher_;
  std::vector<uint8_t*> layers_;
};

}  // namespace kvf::engines
