// Segment builders (gather / scatter / direct) and the CPU executor: every block lands bytewise
// where an independent per-block reference (KvLayout::extent, no merging, no staging) puts it, and
// every byte nobody targets keeps its poison. Random data and block orders come from one seed,
// printed at start; KVF_TEST_SEED=<n> repeats a run.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "catch.h"
#include "kvf/gpudirect/cuda_probe.h"
#include "kvf/gpudirect/paged_copy.h"
#include "kvf/gpudirect/segment_copier.h"
#include "paged_copy_fixtures.h"

using namespace kvf;
using namespace kvf::gpudirect;
using namespace kvf::protocol;
using namespace kvf::test;

namespace {

// One host allocation holding every layer buffer, `gap` poisoned bytes after each, so stray writes
// past a layer show up and layer bases are not adjacent (no merging across layers).
struct Paged {
  Paged(const KvLayout& layout, uint64_t gap, uint8_t fill)
      : stride(layout.layer_bytes() + gap), bytes(stride * layout.desc().num_layers, fill) {
    for (uint32_t l = 0; l < layout.desc().num_layers; ++l) bases.push_back(address(l * stride));
  }
  uint64_t address(uint64_t offset) const { return reinterpret_cast<uintptr_t>(bytes.data()) + offset; }
  uint8_t* layer(uint32_t l) { return bytes.data() + l * stride; }
  const uint8_t* layer(uint32_t l) const { return bytes.data() + l * stride; }

  uint64_t stride;
  std::vector<uint8_t> bytes;
  std::vector<uint64_t> bases;
};

// The reference: what the destination must look like after moving block src_blocks[i] of each
// layer in [first, first + count) to dst_blocks[i], computed block by block from extents alone.
Paged expected_paged(const KvLayout& sl, const Paged& src, const std::vector<uint32_t>& sb,
                     const KvLayout& dl, const Paged& dst_before, const std::vector<uint32_t>& db,
                     uint32_t first, uint32_t count) {
  Paged out = dst_before;
  out.bases.clear();  // addresses of a copy are meaningless; only bytes are compared
  for (uint32_t l = first; l < first + count; ++l) {
    for (size_t i = 0; i < sb.size(); ++i) {
      for (uint32_t p = 0; p < sl.parts(); ++p) {
        const ByteExtent s = sl.extent(sb[i], static_cast<KvPart>(p));
        const ByteExtent d = dl.extent(db[i], static_cast<KvPart>(p));
        REQUIRE(s.length == d.length);
        std::memcpy(out.layer(l) + d.offset, src.layer(l) + s.offset, s.length);
      }
    }
  }
  return out;
}

// The staging a gather must produce: [layer][part][block in request order], then poison.
std::vector<uint8_t> expected_staging(const KvLayout& sl, const Paged& src, const std::vector<uint32_t>& sb,
                                      uint32_t first, uint32_t count, uint64_t staging_bytes) {
  std::vector<uint8_t> out(staging_bytes, kPoison);
  uint64_t at = 0;
  for (uint32_t l = first; l < first + count; ++l) {
    for (uint32_t p = 0; p < sl.parts(); ++p) {
      for (uint32_t b : sb) {
        const ByteExtent s = sl.extent(b, static_cast<KvPart>(p));
        std::memcpy(out.data() + at, src.layer(l) + s.offset, s.length);
        at += s.length;
      }
    }
  }
  return out;
}

std::vector<CopySegment> require_ok(Result<std::vector<CopySegment>> r) {
  INFO(r.status().to_string());
  REQUIRE(r.ok());
  return std::move(r).value();
}

void require_invalid(const Result<std::vector<CopySegment>>& r, const std::string& words) {
  REQUIRE_FALSE(r.ok());
  INFO(r.status().to_string());
  REQUIRE(r.status().code() == ErrorCode::kInvalidArgument);
  REQUIRE(r.status().message().find(words) != std::string::npos);
}

}  // namespace

TEST_CASE("gather then scatter moves every block exactly, and nothing else") {
  std::mt19937_64 rng(test_seed("test_paged_copy"));
  for (const KvLayoutDesc& shape : paged_shapes()) {
    const KvLayout src_layout = make_layout(shape);
    const KvLayout dst_layout = make_layout(with_blocks(shape, shape.num_blocks + 5));
    INFO(src_layout.to_string());
    Paged src(src_layout, 13, 0);
    randomize(src.bytes, rng);
    const uint32_t layers = shape.num_layers;
    // All layers, then an inner range (layer ranges select bases by layer number).
    for (auto [first, count] : {std::pair<uint32_t, uint32_t>{0, layers}, {1, layers - 2}}) {
      CAPTURE(first, count);
      const uint32_t nblocks = 1 + static_cast<uint32_t>(rng() % shape.num_blocks);
      const std::vector<uint32_t> sb = shuffled_blocks(shape.num_blocks, nblocks, rng);
      const std::vector<uint32_t> db = shuffled_blocks(dst_layout.desc().num_blocks, nblocks, rng);
      const uint64_t needed = uint64_t{count} * src_layout.parts() * nblocks * src_layout.part_bytes();
      std::vector<uint8_t> staging(needed + 31, kPoison);  // the 31 extra bytes must stay poison
      const uint64_t staging_at = reinterpret_cast<uintptr_t>(staging.data());

      const std::vector<CopySegment> gather =
          require_ok(gather_segments(src_layout, src.bases, sb, first, count, staging_at, staging.size()));
      REQUIRE(total_bytes(gather) == needed);
      copy_segments_cpu(gather);
      REQUIRE(staging == expected_staging(src_layout, src, sb, first, count, staging.size()));

      Paged dst(dst_layout, 13, kPoison);
      const Paged want = expected_paged(src_layout, src, sb, dst_layout, dst, db, first, count);
      const std::vector<CopySegment> scatter =
          require_ok(scatter_segments(dst_layout, dst.bases, db, first, count, staging_at, needed));
      REQUIRE(total_bytes(scatter) == needed);
      copy_segments_cpu(scatter);
      REQUIRE(dst.bytes == want.bytes);

      // The same scatter cut into 100-byte pieces gives the same bytes.
      Paged dst_split(dst_layout, 13, kPoison);
      const std::vector<CopySegment> pieces = split_segments(
          require_ok(scatter_segments(dst_layout, dst_split.bases, db, first, count, staging_at, needed)),
          100);
      REQUIRE(std::all_of(pieces.begin(), pieces.end(), [](const CopySegment& s) { return s.bytes <= 100; }));
      copy_segments_cpu(pieces);
      REQUIRE(dst_split.bytes == want.bytes);
    }
  }
}

TEST_CASE("gather reads a repeated source block twice") {
  std::mt19937_64 rng(test_seed("test_paged_copy") + 1);
  const KvLayout layout = make_layout(paged_shapes()[1]);
  Paged src(layout, 0, 0);
  randomize(src.bytes, rng);
  const std::vector<uint32_t> sb = {5, 9, 5};
  const uint64_t needed = uint64_t{layout.desc().num_layers} * 2 * 3 * layout.part_bytes();
  std::vector<uint8_t> staging(needed, kPoison);
  copy_segments_cpu(require_ok(gather_segments(layout, src.bases, sb, 0, layout.desc().num_layers,
                                               reinterpret_cast<uintptr_t>(staging.data()), needed)));
  REQUIRE(staging == expected_staging(layout, src, sb, 0, layout.desc().num_layers, needed));
}

TEST_CASE("direct copies move every block exactly, and nothing else") {
  std::mt19937_64 rng(test_seed("test_paged_copy") + 2);
  for (const KvLayoutDesc& shape : paged_shapes()) {
    const KvLayout src_layout = make_layout(shape);
    const KvLayout dst_layout = make_layout(with_blocks(shape, shape.num_blocks * 2));
    INFO(src_layout.to_string());
    Paged src(src_layout, 7, 0);
    randomize(src.bytes, rng);
    for (auto [first, count] : {std::pair<uint32_t, uint32_t>{0, shape.num_layers}, {2, 1}}) {
      CAPTURE(first, count);
      const uint32_t nblocks = 1 + static_cast<uint32_t>(rng() % shape.num_blocks);
      const std::vector<uint32_t> sb = shuffled_blocks(shape.num_blocks, nblocks, rng);
      const std::vector<uint32_t> db = shuffled_blocks(dst_layout.desc().num_blocks, nblocks, rng);
      Paged dst(dst_layout, 7, kPoison);
      const Paged want = expected_paged(src_layout, src, sb, dst_layout, dst, db, first, count);
      const std::vector<CopySegment> segs =
          require_ok(direct_segments(src_layout, src.bases, sb, dst_layout, dst.bases, db, first, count));
      REQUIRE(total_bytes(segs) == uint64_t{count} * src_layout.block_bytes() * nblocks);
      copy_segments_cpu(segs);
      REQUIRE(dst.bytes == want.bytes);
    }
  }
}

TEST_CASE("unshuffled requests merge into one segment per layer-part run") {
  const KvLayoutDesc fa{KvLayoutKind::kFlashAttention, 4, 37, 16, 2, 64, 2};
  const KvLayoutDesc fi{KvLayoutKind::kFlashInfer, 4, 37, 16, 2, 64, 2};
  const KvLayoutDesc mla{KvLayoutKind::kMla, 4, 37, 16, 1, 128, 2};
  std::vector<uint32_t> first10(10);
  std::iota(first10.begin(), first10.end(), 0u);
  std::vector<uint32_t> all(37);
  std::iota(all.begin(), all.end(), 0u);
  std::vector<uint32_t> moved10(10);
  std::iota(moved10.begin(), moved10.end(), 20u);  // blocks 20..29: still one run
  // Bases with gaps: no layer continues the previous one. The staging address is a fake; building
  // segments never touches memory.
  auto bases_with_gap = [](const KvLayout& l, uint64_t at, uint64_t gap) {
    std::vector<uint64_t> b;
    for (uint32_t i = 0; i < l.desc().num_layers; ++i) b.push_back(at + i * (l.layer_bytes() + gap));
    return b;
  };
  const uint64_t staging = 1ull << 40;
  const uint64_t big = 1ull << 30;

  SECTION("FlashAttention gather: K run and V run per layer; all blocks make one run per layer") {
    const KvLayout l = make_layout(fa);
    const auto bases = bases_with_gap(l, 1ull << 32, 4096);
    auto segs = require_ok(gather_segments(l, bases, first10, 0, 4, staging, big));
    REQUIRE(segs.size() == 4 * 2);
    REQUIRE(segs[0] == CopySegment{bases[0], staging, 10 * l.part_bytes()});
    REQUIRE(segs[1] ==
            CopySegment{bases[0] + 37 * l.part_bytes(), staging + 10 * l.part_bytes(), 10 * l.part_bytes()});
    REQUIRE(require_ok(gather_segments(l, bases, all, 0, 4, staging, big)).size() == 4);
    // Layers that happen to be adjacent in memory merge too: one segment for everything.
    const auto packed = bases_with_gap(l, 1ull << 32, 0);
    REQUIRE(require_ok(gather_segments(l, packed, all, 0, 4, staging, big)).size() == 1);
  }
  SECTION("FlashAttention direct and scatter: one segment per layer-part run") {
    const KvLayout l = make_layout(fa);
    const auto sb = bases_with_gap(l, 1ull << 32, 4096);
    const auto db = bases_with_gap(l, 1ull << 36, 4096);
    REQUIRE(require_ok(direct_segments(l, sb, first10, l, db, moved10, 0, 4)).size() == 4 * 2);
    REQUIRE(require_ok(scatter_segments(l, db, moved10, 1, 2, staging, big)).size() == 2 * 2);
  }
  SECTION("FlashInfer direct: K and V side by side, one segment per layer") {
    const KvLayout l = make_layout(fi);
    const auto sb = bases_with_gap(l, 1ull << 32, 4096);
    const auto db = bases_with_gap(l, 1ull << 36, 4096);
    auto segs = require_ok(direct_segments(l, sb, first10, l, db, moved10, 0, 4));
    REQUIRE(segs.size() == 4);
    REQUIRE(segs[0] == CopySegment{sb[0], db[0] + 20 * l.block_bytes(), 10 * l.block_bytes()});
    // Staging is part-major, so a FlashInfer gather cannot merge across blocks: K of block i and
    // K of block i+1 are a V apart in the paged buffer.
    REQUIRE(require_ok(gather_segments(l, sb, first10, 0, 4, staging, big)).size() == 4 * 2 * 10);
  }
  SECTION("MLA: one run per layer") {
    const KvLayout l = make_layout(mla);
    const auto sb = bases_with_gap(l, 1ull << 32, 4096);
    const auto db = bases_with_gap(l, 1ull << 36, 4096);
    REQUIRE(require_ok(gather_segments(l, sb, first10, 0, 4, staging, big)).size() == 4);
    REQUIRE(require_ok(direct_segments(l, sb, first10, l, db, moved10, 0, 4)).size() == 4);
  }
  SECTION("a shuffled request merges only its runs") {
    const KvLayout l = make_layout(fa);
    const auto bases = bases_with_gap(l, 1ull << 32, 4096);
    const std::vector<uint32_t> blocks = {0, 1, 2, 10, 11, 5};  // runs {0,1,2} {10,11} {5}
    REQUIRE(require_ok(gather_segments(l, bases, blocks, 0, 1, staging, big)).size() == 2 * 3);
  }
}

TEST_CASE("split_segments cuts long segments and keeps the bytes") {
  const std::vector<CopySegment> in = {{1000, 5000, 250}, {9000, 9500, 100}, {1, 2, 0}, {20000, 30000, 7}};
  const std::vector<CopySegment> out = split_segments(in, 100);
  const std::vector<CopySegment> want = {{1000, 5000, 100}, {1100, 5100, 100}, {1200, 5200, 50},
                                         {9000, 9500, 100}, {1, 2, 0},         {20000, 30000, 7}};
  REQUIRE(out == want);
  REQUIRE(total_bytes(out) == total_bytes(in));
  REQUIRE(split_segments(in, 0) == in);    // no limit
  REQUIRE(split_segments(in, 250) == in);  // nothing longer than the limit
  REQUIRE(split_segments({}, 16).empty());
  REQUIRE(total_bytes({}) == 0);
}

TEST_CASE("merge_contiguous joins pieces whose source and destination both continue") {
  // A layer's K blocks in order into slot offsets 0.., then its V blocks from elsewhere: two runs.
  std::vector<CopySegment> in;
  for (uint64_t b = 0; b < 4; ++b) in.push_back({1000 + b * 64, b * 64, 64});
  for (uint64_t b = 0; b < 4; ++b) in.push_back({9000 + b * 64, 256 + b * 64, 64});
  const std::vector<CopySegment> want = {{1000, 0, 256}, {9000, 256, 256}};
  REQUIRE(merge_contiguous(in, 16) == want);
  REQUIRE(merge_contiguous(in, 2) == want);
  REQUIRE(merge_contiguous(in, 1).empty());  // more runs than allowed: the caller gathers
  REQUIRE(total_bytes(merge_contiguous(in, 2)) == total_bytes(in));
  // A source that continues while the destination jumps (a shuffled source block) stays apart.
  const std::vector<CopySegment> jump = {{0, 0, 64}, {64, 128, 64}, {128, 192, 64}};
  const std::vector<CopySegment> jump_want = {{0, 0, 64}, {64, 128, 128}};
  REQUIRE(merge_contiguous(jump, 16) == jump_want);
  // And a destination that continues while the source jumps.
  const std::vector<CopySegment> src_jump = {{0, 0, 64}, {640, 64, 64}};
  REQUIRE(merge_contiguous(src_jump, 16) == src_jump);
  REQUIRE(merge_contiguous({}, 4).empty());
}

TEST_CASE("copy_segments_cpu skips empty segments") {
  uint8_t a[4] = {1, 2, 3, 4};
  uint8_t b[4] = {0, 0, 0, 0};
  const std::vector<CopySegment> segs = {
      {0, 0, 0}, {reinterpret_cast<uintptr_t>(a + 1), reinterpret_cast<uintptr_t>(b), 2}};
  copy_segments_cpu(segs);
  REQUIRE(b[0] == 2);
  REQUIRE(b[1] == 3);
  REQUIRE(b[2] == 0);
}

TEST_CASE("segment builders reject bad requests with a clear message") {
  const KvLayoutDesc fa{KvLayoutKind::kFlashAttention, 4, 37, 16, 2, 64, 2};
  const KvLayout l = make_layout(fa);
  std::vector<uint64_t> bases;
  for (uint32_t i = 0; i < 4; ++i) bases.push_back((uint64_t{i} + 1) << 32);
  const std::vector<uint32_t> blocks = {3, 36, 0};
  const uint64_t staging = 1ull << 40;
  const uint64_t needed = 4 * 2 * 3 * l.part_bytes();

  SECTION("block out of range") {
    const std::vector<uint32_t> bad = {3, 37, 1};
    require_invalid(gather_segments(l, bases, bad, 0, 4, staging, needed),
                    "source block [1] = 37 out of range");
    require_invalid(scatter_segments(l, bases, bad, 0, 4, staging, needed), "destination block [1] = 37");
    require_invalid(direct_segments(l, bases, bad, l, bases, blocks, 0, 4), "source block [1] = 37");
    require_invalid(direct_segments(l, bases, blocks, l, bases, bad, 0, 1), "destination block [1] = 37");
  }
  SECTION("staging too small") {
    REQUIRE(require_ok(gather_segments(l, bases, blocks, 0, 4, staging, needed)).size() > 0);
    require_invalid(gather_segments(l, bases, blocks, 0, 4, staging, needed - 1), "too small");
    require_invalid(scatter_segments(l, bases, blocks, 0, 4, staging, needed - 1), "too small");
    require_invalid(gather_segments(l, bases, blocks, 0, 4, staging, 0), "too small");
  }
  SECTION("layer range") {
    require_invalid(gather_segments(l, bases, blocks, 3, 2, staging, needed), "layers [3, 5) out of range");
    require_invalid(scatter_segments(l, bases, blocks, 4, 1, staging, needed), "out of range");
    require_invalid(gather_segments(l, bases, blocks, 0, 0, staging, needed), "empty layer range");
    require_invalid(direct_segments(l, bases, blocks, l, bases, blocks, 0, 5), "out of range");
    // first_layer + layer_count wraps in 32 bits: still out of range, not layer 1.
    require_invalid(gather_segments(l, bases, blocks, 0xFFFFFFFFu, 2, staging, needed), "out of range");
  }
  SECTION("a base address missing for a layer of the range") {
    const std::vector<uint64_t> short_bases(bases.begin(), bases.begin() + 2);
    require_invalid(gather_segments(l, short_bases, blocks, 1, 2, staging, needed), "layer 2 is copied");
    REQUIRE(require_ok(gather_segments(l, short_bases, blocks, 0, 2, staging, needed)).size() > 0);
    require_invalid(direct_segments(l, bases, blocks, l, short_bases, blocks, 0, 4), "dst_bases");
    require_invalid(direct_segments(l, short_bases, blocks, l, bases, blocks, 0, 4), "src_bases");
  }
  SECTION("a destination block twice") {
    const std::vector<uint32_t> dup = {4, 9, 4};
    require_invalid(scatter_segments(l, bases, dup, 0, 4, staging, needed), "block 4 appears more than once");
    require_invalid(direct_segments(l, bases, blocks, l, bases, dup, 0, 4), "appears more than once");
  }
  SECTION("direct: geometry and counts must match") {
    KvLayoutDesc other = fa;
    other.head_dim = 128;
    require_invalid(direct_segments(l, bases, blocks, make_layout(other), bases, blocks, 0, 4),
                    "differ in block geometry");
    KvLayoutDesc fi = fa;
    fi.kind = KvLayoutKind::kFlashInfer;
    require_invalid(direct_segments(l, bases, blocks, make_layout(fi), bases, blocks, 0, 4),
                    "differ in block geometry");
    const std::vector<uint32_t> two = {1, 2};
    require_invalid(direct_segments(l, bases, blocks, l, bases, two, 0, 4),
                    "3 source blocks but 2 destination blocks");
    // Only num_blocks may differ.
    REQUIRE(
        require_ok(direct_segments(l, bases, blocks, make_layout(with_blocks(fa, 99)), bases, blocks, 0, 4))
            .size() > 0);
  }
  SECTION("an empty block list is an empty copy") {
    REQUIRE(require_ok(gather_segments(l, bases, {}, 0, 4, staging, 0)).empty());
    REQUIRE(require_ok(direct_segments(l, bases, {}, l, bases, {}, 0, 4)).empty());
  }
}

TEST_CASE("SegmentCopier reports a machine without a GPU as unavailable") {
  if (cuda_availability().device_count > 0) {
    SUCCEED("a GPU is present: tests/gpu covers SegmentCopier");
    return;
  }
  auto copier = SegmentCopier::create(0);
  REQUIRE_FALSE(copier.ok());
  INFO(copier.status().to_string());
  REQUIRE(copier.status().code() == ErrorCode::kUnavailable);
}
