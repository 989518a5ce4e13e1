#include "kvf/fabric/transfer_plan.h"

#include <string>
#include <unordered_set>

namespace kvf::fabric {

Result<TransferPlan> build_layer_plan(uint64_t request_id, uint32_t layer, const protocol::KvLayout& src,
                                      const protocol::KvLayout& dst, std::span<const uint32_t> src_blocks,
                                      std::span<const uint32_t> dst_blocks, uint64_t max_extent_bytes) {
  if (!src.same_block_geometry(dst)) {
    return Status(ErrorCode::kInvalidArgument,
                  "layouts differ in block geometry: " + src.to_string() + " vs " + dst.to_string());
  }
  if (src_blocks.size() != dst_blocks.size()) {
    return Status(ErrorCode::kInvalidArgument, "request has " + std::to_string(src_blocks.size()) +
                                                   " source blocks but " + std::to_string(dst_blocks.size()) +
                                                   " destination blocks");
  }
  if (layer >= src.desc().num_layers || layer >= dst.desc().num_layers) {
    return Status(ErrorCode::kInvalidArgument, "layer " + std::to_string(layer) + " out of range");
  }
  std::unordered_set<uint32_t> seen_dst;
  seen_dst.reserve(dst_blocks.size());
  for (size_t i = 0; i < src_blocks.size(); ++i) {
    if (src_blocks[i] >= src.desc().num_blocks) {
      return Status(ErrorCode::kInvalidArgument,
                    "source block [" + std::to_string(i) + "] = " + std::to_string(src_blocks[i]) +
                        " out of range (pool of " + std::to_string(src.desc().num_blocks) + ")");
    }
    if (dst_blocks[i] >= dst.desc().num_blocks) {
      return Status(ErrorCode::kInvalidArgument,
                    "destination block [" + std::to_string(i) + "] = " + std::to_string(dst_blocks[i]) +
                        " out of range (pool of " + std::to_string(dst.desc().num_blocks) + ")");
    }
    if (!seen_dst.insert(dst_blocks[i]).second) {
      return Status(ErrorCode::kInvalidArgument,
                    "destination block " + std::to_string(dst_blocks[i]) + " appears twice in the request");
    }
  }

  TransferPlan plan;
  plan.request_id = request_id;
  plan.layer = layer;
  const uint32_t parts = src.parts();
  // Walk part-major so that in FlashAttention layouts (all K blocks, then all V blocks) runs of
  // adjacent blocks coalesce; in FlashInfer layouts K and V of one block are adjacent, which the
  // same merge rule catches when walking block-major, so try both orders and keep the shorter.
  auto build = [&](bool part_major) {
    std::vector<TransferExtent> out;
    auto emit = [&](uint32_t i, uint32_t part) {
      auto s = src.extent(src_blocks[i], static_cast<protocol::KvPart>(part));
      auto d = dst.extent(dst_blocks[i], static_cast<protocol::KvPart>(part));
      if (!out.empty()) {
        TransferExtent& last = out.back();
        if (last.src_offset + last.length == s.offset && last.dst_offset + last.length == d.offset) {
          last.length += s.length;
          return;
        }
      }
      out.push_back(TransferExtent{s.offset, d.offset, s.length});
    };
    if (part_major) {
      for (uint32_t p = 0; p < parts; ++p)
        for (uint32_t i = 0; i < src_blocks.size(); ++i) emit(i, p);
    } else {
      for (uint32_t i = 0; i < src_blocks.size(); ++i)
        for (uint32_t p = 0; p < parts; ++p) emit(i, p);
    }
    return out;
  };
  auto a = build(true);
  auto b = build(false);
  plan.extents = a.size() <= b.size() ? std::move(a) : std::move(b);

  if (max_extent_bytes > 0) {
    std::vector<TransferExtent> split;
    split.reserve(plan.extents.size());
    for (const TransferExtent& e : plan.extents) {
      for (uint64_t off = 0; off < e.length; off += max_extent_bytes) {
        uint64_t len = std::min(max_extent_bytes, e.length - off);
        split.push_back(TransferExtent{e.src_offset + off, e.dst_offset + off, len});
      }
    }
    plan.extents = std::move(split);
  }
  for (const TransferExtent& e : plan.extents) plan.total_bytes += e.length;
  return plan;
}

}  // namespace kvf::fabric
