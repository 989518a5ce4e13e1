#include <xxhash.h>

#include <numeric>
#include <unordered_set>
#include <vector>

#include "catch.h"
#include "kvf/protocol/chunk_key.h"

using namespace kvf;
using namespace kvf::protocol;

namespace {

const KvLayoutDesc kLlama3_8b = {KvLayoutKind::kFlashAttention, 32, 1000, 16, 8, 128, 2};

std::vector<uint32_t> iota_tokens(size_t n, uint32_t from = 0) {
  std::vector<uint32_t> t(n);
  std::iota(t.begin(), t.end(), from);
  return t;
}

void put_le(std::vector<uint8_t>& b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

ChunkKey xxh3(const std::vector<uint8_t>& b) {
  XXH128_hash_t h = XXH3_128bits(b.data(), b.size());
  return ChunkKey{h.high64, h.low64};
}

}  // namespace

TEST_CASE("keys chain: the keys of a prefix are a prefix of the keys") {
  const ChunkHasher h(model_fingerprint("m", kLlama3_8b), 16);
  const auto tokens = iota_tokens(200, 1000);
  const auto all = h.hash(tokens);
  REQUIRE(all.size() == 12);  // 200 / 16, the partial tail left out
  for (size_t n = 0; n <= tokens.size(); n += 7) {
    const auto some = h.hash(std::span<const uint32_t>(tokens).first(n));
    REQUIRE(some.size() == n / 16);
    REQUIRE(std::equal(some.begin(), some.end(), all.begin()));
  }
  // hash() is next() applied along the chain from the zero key.
  ChunkKey k;
  for (size_t i = 0; i < all.size(); ++i) {
    k = h.next(k, std::span<const uint32_t>(tokens).subspan(i * 16, 16));
    REQUIRE(k == all[i]);
  }
  std::unordered_set<ChunkKey> distinct(all.begin(), all.end());
  REQUIRE(distinct.size() == all.size());
}

TEST_CASE("a changed token changes its chunk's key and every later one, none before") {
  const ChunkHasher h(model_fingerprint("m", kLlama3_8b), 32);
  const auto tokens = iota_tokens(32 * 6);
  const auto base = h.hash(tokens);
  for (size_t chunk = 0; chunk < 6; ++chunk) {
    auto changed = tokens;
    changed[chunk * 32 + 17] ^= 1;
    const auto keys = h.hash(changed);
    for (size_t i = 0; i < 6; ++i) {
      if (i < chunk) {
        REQUIRE(keys[i] == base[i]);
      } else {
        REQUIRE(keys[i] != base[i]);
      }
    }
  }
}

TEST_CASE("different models give different keys") {
  const auto tokens = iota_tokens(512);
  const ChunkKey a = model_fingerprint("llama-3-8b", kLlama3_8b);
  KvLayoutDesc other_layout = kLlama3_8b;
  other_layout.dtype_bytes = 1;  // the same model in fp8
  const ChunkKey b = model_fingerprint("llama-3-8b", other_layout);
  const ChunkKey c = model_fingerprint("llama-3-8b-instruct", kLlama3_8b);
  REQUIRE(a != b);
  REQUIRE(a != c);
  REQUIRE(ChunkHasher(a).hash(tokens)[0] != ChunkHasher(b).hash(tokens)[0]);
  REQUIRE(ChunkHasher(a).hash(tokens)[1] != ChunkHasher(c).hash(tokens)[1]);

  // The pool size is not part of the model: engines of one model share keys.
  KvLayoutDesc bigger_pool = kLlama3_8b;
  bigger_pool.num_blocks = 1234567;
  REQUIRE(model_fingerprint("llama-3-8b", bigger_pool) == a);
}

TEST_CASE("the partial tail chunk is hashed only when asked") {
  const ChunkHasher h(model_fingerprint("m", kLlama3_8b), 256);
  const auto tokens = iota_tokens(600);
  const auto full = h.hash(tokens);
  const auto with_tail = h.hash(tokens, true);
  REQUIRE(full.size() == 2);
  REQUIRE(with_tail.size() == 3);
  REQUIRE(with_tail[0] == full[0]);
  REQUIRE(with_tail[1] == full[1]);
  REQUIRE(with_tail[2] == h.next(full[1], std::span<const uint32_t>(tokens).subspan(512)));
  // A tail that grows into a full chunk gets a different key: tail keys are not chunk keys.
  REQUIRE(h.hash(iota_tokens(768))[2] != with_tail[2]);
  REQUIRE(h.hash(iota_tokens(512), true).size() == 2);  // no empty tail
  REQUIRE(h.hash({}, true).empty());
}

TEST_CASE("chunk keys print and parse as 32 hex digits") {
  const ChunkKey k{0x0123456789abcdefull, 0xfedcba9876543210ull};
  REQUIRE(k.to_hex() == "0123456789abcdeffedcba9876543210");
  Result<ChunkKey> back = ChunkKey::from_hex(k.to_hex());
  REQUIRE(back.ok());
  REQUIRE(*back == k);
  REQUIRE(*ChunkKey::from_hex("0123456789ABCDEFFEDCBA9876543210") == k);
  REQUIRE(ChunkKey{}.to_hex() == std::string(32, '0'));
  REQUIRE(ChunkKey{}.is_zero());
  REQUIRE_FALSE(k.is_zero());

  for (const char* bad : {"", "0123", "0123456789abcdeffedcba987654321", "0123456789abcdeffedcba98765432100",
                          "0123456789abcdeffedcba987654321g", " 123456789abcdeffedcba9876543210",
                          "0x23456789abcdeffedcba9876543210"}) {
    Result<ChunkKey> r = ChunkKey::from_hex(bad);
    INFO(bad);
    REQUIRE_FALSE(r.ok());
    REQUIRE(r.status().code() == ErrorCode::kInvalidArgument);
  }
}

TEST_CASE("a zero chunk size is a setup error") {
  REQUIRE_THROWS(ChunkHasher(ChunkKey{}, 0));
}

TEST_CASE("golden keys: the serialization is the documented one and never changes") {
  // The fingerprint, built by hand: name length u64 | name | kind u8 | num_layers | block_tokens |
  // kv_heads | head_dim | dtype_bytes (u32 each), all little-endian.
  std::vector<uint8_t> fp_bytes;
  const std::string name = "llama-3-8b";
  put_le(fp_bytes, name.size(), 8);
  fp_bytes.insert(fp_bytes.end(), name.begin(), name.end());
  put_le(fp_bytes, 0, 1);
  for (uint32_t v : {32u, 16u, 8u, 128u, 2u}) put_le(fp_bytes, v, 4);
  const ChunkKey fp = xxh3(fp_bytes);
  REQUIRE(model_fingerprint(name, kLlama3_8b) == fp);

  // key_i = XXH3-128(key_{i-1}.hi | key_{i-1}.lo | fp.hi | fp.lo | tokens as u32), key_{-1} = 0.
  const auto tokens = iota_tokens(512);
  ChunkKey prev;
  std::vector<ChunkKey> expected;
  for (size_t chunk = 0; chunk < 2; ++chunk) {
    std::vector<uint8_t> b;
    for (uint64_t v : {prev.hi, prev.lo, fp.hi, fp.lo}) put_le(b, v, 8);
    for (size_t i = 0; i < 256; ++i) put_le(b, tokens[chunk * 256 + i], 4);
    prev = xxh3(b);
    expected.push_back(prev);
  }
  const auto keys = ChunkHasher(fp, 256).hash(tokens);
  REQUIRE(keys == expected);

  // Pinned values: XXH3 is a specified, stable hash, so these hold on every host and build.
  // If they change, keys stored by older versions (and peers running them) no longer match.
  CHECK(fp.to_hex() == "a4a1472d78c78e3098fb95cfec967356");
  CHECK(keys[0].to_hex() == "bc2ea1793980ef1166dd007117433ae7");
  CHECK(keys[1].to_hex() == "a2913f7b38e12103766b6a567acc6ca3");
}
