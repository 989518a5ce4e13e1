#include "kvf/protocol/kv_layout.h"

#include <array>
#include <limits>

namespace kvf::protocol {
namespace {

constexpr uint64_t kMaxSize = uint64_t{1} << 63;

// a * b, or false when the product reaches 2^63: sizes must stay representable as signed
// offsets (ptrdiff_t, off_t) wherever they end up.
bool mul(uint64_t a, uint64_t b, uint64_t& out) {
  uint64_t p = 0;
  if (__builtin_mul_overflow(a, b, &p) || p >= kMaxSize) return false;
  out = p;
  return true;
}

bool known_kind(KvLayoutKind k) {
  return static_cast<uint8_t>(k) <= static_cast<uint8_t>(KvLayoutKind::kMla);
}

}  // namespace

std::string_view layout_kind_name(KvLayoutKind kind) {
  switch (kind) {
    case KvLayoutKind::kFlashAttention:
      return "flash_attention";
    case KvLayoutKind::kFlashInfer:
      return "flashinfer";
    case KvLayoutKind::kMla:
      return "mla";
  }
  return "unknown";
}

Result<KvLayoutKind> parse_layout_kind(std::string_view name) {
  for (KvLayoutKind k : {KvLayoutKind::kFlashAttention, KvLayoutKind::kFlashInfer, KvLayoutKind::kMla}) {
    if (name == layout_kind_name(k)) return k;
  }
  if (name == "flash_infer") return KvLayoutKind::kFlashInfer;  // the spelling that matches flash_attention
  return Status(ErrorCode::kInvalidArgument, "unknown KV layout kind '" + std::string(name) +
                                                 "' (expected flash_attention, flashinfer or mla)");
}

Result<KvLayout> KvLayout::create(const KvLayoutDesc& d) {
  auto invalid = [&](const std::string& what) {
    return Status(ErrorCode::kInvalidArgument, "KV layout " + KvLayout(d).to_string() + ": " + what);
  };
  if (!known_kind(d.kind)) return invalid("unknown kind " + std::to_string(static_cast<unsigned>(d.kind)));
  const std::array<std::pair<const char*, uint32_t>, 6> counts = {{{"num_layers", d.num_layers},
                                                                   {"num_blocks", d.num_blocks},
                                                                   {"block_tokens", d.block_tokens},
                                                                   {"kv_heads", d.kv_heads},
                                                                   {"head_dim", d.head_dim},
                                                                   {"dtype_bytes", d.dtype_bytes}}};
  for (const auto& [name, value] : counts) {
    if (value == 0) return invalid(std::string(name) + " must be non-zero");
  }
  if (d.kind == KvLayoutKind::kMla && d.kv_heads != 1) {
    return invalid("MLA stores one latent per token, so kv_heads must be 1 (got " +
                   std::to_string(d.kv_heads) + ")");
  }
  // Every size the layout reports is a factor of the bytes of all layers, so bounding that one
  // bounds them all (bytes_per_token too: it is at most the total divided by the tokens).
  const uint64_t parts = d.kind == KvLayoutKind::kMla ? 1 : 2;
  uint64_t total = 1;
  for (uint64_t f : {uint64_t{d.num_layers}, uint64_t{d.num_blocks}, parts, uint64_t{d.block_tokens},
                     uint64_t{d.kv_heads}, uint64_t{d.head_dim}, uint64_t{d.dtype_bytes}}) {
    if (!mul(total, f, total)) return invalid("the KV cache of all layers would exceed 2^63 bytes");
  }
  return KvLayout(d);
}

uint32_t KvLayout::parts() const {
  return desc_.kind == KvLayoutKind::kMla ? 1 : 2;
}

uint64_t KvLayout::part_bytes() const {
  return uint64_t{desc_.block_tokens} * desc_.kv_heads * desc_.head_dim * desc_.dtype_bytes;
}

uint64_t KvLayout::block_bytes() const {
  return parts() * part_bytes();
}

uint64_t KvLayout::layer_bytes() const {
  return desc_.num_blocks * block_bytes();
}

uint64_t KvLayout::bytes_per_token() const {
  return uint64_t{desc_.num_layers} * parts() * desc_.kv_heads * desc_.head_dim * desc_.dtype_bytes;
}

ByteExtent KvLayout::extent(uint32_t block, KvPart part) const {
  const uint64_t p = static_cast<uint64_t>(part);
  switch (desc_.kind) {
    case KvLayoutKind::kFlashAttention:  // [2, num_blocks, ...]: all K blocks, then all V blocks
      return {(p * desc_.num_blocks + block) * part_bytes(), part_bytes()};
    case KvLayoutKind::kFlashInfer:  // [num_blocks, 2, ...]: K and V of a block side by side
      return {block * block_bytes() + p * part_bytes(), part_bytes()};
    case KvLayoutKind::kMla:  // [num_blocks, ...]: the latent only
      return {block * part_bytes(), part_bytes()};
  }
  return {};
}

Result<ByteExtent> KvLayout::extent_checked(uint32_t block, KvPart part) const {
  if (block >= desc_.num_blocks) {
    return Status(ErrorCode::kInvalidArgument, "block " + std::to_string(block) +
                                                   " out of range (num_blocks " +
                                                   std::to_string(desc_.num_blocks) + ")");
  }
  if (static_cast<uint32_t>(part) >= parts()) {
    return Status(ErrorCode::kInvalidArgument, "part " + std::to_string(static_cast<unsigned>(part)) +
                                                   " out of range: a " +
                                                   std::string(layout_kind_name(desc_.kind)) +
                                                   " layout has " + std::to_string(parts()) + " part(s)");
  }
  return extent(block, part);
}

bool KvLayout::same_block_geometry(const KvLayout& other) const {
  KvLayoutDesc a = desc_;
  a.num_blocks = other.desc_.num_blocks;
  return a == other.desc_;
}

std::string KvLayout::to_string() const {
  const KvLayoutDesc& d = desc_;
  return std::string(layout_kind_name(d.kind)) + "(layers=" + std::to_string(d.num_layers) +
         " blocks=" + std::to_string(d.num_blocks) + " block_tokens=" + std::to_string(d.block_tokens) +
         " kv_heads=" + std::to_string(d.kv_heads) + " head_dim=" + std::to_string(d.head_dim) +
         " dtype_bytes=" + std::to_string(d.dtype_bytes) + ")";
}

}  // namespace kvf::protocol
