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
// store recorded at commit before any byte of it reaches the engine's blocks. A chunk the store holds
// compressed (the daemon's /compress; its lease names the codec) must carry this engine's chunk shape in
// its header. On the GPU path a fixed-rate chunk (int8, fp8, int4, int2) is decoded by the GPU
// straight from the pinned arena into the engine's blocks (gpudirect/kv_codec_cuda.h: the decode fused
// with the scatter); other codecs, and every codec on the host path, are decoded on the CPU (several
// chunks at once) into scratch memory, which the copies then read instead of the arena.
// Layer buffers may be host memory (memcpy) or cudaMalloc'd memory of one GPU: then the arena
// mapping is page-locked (cudaHostRegister) once and chunk bytes move between the GPU blocks and
// the arena by copy-kernel launches: store = reserve -> one gather launch per chunk (all its
// layers) -> synchronize -> commit; load = lease -> checksum check (on the CPU, chunks
// hashed on several threads at once, as for host memory) -> one scatter launch per layer (all chunks) -> each
// layer reported when its event has passed -> release. The byte order in the store is the same, so host and
// GPU engines share chunks. The GPU path runs on the connector's own stream and does not wait for the
// engine's: call store only after the work writing those blocks has finished; loads have finished when they
// return. Thread rules: one request at a time per connector (calls are not synchronized); several connectors
// may share one StoreClient, and must be destroyed before it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/paged_copy.h"
#include "kvf/protocol/chunk_key.h"
#include "kvf/protocol/kv_codec.h"
#include "kvf/protocol/kv_layout.h"
#include "kvf/protocol/status.h"
#include "kvf/store/store_client.h"

namespace kvf::engines {

// Where the engine's layer buffers live.
enum class LayerMemory {
  kAuto,  // ask CUDA: cudaMalloc'd device memory takes the GPU path, anything else is host memory
  kHost,  // host memory (never asks CUDA)
  kCuda,  // device memory of one GPU; refused with kUnavailable where there is no CUDA or no GPU,
          // instead of being touched as host memory by a build that cannot tell
};

struct StoreConnectorOptions {
  std::string model;  // the model's name, as in the topology (it is part of every chunk key)
  protocol::KvLayoutDesc layout;
  uint32_t chunk_tokens = protocol::kDefaultChunkTokens;
  bool verify_loads = true;  // check each chunk's checksum before scattering it
  LayerMemory memory = LayerMemory::kAuto;
};

class GpuStorePath;

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
  // not a whole number of blocks, buffers that mix host and GPU memory or lie on several GPUs, a
  // GPU buffer shorter than a layer; kUnavailable for GPU buffers where CUDA or the GPU is not
  // available (the reason is in the message). Does not connect to the daemon: the first call
  // that needs the arena maps it and, for GPU buffers, page-locks it (hundreds of milliseconds
  // for gigabytes, once).
  static Result<StoreConnector> create(store::StoreClient& client, StoreConnectorOptions options,
                                       std::vector<uint8_t*> layers);
  StoreConnector(StoreConnector&&) noexcept;
  StoreConnector& operator=(StoreConnector&&) noexcept;
  ~StoreConnector();

  const protocol::KvLayout& layout() const { return layout_; }
  // The GPU whose memory the layer buffers are; -1 for host memory.
  int device() const;
  uint64_t chunk_bytes() const;
  uint32_t blocks_per_chunk() const;

  // Full chunks of `tokens` the store holds, from the first, in tokens.
  Result<uint64_t> lookup(std::span<const uint32_t> tokens);
  // `block_table[i]` is the engine block holding tokens [i*block_tokens, (i+1)*block_tokens).
  // Stores every full chunk the table covers; chunks already stored are skipped. A chunk whose
  // copy fails is aborted, never committed. Chunk c+1 is copied while chunk c is committed (hashed
  // by the daemon); on an error the chunks committed before it stay stored.
  Result<StoreResult> store(std::span<const uint32_t> tokens, std::span<const uint32_t> block_table);
  // Loads the longest stored prefix (at most max_chunks chunks) into the blocks of block_table.
  // kVerifyFailed (and no byte written) when a chunk does not match its checksum. GPU buffers: a
  // block id may not repeat among the loaded blocks (kInvalidArgument; the copies run in parallel).
  Result<LoadResult> load(std::span<const uint32_t> tokens, std::span<const uint32_t> block_table,
                          uint32_t max_chunks = UINT32_MAX);
  Result<LoadResult> load_layers(std::span<const uint32_t> tokens, std::span<const uint32_t> block_table,
                                 const std::function<void(uint32_t layer)>& on_layer,
                                 uint32_t max_chunks = UINT32_MAX);

 private:
  StoreConnector(store::StoreClient& client, StoreConnectorOptions options, protocol::KvLayout layout,
                 std::vector<uint8_t*> layers, std::unique_ptr<GpuStorePath> gpu);
  Status check_table(std::span<const uint32_t> block_table, uint32_t chunks) const;
  // Appends the copies of layer `layer` of chunk `chunk` between the chunk's bytes, which start
  // at `chunk_base` (a host address, or the arena's address for the GPU), and the engine's
  // blocks: the one definition of a chunk's byte order, for both paths.
  void layer_segments(uint32_t chunk, uint32_t layer, std::span<const uint32_t> block_table,
                      uint64_t chunk_base, bool to_store, std::vector<gpudirect::CopySegment>& out) const;
  // Copies chunk `chunk`'s blocks of every layer into its reserved bytes in the arena. The host path
  // copies at once; the GPU path page-locks the arena first and only enqueues the copy, marked with
  // chunk mark `slot` (0 or 1), which finish_store_chunk(slot) waits for.
  Status begin_store_chunk(uint32_t chunk, std::span<const uint32_t> block_table,
                           std::span<uint8_t> chunk_bytes, uint32_t slot);
  Status finish_store_chunk(uint32_t slot) const;
  // Copies the leased, checked chunks (their bytes in the arena) into the engine's blocks, layer
  // by layer, calling on_layer(l) (when set) once layer l of every chunk is in place.
  Status load_chunks(std::span<const uint32_t> block_table, std::span<const uint8_t* const> chunks,
                     const std::function<void(uint32_t layer)>& on_layer);
  // `stored_bytes`: each chunk's length where it lies (the arena, or chunk_bytes() once decoded);
  // chunks still encoded are decoded by the GPU into their blocks.
  Status load_chunks_gpu(std::span<const uint32_t> block_table, std::span<const uint8_t* const> chunks,
                         std::span<const uint64_t> stored_bytes, std::span<const protocol::KvCodec> codecs,
                         const std::function<void(uint32_t layer)>& on_layer);

  // The shape of one chunk's raw bytes, as the codecs see it.
  protocol::KvChunkGeometry chunk_geometry() const;
  // A leased chunk's bytes are what this engine can load: raw, chunk_bytes() long; or encoded,
  // with a header naming this engine's chunk shape and the codec the store recorded.
  Status check_stored_chunk(size_t index, std::span<const uint8_t> bytes, protocol::KvCodec codec) const;
  // Decodes the chunks whose codec is not identity into scratch memory and points `chunks` there.
  Status decode_chunks(std::vector<const uint8_t*>& chunks, std::span<const uint64_t> stored_bytes,
                       std::span<const protocol::KvCodec> codecs);

  store::StoreClient* client_;
  StoreConnectorOptions options_;
  protocol::KvLayout layout_;
  protocol::ChunkHasher hasher_;
  std::vector<uint8_t*> layers_;
  std::unique_ptr<GpuStorePath> gpu_;  // null for host memory
  // Where decode_chunks puts decoded chunks: host memory, or mapped pinned memory for the GPU path.
  std::vector<uint8_t> decode_host_;
  std::optional<gpudirect::PinnedBuffer> decode_pinned_;
  std::span<uint8_t> decoded_range_;  // the part of the scratch the last load used
};

}  // namespace kvf::engines
