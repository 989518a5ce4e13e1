#include "request_checks.h"

#include <algorithm>
#include <string>
#include <vector>

namespace kvf::engines {

Status check_kv_cache(const ModelShape& shape, const KvCacheView& kv) {
  auto invalid = [](std::string message) { return Status(ErrorCode::kInvalidArgument, std::move(message)); };
  const protocol::KvLayoutDesc& d = kv.layout.desc();
  const protocol::KvLayoutDesc want = shape.kv_layout_desc(d.num_blocks);
  if (d != want) {
    return invalid("KV layout " + kv.layout.to_string() + " does not match the model's: it needs " +
                   std::string(protocol::layout_kind_name(want.kind)) + ", " +
                   std::to_string(want.num_layers) + " layers, " + std::to_string(want.block_tokens) +
                   "-token blocks, " + std::to_string(want.kv_heads) + " KV heads of dim " +
                   std::to_string(want.head_dim) + ", bf16 (2 bytes)");
  }
  if (kv.layers.size() != shape.layers) {
    return invalid("KV cache has " + std::to_string(kv.layers.size()) + " layer buffers, the model has " +
                   std::to_string(shape.layers) + " layers");
  }
  for (size_t l = 0; l < kv.layers.size(); ++l) {
    if (kv.layers[l] == nullptr) return invalid("KV layer buffer " + std::to_string(l) + " is null");
  }
  return Status::Ok();
}

Status check_tokens_and_table(const ModelShape& shape, std::span<const uint32_t> tokens,
                              uint64_t end_position, std::span<const uint32_t> block_table,
                              uint32_t num_blocks) {
  auto invalid = [](std::string message) { return Status(ErrorCode::kInvalidArgument, std::move(message)); };
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] >= shape.vocab) {
      return invalid("token " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                     " is out of range: vocab is " + std::to_string(shape.vocab));
    }
  }
  const uint32_t block_tokens = shape.block_tokens;
  const uint64_t needed = (end_position + block_tokens - 1) / block_tokens;
  if (block_table.size() < needed) {
    return invalid("block table too short: " + std::to_string(block_table.size()) + " blocks hold " +
                   std::to_string(block_table.size() * uint64_t{block_tokens}) + " positions, but position " +
                   std::to_string(end_position - 1) + " needs " + std::to_string(needed) + " blocks of " +
                   std::to_string(block_tokens) + " tokens");
  }
  for (uint64_t i = 0; i < needed; ++i) {
    if (block_table[i] >= num_blocks) {
      return invalid("block id " + std::to_string(block_table[i]) + " at block table index " +
                     std::to_string(i) + " is out of range: the KV cache has " + std::to_string(num_blocks) +
                     " blocks");
    }
  }
  // Two positions in one block would overwrite each other's K/V and attend to the wrong tokens.
  std::vector<uint32_t> used(block_table.begin(), block_table.begin() + static_cast<std::ptrdiff_t>(needed));
  std::sort(used.begin(), used.end());
  if (auto dup = std::adjacent_find(used.begin(), used.end()); dup != used.end()) {
    return invalid("block id " + std::to_string(*dup) + " appears more than once in the block table");
  }
  return Status::Ok();
}

}  // namespace kvf::engines
