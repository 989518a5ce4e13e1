// TransferPlan: for one request and one layer, the (source offset, destination offset, length)
// extents that move the request's blocks from the sender's layer buffer into the receiver's,
// coalesced where consecutive blocks are adjacent on both sides. Transport-independent.
// Plain value type.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kvf/protocol/kv_layout.h"
#include "kvf/protocol/status.h"

namespace kvf::fabric {

struct TransferExtent {
  uint64_t src_offset = 0;  // into the sender's layer buffer
  uint64_t dst_offset = 0;  // into the receiver's layer buffer
  uint64_t length = 0;
  bool operator==(const TransferExtent&) const = default;
};

struct TransferPlan {
  uint64_t request_id = 0;
  uint32_t layer = 0;
  std::vector<TransferExtent> extents;
  uint64_t total_bytes = 0;
};

// Block i of the request moves from src_blocks[i] to dst_blocks[i], every part (K and V) of it.
// Fails (kInvalidArgument, naming the index) when the lists differ in length, a block id is out
// of its layout's range, a destination block repeats, or the layouts differ in block geometry.
// Extents larger than max_extent_bytes are split (0: no limit).
Result<TransferPlan> build_layer_plan(uint64_t request_id, uint32_t layer, const protocol::KvLayout& src,
                                      const protocol::KvLayout& dst, std::span<const uint32_t> src_blocks,
                                      std::span<const uint32_t> dst_blocks, uint64_t max_extent_bytes = 0);

}  // namespace kvf::fabric
