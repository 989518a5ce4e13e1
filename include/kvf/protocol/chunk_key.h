// ChunkKey: the content address of a chunk of tokens.
//   key_i = XXH3-128(key_{i-1} || model fingerprint || tokens of chunk i), key_{-1} = 0,
// every integer serialized little-endian, no seed: the same tokens give the same keys in every
// process, host and restart. Value types; ChunkHasher is immutable and thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvf/protocol/kv_layout.h"
#include "kvf/protocol/status.h"

namespace kvf::protocol {

struct ChunkKey {
  uint64_t hi = 0;
  uint64_t lo = 0;
  auto operator<=>(const ChunkKey&) const = default;
  bool is_zero() const { return hi == 0 && lo == 0; }
  std::string to_hex() const;                              // 32 lowercase hex digits, hi first
  static Result<ChunkKey> from_hex(std::string_view hex);  // exactly 32 hex digits
};

// Identifies a model and its KV geometry, so keys of different models never collide:
// XXH3-128 over the model name and every field of the layout except num_blocks.
ChunkKey model_fingerprint(std::string_view model_name, const KvLayoutDesc& layout);

inline constexpr uint32_t kDefaultChunkTokens = 256;

class ChunkHasher {
 public:
  ChunkHasher(ChunkKey model, uint32_t chunk_tokens = kDefaultChunkTokens);

  // Keys of the full chunks of `tokens`, in order; a partial tail chunk is hashed only when
  // include_partial_tail is true.
  std::vector<ChunkKey> hash(std::span<const uint32_t> tokens, bool include_partial_tail = false) const;
  // One step of the chain.
  ChunkKey next(const ChunkKey& previous, std::span<const uint32_t> chunk_tokens) const;
  uint32_t chunk_tokens() const { return chunk_tokens_; }
  const ChunkKey& model() const { return model_; }

 private:
  ChunkKey model_;
  uint32_t chunk_tokens_;
};

}  // namespace kvf::protocol

template <>
struct std::hash<kvf::protocol::ChunkKey> {
  size_t operator()(const kvf::protocol::ChunkKey& k) const noexcept { return static_cast<size_t>(k.lo ^ (k.hi * 0x9E3779B97F4A7C15ull)); }
};
