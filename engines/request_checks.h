// The checks both reference engines (CPU and GPU) make before computing anything. kInvalidArgument
// naming the first problem. Pure; any thread.
#pragma once

#include <cstdint>
#include <span>

#include "kvf/engines/kv_cache_view.h"
#include "kvf/engines/model_shape.h"
#include "kvf/protocol/status.h"

namespace kvf::engines {

// The cache: the layout the shape pages with (kFlashAttention, bf16) and one non-null buffer per
// layer (where the buffers live is the engine's own check).
Status check_kv_cache(const ModelShape& shape, const KvCacheView& kv);

// The request: tokens inside the vocabulary, a block table covering positions [0, end_position)
// with block ids in range and none repeated.
Status check_tokens_and_table(const ModelShape& shape, std::span<const uint32_t> tokens,
                              uint64_t end_position, std::span<const uint32_t> block_table,
                              uint32_t num_blocks);

}  // namespace kvf::engines
