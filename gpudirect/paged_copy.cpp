#include "kvf/gpudirect/paged_copy.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace kvf::gpudirect {
namespace {

using protocol::KvLayout;
using protocol::KvLayoutKind;
using protocol::KvPart;

Status invalid(std::string message) {
  return Status(ErrorCode::kInvalidArgument, std::move(message));
}

std::string str(uint64_t v) {
  return std::to_string(v);
}

// The layer range must be non-empty, inside the layout, and every layer in it needs a base.
Status check_layers(const KvLayout& layout, size_t bases, const char* bases_name, uint32_t first_layer,
                    uint32_t layer_count) {
  if (layer_count == 0) return invalid("empty layer range (layer_count is 0)");
  const uint64_t end = uint64_t{first_layer} + layer_count;  // in 64 bits: first + count may wrap u32
  if (end > layout.desc().num_layers) {
    return invalid("layers [" + str(first_layer) + ", " + str(end) + ") out of range: the layout has " +
                   str(layout.desc().num_layers) + " layers");
  }
  if (bases < end) {
    return invalid(std::string(bases_name) + " has " + str(bases) + " base addresses, but layer " +
                   str(end - 1) + " is copied (one base per layer, indexed by layer number)");
  }
  return Status::Ok();
}

// Every id inside the pool; with `unique`, none twice (two pieces landing in one block would race
// on the GPU, and which one wins would depend on the executor).
Status check_blocks(const KvLayout& layout, std::span<const uint32_t> blocks, const char* what, bool unique) {
  const uint32_t pool = layout.desc().num_blocks;
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (blocks[i] >= pool) {
      return invalid(std::string(what) + " block [" + str(i) + "] = " + str(blocks[i]) +
                     " out of range (pool of " + str(pool) + ")");
    }
  }
  if (unique && blocks.size() > 1) {
    std::vector<uint32_t> sorted(blocks.begin(), blocks.end());
    std::sort(sorted.begin(), sorted.end());
    auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    if (dup != sorted.end()) {
      return invalid(std::string(what) + " block " + str(*dup) + " appears more than once");
    }
  }
  return Status::Ok();
}

// Appends one piece, extending the previous segment when both ends continue it exactly: that is
// what turns runs of adjacent blocks into one large copy.
void append(std::vector<CopySegment>& out, uint64_t src, uint64_t dst, uint64_t bytes) {
  if (!out.empty()) {
    CopySegment& last = out.back();
    if (last.src + last.bytes == src && last.dst + last.bytes == dst) {
      last.bytes += bytes;
      return;
    }
  }
  out.push_back(CopySegment{src, dst, bytes});
}

// gather (to_staging) and scatter share one walk: staging order is [layer][part][block].
Result<std::vector<CopySegment>> staged_segments(const KvLayout& layout,
                                                 std::span<const uint64_t> layer_bases,
                                                 std::span<const uint32_t> blocks, uint32_t first_layer,
                                                 uint32_t layer_count, uint64_t staging,
                                                 uint64_t staging_bytes, bool to_staging) {
  if (Status s = check_layers(layout, layer_bases.size(), "layer_bases", first_layer, layer_count); !s.ok()) {
    return s;
  }
  if (Status s = check_blocks(layout, blocks, to_staging ? "source" : "destination", !to_staging); !s.ok()) {
    return s;
  }
  const uint64_t part_bytes = layout.part_bytes();
  const uint32_t parts = layout.parts();
  // Each factor is bounded by the layout (< 2^63 in total) except blocks.size() in a gather, where
  // ids may repeat; check the product rather than trust it.
  uint64_t needed = 0;
  if (__builtin_mul_overflow(uint64_t{layer_count} * parts * part_bytes, uint64_t{blocks.size()}, &needed)) {
    return invalid("staging size overflows 64 bits (" + str(blocks.size()) + " blocks)");
  }
  if (staging_bytes < needed) {
    return invalid("staging of " + str(staging_bytes) + " bytes is too small: " + str(layer_count) +
                   " layers x " + str(parts) + " parts x " + str(blocks.size()) + " blocks x " +
                   str(part_bytes) + " bytes = " + str(needed));
  }
  std::vector<CopySegment> out;
  uint64_t cursor = staging;
  for (uint64_t layer = first_layer; layer < uint64_t{first_layer} + layer_count; ++layer) {
    const uint64_t base = layer_bases[layer];
    for (uint32_t p = 0; p < parts; ++p) {
      for (uint32_t block : blocks) {
        const uint64_t paged = base + layout.extent(block, static_cast<KvPart>(p)).offset;
        if (to_staging) {
          append(out, paged, cursor, part_bytes);
        } else {
          append(out, cursor, paged, part_bytes);
        }
        cursor += part_bytes;
      }
    }
  }
  return out;
}

}  // namespace

Result<std::vector<CopySegment>> gather_segments(const KvLayout& layout,
                                                 std::span<const uint64_t> layer_bases,
                                                 std::span<const uint32_t> blocks, uint32_t first_layer,
                                                 uint32_t layer_count, uint64_t staging,
                                                 uint64_t staging_bytes) {
  return staged_segments(layout, layer_bases, blocks, first_layer, layer_count, staging, staging_bytes, true);
}

Result<std::vector<CopySegment>> scatter_segments(const KvLayout& layout,
                                                  std::span<const uint64_t> layer_bases,
                                                  std::span<const uint32_t> blocks, uint32_t first_layer,
                                                  uint32_t layer_count, uint64_t staging,
                                                  uint64_t staging_bytes) {
  return staged_segments(layout, layer_bases, blocks, first_layer, layer_count, staging, staging_bytes,
                         false);
}

Result<std::vector<CopySegment>> direct_segments(
    const KvLayout& src_layout, std::span<const uint64_t> src_bases, std::span<const uint32_t> src_blocks,
    const KvLayout& dst_layout, std::span<const uint64_t> dst_bases, std::span<const uint32_t> dst_blocks,
    uint32_t first_layer, uint32_t layer_count) {
  if (!src_layout.same_block_geometry(dst_layout)) {
    return invalid("layouts differ in block geometry: " + src_layout.to_string() + " vs " +
                   dst_layout.to_string());
  }
  if (src_blocks.size() != dst_blocks.size()) {
    return invalid(str(src_blocks.size()) + " source blocks but " + str(dst_blocks.size()) +
                   " destination blocks");
  }
  // Same geometry means the same num_layers, so one range check covers both sides.
  if (Status s = check_layers(src_layout, src_bases.size(), "src_bases", first_layer, layer_count); !s.ok()) {
    return s;
  }
  if (Status s = check_layers(dst_layout, dst_bases.size(), "dst_bases", first_layer, layer_count); !s.ok()) {
    return s;
  }
  if (Status s = check_blocks(src_layout, src_blocks, "source", false); !s.ok()) return s;
  if (Status s = check_blocks(dst_layout, dst_blocks, "destination", true); !s.ok()) return s;

  const uint32_t parts = src_layout.parts();
  // Walk in the order the layout stores bytes, so runs of adjacent blocks merge: FlashAttention
  // keeps all K blocks then all V blocks (part-major); FlashInfer keeps K and V of a block side by
  // side (block-major). MLA has one part, so either order is the same.
  const bool block_major = src_layout.desc().kind == KvLayoutKind::kFlashInfer;
  std::vector<CopySegment> out;
  auto emit = [&](uint64_t src_base, uint64_t dst_base, size_t i, uint32_t p) {
    const auto part = static_cast<KvPart>(p);
    const protocol::ByteExtent s = src_layout.extent(src_blocks[i], part);
    append(out, src_base + s.offset, dst_base + dst_layout.extent(dst_blocks[i], part).offset, s.length);
  };
  for (uint64_t layer = first_layer; layer < uint64_t{first_layer} + layer_count; ++layer) {
    const uint64_t sb = src_bases[layer];
    const uint64_t db = dst_bases[layer];
    if (block_major) {
      for (size_t i = 0; i < src_blocks.size(); ++i)
        for (uint32_t p = 0; p < parts; ++p) emit(sb, db, i, p);
    } else {
      for (uint32_t p = 0; p < parts; ++p)
        for (size_t i = 0; i < src_blocks.size(); ++i) emit(sb, db, i, p);
    }
  }
  return out;
}

std::vector<CopySegment> split_segments(std::vector<CopySegment> segments, uint64_t max_bytes) {
  if (max_bytes == 0) return segments;
  const bool any_long = std::any_of(segments.begin(), segments.end(),
                                    [&](const CopySegment& s) { return s.bytes > max_bytes; });
  if (!any_long) return segments;
  std::vector<CopySegment> out;
  out.reserve(segments.size() + total_bytes(segments) / max_bytes);
  for (const CopySegment& s : segments) {
    if (s.bytes == 0) out.push_back(s);  // kept as given, like the no-split path does
    for (uint64_t off = 0; off < s.bytes; off += max_bytes) {
      out.push_back(CopySegment{s.src + off, s.dst + off, std::min(max_bytes, s.bytes - off)});
    }
  }
  return out;
}

uint64_t total_bytes(std::span<const CopySegment> segments) {
  uint64_t total = 0;
  for (const CopySegment& s : segments) total += s.bytes;
  return total;
}

std::vector<CopySegment> merge_contiguous(std::span<const CopySegment> segments, size_t max_runs) {
  std::vector<CopySegment> runs;
  for (const CopySegment& s : segments) {
    if (!runs.empty() && runs.back().src + runs.back().bytes == s.src &&
        runs.back().dst + runs.back().bytes == s.dst) {
      runs.back().bytes += s.bytes;
      continue;
    }
    if (runs.size() == max_runs) return {};
    runs.push_back(s);
  }
  return runs;
}

void copy_segments_cpu(std::span<const CopySegment> segments) {
  for (const CopySegment& s : segments) {
    if (s.bytes == 0) continue;
    std::memcpy(reinterpret_cast<void*>(static_cast<uintptr_t>(s.dst)),
                reinterpret_cast<const void*>(static_cast<uintptr_t>(s.src)), s.bytes);
  }
}

}  // namespace kvf::gpudirect
