// The CPU KV codecs (kv_codec.h): encode_chunk / decode_chunk over the encoded-chunk format of
// protocol/kv_codec.h, compare_chunks, and encode_rows / decode_rows (int8 / fp8 over any run of
// whole token rows, which the chunk codec uses for each block's rows). This is the reference the
// GPU codecs must equal byte for byte, so every per-value step is kv_codec_math.h's IEEE-rounded
// arithmetic (this file is compiled with -ffp-contract=off), or its branch-free restatement in
// kv_codec_lanes.h where the header's form would keep a loop scalar. The unit test checks the
// encoder's bytes against a literal transcription of the spec over the header's functions.
//
// Speed (one thread, >= 1 GB/s of raw bytes for int8, fp8, int4 and int2 on a 2021 server core):
// one token row at a time through small kernels whose loops GCC vectorizes (size_t indices,
// __restrict, integer selects, no calls), built for AVX2 and for baseline x86-64 and picked at
// load time (KVF_KERNEL); the encoder's error terms summed in float per lane and row, in double
// across rows; the key codes turned channel-major by 16 x 16 byte transposes. CMakeLists.txt
// builds this file with -fvect-cost-model=dynamic: -O2's very-cheap model keeps most loops scalar.
#include "kvf/gpudirect/kv_codec.h"

#include <lz4.h>
#include <zstd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "kv_codec_lanes.h"
#include "kvf/gpudirect/kv_codec_math.h"

namespace kvf::gpudirect {
namespace {

using protocol::align_segment;
using protocol::codec_is_fixed_rate;
using protocol::kKvChunkHeaderBytes;
using protocol::KvChunkGeometry;
using protocol::KvChunkHeader;
using protocol::KvCodec;
using protocol::KvCodecParams;
using protocol::KvSegment;
namespace cm = kvf::codec_math;
using namespace kvf::codec_lanes;  // the branch-free restatements of kv_codec_math.h

constexpr size_t kLanes = 16;

// The row kernels are built twice on x86-64, for AVX2 and for the baseline (SSE2), the loader
// picking one per process (GCC's target_clones, an ifunc): twice the lanes, nearly twice the
// speed, and the same bytes, as every step is the same IEEE operation either way (no FMA: that is
// not in "avx2", and the file has -ffp-contract=off). noinline, so that callers take the clone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(KVF_CODEC_BASELINE_ONLY)
#define KVF_KERNEL __attribute__((target_clones("avx2", "default"), noinline))
#else
#define KVF_KERNEL
#endif

Status malformed(const std::string& what) {
  return Status(ErrorCode::kMalformed, "encoded KV chunk: " + what);
}
Status invalid(const std::string& what) {
  return Status(ErrorCode::kInvalidArgument, "KV codec: " + what);
}

// Unaligned little-endian access to caller buffers (memcpy folds into a plain load or store).
template <typename T>
inline T load_as(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
inline void store_as(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}
inline uint16_t load_u16(const uint8_t* p) {
  return load_as<uint16_t>(p);
}
inline void store_u16(uint8_t* p, uint16_t v) {
  store_as(p, v);
}
inline uint32_t load_u32(const uint8_t* p) {
  return load_as<uint32_t>(p);
}
inline void store_u32(uint8_t* p, uint32_t v) {
  store_as(p, v);
}
inline float load_f32(const uint8_t* p) {
  return load_as<float>(p);
}
inline void store_f32(uint8_t* p, float v) {
  store_as(p, v);
}

// The bf16 nearest a float, as a float: what a decoder writes (float_to_bf16), read back, for the
// encoder's error estimate. float_to_bf16 less its NaN case: a NaN here comes from a NaN input,
// whose difference to anything is NaN all the same (and such a chunk is refused).
inline float through_bf16(float f) {
  const uint32_t u = cm::as_bits(f);
  return cm::as_float((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
}

// Calls body(c, lane) for c in [0, n): whole groups of kLanes first (the vectorized loop), then the
// rest on lane 0: a reduction kept in kLanes partial results, so no add waits on the one before
// and GCC vectorizes it without reordering float sums itself (which it may not). Indices are
// size_t: 32-bit index math may wrap, which the vectorizer cannot follow. Bodies are inlined by
// force, as a loop with a call does not vectorize.
#define KVF_LANE_BODY __attribute__((always_inline))
template <typename Body>
__attribute__((always_inline)) inline void for_lanes(size_t n, Body&& body) {
  size_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (size_t j = 0; j < kLanes; ++j) body(c + j, j);
  }
  for (; c < n; ++c) body(c, 0);
}

// --- error sums -------------------------------------------------------------------------------

struct ErrorSums {
  double diff2 = 0;  // sum of (x - x')^2
  double ref2 = 0;   // sum of x^2
};

// Adds a row's error terms from its bf16 values and diff[c] = x - x' (the quantizing kernels write
// diff: a second pass keeps each loop's registers few). A float sum per lane (no add waits on the
// one before, so the loop vectorizes), rows in double. False where a float sum is not finite (a
// value past ~1e19 squared, or NaN): the caller redoes the row with add_row_exact.
KVF_KERNEL bool add_row_error(const uint8_t* __restrict row, const float* __restrict diff, size_t n,
                              ErrorSums& sums) {
  float diff2[kLanes] = {}, ref2[kLanes] = {};
  for_lanes(n, [&](size_t c, size_t j) KVF_LANE_BODY {
    const float x = cm::bf16_to_float(load_u16(row + 2 * c));
    diff2[j] = cm::add(diff2[j], cm::mul(diff[c], diff[c]));
    ref2[j] = cm::add(ref2[j], cm::mul(x, x));
  });
  double d = 0, r = 0;
  for (size_t j = 0; j < kLanes; ++j) {
    d += diff2[j];
    r += ref2[j];
  }
  if (!std::isfinite(d) || !std::isfinite(r)) return false;
  sums.diff2 += d;
  sums.ref2 += r;
  return true;
}

// A row's terms in double, from its bf16 values and their decoded bf16 values.
void add_row_exact(const uint8_t* row, const uint8_t* decoded, size_t n, ErrorSums& sums) {
  for (size_t c = 0; c < n; ++c) {
    const double x = cm::bf16_to_float(load_u16(row + 2 * c));
    const double d = x - static_cast<double>(cm::bf16_to_float(load_u16(decoded + 2 * c)));
    sums.diff2 += d * d;
    sums.ref2 += x * x;
  }
}

// 0 when x is all zero; NaN stays NaN (a chunk holding NaN must not look error-free).
double relative_error(const ErrorSums& s) {
  return s.ref2 == 0 ? 0.0 : std::sqrt(s.diff2 / s.ref2);
}

// --- where a tile's rows lie in the raw chunk -------------------------------------------------

// Tile (layer, part) is `blocks` runs of block_tokens contiguous rows, one run per block.
struct TileRows {
  uint64_t first = 0;         // byte offset of token 0's row
  uint64_t row_bytes = 0;     // channels * 2
  uint64_t block_stride = 0;  // from one block's run to the next: parts * block_tokens rows
  uint32_t block_tokens = 0;
  uint64_t row(uint32_t t) const {
    return first + (t / block_tokens) * block_stride + (t % block_tokens) * row_bytes;
  }
};

TileRows tile_rows(const KvChunkGeometry& g, uint32_t layer, uint32_t part) {
  TileRows r;
  r.row_bytes = uint64_t{g.channels} * 2;
  const uint64_t run = r.row_bytes * g.block_tokens;
  r.block_stride = run * g.parts;
  r.block_tokens = g.block_tokens;
  r.first = uint64_t{layer} * g.blocks * r.block_stride + uint64_t{part} * run;
  return r;
}

// --- int8 and fp8: one float32 scale per token ----------------------------------------------

// The largest |x| of a bf16 row. The magnitudes' bits order like the values for finite input, so
// the max is integer work; lossy encodes refuse non-finite input anyway (the error check).
KVF_KERNEL float row_absmax(const uint8_t* __restrict row, size_t n) {
  uint16_t lane[kLanes] = {};
  for_lanes(n, [&](size_t c, size_t j) KVF_LANE_BODY {
    const auto m = static_cast<uint16_t>(load_u16(row + 2 * c) & 0x7fffu);
    lane[j] = std::max(m, lane[j]);
  });
  uint16_t m = 0;
  for (size_t j = 0; j < kLanes; ++j) m = std::max(m, lane[j]);
  return cm::bf16_to_float(m);
}

// One value's int8 code (as a float, an integer in [-127, 127]) and fp8 code: the math both
// encoders below share.
inline float int8_code(float x, float scale) {
  return round_clamp(cm::div(x, scale), -127.0f, 127.0f);
}
inline E4m3 fp8_code(float x, float scale) {
  return e4m3_lane(cm::div(x, scale));
}

// The chunk encoder's kernels write codes and x - x' (its error terms); the stream's
// (encode_rows) write codes only, which is a third faster (int8: 3.2 against 2.4 GB/s a core).
KVF_KERNEL void int8_encode_row(const uint8_t* __restrict row, size_t n, float scale,
                                uint8_t* __restrict codes, float* __restrict diff) {
  for (size_t c = 0; c < n; ++c) {
    const float x = cm::bf16_to_float(load_u16(row + 2 * c));
    const float q = int8_code(x, scale);
    codes[c] = static_cast<uint8_t>(static_cast<int32_t>(q));
    diff[c] = cm::sub(x, through_bf16(cm::mul(q, scale)));
  }
}

KVF_KERNEL void int8_codes_row(const uint8_t* __restrict row, size_t n, float scale,
                               uint8_t* __restrict codes) {
  for (size_t c = 0; c < n; ++c) {
    codes[c] = static_cast<uint8_t>(
        static_cast<int32_t>(int8_code(cm::bf16_to_float(load_u16(row + 2 * c)), scale)));
  }
}

KVF_KERNEL void int8_decode_row(const uint8_t* __restrict codes, size_t n, float scale,
                                uint8_t* __restrict row) {
  for (size_t c = 0; c < n; ++c) {
    const auto q = static_cast<float>(static_cast<int32_t>(static_cast<int8_t>(codes[c])));
    store_u16(row + 2 * c, cm::float_to_bf16(cm::mul(q, scale)));
  }
}

KVF_KERNEL void fp8_encode_row(const uint8_t* __restrict row, size_t n, float scale,
                               uint8_t* __restrict codes, float* __restrict diff) {
  for (size_t c = 0; c < n; ++c) {
    const float x = cm::bf16_to_float(load_u16(row + 2 * c));
    const E4m3 e = fp8_code(x, scale);
    codes[c] = static_cast<uint8_t>(e.code);
    diff[c] = cm::sub(x, through_bf16(cm::mul(e.value, scale)));
  }
}

KVF_KERNEL void fp8_codes_row(const uint8_t* __restrict row, size_t n, float scale,
                              uint8_t* __restrict codes) {
  for (size_t c = 0; c < n; ++c) {
    codes[c] = static_cast<uint8_t>(fp8_code(cm::bf16_to_float(load_u16(row + 2 * c)), scale).code);
  }
}

KVF_KERNEL void fp8_decode_row(const uint8_t* __restrict codes, size_t n, float scale,
                               uint8_t* __restrict row) {
  for (size_t c = 0; c < n; ++c) {
    store_u16(row + 2 * c, cm::float_to_bf16(cm::mul(e4m3_to_float_lane(codes[c]), scale)));
  }
}

// A run of `rows` contiguous token rows of n values at `src` (a tile's block, or any whole rows a
// stream carries): row t's scale into scales[4t, 4t + 4), its codes into codes[t * n, (t + 1) * n).
// With `err`, the rows' error terms are added to it (the tile encoder's header errors; a stream
// needs none). Returns the first row holding a non-finite value (its scale is not finite), or
// `rows` when there is none; such a row is still written, as the tile encoder always did.
uint64_t encode_scaled_run(bool fp8, size_t n, const uint8_t* src, uint64_t rows, uint8_t* scales,
                           uint8_t* codes, ErrorSums* err) {
  const float range = fp8 ? 448.0f : 127.0f;
  std::vector<float> diff(err != nullptr ? n : 0);  // a row's x - x'
  std::vector<uint8_t> decoded;  // a row decoded again, where its float error sums overflowed
  uint64_t first_bad = rows;
  for (uint64_t t = 0; t < rows; ++t) {
    const uint8_t* row = src + t * 2 * n;
    uint8_t* row_codes = codes + t * n;
    const float absmax = row_absmax(row, n);
    if (!std::isfinite(absmax) && first_bad == rows) first_bad = t;
    const float scale = cm::div(absmax, range);
    store_f32(scales + 4 * t, scale);
    if (scale == 0.0f) {  // an all-zero row: code 0, decoded exactly (the spec's "0 for an all-zero row")
      std::memset(row_codes, 0, n);
      continue;
    }
    if (err == nullptr) {
      if (fp8) {
        fp8_codes_row(row, n, scale, row_codes);
      } else {
        int8_codes_row(row, n, scale, row_codes);
      }
      continue;
    }
    if (fp8) {
      fp8_encode_row(row, n, scale, row_codes, diff.data());
    } else {
      int8_encode_row(row, n, scale, row_codes, diff.data());
    }
    if (!add_row_error(row, diff.data(), n, *err)) {
      decoded.resize(2 * n);
      if (fp8) {
        fp8_decode_row(row_codes, n, scale, decoded.data());
      } else {
        int8_decode_row(row_codes, n, scale, decoded.data());
      }
      add_row_exact(row, decoded.data(), n, *err);
    }
  }
  return first_bad;
}

// The inverse: `rows` rows of n values into dst (contiguous) from their scales and codes.
void decode_scaled_run(bool fp8, size_t n, const uint8_t* scales, const uint8_t* codes, uint64_t rows,
                       uint8_t* dst) {
  for (uint64_t t = 0; t < rows; ++t) {
    const float scale = load_f32(scales + 4 * t);
    if (fp8) {
      fp8_decode_row(codes + t * n, n, scale, dst + t * 2 * n);
    } else {
      int8_decode_row(codes + t * n, n, scale, dst + t * 2 * n);
    }
  }
}

// Segment: T float32 scales, then T x C codes; each block's rows are one run.
void encode_scaled(bool fp8, const KvChunkGeometry& g, const uint8_t* raw, const TileRows& tile, uint8_t* seg,
                   ErrorSums& err) {
  uint8_t* codes = seg + 4ull * g.tokens();
  for (uint32_t t = 0; t < g.tokens(); t += g.block_tokens) {
    encode_scaled_run(fp8, g.channels, raw + tile.row(t), g.block_tokens, seg + 4ull * t,
                      codes + uint64_t{t} * g.channels, &err);
  }
}

void decode_scaled(bool fp8, const KvChunkGeometry& g, const uint8_t* seg, uint8_t* raw,
                   const TileRows& tile) {
  const uint8_t* codes = seg + 4ull * g.tokens();
  for (uint32_t t = 0; t < g.tokens(); t += g.block_tokens) {
    decode_scaled_run(fp8, g.channels, seg + 4ull * t, codes + uint64_t{t} * g.channels, g.block_tokens,
                      raw + tile.row(t));
  }
}

// encode_rows / decode_rows: the codec, the channels and the spans' sizes.
Status check_rows(KvCodec codec, uint32_t channels, uint64_t rows, uint64_t raw_size, uint64_t raw_need,
                  uint64_t encoded_size, uint64_t encoded_need) {
  if (codec != KvCodec::kInt8 && codec != KvCodec::kFp8) {
    return invalid("rows are encoded with int8 or fp8, not " + std::string(protocol::codec_name(codec)));
  }
  if (channels == 0 || rows > (uint64_t{1} << 40) / (2ull * channels)) {
    return invalid(std::to_string(rows) + " rows of " + std::to_string(channels) + " channels");
  }
  if (raw_size < raw_need || encoded_size < encoded_need) {
    return invalid(std::to_string(rows) + " rows of " + std::to_string(channels) + " channels need " +
                   std::to_string(raw_need) + " raw and " + std::to_string(encoded_need) +
                   " encoded bytes, got " + std::to_string(raw_size) + " and " +
                   std::to_string(encoded_size));
  }
  return Status::Ok();
}

// --- int4 / int2 (KIVI) ------------------------------------------------------------------------

struct KiviShape {
  uint32_t bits = 0;
  uint32_t per_byte = 0;  // codes a byte holds
  float levels = 0;       // 2^bits - 1
  uint32_t group = 0;
  uint32_t residual = 0;
  uint32_t quantized = 0;  // tokens - residual
  uint32_t channels = 0;
};

KiviShape kivi_shape(const KvCodecParams& p, const KvChunkGeometry& g) {
  KiviShape s;
  s.bits = p.codec == KvCodec::kInt4 ? 4 : 2;
  s.per_byte = 8 / s.bits;
  s.levels = p.codec == KvCodec::kInt4 ? 15.0f : 3.0f;
  s.group = p.group;
  s.residual = p.residual_tokens;
  s.quantized = g.tokens() - p.residual_tokens;
  s.channels = g.channels;
  return s;
}

// The {fp16 min, fp16 scale} of n groups, written to meta[4 i], from their min and max keys
// (order_key), and the two as floats, with 1 / scale (0 where scale is 0): min = the group's min
// rounded to fp16, scale = (max - min) / L rounded to fp16, min there being the rounded one. A zero min or
// max counts as +0 (adding +0 turns -0 into +0), so the bytes do not depend on the order the min and max were
// taken in (the GPU reduces in another order).
KVF_KERNEL void kivi_metas(const int16_t* __restrict lo, const int16_t* __restrict hi, size_t n, float levels,
                           uint8_t* __restrict meta, float* __restrict mins, float* __restrict scales,
                           float* __restrict inverses) {
  for (size_t i = 0; i < n; ++i) {
    const uint16_t min_half = half_lane(cm::add(order_value(lo[i]), 0.0f));
    const float min = half_to_float_lane(min_half);
    const uint16_t scale_half = half_lane(cm::div(cm::sub(cm::add(order_value(hi[i]), 0.0f), min), levels));
    const float scale = half_to_float_lane(scale_half);
    mins[i] = min;
    scales[i] = scale;
    // Divided always, then selected as bits: a branch would keep the loop from vectorizing.
    const float inverse = cm::div(1.0f, scale);
    inverses[i] = cm::as_float(select_bits(scale == 0.0f, 0u, cm::as_bits(inverse)));
    store_u32(meta + 4 * i, uint32_t{min_half} | (uint32_t{scale_half} << 16));
  }
}
KVF_KERNEL void kivi_read_metas(const uint8_t* __restrict meta, size_t n, float* __restrict mins,
                                float* __restrict scales) {
  for (size_t i = 0; i < n; ++i) {
    const uint32_t w = load_u32(meta + 4 * i);
    mins[i] = half_to_float_lane(static_cast<uint16_t>(w & 0xffffu));
    scales[i] = half_to_float_lane(static_cast<uint16_t>(w >> 16));
  }
}

// code = clamp(round_even((x - min) * (1 / scale)), 0, L), 0 where scale is 0 (a multiply by the
// group's inverse, not a division per value: the GPU's encode is bound by its arithmetic), ORed into
// packed[c] shifted left by `shift` (keys pack the codes of 8 / b tokens of a channel into one byte: each
// token's row lands in its bits; the caller zeroes `packed`). diff[c] = x - the decoded
// min + code * scale (rounded to bf16), for the error.
// mins and scales: per channel (keys: const float*) or one for the row's run (values: Broadcast).
struct Broadcast {
  float value;
  float operator[](size_t) const { return value; }
};
template <typename Param>
__attribute__((always_inline)) inline void kivi_quantize(const uint8_t* __restrict row, size_t n, Param mins,
                                                         Param scales, Param inverses, float levels,
                                                         uint8_t* __restrict packed, uint32_t shift,
                                                         float* __restrict diff) {
  for (size_t c = 0; c < n; ++c) {
    const float x = cm::bf16_to_float(load_u16(row + 2 * c));
    const float scale = scales[c];
    const float q = round_clamp(cm::mul(cm::sub(x, mins[c]), inverses[c]), 0.0f, levels);
    const auto code = static_cast<uint32_t>(static_cast<int32_t>(q));
    const uint32_t kept = select_bits(scale == 0.0f, 0u, code);  // 0 where scale is 0
    packed[c] = static_cast<uint8_t>(packed[c] | (kept << shift));
    const auto kept_q = static_cast<float>(static_cast<int32_t>(kept));
    diff[c] = cm::sub(x, through_bf16(cm::add(mins[c], cm::mul(kept_q, scale))));
  }
}
KVF_KERNEL void kivi_quantize_row(const uint8_t* __restrict row, size_t n, const float* __restrict mins,
                                  const float* __restrict scales, const float* __restrict inverses,
                                  float levels, uint8_t* __restrict packed, uint32_t shift,
                                  float* __restrict diff) {
  kivi_quantize(row, n, mins, scales, inverses, levels, packed, shift, diff);
}
KVF_KERNEL void kivi_quantize_run(const uint8_t* __restrict row, size_t n, float min, float scale,
                                  float inverse, float levels, uint8_t* __restrict packed,
                                  float* __restrict diff) {
  kivi_quantize(row, n, Broadcast{min}, Broadcast{scale}, Broadcast{inverse}, levels, packed, 0, diff);
}

// x = min + code * scale rounded to bf16, code = (packed[c] >> shift) & mask.
template <typename Param>
__attribute__((always_inline)) inline void kivi_dequantize(const uint8_t* __restrict packed, size_t n,
                                                           Param mins, Param scales, uint32_t shift,
                                                           uint32_t mask, uint8_t* __restrict row) {
  for (size_t c = 0; c < n; ++c) {
    const auto q = static_cast<float>(static_cast<int32_t>((uint32_t{packed[c]} >> shift) & mask));
    store_u16(row + 2 * c, cm::float_to_bf16(cm::add(mins[c], cm::mul(q, scales[c]))));
  }
}
KVF_KERNEL void kivi_dequantize_row(const uint8_t* __restrict packed, size_t n, const float* __restrict mins,
                                    const float* __restrict scales, uint32_t shift, uint32_t mask,
                                    uint8_t* __restrict row) {
  kivi_dequantize(packed, n, mins, scales, shift, mask, row);
}
KVF_KERNEL void kivi_dequantize_run(const uint8_t* __restrict codes, size_t n, float min, float scale,
                                    uint8_t* __restrict row) {
  kivi_dequantize(codes, n, Broadcast{min}, Broadcast{scale}, 0, 0xffu, row);
}

// Adds the error of a quantized KIVI row; where the float sums overflowed, decode(buffer) writes the
// row's decoded bf16 values and it is redone in double.
template <typename Decode>
void kivi_add_row_error(const float* diff, const uint8_t* row, size_t n, std::vector<uint8_t>& decoded,
                        ErrorSums& err, Decode&& decode) {
  if (add_row_error(row, diff, n, err)) return;
  decoded.resize(2 * n);
  decode(decoded.data());
  add_row_exact(row, decoded.data(), n, err);
}

// Min and max keys of row[0, n) into lo/hi, per channel (keys: across a group's rows).
KVF_KERNEL void fold_min_max(const uint8_t* __restrict row, size_t n, int16_t* __restrict lo,
                             int16_t* __restrict hi) {
  for (size_t c = 0; c < n; ++c) {
    const int16_t k = order_key(load_u16(row + 2 * c));
    lo[c] = std::min(lo[c], k);
    hi[c] = std::max(hi[c], k);
  }
}

// Min and max keys of each group of `group` channels (a multiple of 8) of a row.
KVF_KERNEL void group_min_max(const uint8_t* __restrict row, size_t n, size_t group, int16_t* __restrict lo,
                              int16_t* __restrict hi) {
  for (size_t g = 0; g * group < n; ++g) {
    const uint8_t* x = row + 2 * g * group;
    int16_t l[8], h[8];
    for (size_t j = 0; j < 8; ++j) l[j] = h[j] = order_key(load_u16(x + 2 * j));
    for (size_t c = 8; c < group; c += 8) {
      for (size_t j = 0; j < 8; ++j) {
        const int16_t k = order_key(load_u16(x + 2 * (c + j)));
        l[j] = std::min(l[j], k);
        h[j] = std::max(h[j], k);
      }
    }
    int16_t lmin = l[0], hmax = h[0];
    for (size_t j = 1; j < 8; ++j) {
      lmin = std::min(lmin, l[j]);
      hmax = std::max(hmax, h[j]);
    }
    lo[g] = lmin;
    hi[g] = hmax;
  }
}

// Packs codes (each below 2^bits) into `bytes` bytes, the first code in the lowest bits. A byte's
// codes are read as one 16- or 32-bit word: SSE2 has no 8-bit shifts, so byte-wise shifts would
// keep the loop scalar.
KVF_KERNEL void pack_codes(const uint8_t* __restrict codes, size_t bytes, uint32_t bits,
                           uint8_t* __restrict out) {
  if (bits == 4) {
    for (size_t k = 0; k < bytes; ++k) {
      const uint32_t w = load_u16(codes + 2 * k);
      out[k] = static_cast<uint8_t>((w & 0xfu) | ((w >> 4) & 0xf0u));
    }
  } else {
    for (size_t k = 0; k < bytes; ++k) {
      const uint32_t w = load_u32(codes + 4 * k);
      out[k] =
          static_cast<uint8_t>((w & 0x3u) | ((w >> 6) & 0xcu) | ((w >> 12) & 0x30u) | ((w >> 18) & 0xc0u));
    }
  }
}
KVF_KERNEL void unpack_codes(const uint8_t* __restrict in, size_t bytes, uint32_t bits,
                             uint8_t* __restrict codes) {
  if (bits == 4) {
    for (size_t k = 0; k < bytes; ++k) {
      const uint32_t b = in[k];
      store_u16(codes + 2 * k, static_cast<uint16_t>((b & 0xfu) | ((b << 4) & 0xf00u)));
    }
  } else {
    for (size_t k = 0; k < bytes; ++k) {
      const uint32_t b = in[k];
      store_u32(codes + 4 * k,
                (b & 0x3u) | ((b << 6) & 0x300u) | ((b << 12) & 0x30000u) | ((b << 18) & 0x3000000u));
    }
  }
}

// --- byte transposes (the key codes between token-major, as quantized, and channel-major) ---------

// GCC/Clang vector extensions (no intrinsics, so any target): a 16 x 16 byte block in four rounds
// of interleaves (1, 2, 4, 8 bytes), the standard SSE2 transpose, some 6x faster than a byte at a time.
typedef uint8_t V16 __attribute__((vector_size(16)));
inline V16 load_v16(const uint8_t* p) {
  V16 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline void store_v16(uint8_t* p, V16 v) {
  std::memcpy(p, &v, 16);
}
// The low (high) halves of a and b interleaved in units of 1, 2, 4 and 8 bytes.
inline V16 lo8(V16 a, V16 b) {
  return __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
}
inline V16 hi8(V16 a, V16 b) {
  return __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
}
inline V16 lo16(V16 a, V16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
}
inline V16 hi16(V16 a, V16 b) {
  return __builtin_shufflevector(a, b, 8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
}
inline V16 lo32(V16 a, V16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
}
inline V16 hi32(V16 a, V16 b) {
  return __builtin_shufflevector(a, b, 8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
}
inline V16 lo64(V16 a, V16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
}
inline V16 hi64(V16 a, V16 b) {
  return __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}

// out[c * out_stride + r] = in[r * in_stride + c] for a 16 x 16 block.
inline void transpose_16x16(const uint8_t* in, size_t in_stride, uint8_t* out, size_t out_stride) {
  V16 r[16], a[16], b[16], c[16];
  for (size_t i = 0; i < 16; ++i) r[i] = load_v16(in + i * in_stride);
  for (size_t k = 0; k < 8; ++k) {  // a[k]: rows 2k, 2k+1 of columns 0..7; a[8 + k]: of columns 8..15
    a[k] = lo8(r[2 * k], r[2 * k + 1]);
    a[8 + k] = hi8(r[2 * k], r[2 * k + 1]);
  }
  for (size_t h = 0; h < 16; h += 8) {
    for (size_t q = 0; q < 4; ++q) {  // b[h + 4s + q]: rows 4q..4q+3 of columns h + 4s + (0..3)
      b[h + q] = lo16(a[h + 2 * q], a[h + 2 * q + 1]);
      b[h + 4 + q] = hi16(a[h + 2 * q], a[h + 2 * q + 1]);
    }
  }
  for (size_t base = 0; base < 16; base += 4) {
    for (size_t o = 0; o < 2; ++o) {  // c[base + 2t + o]: rows 8o..8o+7 of columns base + 2t + (0..1)
      c[base + o] = lo32(b[base + 2 * o], b[base + 2 * o + 1]);
      c[base + 2 + o] = hi32(b[base + 2 * o], b[base + 2 * o + 1]);
    }
  }
  for (size_t j = 0; j < 16; j += 2) {  // column j: rows 0..15
    store_v16(out + j * out_stride, lo64(c[j], c[j + 1]));
    store_v16(out + (j + 1) * out_stride, hi64(c[j], c[j + 1]));
  }
}

// The same for 16 rows x 8 columns (decoding int2 groups of 32 tokens: 8 bytes a channel).
inline void transpose_16x8(const uint8_t* in, size_t in_stride, uint8_t* out, size_t out_stride) {
  V16 r[16] = {}, a[8], b[8], c[8];
  for (size_t i = 0; i < 16; ++i) std::memcpy(&r[i], in + i * in_stride, 8);
  for (size_t k = 0; k < 8; ++k) a[k] = lo8(r[2 * k], r[2 * k + 1]);  // rows 2k, 2k+1 of columns 0..7
  for (size_t q = 0; q < 4; ++q) {  // b[4s + q]: rows 4q..4q+3 of columns 4s + (0..3)
    b[q] = lo16(a[2 * q], a[2 * q + 1]);
    b[4 + q] = hi16(a[2 * q], a[2 * q + 1]);
  }
  for (size_t base = 0; base < 8; base += 4) {
    for (size_t o = 0; o < 2; ++o) {  // c[base + 2t + o]: rows 8o..8o+7 of columns base + 2t + (0..1)
      c[base + o] = lo32(b[base + 2 * o], b[base + 2 * o + 1]);
      c[base + 2 + o] = hi32(b[base + 2 * o], b[base + 2 * o + 1]);
    }
  }
  for (size_t j = 0; j < 8; j += 2) {
    store_v16(out + j * out_stride, lo64(c[j], c[j + 1]));
    store_v16(out + (j + 1) * out_stride, hi64(c[j], c[j + 1]));
  }
}

// The same for 8 rows x 16 columns (encoding int2 groups of 32 tokens).
inline void transpose_8x16(const uint8_t* in, size_t in_stride, uint8_t* out, size_t out_stride) {
  V16 r[8], a[8], b[8];
  for (size_t i = 0; i < 8; ++i) r[i] = load_v16(in + i * in_stride);
  for (size_t k = 0; k < 4; ++k) {  // a[k]: rows 2k, 2k+1 of columns 0..7; a[4 + k]: of columns 8..15
    a[k] = lo8(r[2 * k], r[2 * k + 1]);
    a[4 + k] = hi8(r[2 * k], r[2 * k + 1]);
  }
  for (size_t h = 0; h < 8; h += 4) {
    for (size_t q = 0; q < 2; ++q) {  // b[h + 2s + q]: rows 4q..4q+3 of columns 2h + 4s + (0..3)
      b[h + q] = lo16(a[h + 2 * q], a[h + 2 * q + 1]);
      b[h + 2 + q] = hi16(a[h + 2 * q], a[h + 2 * q + 1]);
    }
  }
  for (size_t i = 0; i < 4; ++i) {  // columns 4i..4i+3, 8 rows each
    const V16 lo = lo32(b[2 * i], b[2 * i + 1]);
    const V16 hi = hi32(b[2 * i], b[2 * i + 1]);
    uint8_t bytes[32];
    std::memcpy(bytes, &lo, 16);
    std::memcpy(bytes + 16, &hi, 16);
    for (size_t k = 0; k < 4; ++k) std::memcpy(out + (4 * i + k) * out_stride, bytes + 8 * k, 8);
  }
}

// out[c * rows + r] = in[r * cols + c]: blocks of 16 (or 8) rows and 16 (or 8) columns, a byte at
// a time at the edges.
KVF_KERNEL void transpose_bytes(const uint8_t* __restrict in, size_t rows, size_t cols,
                                uint8_t* __restrict out) {
  size_t r0 = 0;
  for (; r0 + 16 <= rows; r0 += 16) {
    size_t c0 = 0;
    for (; c0 + 16 <= cols; c0 += 16) transpose_16x16(in + r0 * cols + c0, cols, out + c0 * rows + r0, rows);
    for (; c0 + 8 <= cols; c0 += 8) transpose_16x8(in + r0 * cols + c0, cols, out + c0 * rows + r0, rows);
    for (size_t c = c0; c < cols; ++c) {
      for (size_t r = r0; r < r0 + 16; ++r) out[c * rows + r] = in[r * cols + c];
    }
  }
  if (r0 + 8 <= rows) {
    size_t c0 = 0;
    for (; c0 + 16 <= cols; c0 += 16) transpose_8x16(in + r0 * cols + c0, cols, out + c0 * rows + r0, rows);
    for (size_t c = c0; c < cols; ++c) {
      for (size_t r = r0; r < r0 + 8; ++r) out[c * rows + r] = in[r * cols + c];
    }
    r0 += 8;
  }
  for (size_t c = 0; c < cols; ++c) {
    for (size_t r = r0; r < rows; ++r) out[c * rows + r] = in[r * cols + c];
  }
}

// Channels per slab of a key group: its packed codes (G / per_byte bytes x slab channels) are
// staged token-major, as quantizing runs along rows, then turned channel-major; the slab keeps
// that stage small (at most 64 KiB) for any group.
uint32_t key_slab(const KiviShape& s) {
  const uint32_t bytes = s.group / s.per_byte;
  constexpr uint32_t kLanes32 = kLanes;
  const uint32_t slab = std::max(kLanes32, (65536u / bytes) / kLanes32 * kLanes32);
  return std::min(slab, s.channels);
}

// Keys (and the MLA latent): per channel over groups of G tokens.
void kivi_encode_keys(const KiviShape& s, const uint8_t* raw, const TileRows& tile, uint8_t* seg,
                      ErrorSums& err) {
  const uint32_t n = s.channels;
  const uint32_t groups = s.quantized / s.group;
  const uint32_t group_bytes = s.group / s.per_byte;  // one channel's codes in a group
  const uint32_t mask = (1u << s.bits) - 1;
  uint8_t* meta = seg;
  uint8_t* codes = seg + 4ull * groups * n;
  const uint32_t slab = key_slab(s);
  std::vector<int16_t> lo(slab), hi(slab);
  std::vector<float> mins(slab), scales(slab), inverses(slab), diff(slab);
  std::vector<uint8_t> stage(uint64_t{group_bytes} * slab), decoded;
  for (uint32_t g = 0; g < groups; ++g) {
    const uint32_t t0 = g * s.group;
    for (uint32_t c0 = 0; c0 < n; c0 += slab) {
      const uint32_t width = std::min(slab, n - c0);
      const uint8_t* first = raw + tile.row(t0) + 2ull * c0;
      for (uint32_t c = 0; c < width; ++c) lo[c] = hi[c] = order_key(load_u16(first + 2 * c));
      for (uint32_t t = 1; t < s.group; ++t)
        fold_min_max(raw + tile.row(t0 + t) + 2ull * c0, width, lo.data(), hi.data());
      kivi_metas(lo.data(), hi.data(), width, s.levels, meta + 4 * (uint64_t{g} * n + c0), mins.data(),
                 scales.data(), inverses.data());
      // Stage row k holds byte k of every channel's codes: tokens k * per_byte + i in bits i * b.
      std::memset(stage.data(), 0, stage.size());
      for (uint32_t t = 0; t < s.group; ++t) {
        const uint8_t* row = raw + tile.row(t0 + t) + 2ull * c0;
        uint8_t* packed = stage.data() + uint64_t{t / s.per_byte} * width;
        const uint32_t shift = (t % s.per_byte) * s.bits;
        kivi_quantize_row(row, width, mins.data(), scales.data(), inverses.data(), s.levels, packed, shift,
                          diff.data());
        kivi_add_row_error(diff.data(), row, width, decoded, err, [&](uint8_t* out) {
          kivi_dequantize_row(packed, width, mins.data(), scales.data(), shift, mask, out);
        });
      }
      transpose_bytes(stage.data(), group_bytes, width, codes + (uint64_t{g} * n + c0) * group_bytes);
    }
  }
}

void kivi_decode_keys(const KiviShape& s, const uint8_t* seg, uint8_t* raw, const TileRows& tile) {
  const uint32_t n = s.channels;
  const uint32_t groups = s.quantized / s.group;
  const uint32_t group_bytes = s.group / s.per_byte;
  const uint32_t mask = (1u << s.bits) - 1;
  const uint8_t* meta = seg;
  const uint8_t* codes = seg + 4ull * groups * n;
  const uint32_t slab = key_slab(s);
  std::vector<float> mins(slab), scales(slab);
  std::vector<uint8_t> stage(uint64_t{group_bytes} * slab);
  for (uint32_t g = 0; g < groups; ++g) {
    const uint32_t t0 = g * s.group;
    for (uint32_t c0 = 0; c0 < n; c0 += slab) {
      const uint32_t width = std::min(slab, n - c0);
      kivi_read_metas(meta + 4 * (uint64_t{g} * n + c0), width, mins.data(), scales.data());
      transpose_bytes(codes + (uint64_t{g} * n + c0) * group_bytes, width, group_bytes, stage.data());
      for (uint32_t t = 0; t < s.group; ++t) {
        kivi_dequantize_row(stage.data() + uint64_t{t / s.per_byte} * width, width, mins.data(),
                            scales.data(), (t % s.per_byte) * s.bits, mask,
                            raw + tile.row(t0 + t) + 2ull * c0);
      }
    }
  }
}

// Values: per token over groups of G channels; codes in [token][channel] order.
void kivi_encode_values(const KiviShape& s, const uint8_t* raw, const TileRows& tile, uint8_t* seg,
                        ErrorSums& err) {
  const uint32_t n = s.channels;
  const uint32_t groups = n / s.group;
  const uint64_t row_code_bytes = n / s.per_byte;
  uint8_t* meta = seg;
  uint8_t* codes = seg + 4ull * s.quantized * groups;
  std::vector<float> mins(groups), scales(groups), inverses(groups), diff(n);
  std::vector<int16_t> lo(groups), hi(groups);
  std::vector<uint8_t> stage(n), decoded;
  for (uint32_t t = 0; t < s.quantized; ++t) {
    const uint8_t* row = raw + tile.row(t);
    group_min_max(row, n, s.group, lo.data(), hi.data());
    std::memset(stage.data(), 0, n);
    kivi_metas(lo.data(), hi.data(), groups, s.levels, meta + 4ull * t * groups, mins.data(), scales.data(),
               inverses.data());
    for (uint32_t gi = 0; gi < groups; ++gi) {
      const uint64_t c0 = uint64_t{gi} * s.group;
      kivi_quantize_run(row + 2 * c0, s.group, mins[gi], scales[gi], inverses[gi], s.levels,
                        stage.data() + c0, diff.data() + c0);
    }
    kivi_add_row_error(diff.data(), row, n, decoded, err, [&](uint8_t* out) {
      for (uint32_t gi = 0; gi < groups; ++gi) {
        const uint64_t c0 = uint64_t{gi} * s.group;
        kivi_dequantize_run(stage.data() + c0, s.group, mins[gi], scales[gi], out + 2 * c0);
      }
    });
    pack_codes(stage.data(), row_code_bytes, s.bits, codes + t * row_code_bytes);
  }
}

void kivi_decode_values(const KiviShape& s, const uint8_t* seg, uint8_t* raw, const TileRows& tile) {
  const uint32_t n = s.channels;
  const uint32_t groups = n / s.group;
  const uint64_t row_code_bytes = n / s.per_byte;
  const uint8_t* meta = seg;
  const uint8_t* codes = seg + 4ull * s.quantized * groups;
  std::vector<float> mins(groups), scales(groups);
  std::vector<uint8_t> stage(n);
  for (uint32_t t = 0; t < s.quantized; ++t) {
    unpack_codes(codes + t * row_code_bytes, row_code_bytes, s.bits, stage.data());
    kivi_read_metas(meta + 4ull * t * groups, groups, mins.data(), scales.data());
    uint8_t* row = raw + tile.row(t);
    for (uint32_t gi = 0; gi < groups; ++gi) {
      const uint64_t c0 = uint64_t{gi} * s.group;
      kivi_dequantize_run(stage.data() + c0, s.group, mins[gi], scales[gi], row + 2 * c0);
    }
  }
}

// Segment: the quantized part (keys or values), then the last R rows as raw bf16.
void kivi_encode(const KvCodecParams& p, const KvChunkGeometry& g, uint32_t part, const uint8_t* raw,
                 const TileRows& tile, uint8_t* seg, ErrorSums& err) {
  const KiviShape s = kivi_shape(p, g);
  uint64_t quantized_bytes = 0;
  if (part == 0) {
    kivi_encode_keys(s, raw, tile, seg, err);
    quantized_bytes = 4ull * (s.quantized / s.group) * s.channels;
  } else {
    kivi_encode_values(s, raw, tile, seg, err);
    quantized_bytes = 4ull * s.quantized * (s.channels / s.group);
  }
  quantized_bytes += uint64_t{s.quantized} * s.channels / s.per_byte;
  for (uint32_t t = s.quantized; t < g.tokens(); ++t) {
    std::memcpy(seg + quantized_bytes + (t - s.quantized) * tile.row_bytes, raw + tile.row(t),
                tile.row_bytes);
    add_row_exact(raw + tile.row(t), raw + tile.row(t), s.channels, err);  // exact, but they weigh in ||x||
  }
}

void kivi_decode(const KvCodecParams& p, const KvChunkGeometry& g, uint32_t part, const uint8_t* seg,
                 uint8_t* raw, const TileRows& tile) {
  const KiviShape s = kivi_shape(p, g);
  uint64_t quantized_bytes = 0;
  if (part == 0) {
    kivi_decode_keys(s, seg, raw, tile);
    quantized_bytes = 4ull * (s.quantized / s.group) * s.channels;
  } else {
    kivi_decode_values(s, seg, raw, tile);
    quantized_bytes = 4ull * s.quantized * (s.channels / s.group);
  }
  quantized_bytes += uint64_t{s.quantized} * s.channels / s.per_byte;
  for (uint32_t t = s.quantized; t < g.tokens(); ++t) {
    std::memcpy(raw + tile.row(t), seg + quantized_bytes + (t - s.quantized) * tile.row_bytes,
                tile.row_bytes);
  }
}

// --- identity, zstd, lz4 ---------------------------------------------------------------------

void copy_tile_out(const KvChunkGeometry& g, const uint8_t* raw, const TileRows& tile, uint8_t* seg) {
  for (uint32_t t = 0; t < g.tokens(); ++t)
    std::memcpy(seg + t * tile.row_bytes, raw + tile.row(t), tile.row_bytes);
}
void copy_tile_in(const KvChunkGeometry& g, const uint8_t* seg, uint8_t* raw, const TileRows& tile) {
  for (uint32_t t = 0; t < g.tokens(); ++t)
    std::memcpy(raw + tile.row(t), seg + t * tile.row_bytes, tile.row_bytes);
}

// byte_shuffle: every value's low byte in token-major order, then every high byte. Compressors find
// the bf16 exponents (the high bytes) far more alike than the interleaved pairs.
void shuffle_tile(const KvChunkGeometry& g, const uint8_t* raw, const TileRows& tile, uint8_t* out) {
  const uint64_t values = uint64_t{g.tokens()} * g.channels;
  uint8_t* lo = out;
  uint8_t* hi = out + values;
  for (uint32_t t = 0; t < g.tokens(); ++t) {
    const uint8_t* row = raw + tile.row(t);
    const uint64_t at = uint64_t{t} * g.channels;
    for (uint32_t c = 0; c < g.channels; ++c) {
      lo[at + c] = row[2 * c];
      hi[at + c] = row[2 * c + 1];
    }
  }
}
void unshuffle_tile(const KvChunkGeometry& g, const uint8_t* in, uint8_t* raw, const TileRows& tile) {
  const uint64_t values = uint64_t{g.tokens()} * g.channels;
  const uint8_t* lo = in;
  const uint8_t* hi = in + values;
  for (uint32_t t = 0; t < g.tokens(); ++t) {
    uint8_t* row = raw + tile.row(t);
    const uint64_t at = uint64_t{t} * g.channels;
    for (uint32_t c = 0; c < g.channels; ++c) {
      row[2 * c] = lo[at + c];
      row[2 * c + 1] = hi[at + c];
    }
  }
}

// One compression and one decompression context per thread, reused across calls.
struct ZstdContexts {
  ZSTD_CCtx* compress = nullptr;
  ZSTD_DCtx* decompress = nullptr;
  ZstdContexts() = default;
  ZstdContexts(const ZstdContexts&) = delete;
  ZstdContexts& operator=(const ZstdContexts&) = delete;
  ~ZstdContexts() {
    ZSTD_freeCCtx(compress);
    ZSTD_freeDCtx(decompress);
  }
};
ZstdContexts& zstd_contexts() {
  thread_local ZstdContexts contexts;
  return contexts;
}

Result<uint64_t> zstd_compress(const uint8_t* in, uint64_t size, uint8_t* out, uint64_t capacity, int level) {
  ZstdContexts& z = zstd_contexts();
  if (z.compress == nullptr) z.compress = ZSTD_createCCtx();
  if (z.compress == nullptr) return Status(ErrorCode::kOutOfMemory, "KV codec: ZSTD_createCCtx failed");
  const size_t n = ZSTD_compressCCtx(z.compress, out, capacity, in, size, level);
  if (ZSTD_isError(n))
    return Status(ErrorCode::kInternal, std::string("KV codec: zstd: ") + ZSTD_getErrorName(n));
  return uint64_t{n};
}

// Decompresses exactly `size` bytes; anything else is malformed.
Status zstd_decompress(std::span<const uint8_t> in, uint8_t* out, uint64_t size, uint32_t index) {
  const unsigned long long content = ZSTD_getFrameContentSize(in.data(), in.size());
  if (content != size) {
    return malformed("segment " + std::to_string(index) + ": zstd frame does not hold the tile's " +
                     std::to_string(size) + " bytes");
  }
  ZstdContexts& z = zstd_contexts();
  if (z.decompress == nullptr) z.decompress = ZSTD_createDCtx();
  if (z.decompress == nullptr) return Status(ErrorCode::kOutOfMemory, "KV codec: ZSTD_createDCtx failed");
  const size_t n = ZSTD_decompressDCtx(z.decompress, out, size, in.data(), in.size());
  if (ZSTD_isError(n))
    return malformed("segment " + std::to_string(index) + ": zstd: " + ZSTD_getErrorName(n));
  if (n != size) return malformed("segment " + std::to_string(index) + ": zstd gave the wrong size");
  return Status::Ok();
}

// --- drop --------------------------------------------------------------------------------------

uint64_t drop_position_bytes(uint32_t kept) {
  return (2ull * kept + 7) & ~7ull;
}
uint64_t drop_segment_bytes(uint32_t kept, uint32_t channels) {
  return 8 + drop_position_bytes(kept) + uint64_t{kept} * channels * 2;
}

// The kept positions of one layer: the K largest key-row L2 norms (float sums over channels in
// order), ties to the earlier token, ascending. kInvalidArgument where a norm is NaN (no order).
Result<std::vector<uint16_t>> drop_positions(const KvChunkGeometry& g, uint32_t kept, const uint8_t* raw,
                                             const TileRows& keys) {
  const uint32_t tokens = g.tokens();
  std::vector<float> norms(tokens);
  for (uint32_t t = 0; t < tokens; ++t) {
    const uint8_t* row = raw + keys.row(t);
    float sum = 0;
    for (uint32_t c = 0; c < g.channels; ++c) {
      const float x = cm::bf16_to_float(load_u16(row + 2 * c));
      sum = cm::add(sum, cm::mul(x, x));
    }
    norms[t] = std::sqrt(sum);
    if (std::isnan(norms[t])) return invalid("drop: token " + std::to_string(t) + "'s key row holds NaN");
  }
  std::vector<uint32_t> order(tokens);
  std::iota(order.begin(), order.end(), 0u);
  const auto first = [&](uint32_t a, uint32_t b) {
    return norms[a] > norms[b] || (norms[a] == norms[b] && a < b);
  };
  std::nth_element(order.begin(), order.begin() + (kept - 1), order.end(), first);
  std::vector<uint16_t> positions(kept);
  for (uint32_t i = 0; i < kept; ++i) positions[i] = static_cast<uint16_t>(order[i]);
  std::sort(positions.begin(), positions.end());
  return positions;
}

void drop_encode(const KvChunkGeometry& g, std::span<const uint16_t> positions, const uint8_t* raw,
                 const TileRows& tile, uint8_t* seg, ErrorSums& err) {
  const auto kept = static_cast<uint32_t>(positions.size());
  store_u32(seg, kept);
  store_u32(seg + 4, 0);
  const uint64_t pos_bytes = drop_position_bytes(kept);
  std::memset(seg + 8, 0, pos_bytes);
  for (uint32_t i = 0; i < kept; ++i) store_u16(seg + 8 + 2 * i, positions[i]);
  uint8_t* rows = seg + 8 + pos_bytes;
  uint32_t next = 0;
  for (uint32_t t = 0; t < g.tokens(); ++t) {
    const uint8_t* row = raw + tile.row(t);
    const bool keep = next < kept && positions[next] == t;
    double sum = 0;
    for (uint32_t c = 0; c < g.channels; ++c) {
      const double x = cm::bf16_to_float(load_u16(row + 2 * c));
      sum += x * x;
    }
    err.ref2 += sum;
    if (keep) {
      std::memcpy(rows + uint64_t{next} * tile.row_bytes, row, tile.row_bytes);
      ++next;
    } else {
      err.diff2 += sum;  // a dropped row decodes to zeros
    }
  }
}

// Checks a drop segment (length, count, zero fields and padding, positions strictly ascending and
// inside the tile) and returns its positions.
Result<std::vector<uint16_t>> drop_read_positions(const KvChunkHeader& h, std::span<const uint8_t> seg,
                                                  uint32_t index) {
  const std::string at = "segment " + std::to_string(index) + ": ";
  if (seg.size() < 8) return malformed(at + "drop segment shorter than its 8-byte head");
  const uint32_t kept = load_u32(seg.data());
  if (kept != h.kept_tokens) {
    return malformed(at + "keeps " + std::to_string(kept) + " tokens, the header says " +
                     std::to_string(h.kept_tokens));
  }
  if (load_u32(seg.data() + 4) != 0) return malformed(at + "reserved word is not zero");
  if (seg.size() != drop_segment_bytes(kept, h.geometry.channels))
    return malformed(at + "wrong length for a drop segment");
  std::vector<uint16_t> positions(kept);
  for (uint32_t i = 0; i < kept; ++i) {
    positions[i] = load_u16(seg.data() + 8 + 2 * i);
    if (positions[i] >= h.geometry.tokens()) return malformed(at + "position past the tile's tokens");
    if (i > 0 && positions[i] <= positions[i - 1]) return malformed(at + "positions not strictly ascending");
  }
  for (uint64_t b = 8 + 2ull * kept; b < 8 + drop_position_bytes(kept); ++b) {
    if (seg[b] != 0) return malformed(at + "position padding is not zero");
  }
  return positions;
}

void drop_decode(const KvChunkGeometry& g, std::span<const uint16_t> positions, const uint8_t* seg,
                 uint8_t* raw, const TileRows& tile) {
  const uint8_t* rows = seg + 8 + drop_position_bytes(static_cast<uint32_t>(positions.size()));
  size_t next = 0;
  for (uint32_t t = 0; t < g.tokens(); ++t) {
    uint8_t* row = raw + tile.row(t);
    if (next < positions.size() && positions[next] == t) {
      std::memcpy(row, rows + next * tile.row_bytes, tile.row_bytes);
      ++next;
    } else {
      std::memset(row, 0, tile.row_bytes);
    }
  }
}

// The largest segment a tile of this codec can take, aligned (for max_encoded_bytes).
Result<uint64_t> segment_bound(const KvCodecParams& p, const KvChunkGeometry& g, uint32_t part) {
  const uint64_t tile = g.tile_bytes();
  switch (p.codec) {
    case KvCodec::kZstd: {
      const size_t bound = ZSTD_compressBound(tile);
      if (ZSTD_isError(bound))
        return invalid("zstd cannot compress a " + std::to_string(tile) + "-byte tile");
      return align_segment(bound);
    }
    case KvCodec::kLz4:
      if (tile > LZ4_MAX_INPUT_SIZE) {
        return invalid("lz4 takes tiles up to " + std::to_string(LZ4_MAX_INPUT_SIZE) + " bytes, not " +
                       std::to_string(tile));
      }
      return align_segment(static_cast<uint64_t>(LZ4_compressBound(static_cast<int>(tile))));
    case KvCodec::kDrop:
      return align_segment(drop_segment_bytes(protocol::drop_kept_tokens(p, g), g.channels));
    default:
      return align_segment(protocol::fixed_segment_bytes(p, g, part));
  }
}

}  // namespace

Result<uint64_t> max_encoded_bytes(const KvCodecParams& params, const KvChunkGeometry& geometry) {
  if (Status s = protocol::validate_codec(params, geometry); !s.ok()) return s;
  if (codec_is_fixed_rate(params.codec)) return protocol::fixed_encoded_bytes(params, geometry);
  uint64_t total = kKvChunkHeaderBytes + 16ull * geometry.layers * geometry.parts;
  for (uint32_t part = 0; part < geometry.parts; ++part) {
    auto bound = segment_bound(params, geometry, part);
    if (!bound.ok()) return bound.status();
    total += uint64_t{geometry.layers} * bound.value();
  }
  return total;
}

uint64_t encoded_rows_bytes(uint32_t channels, uint64_t rows) {
  return rows * (4 + uint64_t{channels});
}

Status encode_rows(KvCodec codec, uint32_t channels, std::span<const uint8_t> src, uint64_t rows,
                   std::span<uint8_t> dst) {
  if (Status s = check_rows(codec, channels, rows, src.size(), rows * 2 * channels, dst.size(),
                            encoded_rows_bytes(channels, rows));
      !s.ok())
    return s;
  const uint64_t bad = encode_scaled_run(codec == KvCodec::kFp8, channels, src.data(), rows, dst.data(),
                                         dst.data() + 4 * rows, nullptr);
  if (bad < rows) return invalid("row " + std::to_string(bad) + " holds a value that is not finite");
  return Status::Ok();
}

Status decode_rows(KvCodec codec, uint32_t channels, std::span<const uint8_t> src, uint64_t rows,
                   std::span<uint8_t> dst) {
  if (Status s = check_rows(codec, channels, rows, dst.size(), rows * 2 * channels, src.size(),
                            encoded_rows_bytes(channels, rows));
      !s.ok())
    return s;
  decode_scaled_run(codec == KvCodec::kFp8, channels, src.data(), src.data() + 4 * rows, rows, dst.data());
  return Status::Ok();
}

Result<uint64_t> encode_chunk(const KvCodecParams& params, const KvChunkGeometry& geometry,
                              std::span<const uint8_t> raw, std::span<uint8_t> out) {
  auto max_bytes = max_encoded_bytes(params, geometry);
  if (!max_bytes.ok()) return max_bytes.status();
  if (raw.size() != geometry.raw_bytes()) {
    return invalid("raw chunk of " + std::to_string(raw.size()) + " bytes, the geometry says " +
                   std::to_string(geometry.raw_bytes()));
  }
  if (out.size() < max_bytes.value()) {
    return invalid("output of " + std::to_string(out.size()) + " bytes, max_encoded_bytes is " +
                   std::to_string(max_bytes.value()));
  }
  KvChunkHeader header;
  header.params = params;
  header.geometry = geometry;
  header.kept_tokens =
      params.codec == KvCodec::kDrop ? protocol::drop_kept_tokens(params, geometry) : geometry.tokens();
  header.raw_bytes = geometry.raw_bytes();

  const uint64_t payload_start = kKvChunkHeaderBytes + header.table_bytes();
  uint8_t* payload = out.data() + payload_start;
  const uint64_t capacity = out.size() - payload_start;
  uint64_t offset = 0;
  ErrorSums errors[2];
  std::unique_ptr<uint8_t[]> shuffled;  // zstd/lz4: one tile, shuffled
  if (params.codec == KvCodec::kZstd || params.codec == KvCodec::kLz4) {
    shuffled.reset(new uint8_t[geometry.tile_bytes()]);
  }
  std::vector<uint16_t> positions;
  for (uint32_t layer = 0; layer < geometry.layers; ++layer) {
    if (params.codec == KvCodec::kDrop) {
      auto kept = drop_positions(geometry, header.kept_tokens, raw.data(), tile_rows(geometry, layer, 0));
      if (!kept.ok()) return kept.status();
      positions = std::move(kept.value());
    }
    for (uint32_t part = 0; part < geometry.parts; ++part) {
      const TileRows tile = tile_rows(geometry, layer, part);
      uint8_t* seg = payload + offset;
      uint64_t length = 0;
      switch (params.codec) {
        case KvCodec::kIdentity:
          copy_tile_out(geometry, raw.data(), tile, seg);
          length = geometry.tile_bytes();
          break;
        case KvCodec::kZstd: {
          shuffle_tile(geometry, raw.data(), tile, shuffled.get());
          auto n =
              zstd_compress(shuffled.get(), geometry.tile_bytes(), seg, capacity - offset, params.zstd_level);
          if (!n.ok()) return n.status();
          length = n.value();
          break;
        }
        case KvCodec::kLz4: {
          shuffle_tile(geometry, raw.data(), tile, shuffled.get());
          const uint64_t room = std::min<uint64_t>(capacity - offset, INT32_MAX);
          const int n = LZ4_compress_default(reinterpret_cast<const char*>(shuffled.get()),
                                             reinterpret_cast<char*>(seg),
                                             static_cast<int>(geometry.tile_bytes()), static_cast<int>(room));
          if (n <= 0) return Status(ErrorCode::kInternal, "KV codec: lz4 compression failed");
          length = static_cast<uint64_t>(n);
          break;
        }
        case KvCodec::kInt8:
        case KvCodec::kFp8:
          encode_scaled(params.codec == KvCodec::kFp8, geometry, raw.data(), tile, seg, errors[part]);
          length = protocol::fixed_segment_bytes(params, geometry, part);
          break;
        case KvCodec::kInt4:
        case KvCodec::kInt2:
          kivi_encode(params, geometry, part, raw.data(), tile, seg, errors[part]);
          length = protocol::fixed_segment_bytes(params, geometry, part);
          break;
        case KvCodec::kDrop:
          drop_encode(geometry, positions, raw.data(), tile, seg, errors[part]);
          length = drop_segment_bytes(header.kept_tokens, geometry.channels);
          break;
      }
      const uint64_t end = align_segment(offset + length);
      std::memset(seg + length, 0, end - offset - length);  // the padding is zero: one chunk, one encoding
      protocol::write_chunk_segment(header, out, layer * geometry.parts + part, KvSegment{offset, length});
      offset = end;
    }
  }
  header.payload_bytes = offset;
  if (!protocol::codec_is_lossless(params.codec)) {
    header.key_error = static_cast<float>(relative_error(errors[0]));
    header.value_error = static_cast<float>(relative_error(errors[1]));
    // read_chunk_header refuses a chunk whose estimates are not finite; inf or NaN input makes them so.
    if (!std::isfinite(header.key_error) || !std::isfinite(header.value_error)) {
      return invalid(std::string(protocol::codec_name(params.codec)) +
                     " takes finite values: the chunk holds inf or NaN (or values whose error overflows)");
    }
  }
  protocol::write_chunk_header(header, out);
  return header.encoded_bytes();
}

Status decode_chunk(std::span<const uint8_t> encoded, std::span<uint8_t> raw) {
  auto read = protocol::read_chunk_header(encoded);
  if (!read.ok()) return read.status();
  const KvChunkHeader& h = read.value();
  const KvChunkGeometry& g = h.geometry;
  const KvCodecParams& p = h.params;
  if (raw.size() != h.raw_bytes) {
    return invalid("decode into " + std::to_string(raw.size()) + " bytes, the chunk holds " +
                   std::to_string(h.raw_bytes));
  }
  const uint64_t payload_start = kKvChunkHeaderBytes + h.table_bytes();
  const std::span<const uint8_t> payload = encoded.subspan(payload_start, h.payload_bytes);
  if (uint64_t{g.layers} * g.parts > UINT32_MAX) return malformed("more than 2^32 segments");
  const uint32_t segments = g.layers * g.parts;

  // The table first: segments in order, contiguous, each aligned, zero padding, ending the payload.
  std::vector<KvSegment> table(segments);
  uint64_t expected = 0;
  for (uint32_t i = 0; i < segments; ++i) {
    auto seg = protocol::read_chunk_segment(h, encoded, i);
    if (!seg.ok()) return seg.status();
    if (seg->offset != expected) {
      return malformed("segment " + std::to_string(i) + " at " + std::to_string(seg->offset) + ", expected " +
                       std::to_string(expected) + " (segments are contiguous, in table order)");
    }
    const uint64_t end = align_segment(seg->offset + seg->length);
    if (end > h.payload_bytes)
      return malformed("segment " + std::to_string(i) + "'s padding runs past the payload");
    for (uint64_t b = seg->offset + seg->length; b < end; ++b) {
      if (payload[b] != 0) return malformed("segment " + std::to_string(i) + "'s padding is not zero");
    }
    table[i] = seg.value();
    expected = end;
  }
  if (expected != h.payload_bytes) return malformed("payload runs past its last segment");

  const uint64_t tile_bytes = g.tile_bytes();
  if (p.codec == KvCodec::kLz4 && tile_bytes > LZ4_MAX_INPUT_SIZE)
    return malformed("lz4 tile past lz4's limit");
  std::unique_ptr<uint8_t[]> shuffled;
  if (p.codec == KvCodec::kZstd || p.codec == KvCodec::kLz4) shuffled.reset(new uint8_t[tile_bytes]);
  std::vector<uint16_t> positions;
  for (uint32_t layer = 0; layer < g.layers; ++layer) {
    for (uint32_t part = 0; part < g.parts; ++part) {
      const uint32_t index = layer * g.parts + part;
      const std::span<const uint8_t> seg = payload.subspan(table[index].offset, table[index].length);
      const TileRows tile = tile_rows(g, layer, part);
      // Fixed-rate lengths were checked by read_chunk_segment; the others here, before any read.
      switch (p.codec) {
        case KvCodec::kIdentity:
          copy_tile_in(g, seg.data(), raw.data(), tile);
          break;
        case KvCodec::kZstd:
          if (Status s = zstd_decompress(seg, shuffled.get(), tile_bytes, index); !s.ok()) return s;
          unshuffle_tile(g, shuffled.get(), raw.data(), tile);
          break;
        case KvCodec::kLz4: {
          if (seg.size() > static_cast<uint64_t>(INT32_MAX)) return malformed("lz4 segment past 2 GiB");
          const int n = LZ4_decompress_safe(reinterpret_cast<const char*>(seg.data()),
                                            reinterpret_cast<char*>(shuffled.get()),
                                            static_cast<int>(seg.size()), static_cast<int>(tile_bytes));
          if (n < 0 || static_cast<uint64_t>(n) != tile_bytes) {
            return malformed("segment " + std::to_string(index) +
                             ": lz4 data does not decompress to the tile's " + std::to_string(tile_bytes) +
                             " bytes");
          }
          unshuffle_tile(g, shuffled.get(), raw.data(), tile);
          break;
        }
        case KvCodec::kInt8:
        case KvCodec::kFp8:
          decode_scaled(p.codec == KvCodec::kFp8, g, seg.data(), raw.data(), tile);
          break;
        case KvCodec::kInt4:
        case KvCodec::kInt2:
          kivi_decode(p, g, part, seg.data(), raw.data(), tile);
          break;
        case KvCodec::kDrop: {
          auto read_positions = drop_read_positions(h, seg, index);
          if (!read_positions.ok()) return read_positions.status();
          if (part == 0) {
            positions = std::move(read_positions.value());
          } else if (read_positions.value() != positions) {
            return malformed("segment " + std::to_string(index) +
                             ": value positions differ from the key positions");
          }
          drop_decode(g, positions, seg.data(), raw.data(), tile);
          break;
        }
      }
    }
  }
  return Status::Ok();
}

Result<KvErrorStats> compare_chunks(const KvChunkGeometry& geometry, std::span<const uint8_t> original,
                                    std::span<const uint8_t> decoded) {
  if (Status s = geometry.validate(); !s.ok()) return s;
  if (original.size() != geometry.raw_bytes() || decoded.size() != geometry.raw_bytes()) {
    return invalid("compare_chunks: both chunks must be the geometry's " +
                   std::to_string(geometry.raw_bytes()) + " bytes");
  }
  ErrorSums sums[2];
  double max_abs = 0;
  const uint64_t run =
      uint64_t{geometry.block_tokens} * geometry.channels;  // values of one part of one block
  const uint64_t runs = uint64_t{geometry.layers} * geometry.blocks * geometry.parts;
  for (uint64_t r = 0; r < runs; ++r) {
    const uint8_t* a = original.data() + r * run * 2;
    const uint8_t* b = decoded.data() + r * run * 2;
    double diff2[kLanes] = {}, ref2[kLanes] = {}, worst[kLanes] = {};
    uint64_t i = 0;
    const auto one = [&](uint64_t at, uint32_t j) {
      const double x = cm::bf16_to_float(load_u16(a + 2 * at));
      const double d = x - static_cast<double>(cm::bf16_to_float(load_u16(b + 2 * at)));
      diff2[j] += d * d;
      ref2[j] += x * x;
      const double m = std::fabs(d);
      worst[j] = m > worst[j] ? m : worst[j];
    };
    for (; i + kLanes <= run; i += kLanes) {
      for (uint32_t j = 0; j < kLanes; ++j) one(i + j, j);
    }
    for (; i < run; ++i) one(i, 0);
    ErrorSums& s = sums[r % geometry.parts];
    for (uint32_t j = 0; j < kLanes; ++j) {
      s.diff2 += diff2[j];
      s.ref2 += ref2[j];
      max_abs = worst[j] > max_abs ? worst[j] : max_abs;
    }
  }
  KvErrorStats stats;
  stats.key_relative = relative_error(sums[0]);
  stats.value_relative = geometry.parts == 2 ? relative_error(sums[1]) : 0.0;
  stats.max_abs = max_abs;
  return stats;
}

}  // namespace kvf::gpudirect
