// Chunk keys are content addresses shared by every process of a cluster (and stored on SSD), so
// the byte serialization hashed here is a wire format: changing it invalidates every stored key.
#include "kvf/protocol/chunk_key.h"

#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack: hashing a chunk allocates nothing
#include <xxhash.h>

#include <algorithm>
#include <bit>
#include <stdexcept>

namespace kvf::protocol {
namespace {

void put_le(uint8_t* out, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(v >> (8 * i));
}

ChunkKey from_xxh(XXH128_hash_t h) {
  return ChunkKey{h.high64, h.low64};
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

std::string ChunkKey::to_hex() const {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s(32, '0');
  for (int i = 0; i < 16; ++i) {
    s[static_cast<size_t>(15 - i)] = kDigits[(hi >> (4 * i)) & 0xf];
    s[static_cast<size_t>(31 - i)] = kDigits[(lo >> (4 * i)) & 0xf];
  }
  return s;
}

Result<ChunkKey> ChunkKey::from_hex(std::string_view hex) {
  if (hex.size() != 32) {
    return Status(ErrorCode::kInvalidArgument,
                  "chunk key: expected 32 hex digits, got " + std::to_string(hex.size()) + " characters");
  }
  ChunkKey k;
  for (size_t i = 0; i < 32; ++i) {
    const int v = hex_value(hex[i]);
    if (v < 0) {
      return Status(ErrorCode::kInvalidArgument,
                    "chunk key: '" + std::string(hex) + "' has a non-hex character at " + std::to_string(i));
    }
    uint64_t& half = i < 16 ? k.hi : k.lo;
    half = (half << 4) | static_cast<uint64_t>(v);
  }
  return k;
}

ChunkKey model_fingerprint(std::string_view model_name, const KvLayoutDesc& layout) {
  // name length u64 | name | kind u8 | num_layers | block_tokens | kv_heads | head_dim | dtype_bytes
  // (u32 each). num_blocks is left out: pool sizes differ between engines of the same model.
  std::string buf(8 + model_name.size() + 1 + 5 * 4, '\0');
  auto* p = reinterpret_cast<uint8_t*>(buf.data());
  put_le(p, model_name.size(), 8);
  p += 8;
  for (char c : model_name) *p++ = static_cast<uint8_t>(c);
  *p++ = static_cast<uint8_t>(layout.kind);
  for (uint32_t v :
       {layout.num_layers, layout.block_tokens, layout.kv_heads, layout.head_dim, layout.dtype_bytes}) {
    put_le(p, v, 4);
    p += 4;
  }
  return from_xxh(XXH3_128bits(buf.data(), buf.size()));
}

ChunkHasher::ChunkHasher(ChunkKey model, uint32_t chunk_tokens) : model_(model), chunk_tokens_(chunk_tokens) {
  // A configuration error, found at setup (status.h: exceptions are for setup only).
  if (chunk_tokens == 0) throw std::invalid_argument("ChunkHasher: chunk_tokens must be non-zero");
}

ChunkKey ChunkHasher::next(const ChunkKey& previous, std::span<const uint32_t> chunk_tokens) const {
  // Streaming over (prefix, tokens) hashes the same bytes as one call over their concatenation.
  uint8_t prefix[32];
  put_le(prefix, previous.hi, 8);
  put_le(prefix + 8, previous.lo, 8);
  put_le(prefix + 16, model_.hi, 8);
  put_le(prefix + 24, model_.lo, 8);
  XXH3_state_t state;
  XXH3_128bits_reset(&state);
  XXH3_128bits_update(&state, prefix, sizeof prefix);
  if constexpr (std::endian::native == std::endian::little) {
    XXH3_128bits_update(&state, chunk_tokens.data(), chunk_tokens.size_bytes());
  } else {
    uint8_t le[4];
    for (uint32_t t : chunk_tokens) {
      put_le(le, t, 4);
      XXH3_128bits_update(&state, le, sizeof le);
    }
  }
  return from_xxh(XXH3_128bits_digest(&state));
}

std::vector<ChunkKey> ChunkHasher::hash(std::span<const uint32_t> tokens, bool include_partial_tail) const {
  std::vector<ChunkKey> keys;
  keys.reserve(tokens.size() / chunk_tokens_ + 1);
  ChunkKey key;  // key_{-1} = 0
  for (size_t at = 0; at < tokens.size(); at += chunk_tokens_) {
    const size_t n = std::min<size_t>(chunk_tokens_, tokens.size() - at);
    if (n < chunk_tokens_ && !include_partial_tail) break;
    key = next(key, tokens.subspan(at, n));
    keys.push_back(key);
  }
  return keys;
}

}  // namespace kvf::protocol
