// The CPU KV codecs (gpudirect/kv_codec.h) and their format (protocol/kv_codec.h): the per-value math
// against known values, the branch-free restatements the encoder vectorizes against the header's
// functions, the header's checks, every codec's round trip on KV-like data in both geometries
// (K and V; the MLA latent), the fixed-rate codecs' bytes against a literal transcription of the
// spec (the bytes the GPU kernels must also produce), and malformed input (truncation, corrupt
// payloads, random byte flips) refused as errors, never a crash or a stray write. The random data
// comes from one seed, printed at start; KVF_TEST_SEED=<n> repeats a run.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../../gpudirect/kv_codec_lanes.h"  // private to gpudirect: checked here against the header
#include "catch.h"
#include "kvf/gpudirect/kv_codec.h"
#include "kvf/gpudirect/kv_codec_math.h"
#include "kvf/protocol/kv_codec.h"

using namespace kvf;
using namespace kvf::protocol;
namespace cm = kvf::codec_math;
namespace lanes = kvf::codec_lanes;

namespace {

uint64_t test_seed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("KVF_TEST_SEED");
    const uint64_t s = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::printf("test_kv_codec: KVF_TEST_SEED=%llu\n", static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

float f32(uint32_t bits) {
  return cm::as_float(bits);
}
uint32_t bits_of(float f) {
  return cm::as_bits(f);
}
uint16_t get16(const std::vector<uint8_t>& v, uint64_t at) {
  uint16_t x;
  std::memcpy(&x, v.data() + at, 2);
  return x;
}
void put16(std::vector<uint8_t>& v, uint64_t at, uint16_t x) {
  std::memcpy(v.data() + at, &x, 2);
}
uint32_t get32(const std::vector<uint8_t>& v, uint64_t at) {
  uint32_t x;
  std::memcpy(&x, v.data() + at, 4);
  return x;
}
template <typename T>
void put(std::vector<uint8_t>& v, uint64_t at, T x) {
  std::memcpy(v.data() + at, &x, sizeof(T));
}

// --- geometry and data ------------------------------------------------------------------------

KvChunkGeometry kv_geometry() {
  return {2, 2, 4, 16, 256, 2};
}  // K and V: 64 tokens x 256 channels
KvChunkGeometry mla_geometry() {
  return {2, 1, 4, 16, 576, 2};
}  // the MLA latent (512 + 64 rope)
KvChunkGeometry odd_geometry() {
  return {1, 2, 3, 8, 40, 2};
}  // 24 tokens, 40 channels: loop tails

uint64_t row_offset(const KvChunkGeometry& g, uint32_t layer, uint32_t part, uint32_t t) {
  const uint64_t row_bytes = uint64_t{g.channels} * 2;
  return ((uint64_t{layer} * g.blocks + t / g.block_tokens) * g.parts + part) * g.block_tokens * row_bytes +
         (t % g.block_tokens) * row_bytes;
}
uint16_t value_at(const KvChunkGeometry& g, const std::vector<uint8_t>& raw, uint32_t layer, uint32_t part,
                  uint32_t t, uint32_t c) {
  return get16(raw, row_offset(g, layer, part, t) + 2ull * c);
}
void set_value(const KvChunkGeometry& g, std::vector<uint8_t>& raw, uint32_t layer, uint32_t part, uint32_t t,
               uint32_t c, float x) {
  put16(raw, row_offset(g, layer, part, t) + 2ull * c, cm::float_to_bf16(x));
}

// bf16 values shaped like a KV cache: keys with a mean and a spread per channel and an outlier
// channel in 32 (large mean and spread), values per token near zero mean. Plus the edges the
// codecs branch on: an all-zero row, a row of -0 and +0 mixed, a row of bf16 subnormals, a
// channel that is constant over the tokens.
std::vector<uint8_t> kv_like(const KvChunkGeometry& g, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint8_t> raw(g.raw_bytes());
  for (uint32_t layer = 0; layer < g.layers; ++layer) {
    for (uint32_t part = 0; part < g.parts; ++part) {
      const bool keys = part == 0;
      std::vector<float> mean(g.channels), spread(g.channels);
      for (uint32_t c = 0; c < g.channels; ++c) {
        const bool outlier = c % 32 == 5;
        mean[c] = keys ? normal(rng) * (outlier ? 1.0f : 0.3f) : 0.0f;
        spread[c] = std::exp(0.1f * normal(rng)) * (keys && outlier ? 1.5f : 1.0f);
      }
      for (uint32_t t = 0; t < g.tokens(); ++t) {
        const float token_spread = keys ? 1.0f : 0.5f * std::exp(0.2f * normal(rng));
        for (uint32_t c = 0; c < g.channels; ++c) {
          set_value(g, raw, layer, part, t, c, mean[c] + spread[c] * token_spread * normal(rng));
        }
      }
      const uint32_t t = g.tokens();
      for (uint32_t c = 0; c < g.channels; ++c) {
        set_value(g, raw, layer, part, 3 % t, c, 0.0f);
        set_value(g, raw, layer, part, 5 % t, c, (c % 3 == 0) ? -0.0f : 0.0f);
        set_value(g, raw, layer, part, 7 % t, c, f32(0x00010000u * ((c % 5) + 1)) * ((c % 2) ? -1.0f : 1.0f));
      }
      for (uint32_t tt = 0; tt < t; ++tt) set_value(g, raw, layer, part, tt, 1 % g.channels, 0.75f);
    }
  }
  return raw;
}

Result<std::vector<uint8_t>> encode(const KvCodecParams& p, const KvChunkGeometry& g,
                                    const std::vector<uint8_t>& raw) {
  auto max = gpudirect::max_encoded_bytes(p, g);
  if (!max.ok()) return max.status();
  std::vector<uint8_t> out(max.value(), 0xEE);
  auto n = gpudirect::encode_chunk(p, g, raw, out);
  if (!n.ok()) return n.status();
  if (n.value() > max.value()) return Status(ErrorCode::kInternal, "encoded past max_encoded_bytes");
  out.resize(n.value());
  return out;
}

// Decodes into a buffer poisoned with `poison`.
Result<std::vector<uint8_t>> decode(const std::vector<uint8_t>& encoded, uint64_t raw_bytes,
                                    uint8_t poison = 0xA5) {
  std::vector<uint8_t> raw(raw_bytes, poison);
  if (Status s = gpudirect::decode_chunk(encoded, raw); !s.ok()) return s;
  return raw;
}

KvCodecParams params_of(KvCodec codec) {
  KvCodecParams p;
  p.codec = codec;
  p.group = 32;
  p.residual_tokens = 0;
  p.keep_fraction = 0.5f;
  return p;
}

constexpr KvCodec kAll[] = {KvCodec::kIdentity, KvCodec::kZstd, KvCodec::kLz4,  KvCodec::kInt8,
                            KvCodec::kFp8,      KvCodec::kInt4, KvCodec::kInt2, KvCodec::kDrop};

// --- the spec, transcribed one value at a time --------------------------------------------------

// The fixed-rate codecs' encoded chunk as protocol/kv_codec.h says it, over kv_codec_math.h: every
// reduction a plain fold in token or channel order, round_even the header's (nearbyint). The
// header's error estimates (bytes 40..47) are left 0: they are sums, in whatever order.
std::vector<uint8_t> reference_encode(const KvCodecParams& p, const KvChunkGeometry& g,
                                      const std::vector<uint8_t>& raw) {
  KvChunkHeader h;
  h.params = p;
  h.geometry = g;
  h.kept_tokens = g.tokens();
  h.raw_bytes = g.raw_bytes();
  const uint64_t table = 64 + 16ull * g.layers * g.parts;
  std::vector<uint8_t> out(fixed_encoded_bytes(p, g), 0);
  uint64_t offset = 0;
  const uint32_t T = g.tokens(), C = g.channels;
  for (uint32_t layer = 0; layer < g.layers; ++layer) {
    for (uint32_t part = 0; part < g.parts; ++part) {
      const uint64_t length = fixed_segment_bytes(p, g, part);
      write_chunk_segment(h, out, layer * g.parts + part, KvSegment{offset, length});
      const uint64_t seg = table + offset;
      const auto x = [&](uint32_t t, uint32_t c) {
        return cm::bf16_to_float(value_at(g, raw, layer, part, t, c));
      };
      if (p.codec == KvCodec::kIdentity) {
        for (uint32_t t = 0; t < T; ++t) {
          for (uint32_t c = 0; c < C; ++c)
            put16(out, seg + 2 * (uint64_t{t} * C + c), value_at(g, raw, layer, part, t, c));
        }
      } else if (p.codec == KvCodec::kInt8 || p.codec == KvCodec::kFp8) {
        const bool fp8 = p.codec == KvCodec::kFp8;
        for (uint32_t t = 0; t < T; ++t) {
          float absmax = 0;
          for (uint32_t c = 0; c < C; ++c) absmax = cm::max_value(absmax, cm::abs_value(x(t, c)));
          const float scale = cm::div(absmax, fp8 ? 448.0f : 127.0f);
          put<float>(out, seg + 4ull * t, scale);
          for (uint32_t c = 0; c < C; ++c) {
            uint8_t code = 0;
            if (scale != 0.0f && fp8) code = cm::float_to_e4m3(cm::div(x(t, c), scale));
            if (scale != 0.0f && !fp8) {
              const float q = cm::clamp_value(cm::round_even(cm::div(x(t, c), scale)), -127.0f, 127.0f);
              code = static_cast<uint8_t>(static_cast<int8_t>(q));
            }
            out[seg + 4ull * T + uint64_t{t} * C + c] = code;
          }
        }
      } else {  // int4, int2
        const uint32_t bits = p.codec == KvCodec::kInt4 ? 4 : 2;
        const float L = p.codec == KvCodec::kInt4 ? 15.0f : 3.0f;
        const uint32_t G = p.group, R = p.residual_tokens, Q = T - R;
        struct Meta {
          float min, scale;
        };
        const auto meta = [&](float mn, float mx, uint64_t at) {
          const uint16_t min_half = cm::float_to_half(cm::add(mn, 0.0f));
          const float min = cm::half_to_float(min_half);
          const uint16_t scale_half = cm::float_to_half(cm::div(cm::sub(cm::add(mx, 0.0f), min), L));
          put16(out, at, min_half);
          put16(out, at + 2, scale_half);
          return Meta{min, cm::half_to_float(scale_half)};
        };
        const auto code_of = [&](float v, Meta m) -> uint32_t {
          if (m.scale == 0.0f) return 0;
          const float inverse = cm::div(1.0f, m.scale);  // once a group: the spec multiplies by it
          return static_cast<uint32_t>(
              cm::clamp_value(cm::round_even(cm::mul(cm::sub(v, m.min), inverse)), 0.0f, L));
        };
        // Code number i of the segment's code stream at bits i * b, little-endian.
        const auto put_code = [&](uint64_t codes_at, uint64_t i, uint32_t code) {
          const uint64_t bit = i * bits;
          out[codes_at + bit / 8] = static_cast<uint8_t>(out[codes_at + bit / 8] | (code << (bit % 8)));
        };
        uint64_t codes_at = 0;
        if (part == 0) {
          codes_at = seg + 4ull * (Q / G) * C;
          for (uint32_t gi = 0; gi < Q / G; ++gi) {
            for (uint32_t c = 0; c < C; ++c) {
              float mn = x(gi * G, c), mx = mn;
              for (uint32_t t = gi * G + 1; t < (gi + 1) * G; ++t) {
                mn = cm::min_value(mn, x(t, c));
                mx = cm::max_value(mx, x(t, c));
              }
              const Meta m = meta(mn, mx, seg + 4 * (uint64_t{gi} * C + c));
              for (uint32_t k = 0; k < G; ++k)
                put_code(codes_at, (uint64_t{gi} * C + c) * G + k, code_of(x(gi * G + k, c), m));
            }
          }
        } else {
          codes_at = seg + 4ull * Q * (C / G);
          for (uint32_t t = 0; t < Q; ++t) {
            for (uint32_t cg = 0; cg < C / G; ++cg) {
              float mn = x(t, cg * G), mx = mn;
              for (uint32_t c = cg * G + 1; c < (cg + 1) * G; ++c) {
                mn = cm::min_value(mn, x(t, c));
                mx = cm::max_value(mx, x(t, c));
              }
              const Meta m = meta(mn, mx, seg + 4 * (uint64_t{t} * (C / G) + cg));
              for (uint32_t c = cg * G; c < (cg + 1) * G; ++c)
                put_code(codes_at, uint64_t{t} * C + c, code_of(x(t, c), m));
            }
          }
        }
        const uint64_t residual_at = codes_at + uint64_t{Q} * C * bits / 8;
        for (uint32_t t = Q; t < T; ++t) {
          for (uint32_t c = 0; c < C; ++c) {
            put16(out, residual_at + 2 * (uint64_t{t - Q} * C + c), value_at(g, raw, layer, part, t, c));
          }
        }
      }
      offset = align_segment(offset + length);
    }
  }
  h.payload_bytes = offset;
  write_chunk_header(h, out);
  return out;
}

// The header's error estimates zeroed, to compare the rest byte for byte.
std::vector<uint8_t> without_estimates(std::vector<uint8_t> encoded) {
  std::memset(encoded.data() + 40, 0, 8);
  return encoded;
}

// The index of the first differing byte, or -1.
int64_t first_difference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  if (a.size() != b.size()) return static_cast<int64_t>(std::min(a.size(), b.size()));
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  }
  return -1;
}

}  // namespace

// --- the per-value math -----------------------------------------------------------------------

TEST_CASE("float_to_half and half_to_float on known values and edges") {
  CHECK(cm::float_to_half(1.0f) == 0x3c00);
  CHECK(cm::float_to_half(-2.0f) == 0xc000);
  CHECK(cm::float_to_half(65504.0f) == 0x7bff);   // the largest half
  CHECK(cm::float_to_half(65519.99f) == 0x7bff);  // below the midpoint to 65536
  CHECK(cm::float_to_half(65520.0f) == 0x7c00);   // the midpoint: ties to even = 65536 = inf
  CHECK(cm::float_to_half(-65520.0f) == 0xfc00);
  CHECK(cm::float_to_half(1e10f) == 0x7c00);
  CHECK(cm::float_to_half(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(cm::float_to_half(std::numeric_limits<float>::quiet_NaN()) == 0x7e00);
  CHECK(cm::float_to_half(0.0f) == 0x0000);
  CHECK(cm::float_to_half(-0.0f) == 0x8000);
  CHECK(cm::float_to_half(std::ldexp(1.0f, -14)) == 0x0400);     // the smallest normal
  CHECK(cm::float_to_half(std::ldexp(1.0f, -24)) == 0x0001);     // the smallest subnormal
  CHECK(cm::float_to_half(std::ldexp(1023.0f, -24)) == 0x03ff);  // the largest subnormal
  CHECK(cm::float_to_half(std::ldexp(1.0f, -25)) == 0x0000);     // a tie between 0 and 2^-24: to even, 0
  CHECK(cm::float_to_half(std::ldexp(3.0f, -25)) == 0x0002);     // a tie between 1 and 2 (x 2^-24): 2
  CHECK(cm::float_to_half(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
  CHECK(cm::float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);  // tie: mantissa stays even
  CHECK(cm::float_to_half(1.0f + std::ldexp(3.0f, -11)) == 0x3c02);  // tie: rounds up to even
  CHECK(cm::float_to_half(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)) == 0x3c01);

  CHECK(cm::half_to_float(0x7bff) == 65504.0f);
  CHECK(cm::half_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(cm::half_to_float(0x03ff) == std::ldexp(1023.0f, -24));
  CHECK(cm::half_to_float(0x0400) == std::ldexp(1.0f, -14));
  CHECK(std::isinf(cm::half_to_float(0x7c00)));
  CHECK(cm::half_to_float(0xfc00) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(cm::half_to_float(0x7e00)));
  CHECK(std::signbit(cm::half_to_float(0x8000)));
  CHECK(cm::half_to_float(0x8000) == 0.0f);
  // Every finite or infinite half survives the round trip.
  for (uint32_t h = 0; h < 65536; ++h) {
    const auto half = static_cast<uint16_t>(h);
    if ((half & 0x7c00) == 0x7c00 && (half & 0x3ff) != 0) continue;  // NaN
    REQUIRE(cm::float_to_half(cm::half_to_float(half)) == half);
  }
}

TEST_CASE("float_to_e4m3 and e4m3_to_float on known values and edges") {
  CHECK(cm::float_to_e4m3(448.0f) == 0x7e);  // the largest finite
  CHECK(cm::float_to_e4m3(464.0f) == 0x7e);  // past it: saturates (0x7f is NaN)
  CHECK(cm::float_to_e4m3(1e9f) == 0x7e);
  CHECK(cm::float_to_e4m3(std::numeric_limits<float>::infinity()) == 0x7e);
  CHECK(cm::float_to_e4m3(-448.0f) == 0xfe);
  CHECK(cm::float_to_e4m3(-500.0f) == 0xfe);
  CHECK(cm::float_to_e4m3(std::numeric_limits<float>::quiet_NaN()) == 0x00);  // never NaN out
  CHECK(cm::float_to_e4m3(1.0f) == 0x38);
  CHECK(cm::float_to_e4m3(240.0f) == 0x77);                  // 1.875 x 2^7
  CHECK(cm::float_to_e4m3(0.015625f) == 0x08);               // 2^-6, the smallest normal
  CHECK(cm::float_to_e4m3(std::ldexp(1.0f, -9)) == 0x01);    // the smallest subnormal
  CHECK(cm::float_to_e4m3(std::ldexp(7.0f, -9)) == 0x07);    // the largest subnormal
  CHECK(cm::float_to_e4m3(std::ldexp(1.0f, -10)) == 0x00);   // tie between 0 and 2^-9: 0
  CHECK(cm::float_to_e4m3(std::ldexp(3.0f, -10)) == 0x02);   // tie between 1 and 2 (x 2^-9): 2
  CHECK(cm::float_to_e4m3(std::ldexp(15.0f, -10)) == 0x08);  // tie between 7 and 8 steps: 8 = 2^-6
  CHECK(cm::float_to_e4m3(1.0625f) == 0x38);                 // tie between 1 and 1.125: even
  CHECK(cm::float_to_e4m3(1.1875f) == 0x3a);                 // tie between 1.125 and 1.25: even
  CHECK(cm::float_to_e4m3(1.0625f + 1e-6f) == 0x39);
  CHECK(cm::float_to_e4m3(15.5f) == 0x58);  // tie between 15 and 16: 16 (carry)
  CHECK(cm::float_to_e4m3(-0.0f) == 0x80);
  CHECK(cm::float_to_e4m3(0.0f) == 0x00);

  CHECK(cm::e4m3_to_float(0x7e) == 448.0f);
  CHECK(cm::e4m3_to_float(0x01) == std::ldexp(1.0f, -9));
  CHECK(cm::e4m3_to_float(0x08) == 0.015625f);
  CHECK(cm::e4m3_to_float(0xb8) == -1.0f);
  CHECK(std::isnan(cm::e4m3_to_float(0x7f)));
  CHECK(std::isnan(cm::e4m3_to_float(0xff)));
  for (uint32_t b = 0; b < 256; ++b) {
    if ((b & 0x7f) == 0x7f) continue;
    REQUIRE(cm::float_to_e4m3(cm::e4m3_to_float(static_cast<uint8_t>(b))) == b);
  }
}

TEST_CASE("float_to_bf16 rounds to nearest even and keeps NaN") {
  CHECK(cm::float_to_bf16(1.0f) == 0x3f80);
  CHECK(cm::float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);  // tie: stays even
  CHECK(cm::float_to_bf16(1.0f + std::ldexp(3.0f, -8)) == 0x3f82);  // tie: up to even
  CHECK(cm::float_to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)) == 0x3f81);
  CHECK(cm::float_to_bf16(-1.0f - std::ldexp(1.0f, -8)) == 0xbf80);
  CHECK(cm::float_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);  // rounds past the largest: inf
  CHECK(cm::float_to_bf16(std::numeric_limits<float>::infinity()) == 0x7f80);
  const uint16_t nan = cm::float_to_bf16(f32(0x7f800001u));  // a signaling NaN whose payload is all low bits
  CHECK((nan & 0x7f80) == 0x7f80);
  CHECK((nan & 0x7f) != 0);  // still a NaN, not inf
  CHECK(cm::bf16_to_float(0x3f80) == 1.0f);
  CHECK(cm::bf16_to_float(0x0001) == f32(0x00010000u));
}

// The encoder's branch-free forms (gpudirect/kv_codec_lanes.h) against the header's functions,
// over every 4099th float bit pattern (all exponents and signs) plus neighbourhoods of the edges.
TEST_CASE("the vectorizable restatements equal the header's conversions") {
  std::vector<float> samples;
  for (uint64_t b = 0; b < (1ull << 32); b += 4099) samples.push_back(f32(static_cast<uint32_t>(b)));
  const float edges[] = {448.0f,
                         464.0f,
                         480.0f,
                         0.015625f,
                         std::ldexp(1.0f, -9),
                         std::ldexp(1.0f, -10),
                         65504.0f,
                         65520.0f,
                         std::ldexp(1.0f, -14),
                         std::ldexp(1.0f, -24),
                         std::ldexp(1.0f, -25),
                         1.0f,
                         0.5f,
                         1.5f,
                         2.5f,
                         127.0f,
                         127.5f,
                         4194304.0f,
                         8388608.0f,
                         12582912.0f,
                         std::numeric_limits<float>::infinity(),
                         std::numeric_limits<float>::min(),
                         0.0f};
  for (float e : edges) {
    for (int sign = 0; sign < 2; ++sign) {
      const uint32_t base = bits_of(e) | (sign ? 0x80000000u : 0u);
      for (int d = -64; d <= 64; ++d) samples.push_back(f32(base + static_cast<uint32_t>(d)));
    }
  }
  for (float f : samples) {
    const lanes::E4m3 e = lanes::e4m3_lane(f);
    REQUIRE(e.code == cm::float_to_e4m3(f));
    const float value = cm::e4m3_to_float(static_cast<uint8_t>(e.code));
    REQUIRE(bits_of(e.value) == bits_of(value));
    REQUIRE(lanes::half_lane(f) == cm::float_to_half(f));
    if (!std::isnan(f)) {
      // clamp(round_even(v)) for the bounds the codecs use.
      REQUIRE(static_cast<int>(lanes::round_clamp(f, -127.0f, 127.0f)) ==
              static_cast<int>(cm::clamp_value(cm::round_even(f), -127.0f, 127.0f)));
      REQUIRE(static_cast<int>(lanes::round_clamp(f, 0.0f, 15.0f)) ==
              static_cast<int>(cm::clamp_value(cm::round_even(f), 0.0f, 15.0f)));
      if (std::fabs(f) < 4194304.0f) REQUIRE(lanes::round_even_small(f) == cm::round_even(f));
    }
  }
  for (uint32_t b = 0; b < 256; ++b) {
    const float want = cm::e4m3_to_float(static_cast<uint8_t>(b));
    REQUIRE(bits_of(lanes::e4m3_to_float_lane(static_cast<uint8_t>(b))) == bits_of(want));
  }
  for (uint32_t h = 0; h < 65536; ++h) {
    const float want = cm::half_to_float(static_cast<uint16_t>(h));
    REQUIRE(bits_of(lanes::half_to_float_lane(static_cast<uint16_t>(h))) == bits_of(want));
  }
  // bf16_order orders like the values (ties only between -0 and +0) and is its own inverse.
  for (uint32_t a = 0; a < 65536; a += 7) {
    const auto ba = static_cast<uint16_t>(a);
    REQUIRE(lanes::bf16_order(lanes::bf16_order(ba)) == ba);
    if (std::isnan(cm::bf16_to_float(ba))) continue;
    for (uint32_t b = 0; b < 65536; b += 251) {
      const auto bb = static_cast<uint16_t>(b);
      if (std::isnan(cm::bf16_to_float(bb))) continue;
      if (cm::bf16_to_float(ba) < cm::bf16_to_float(bb)) REQUIRE(lanes::order_key(ba) < lanes::order_key(bb));
    }
  }
}

// --- the header -------------------------------------------------------------------------------

TEST_CASE("codec specs: a codec and its options as benches and policy files write them") {
  auto int4 = protocol::parse_codec_spec("int4:r=32,g=64");
  REQUIRE(int4.ok());
  CHECK(int4->codec == protocol::KvCodec::kInt4);
  CHECK(int4->residual_tokens == 32);
  CHECK(int4->group == 64);
  auto drop = protocol::parse_codec_spec("drop:keep=0.25");
  REQUIRE(drop.ok());
  CHECK(drop->keep_fraction == 0.25f);
  auto zstd = protocol::parse_codec_spec("zstd:level=3");
  REQUIRE(zstd.ok());
  CHECK(zstd->zstd_level == 3);
  auto plain = protocol::parse_codec_spec("int8");
  REQUIRE(plain.ok());
  CHECK(plain->codec == protocol::KvCodec::kInt8);
  CHECK(plain->group == protocol::KvCodecParams{}.group);
  for (const char* bad : {"int9", "int4:r", "int4:r=", "int4:r=x", "int4:r=-1", "int4:q=3", "drop:keep=abc",
                          "int4:r=99999999999"}) {
    INFO(bad);
    auto p = protocol::parse_codec_spec(bad);
    REQUIRE_FALSE(p.ok());
    CHECK(p.status().code() == ErrorCode::kMalformed);
  }
}

TEST_CASE("codec names, parameters and geometry checks") {
  for (KvCodec c : kAll) {
    auto parsed = parse_codec(codec_name(c));
    REQUIRE(parsed.ok());
    CHECK(parsed.value() == c);
  }
  CHECK(parse_codec("gzip").status().code() == ErrorCode::kMalformed);
  KvChunkGeometry g = kv_geometry();
  CHECK(g.validate().ok());
  g.parts = 3;
  CHECK(g.validate().code() == ErrorCode::kInvalidArgument);
  g = kv_geometry();
  g.dtype_bytes = 4;
  CHECK(g.validate().code() == ErrorCode::kInvalidArgument);
  g = kv_geometry();
  g.layers = 0;
  CHECK(g.validate().code() == ErrorCode::kInvalidArgument);
  KvCodecParams p = params_of(KvCodec::kInt4);
  p.group = 24;  // 64 tokens: not a multiple
  CHECK(validate_codec(p, kv_geometry()).code() == ErrorCode::kInvalidArgument);
  p.group = 12;  // not a multiple of 8
  CHECK(validate_codec(p, kv_geometry()).code() == ErrorCode::kInvalidArgument);
  p = params_of(KvCodec::kDrop);
  p.keep_fraction = 0.0f;
  CHECK(validate_codec(p, kv_geometry()).code() == ErrorCode::kInvalidArgument);
  p.keep_fraction = 0.3f;
  CHECK(drop_kept_tokens(p, kv_geometry()) == 20);  // ceil(0.3 * 64)
  p.keep_fraction = 1e-6f;
  CHECK(drop_kept_tokens(p, kv_geometry()) == 1);
  // Encoding refuses what validate_codec refuses, and wrong sizes.
  const auto raw = kv_like(kv_geometry(), 1);
  std::vector<uint8_t> out(1 << 20);
  p = params_of(KvCodec::kInt4);
  p.group = 24;
  CHECK(gpudirect::encode_chunk(p, kv_geometry(), raw, out).status().code() == ErrorCode::kInvalidArgument);
  CHECK(gpudirect::max_encoded_bytes(p, kv_geometry()).status().code() == ErrorCode::kInvalidArgument);
  p = params_of(KvCodec::kInt8);
  std::vector<uint8_t> short_raw(raw.begin(), raw.end() - 2);
  CHECK(gpudirect::encode_chunk(p, kv_geometry(), short_raw, out).status().code() ==
        ErrorCode::kInvalidArgument);
  std::vector<uint8_t> small_out(fixed_encoded_bytes(p, kv_geometry()) - 1);
  CHECK(gpudirect::encode_chunk(p, kv_geometry(), raw, small_out).status().code() ==
        ErrorCode::kInvalidArgument);
}

TEST_CASE("chunk header round trip and every rejection") {
  const KvChunkGeometry g = kv_geometry();
  const auto raw = kv_like(g, test_seed());
  for (KvCodec codec : kAll) {
    INFO("codec " << codec_name(codec));
    KvCodecParams p = params_of(codec);
    if (codec == KvCodec::kInt4) {
      p.group = 16;
      p.residual_tokens = 16;
    }
    auto encoded = encode(p, g, raw);
    REQUIRE(encoded.ok());
    auto h = read_chunk_header(encoded.value());
    REQUIRE(h.ok());
    CHECK(h->params.codec == codec);
    CHECK(h->geometry == g);
    CHECK(h->raw_bytes == g.raw_bytes());
    CHECK(h->encoded_bytes() == encoded->size());
    if (codec == KvCodec::kInt4) {
      CHECK(h->params.group == 16);
      CHECK(h->params.residual_tokens == 16);
    }
    CHECK(h->kept_tokens == (codec == KvCodec::kDrop ? 32u : 64u));
    // Written again, the header is the same 64 bytes.
    std::vector<uint8_t> again(64);
    write_chunk_header(h.value(), again);
    CHECK(std::equal(again.begin(), again.end(), encoded->begin()));
    if (codec_is_fixed_rate(codec)) CHECK(encoded->size() == fixed_encoded_bytes(p, g));
  }

  KvCodecParams p = params_of(KvCodec::kInt8);
  auto good = encode(p, g, raw);
  REQUIRE(good.ok());
  const auto code_of = [](std::vector<uint8_t> bytes) { return read_chunk_header(bytes).status().code(); };
  const auto with = [&](auto change) {
    std::vector<uint8_t> b = good.value();
    change(b);
    return b;
  };
  SECTION("truncated") {
    CHECK(code_of(std::vector<uint8_t>(good->begin(), good->begin() + 63)) == ErrorCode::kMalformed);
    CHECK(code_of(std::vector<uint8_t>(good->begin(), good->end() - 1)) == ErrorCode::kMalformed);
    CHECK(code_of(std::vector<uint8_t>(good->begin(), good->begin() + 64 + 16)) == ErrorCode::kMalformed);
    CHECK(code_of({}) == ErrorCode::kMalformed);
  }
  SECTION("magic, version, codec, reserved byte") {
    CHECK(code_of(with([](auto& b) { b[0] ^= 1; })) == ErrorCode::kMalformed);
    CHECK(code_of(with([](auto& b) { put<uint16_t>(b, 4, 2); })) == ErrorCode::kUnsupportedVersion);
    CHECK(code_of(with([](auto& b) { put<uint16_t>(b, 4, 0); })) == ErrorCode::kUnsupportedVersion);
    CHECK(code_of(with([](auto& b) { b[6] = 8; })) == ErrorCode::kMalformed);
    CHECK(code_of(with([](auto& b) { b[6] = 255; })) == ErrorCode::kMalformed);
    CHECK(code_of(with([](auto& b) { b[7] = 1; })) == ErrorCode::kMalformed);
  }
  SECTION("sizes and parameters") {
    CHECK(code_of(with([](auto& b) { put<uint16_t>(b, 12, 3); })) == ErrorCode::kMalformed);  // parts
    CHECK(code_of(with([](auto& b) { put<uint16_t>(b, 14, 4); })) == ErrorCode::kMalformed);  // dtype
    CHECK(code_of(with([](auto& b) { put<uint32_t>(b, 8, 0); })) == ErrorCode::kMalformed);   // layers
    CHECK(code_of(with([](auto& b) { put<uint32_t>(b, 8, 3); })) ==
          ErrorCode::kMalformed);  // raw_bytes now wrong
    CHECK(code_of(with([](auto& b) { put<uint32_t>(b, 24, 128); })) == ErrorCode::kMalformed);  // channels
    CHECK(code_of(with([](auto& b) { put<uint64_t>(b, 48, 12345); })) == ErrorCode::kMalformed);
    CHECK(code_of(with([](auto& b) { put<uint32_t>(b, 32, 63); })) == ErrorCode::kMalformed);  // kept_tokens
    CHECK(code_of(with([](auto& b) { put<uint16_t>(b, 28, 32); })) ==
          ErrorCode::kMalformed);  // group for int8
    CHECK(code_of(with([](auto& b) { put<float>(b, 36, 0.5f); })) == ErrorCode::kMalformed);  // keep for int8
    CHECK(code_of(with([](auto& b) { put<float>(b, 40, -1.0f); })) == ErrorCode::kMalformed);
    CHECK(code_of(with([](auto& b) { put<float>(b, 44, std::numeric_limits<float>::quiet_NaN()); })) ==
          ErrorCode::kMalformed);
    CHECK(code_of(with([](auto& b) { put<float>(b, 40, std::numeric_limits<float>::infinity()); })) ==
          ErrorCode::kMalformed);
    CHECK(code_of(with([](auto& b) { put<uint64_t>(b, 56, get32(b, 56) + 16ull); })) ==
          ErrorCode::kMalformed);
    CHECK(code_of(with([](auto& b) { put<uint64_t>(b, 56, ~0ull); })) == ErrorCode::kMalformed);
    // Fixed-rate: a payload of any other size, even one the buffer holds.
    std::vector<uint8_t> longer = with([](auto& b) { put<uint64_t>(b, 56, get32(b, 56) - 16ull); });
    CHECK(code_of(longer) == ErrorCode::kMalformed);
  }
  SECTION("segments") {
    auto h = read_chunk_header(good.value());
    REQUIRE(h.ok());
    CHECK(read_chunk_segment(h.value(), good.value(), 4).status().code() ==
          ErrorCode::kMalformed);  // 4 segments
    CHECK(read_chunk_segment(h.value(), good.value(), 0).ok());
    const auto segment_code = [&](std::vector<uint8_t> b, uint32_t i) {
      auto hh = read_chunk_header(b);
      if (!hh.ok()) return hh.status().code();
      return read_chunk_segment(hh.value(), b, i).status().code();
    };
    const uint64_t entry = 64 + 16 * 1;
    CHECK(segment_code(with([&](auto& b) { put<uint64_t>(b, entry, get32(b, entry) + 8ull); }), 1) ==
          ErrorCode::kMalformed);  // misaligned
    CHECK(segment_code(with([&](auto& b) { put<uint64_t>(b, entry, 1ull << 40); }), 1) ==
          ErrorCode::kMalformed);
    CHECK(segment_code(with([&](auto& b) { put<uint64_t>(b, entry + 8, get32(b, entry + 8) + 1ull); }), 1) ==
          ErrorCode::kMalformed);  // wrong length for int8
    CHECK(segment_code(with([&](auto& b) { put<uint64_t>(b, entry + 8, ~0ull); }), 1) ==
          ErrorCode::kMalformed);
    // decode_chunk's own table checks: segments out of order, padding that is not zero.
    auto swapped = with([&](auto& b) {
      const uint64_t a = get32(b, 64), c = get32(b, 64 + 16);
      put<uint64_t>(b, 64, c);
      put<uint64_t>(b, 64 + 16, a);
    });
    CHECK(decode(swapped, g.raw_bytes()).status().code() == ErrorCode::kMalformed);
  }
  SECTION("decode into the wrong size") {
    std::vector<uint8_t> wrong(g.raw_bytes() + 2);
    CHECK(gpudirect::decode_chunk(good.value(), wrong).code() == ErrorCode::kInvalidArgument);
  }
}

// --- round trips -----------------------------------------------------------------------------

TEST_CASE("every codec round-trips KV-like data in both geometries") {
  const uint64_t seed = test_seed();
  struct Case {
    const char* name;
    KvChunkGeometry g;
    uint32_t group;
    uint32_t residual;
  };
  const Case cases[] = {{"K and V", kv_geometry(), 32, 0},
                        {"K and V, residual", kv_geometry(), 16, 16},
                        {"MLA latent", mla_geometry(), 32, 0},
                        {"MLA latent, residual", mla_geometry(), 16, 32},
                        {"odd sizes", odd_geometry(), 8, 8},
                        {"MLA latent, 40 channels", KvChunkGeometry{1, 1, 4, 16, 40, 2}, 32, 0}};
  for (const Case& k : cases) {
    const auto raw = kv_like(k.g, seed);
    for (KvCodec codec : kAll) {
      INFO(k.name << ", codec " << codec_name(codec));
      KvCodecParams p = params_of(codec);
      p.group = k.group;
      p.residual_tokens = k.residual;
      auto encoded = encode(p, k.g, raw);
      REQUIRE(encoded.ok());
      auto h = read_chunk_header(encoded.value());
      REQUIRE(h.ok());
      // Decoded into 0xA5 and into 0x5A, the same bytes: every byte was written.
      auto decoded = decode(encoded.value(), k.g.raw_bytes(), 0xA5);
      REQUIRE(decoded.ok());
      auto decoded2 = decode(encoded.value(), k.g.raw_bytes(), 0x5A);
      REQUIRE(decoded2.ok());
      CHECK(first_difference(decoded.value(), decoded2.value()) == -1);
      // Encoding is deterministic.
      auto again = encode(p, k.g, raw);
      REQUIRE(again.ok());
      CHECK(first_difference(encoded.value(), again.value()) == -1);

      auto stats = gpudirect::compare_chunks(k.g, raw, decoded.value());
      REQUIRE(stats.ok());
      const double ke = stats->key_relative, ve = stats->value_relative;
      INFO("K error " << ke << ", V error " << ve << ", header " << h->key_error << " " << h->value_error);
      CHECK(std::fabs(h->key_error - ke) <= 1e-4 + 1e-3 * ke);
      CHECK(std::fabs(h->value_error - ve) <= 1e-4 + 1e-3 * ve);
      if (k.g.parts == 1) CHECK(ve == 0.0);
      switch (codec) {
        case KvCodec::kIdentity:
        case KvCodec::kZstd:
        case KvCodec::kLz4:
          CHECK(first_difference(decoded.value(), raw) == -1);
          CHECK(h->key_error == 0.0f);
          CHECK(h->value_error == 0.0f);
          if (codec == KvCodec::kZstd) CHECK(encoded->size() < raw.size());  // the bf16 exponents compress
          break;
        // Bounds from measurement (seeds 1-5: int8 0.58-0.93 %, fp8 2.3-2.6 %, int4 3.6-8.0 %, int2
        // 17-40 %, drop 57-71 %), with a margin; the lower ones catch a codec that changes nothing.
        // int8 per token stays under 1 % on these rows; rows with stronger outlier channels do not.
        case KvCodec::kInt8:
          CHECK(ke < 0.0105);
          CHECK(ke > 0.004);
          if (k.g.parts == 2) CHECK(ve < 0.0105);
          break;
        case KvCodec::kFp8:
          CHECK(ke < 0.03);
          CHECK(ke > 0.015);
          if (k.g.parts == 2) CHECK(ve < 0.03);
          break;
        case KvCodec::kInt4:
          CHECK(ke < 0.09);
          CHECK(ke > 0.02);
          if (k.g.parts == 2) CHECK(ve < 0.09);
          break;
        case KvCodec::kInt2:
          CHECK(ke < 0.45);
          CHECK(ke > 0.1);
          if (k.g.parts == 2) CHECK(ve < 0.45);
          break;
        case KvCodec::kDrop:  // half the tokens dropped
          CHECK(ke < 0.8);
          CHECK(ke > 0.4);
          break;
      }
      if ((codec == KvCodec::kInt4 || codec == KvCodec::kInt2) && k.residual > 0) {
        // The residual tokens come back exactly.
        for (uint32_t layer = 0; layer < k.g.layers; ++layer) {
          for (uint32_t part = 0; part < k.g.parts; ++part) {
            for (uint32_t t = k.g.tokens() - k.residual; t < k.g.tokens(); ++t) {
              const uint64_t at = row_offset(k.g, layer, part, t);
              REQUIRE(std::equal(raw.begin() + static_cast<ptrdiff_t>(at),
                                 raw.begin() + static_cast<ptrdiff_t>(at + 2ull * k.g.channels),
                                 decoded->begin() + static_cast<ptrdiff_t>(at)));
            }
          }
        }
      }
      if (codec_is_fixed_rate(codec)) {
        // The spec, value by value: the bytes the GPU kernels must write as well.
        const auto want = reference_encode(p, k.g, raw);
        INFO("first difference from the spec at byte "
             << first_difference(without_estimates(encoded.value()), want));
        CHECK(first_difference(without_estimates(encoded.value()), want) == -1);
      }
    }
  }
}

TEST_CASE("lossy codecs decode what the spec's decoding gives") {
  // Decoding by the spec: int8 code * scale, fp8 e4m3_to_float(code) * scale, KIVI min + code *
  // scale, each rounded to bf16; compared over the MLA geometry (keys layout) and K/V (both).
  for (const KvChunkGeometry& g : {kv_geometry(), mla_geometry()}) {
    const auto raw = kv_like(g, test_seed() + 1);
    for (KvCodec codec : {KvCodec::kInt8, KvCodec::kFp8}) {
      auto encoded = encode(params_of(codec), g, raw);
      REQUIRE(encoded.ok());
      auto decoded = decode(encoded.value(), g.raw_bytes());
      REQUIRE(decoded.ok());
      const uint64_t table = 64 + 16ull * g.layers * g.parts;
      const uint64_t seg_bytes = align_segment(fixed_segment_bytes(params_of(codec), g, 0));
      for (uint32_t layer = 0; layer < g.layers; ++layer) {
        for (uint32_t part = 0; part < g.parts; ++part) {
          const uint64_t seg = table + (uint64_t{layer} * g.parts + part) * seg_bytes;
          for (uint32_t t = 0; t < g.tokens(); ++t) {
            float scale;
            std::memcpy(&scale, encoded->data() + seg + 4ull * t, 4);
            for (uint32_t c = 0; c < g.channels; ++c) {
              const uint8_t code = (*encoded)[seg + 4ull * g.tokens() + uint64_t{t} * g.channels + c];
              const float q = codec == KvCodec::kInt8 ? static_cast<float>(static_cast<int8_t>(code))
                                                      : cm::e4m3_to_float(code);
              REQUIRE(value_at(g, decoded.value(), layer, part, t, c) ==
                      cm::float_to_bf16(cm::mul(q, scale)));
            }
          }
        }
      }
    }
  }
}

TEST_CASE("drop keeps the tokens with the largest key norms, ties to the earlier") {
  for (const KvChunkGeometry& g : {kv_geometry(), mla_geometry()}) {
    // Layer l's token t has every key value equal to norm_rank(t): known norms, a permutation, with
    // two equal ones straddling the cut.
    std::mt19937_64 rng(test_seed() + 2);
    std::vector<uint8_t> raw(g.raw_bytes());
    std::vector<std::vector<float>> key_value(g.layers);
    const uint32_t T = g.tokens();
    KvCodecParams p = params_of(KvCodec::kDrop);
    p.keep_fraction = 0.25f;
    const uint32_t kept = drop_kept_tokens(p, g);  // 16 of 64
    REQUIRE(kept == 16);
    for (uint32_t layer = 0; layer < g.layers; ++layer) {
      std::vector<uint32_t> order(T);
      for (uint32_t t = 0; t < T; ++t) order[t] = t;
      std::shuffle(order.begin(), order.end(), rng);
      key_value[layer].resize(T);
      for (uint32_t rank = 0; rank < T; ++rank) {
        key_value[layer][order[rank]] = 1.0f + 0.0625f * static_cast<float>(T - rank);  // rank 0 largest
      }
      // The 16th and 17th largest get the same value: only the earlier token of the two is kept.
      const uint32_t a = std::min(order[kept - 1], order[kept]), b = std::max(order[kept - 1], order[kept]);
      key_value[layer][a] = key_value[layer][b] = key_value[layer][order[kept - 1]];
      for (uint32_t t = 0; t < T; ++t) {
        for (uint32_t part = 0; part < g.parts; ++part) {
          for (uint32_t c = 0; c < g.channels; ++c) {
            const float v = part == 0 ? key_value[layer][t] * ((c % 2) ? -1.0f : 1.0f)
                                      : static_cast<float>(t) + 0.5f * static_cast<float>(c % 7);
            set_value(g, raw, layer, part, t, c, v);
          }
        }
      }
    }
    auto encoded = encode(p, g, raw);
    REQUIRE(encoded.ok());
    auto decoded = decode(encoded.value(), g.raw_bytes());
    REQUIRE(decoded.ok());
    auto h = read_chunk_header(encoded.value());
    REQUIRE(h.ok());
    for (uint32_t layer = 0; layer < g.layers; ++layer) {
      // The kept set: sort by (value desc, token asc), first 16.
      std::vector<uint32_t> by_norm(T);
      for (uint32_t t = 0; t < T; ++t) by_norm[t] = t;
      std::stable_sort(by_norm.begin(), by_norm.end(),
                       [&](uint32_t x, uint32_t y) { return key_value[layer][x] > key_value[layer][y]; });
      std::vector<uint16_t> want(by_norm.begin(), by_norm.begin() + kept);
      std::sort(want.begin(), want.end());
      for (uint32_t part = 0; part < g.parts; ++part) {
        auto seg = read_chunk_segment(h.value(), encoded.value(), layer * g.parts + part);
        REQUIRE(seg.ok());
        const uint64_t at = 64 + h->table_bytes() + seg->offset;
        REQUIRE(get32(encoded.value(), at) == kept);
        for (uint32_t i = 0; i < kept; ++i) REQUIRE(get16(encoded.value(), at + 8 + 2 * i) == want[i]);
        for (uint32_t t = 0; t < T; ++t) {
          const bool keep = std::binary_search(want.begin(), want.end(), static_cast<uint16_t>(t));
          for (uint32_t c = 0; c < g.channels; ++c) {
            const uint16_t got = value_at(g, decoded.value(), layer, part, t, c);
            REQUIRE(got == (keep ? value_at(g, raw, layer, part, t, c) : uint16_t{0}));
          }
        }
      }
    }
    // The header's error is what the dropped rows weigh.
    auto stats = gpudirect::compare_chunks(g, raw, decoded.value());
    REQUIRE(stats.ok());
    CHECK(stats->key_relative > 0.5);
    CHECK(std::fabs(h->key_error - stats->key_relative) < 1e-4);
    CHECK(std::fabs(h->value_error - stats->value_relative) < 1e-4);
  }
}

TEST_CASE("drop segments are checked: count, order, range, positions shared by K and V") {
  const KvChunkGeometry g = kv_geometry();
  const auto raw = kv_like(g, test_seed() + 3);
  auto encoded = encode(params_of(KvCodec::kDrop), g, raw);
  REQUIRE(encoded.ok());
  auto h = read_chunk_header(encoded.value());
  REQUIRE(h.ok());
  auto seg0 = read_chunk_segment(h.value(), encoded.value(), 0);
  auto seg1 = read_chunk_segment(h.value(), encoded.value(), 1);
  REQUIRE(seg0.ok());
  REQUIRE(seg1.ok());
  const uint64_t k_at = 64 + h->table_bytes() + seg0->offset;
  const uint64_t v_at = 64 + h->table_bytes() + seg1->offset;
  const auto decode_code = [&](auto change) {
    std::vector<uint8_t> b = encoded.value();
    change(b);
    return decode(b, g.raw_bytes()).status().code();
  };
  CHECK(decode_code([&](auto& b) { put<uint32_t>(b, k_at, 31); }) == ErrorCode::kMalformed);     // count
  CHECK(decode_code([&](auto& b) { put<uint32_t>(b, k_at + 4, 1); }) == ErrorCode::kMalformed);  // reserved
  CHECK(decode_code([&](auto& b) {  // two positions swapped: not ascending
          const uint16_t x = get16(b, k_at + 8), y = get16(b, k_at + 10);
          put16(b, k_at + 8, y);
          put16(b, k_at + 10, x);
        }) == ErrorCode::kMalformed);
  CHECK(decode_code([&](auto& b) { put16(b, k_at + 10, get16(b, k_at + 8)); }) ==
        ErrorCode::kMalformed);                                                                    // repeat
  CHECK(decode_code([&](auto& b) { put16(b, k_at + 8 + 2 * 31, 64); }) == ErrorCode::kMalformed);  // past T
  CHECK(decode_code([&](auto& b) {  // V keeps another token than K
          const uint16_t last = get16(b, v_at + 8 + 2 * 31);
          if (last < 63)
            put16(b, v_at + 8 + 2 * 31, static_cast<uint16_t>(last + 1));
          else
            put16(b, v_at + 8, static_cast<uint16_t>(get16(b, v_at + 8) + 1));
        }) == ErrorCode::kMalformed);
  CHECK(decode_code([&](auto& b) { put<uint64_t>(b, 64 + 8, get32(b, 64 + 8) - 2ull); }) ==
        ErrorCode::kMalformed);
  // 8 + 64 + 32 rows of 512 bytes: 8 bytes short of a multiple of 16, so zero padding follows.
  REQUIRE(seg0->length % 16 == 8);
  CHECK(decode_code([&](auto& b) { b[k_at + seg0->length + 3] = 1; }) == ErrorCode::kMalformed);
  CHECK(decode(encoded.value(), g.raw_bytes()).ok());
}

TEST_CASE("corrupt compressed payloads are malformed, not a crash") {
  const KvChunkGeometry g = kv_geometry();
  const auto raw = kv_like(g, test_seed() + 4);
  for (KvCodec codec : {KvCodec::kZstd, KvCodec::kLz4}) {
    INFO("codec " << codec_name(codec));
    auto encoded = encode(params_of(codec), g, raw);
    REQUIRE(encoded.ok());
    auto h = read_chunk_header(encoded.value());
    REQUIRE(h.ok());
    auto seg = read_chunk_segment(h.value(), encoded.value(), 1);
    REQUIRE(seg.ok());
    const uint64_t at = 64 + h->table_bytes() + seg->offset;
    std::vector<uint8_t> garbage = encoded.value();
    std::fill(garbage.begin() + static_cast<ptrdiff_t>(at),
              garbage.begin() + static_cast<ptrdiff_t>(at + seg->length), 0xFF);
    CHECK(decode(garbage, g.raw_bytes()).status().code() == ErrorCode::kMalformed);
    std::vector<uint8_t> zeros = encoded.value();
    std::fill(zeros.begin() + static_cast<ptrdiff_t>(at),
              zeros.begin() + static_cast<ptrdiff_t>(at + seg->length), 0);
    CHECK(decode(zeros, g.raw_bytes()).status().code() == ErrorCode::kMalformed);
    // Shorter: the segment's last bytes cut (the table and payload shrunk to match).
    std::vector<uint8_t> cut = encoded.value();
    const uint64_t drop = 16;
    if (seg->length > drop + 16) {
      put<uint64_t>(cut, 64 + 16 + 8, seg->length - drop);
      // Move the following segments down by `drop`, keeping them aligned.
      std::vector<uint8_t> rebuilt(cut.begin(),
                                   cut.begin() + static_cast<ptrdiff_t>(at + seg->length - drop));
      const uint64_t end_old = align_segment(seg->offset + seg->length);
      const uint64_t end_new = align_segment(seg->offset + seg->length - drop);
      rebuilt.resize(64 + h->table_bytes() + end_new, 0);
      rebuilt.insert(rebuilt.end(), cut.begin() + static_cast<ptrdiff_t>(64 + h->table_bytes() + end_old),
                     cut.end());
      const uint64_t moved = end_old - end_new;
      for (uint32_t i = 2; i < 4; ++i)
        put<uint64_t>(rebuilt, 64 + 16 * i, get32(rebuilt, 64 + 16 * i) - moved);
      put<uint64_t>(rebuilt, 56, h->payload_bytes - moved);
      REQUIRE(read_chunk_header(rebuilt).ok());
      CHECK(decode(rebuilt, g.raw_bytes()).status().code() == ErrorCode::kMalformed);
    }
  }
}

TEST_CASE("random byte flips never crash: an error value or a decoded chunk") {
  const KvChunkGeometry g = odd_geometry();
  const auto raw = kv_like(g, test_seed() + 5);
  std::mt19937_64 rng(test_seed() + 6);
  for (KvCodec codec : kAll) {
    INFO("codec " << codec_name(codec));
    KvCodecParams p = params_of(codec);
    p.group = 8;
    p.residual_tokens = 8;
    auto encoded = encode(p, g, raw);
    REQUIRE(encoded.ok());
    int failed = 0, decoded_ok = 0;
    for (int round = 0; round < 600; ++round) {
      std::vector<uint8_t> b = encoded.value();
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int f = 0; f < flips; ++f) {
        // Half the flips land in the header and table, where the checks are.
        const uint64_t span =
            (round % 2 == 0) ? std::min<uint64_t>(b.size(), 64 + 16ull * g.layers * g.parts) : b.size();
        b[rng() % span] ^= static_cast<uint8_t>(1u << (rng() % 8));
      }
      if (round % 7 == 0) b.resize(rng() % b.size());  // and some are cut short as well
      auto out = decode(b, g.raw_bytes());
      if (out.ok()) {
        ++decoded_ok;
      } else {
        ++failed;
        const ErrorCode code = out.status().code();
        REQUIRE((code == ErrorCode::kMalformed || code == ErrorCode::kUnsupportedVersion));
      }
    }
    CHECK(failed > 0);
    INFO(decoded_ok << " flipped chunks decoded, " << failed << " refused");
    SUCCEED();
  }
}

TEST_CASE("lossy codecs refuse inf and NaN; lossless ones carry them") {
  const KvChunkGeometry g = kv_geometry();
  auto raw = kv_like(g, test_seed() + 7);
  set_value(g, raw, 1, 1, 9, 17, std::numeric_limits<float>::infinity());
  for (KvCodec codec : kAll) {
    INFO("codec " << codec_name(codec));
    auto encoded = encode(params_of(codec), g, raw);
    if (codec_is_lossless(codec)) {
      REQUIRE(encoded.ok());
      auto decoded = decode(encoded.value(), g.raw_bytes());
      REQUIRE(decoded.ok());
      CHECK(first_difference(decoded.value(), raw) == -1);
    } else if (codec == KvCodec::kDrop) {
      // Values are copied or dropped, never computed with; an inf in a kept row is carried, in a
      // dropped one its error is inf: either a chunk or kInvalidArgument.
      if (!encoded.ok()) CHECK(encoded.status().code() == ErrorCode::kInvalidArgument);
    } else {
      CHECK(encoded.status().code() == ErrorCode::kInvalidArgument);
    }
  }
  for (uint32_t part = 0; part < 2; ++part) {  // one NaN, in K, then in V
    raw = kv_like(g, test_seed() + 7);
    put16(raw, row_offset(g, 0, part, 2) + 6, 0x7fc1);
    for (KvCodec codec : {KvCodec::kInt8, KvCodec::kFp8, KvCodec::kInt4, KvCodec::kInt2}) {
      INFO("codec " << codec_name(codec) << ", NaN in part " << part);
      CHECK(encode(params_of(codec), g, raw).status().code() == ErrorCode::kInvalidArgument);
    }
    auto stats = gpudirect::compare_chunks(g, raw, raw);
    REQUIRE(stats.ok());
    CHECK(std::isnan(part == 0 ? stats->key_relative : stats->value_relative));  // not "no error"
  }
  raw = kv_like(g, test_seed() + 7);
  put16(raw, row_offset(g, 0, 0, 2) + 6, 0x7fc1);  // a NaN key: drop cannot rank the tokens
  CHECK(encode(params_of(KvCodec::kDrop), g, raw).status().code() == ErrorCode::kInvalidArgument);
}

TEST_CASE("huge finite values: the error sums fall back to double") {
  // |x| near bf16's largest: x^2 overflows float, so each row is summed again in double.
  const KvChunkGeometry g = kv_geometry();
  auto raw = kv_like(g, test_seed() + 8);
  for (uint32_t c = 0; c < g.channels; ++c) set_value(g, raw, 0, 0, 11, c, 1e30f * static_cast<float>(c % 5));
  for (KvCodec codec : {KvCodec::kInt8, KvCodec::kFp8}) {
    INFO("codec " << codec_name(codec));
    auto encoded = encode(params_of(codec), g, raw);
    REQUIRE(encoded.ok());
    auto h = read_chunk_header(encoded.value());
    REQUIRE(h.ok());
    auto decoded = decode(encoded.value(), g.raw_bytes());
    REQUIRE(decoded.ok());
    auto stats = gpudirect::compare_chunks(g, raw, decoded.value());
    REQUIRE(stats.ok());
    CHECK(std::isfinite(h->key_error));
    CHECK(std::fabs(h->key_error - stats->key_relative) <= 1e-4 + 1e-3 * stats->key_relative);
  }
  // KIVI's metadata is fp16: a group past 65504 * L has an infinite scale, decodes to NaN, and the
  // encoder refuses it rather than write such a chunk.
  CHECK(encode(params_of(KvCodec::kInt4), g, raw).status().code() == ErrorCode::kInvalidArgument);
}

TEST_CASE("compare_chunks measures K and V apart") {
  const KvChunkGeometry g = kv_geometry();
  std::vector<uint8_t> a(g.raw_bytes()), b(g.raw_bytes());
  for (uint32_t layer = 0; layer < g.layers; ++layer) {
    for (uint32_t t = 0; t < g.tokens(); ++t) {
      for (uint32_t c = 0; c < g.channels; ++c) {
        set_value(g, a, layer, 0, t, c, 2.0f);
        set_value(g, a, layer, 1, t, c, 1.0f);
        set_value(g, b, layer, 0, t, c, 2.0f);
        set_value(g, b, layer, 1, t, c, c % 4 == 0 ? 0.0f : 1.0f);  // a quarter of V zeroed
      }
    }
  }
  auto s = gpudirect::compare_chunks(g, a, b);
  REQUIRE(s.ok());
  CHECK(s->key_relative == 0.0);
  CHECK(s->value_relative == Approx(0.5).epsilon(1e-9));  // sqrt(1/4)
  CHECK(s->max_abs == 1.0);
  CHECK(gpudirect::compare_chunks(g, a, std::vector<uint8_t>(8)).status().code() ==
        ErrorCode::kInvalidArgument);
  std::vector<uint8_t> zeros(g.raw_bytes(), 0);
  auto z = gpudirect::compare_chunks(g, zeros, b);
  REQUIRE(z.ok());
  CHECK(z->key_relative == 0.0);  // K all zero: 0 by definition
}

TEST_CASE("encoding on several threads at once gives the same bytes") {
  const KvChunkGeometry g = kv_geometry();
  const auto raw = kv_like(g, test_seed() + 9);
  for (KvCodec codec : {KvCodec::kZstd, KvCodec::kLz4, KvCodec::kInt4}) {
    auto want = encode(params_of(codec), g, raw);
    REQUIRE(want.ok());
    std::vector<std::vector<uint8_t>> got(4);
    std::vector<std::thread> threads;
    for (int i = 0; i < 4; ++i) {
      threads.emplace_back([&, i] {
        for (int r = 0; r < 5; ++r) {
          auto e = encode(params_of(codec), g, raw);
          auto d = e.ok() ? decode(e.value(), g.raw_bytes()) : Result<std::vector<uint8_t>>(e.status());
          if (e.ok() && d.ok()) got[static_cast<size_t>(i)] = e.value();
        }
      });
    }
    for (auto& t : threads) t.join();
    for (const auto& e : got) CHECK(first_difference(e, want.value()) == -1);
  }
}
