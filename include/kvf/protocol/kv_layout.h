// KvLayout: how an engine lays out the KV cache of one layer in (GPU or host) memory, and where
// the bytes of any (block, K|V) are inside that layer's buffer. Each layer is its own buffer, as
// vLLM allocates them. Immutable value type; safe to share between threads.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvf/protocol/status.h"

namespace kvf::protocol {

enum class KvLayoutKind : uint8_t {
  kFlashAttention = 0,  // per layer [2, num_blocks, block_tokens, kv_heads, head_dim]
  kFlashInfer = 1,      // per layer [num_blocks, 2, block_tokens, kv_heads, head_dim]
  kMla = 2,             // per layer [num_blocks, block_tokens, head_dim] (head_dim = latent dim, kv_heads = 1)
};

std::string_view layout_kind_name(KvLayoutKind kind);             // "flash_attention", ...
Result<KvLayoutKind> parse_layout_kind(std::string_view name);    // inverse of the above

enum class KvPart : uint8_t { kKey = 0, kValue = 1 };  // MLA has only kKey (the latent)

// The parameters that describe a layout; what travels on the wire.
struct KvLayoutDesc {
  KvLayoutKind kind = KvLayoutKind::kFlashAttention;
  uint32_t num_layers = 0;
  uint32_t num_blocks = 0;     // blocks per layer buffer
  uint32_t block_tokens = 0;   // tokens per block (page)
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t dtype_bytes = 0;    // 2 for bf16/fp16, 1 for fp8, 4 for fp32
  bool operator==(const KvLayoutDesc&) const = default;
};

struct ByteExtent {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool operator==(const ByteExtent&) const = default;
};

class KvLayout {
 public:
  // Validates: every count non-zero, MLA has kv_heads == 1, no size overflows 2^63.
  static Result<KvLayout> create(const KvLayoutDesc& desc);

  const KvLayoutDesc& desc() const { return desc_; }
  uint32_t parts() const;               // 2 (K and V), or 1 for MLA
  uint64_t part_bytes() const;          // bytes of one (block, part): block_tokens*kv_heads*head_dim*dtype
  uint64_t block_bytes() const;         // parts() * part_bytes(): one block of one layer
  uint64_t layer_bytes() const;         // one layer buffer: num_blocks * block_bytes()
  uint64_t bytes_per_token() const;     // all layers, K and V
  // Byte range of (block, part) inside a layer buffer. Precondition: block < num_blocks,
  // part < parts() (checked by extent_checked).
  ByteExtent extent(uint32_t block, KvPart part) const;
  Result<ByteExtent> extent_checked(uint32_t block, KvPart part) const;
  // Two layouts can exchange blocks when everything but num_blocks matches.
  bool same_block_geometry(const KvLayout& other) const;
  std::string to_string() const;

 private:
  explicit KvLayout(const KvLayoutDesc& desc) : desc_(desc) {}
  KvLayoutDesc desc_;
};

}  // namespace kvf::protocol
