// Batched paged-KV copies as lists of raw (src, dst, bytes) segments: the builders below turn
// "these blocks of these layers" into segments, which one GPU kernel (SegmentCopier), the copy
// engines, or copy_segments_cpu then execute. Building is pure host arithmetic, so the same list
// drives the GPU path and the CPU fallback and both give identical bytes.
//
// Addresses are plain integers: a source or destination may be device memory, a peer GPU's
// memory mapped through CUDA IPC, pinned host memory or ordinary host memory; only the executor
// cares. Each layer is its own buffer (as vLLM allocates them), so callers pass one base address
// per layer, indexed by layer number.
//
// Free functions over value types; safe to call from any thread.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kvf/protocol/kv_layout.h"
#include "kvf/protocol/status.h"

namespace kvf::gpudirect {

// One contiguous copy. Executors treat bytes as opaque (dtype-agnostic). Segments of one batch
// must not overlap each other's destinations or any source: the GPU copies them in parallel, in no
// particular order. Layout is fixed (three u64) because the GPU kernel reads it as is.
struct CopySegment {
  uint64_t src = 0;
  uint64_t dst = 0;
  uint64_t bytes = 0;
  bool operator==(const CopySegment&) const = default;
};
static_assert(sizeof(CopySegment) == 24, "the GPU kernel reads CopySegment as three u64");

// Paged blocks → contiguous staging. Copies (block, part) of layers [first_layer, first_layer +
// layer_count) into staging laid out [layer][part (K then V; MLA has one)][block, in the order of
// `blocks`], each piece layout.part_bytes() long, so staging needs layer_count * parts *
// blocks.size() * part_bytes bytes (staging_bytes may be larger). A block may repeat (it is read
// twice). Fails with kInvalidArgument when a block id is out of range, the layer range is empty or
// beyond the layout, layer_bases has no entry for a layer of the range, or staging is too small.
Result<std::vector<CopySegment>> gather_segments(const protocol::KvLayout& layout,
                                                 std::span<const uint64_t> layer_bases,
                                                 std::span<const uint32_t> blocks, uint32_t first_layer,
                                                 uint32_t layer_count, uint64_t staging,
                                                 uint64_t staging_bytes);

// The exact inverse of gather_segments: staging (same layout) → the paged blocks. Also fails when
// a block id repeats: two pieces would land in one block, and which one wins would depend on the
// executor's order.
Result<std::vector<CopySegment>> scatter_segments(const protocol::KvLayout& layout,
                                                  std::span<const uint64_t> layer_bases,
                                                  std::span<const uint32_t> blocks, uint32_t first_layer,
                                                  uint32_t layer_count, uint64_t staging,
                                                  uint64_t staging_bytes);

// Paged → paged with no staging: every part of block src_blocks[i] of each layer in the range goes
// to block dst_blocks[i] of the same layer on the other side. Needs
// src_layout.same_block_geometry(dst_layout) and as many destination as source blocks; a
// destination block may not repeat. Fails with kInvalidArgument otherwise, or on the range and
// base-address errors gather_segments reports.
Result<std::vector<CopySegment>> direct_segments(const protocol::KvLayout& src_layout,
                                                 std::span<const uint64_t> src_bases,
                                                 std::span<const uint32_t> src_blocks,
                                                 const protocol::KvLayout& dst_layout,
                                                 std::span<const uint64_t> dst_bases,
                                                 std::span<const uint32_t> dst_blocks, uint32_t first_layer,
                                                 uint32_t layer_count);

// All builders merge a piece into the previous segment when its source and destination both
// continue that segment exactly, so an unshuffled request becomes a few large segments. This
// splits every segment longer than max_bytes into pieces of max_bytes (the last one shorter), so
// no single GPU thread block is handed a huge segment while others idle. max_bytes == 0: no limit.
// Splitting at multiples of max_bytes keeps each piece's alignment when max_bytes is a multiple
// of 16.
std::vector<CopySegment> split_segments(std::vector<CopySegment> segments, uint64_t max_bytes);

uint64_t total_bytes(std::span<const CopySegment> segments);

// `segments` with each one merged into the previous where both its source and destination
// continue it exactly; empty when that leaves more than `max_runs` runs (the caller then copies
// piece by piece). Staged puts use it to copy a chunk from the engine's blocks straight into a
// receiver slot when those blocks lie in order.
std::vector<CopySegment> merge_contiguous(std::span<const CopySegment> segments, size_t max_runs);

// Executes segments with memcpy, in order, on the calling thread: the CPU version that CI and CPU
// engines use. Every address must be host-accessible.
void copy_segments_cpu(std::span<const CopySegment> segments);

}  // namespace kvf::gpudirect
