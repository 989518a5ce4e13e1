#include <algorithm>
#include <vector>

#include "catch.h"
#include "kvf/protocol/kv_layout.h"

using namespace kvf;
using namespace kvf::protocol;

namespace {

KvLayout make(const KvLayoutDesc& d) {
  Result<KvLayout> r = KvLayout::create(d);
  INFO(r.status().to_string());
  REQUIRE(r.ok());
  return *r;
}

// 2 layers, 3 blocks of 4 tokens, 2 heads of dim 8, 2-byte dtype: one (block, part) is
// 4 * 2 * 8 * 2 = 128 bytes.
KvLayoutDesc small(KvLayoutKind kind) {
  if (kind == KvLayoutKind::kMla) return {kind, 2, 3, 4, 1, 16, 2};  // latent dim 16: also 128 bytes
  return {kind, 2, 3, 4, 2, 8, 2};
}

}  // namespace

TEST_CASE("FlashAttention: all K blocks, then all V blocks") {
  const KvLayout l = make(small(KvLayoutKind::kFlashAttention));
  REQUIRE(l.parts() == 2);
  REQUIRE(l.part_bytes() == 128);
  REQUIRE(l.block_bytes() == 256);
  REQUIRE(l.layer_bytes() == 768);
  REQUIRE(l.bytes_per_token() == 2 * 2 * 2 * 8 * 2);
  REQUIRE(l.extent(0, KvPart::kKey) == ByteExtent{0, 128});
  REQUIRE(l.extent(1, KvPart::kKey) == ByteExtent{128, 128});
  REQUIRE(l.extent(2, KvPart::kKey) == ByteExtent{256, 128});
  REQUIRE(l.extent(0, KvPart::kValue) == ByteExtent{384, 128});
  REQUIRE(l.extent(2, KvPart::kValue) == ByteExtent{640, 128});
}

TEST_CASE("FlashInfer: K and V of a block side by side") {
  const KvLayout l = make(small(KvLayoutKind::kFlashInfer));
  REQUIRE(l.part_bytes() == 128);
  REQUIRE(l.layer_bytes() == 768);
  REQUIRE(l.extent(0, KvPart::kKey) == ByteExtent{0, 128});
  REQUIRE(l.extent(0, KvPart::kValue) == ByteExtent{128, 128});
  REQUIRE(l.extent(1, KvPart::kKey) == ByteExtent{256, 128});
  REQUIRE(l.extent(2, KvPart::kValue) == ByteExtent{640, 128});
}

TEST_CASE("MLA: one latent part per block") {
  const KvLayout l = make(small(KvLayoutKind::kMla));
  REQUIRE(l.parts() == 1);
  REQUIRE(l.part_bytes() == 4 * 16 * 2);
  REQUIRE(l.block_bytes() == 128);
  REQUIRE(l.layer_bytes() == 384);
  REQUIRE(l.bytes_per_token() == 2 * 16 * 2);
  REQUIRE(l.extent(2, KvPart::kKey) == ByteExtent{256, 128});
  Result<ByteExtent> v = l.extent_checked(0, KvPart::kValue);
  REQUIRE_FALSE(v.ok());
  REQUIRE(v.status().code() == ErrorCode::kInvalidArgument);
}

TEST_CASE("extent_checked rejects blocks out of range") {
  const KvLayout l = make(small(KvLayoutKind::kFlashAttention));
  REQUIRE(l.extent_checked(2, KvPart::kValue).ok());
  REQUIRE(*l.extent_checked(2, KvPart::kValue) == l.extent(2, KvPart::kValue));
  Result<ByteExtent> r = l.extent_checked(3, KvPart::kKey);
  REQUIRE_FALSE(r.ok());
  REQUIRE(r.status().message() == "block 3 out of range (num_blocks 3)");
}

TEST_CASE("the extents of a layer tile it exactly") {
  for (KvLayoutKind kind : {KvLayoutKind::kFlashAttention, KvLayoutKind::kFlashInfer, KvLayoutKind::kMla}) {
    for (uint32_t blocks : {1u, 2u, 7u, 64u}) {
      KvLayoutDesc d = small(kind);
      d.num_blocks = blocks;
      d.block_tokens = 16;
      d.dtype_bytes = 1;
      const KvLayout l = make(d);
      std::vector<ByteExtent> extents;
      for (uint32_t b = 0; b < blocks; ++b) {
        for (uint32_t p = 0; p < l.parts(); ++p) extents.push_back(l.extent(b, static_cast<KvPart>(p)));
      }
      std::sort(extents.begin(), extents.end(), [](auto& a, auto& b) { return a.offset < b.offset; });
      INFO(l.to_string());
      uint64_t at = 0;
      for (const ByteExtent& e : extents) {
        REQUIRE(e.offset == at);  // no gap, no overlap
        REQUIRE(e.length == l.part_bytes());
        at += e.length;
      }
      REQUIRE(at == l.layer_bytes());
    }
  }
}

TEST_CASE("Llama-3-8B shape") {
  // 32 layers, 8 KV heads of dim 128, bf16, 16-token blocks.
  const KvLayout l = make({KvLayoutKind::kFlashAttention, 32, 1000, 16, 8, 128, 2});
  REQUIRE(l.part_bytes() == 32 * 1024);
  REQUIRE(l.block_bytes() == 64 * 1024);
  REQUIRE(l.bytes_per_token() == 128 * 1024);
  REQUIRE(l.layer_bytes() == 1000ull * 64 * 1024);
  REQUIRE(l.extent(999, KvPart::kValue) == ByteExtent{1999ull * 32 * 1024, 32 * 1024});
}

TEST_CASE("invalid descriptions are rejected") {
  const KvLayoutDesc good = small(KvLayoutKind::kFlashAttention);
  REQUIRE(KvLayout::create(good).ok());
  for (uint32_t KvLayoutDesc::*field :
       {&KvLayoutDesc::num_layers, &KvLayoutDesc::num_blocks, &KvLayoutDesc::block_tokens,
        &KvLayoutDesc::kv_heads, &KvLayoutDesc::head_dim, &KvLayoutDesc::dtype_bytes}) {
    KvLayoutDesc d = good;
    d.*field = 0;
    Result<KvLayout> r = KvLayout::create(d);
    REQUIRE_FALSE(r.ok());
    REQUIRE(r.status().code() == ErrorCode::kInvalidArgument);
    REQUIRE(r.status().message().find("must be non-zero") != std::string::npos);
  }
  SECTION("MLA with more than one KV head") {
    KvLayoutDesc d = small(KvLayoutKind::kMla);
    d.kv_heads = 2;
    REQUIRE_FALSE(KvLayout::create(d).ok());
  }
  SECTION("sizes past 2^63") {
    const uint32_t big = 0xffffffffu;
    REQUIRE_FALSE(KvLayout::create({KvLayoutKind::kFlashInfer, big, big, big, big, big, big}).ok());
    // 2^31 blocks of 2^32 bytes: 2^63 exactly for one layer, one byte too many.
    REQUIRE_FALSE(KvLayout::create({KvLayoutKind::kMla, 1, 1u << 31, 1u << 16, 1, 1u << 14, 4}).ok());
    REQUIRE(KvLayout::create({KvLayoutKind::kMla, 1, 1u << 30, 1u << 16, 1, 1u << 14, 4}).ok());
  }
  SECTION("unknown kind") {
    KvLayoutDesc d = good;
    d.kind = static_cast<KvLayoutKind>(7);
    REQUIRE_FALSE(KvLayout::create(d).ok());
  }
}

TEST_CASE("same_block_geometry ignores only num_blocks") {
  const KvLayoutDesc a = {KvLayoutKind::kFlashAttention, 32, 1000, 16, 8, 128, 2};
  KvLayoutDesc b = a;
  b.num_blocks = 5;
  REQUIRE(make(a).same_block_geometry(make(b)));
  b.head_dim = 64;
  REQUIRE_FALSE(make(a).same_block_geometry(make(b)));
  KvLayoutDesc c = a;
  c.kind = KvLayoutKind::kFlashInfer;
  REQUIRE_FALSE(make(a).same_block_geometry(make(c)));
}

TEST_CASE("layout kind names parse back") {
  for (KvLayoutKind k : {KvLayoutKind::kFlashAttention, KvLayoutKind::kFlashInfer, KvLayoutKind::kMla}) {
    Result<KvLayoutKind> r = parse_layout_kind(layout_kind_name(k));
    REQUIRE(r.ok());
    REQUIRE(*r == k);
  }
  REQUIRE(layout_kind_name(KvLayoutKind::kFlashAttention) == "flash_attention");
  REQUIRE(*parse_layout_kind("flash_infer") == KvLayoutKind::kFlashInfer);
  Result<KvLayoutKind> bad = parse_layout_kind("paged");
  REQUIRE_FALSE(bad.ok());
  REQUIRE(bad.status().message().find("'paged'") != std::string::npos);
  REQUIRE(make(small(KvLayoutKind::kMla)).to_string() ==
          "mla(layers=2 blocks=3 block_tokens=4 kv_heads=1 head_dim=16 dtype_bytes=2)");
}
