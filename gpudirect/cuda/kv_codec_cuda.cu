// The fixed-rate KV codecs on the GPU (kv_codec_cuda.h), fused with the paged gather (encode) and
// scatter (decode). The per-value math is kv_codec_math.h's, shared with the CPU codec, so both
// write the same bytes. protocol/kv_codec.h's header comment is the format.
//
// Kernels (one batch = every chunk, layer and part at once; a launch covers all of them):
//   rows_kernel        a warp per token row, 16-byte loads and stores: int8/fp8 (per-token absmax,
//                      scale, codes), identity and the KIVI residual rows (copies). A CTA of 8 warps
//                      takes 32 consecutive rows of one tile, so its error sums go to one (chunk,
//                      part) with one atomicAdd each.
//   kivi_keys_kernel   KIVI keys (part 0; the MLA latent): a CTA takes one group of G token rows of
//                      one tile and 256 channels, a thread two adjacent channels (one 4-byte load per
//                      row, so a warp reads 128 contiguous bytes of every row). With G = 32 the
//                      group's values stay in registers between the min/max pass and the coding pass.
//   kivi_values_kernel KIVI values (part 1): a thread per (token, channel group): G/8 16-byte loads,
//                      one 4-byte {min, scale} and G*b/8 bytes of codes, written contiguously by
//                      consecutive threads.
//   finalize_kernel    encode only: each chunk's header and segment table (built on the host: they
//                      depend only on the geometry) with the error estimates summed on the GPU.
// An encode is one upload of a small descriptor (layer bases, block ids, header template, zeroed
// error sums) from a pinned staging slot, then 2-4 launches; a decode is the upload and 1-3
// launches. Everything is asynchronous on the caller's stream.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/cuda_probe.h"
#include "kvf/gpudirect/kv_codec_cuda.h"
#include "kvf/gpudirect/kv_codec_math.h"

namespace kvf::gpudirect {
namespace {

namespace cm = kvf::codec_math;
using protocol::KvChunkGeometry;
using protocol::KvCodec;
using protocol::KvCodecParams;
using protocol::KvLayout;
using protocol::KvLayoutKind;

// --- device side ----------------------------------------------------------------------------------

constexpr uint32_t kRowThreads = 256;  // 8 warps
constexpr uint32_t kRowWarps = kRowThreads / 32;
constexpr uint32_t kRowsPerSlab = 32;    // rows of one tile per CTA: 4 per warp
constexpr int kRowCache = 4;             // 16-byte vectors per lane kept between the two passes: rows of
                                         // up to 1024 channels are read from memory once
constexpr uint32_t kKeyThreads = 128;    // KIVI keys: 256 channels per CTA in pairs
constexpr uint32_t kKeyRowTable = 256;   // row addresses of a group computed per CTA at a time
constexpr uint32_t kValueThreads = 256;  // KIVI values: a (token, group) per thread

// Where the rows of a batch are and where its encoded chunks go. Row t of (chunk, layer, part) is
// at layer_base[layer] + block_ids[chunk * blocks_per_chunk + t / block_tokens] * block_stride +
// part * part_stride + (t % block_tokens) * channels * 2: the paged layouts (KvLayout::extent) and
// a contiguous raw chunk in store order (block ids 0..blocks-1) alike.
struct DeviceGeometry {
  const uint64_t* layer_base = nullptr;  // device array, one per layer
  const uint32_t* block_ids = nullptr;   // device array, chunks * blocks_per_chunk
  uint64_t block_stride = 0;
  uint64_t part_stride = 0;
  uint64_t chunk_bytes = 0;        // fixed_encoded_bytes
  uint64_t payload_offset = 0;     // 64 + the segment table
  uint64_t segment_bytes[2] = {};  // aligned segment bytes of parts 0 and 1 (0 for a missing part)
  uint32_t chunks = 0;
  uint32_t layers = 0;
  uint32_t parts = 0;
  uint32_t tokens = 0;
  uint32_t channels = 0;
  uint32_t block_tokens = 0;
  uint32_t blocks_per_chunk = 0;
  uint32_t group = 0;      // KIVI G
  uint32_t quantized = 0;  // KIVI Q = tokens - residual

  __device__ __forceinline__ uint64_t row(uint32_t chunk, uint32_t layer, uint32_t part, uint32_t t) const {
    const uint32_t b = t / block_tokens;
    const uint32_t r = t - b * block_tokens;
    const uint64_t block = block_ids[uint64_t{chunk} * blocks_per_chunk + b];
    return layer_base[layer] + block * block_stride + part * part_stride + uint64_t{r} * channels * 2;
  }
  // The start of (chunk, layer, part)'s segment in the encoded batch at `payload`.
  __device__ __forceinline__ uint64_t segment(uint64_t encoded, uint32_t chunk, uint32_t layer,
                                              uint32_t part) const {
    return encoded + chunk * chunk_bytes + payload_offset + layer * (segment_bytes[0] + segment_bytes[1]) +
           (part == 0 ? 0 : segment_bytes[0]);
  }
};

template <typename T>
__device__ __forceinline__ T load(uint64_t address) {
  return *reinterpret_cast<const T*>(address);
}
template <typename T>
__device__ __forceinline__ void store(uint64_t address, T value) {
  *reinterpret_cast<T*>(address) = value;
}

__device__ __forceinline__ float lo_bf16(uint32_t w) {
  return cm::bf16_to_float(static_cast<uint16_t>(w & 0xffffu));
}
__device__ __forceinline__ float hi_bf16(uint32_t w) {
  return cm::bf16_to_float(static_cast<uint16_t>(w >> 16));
}
__device__ __forceinline__ uint32_t pack_bf16(uint16_t lo, uint16_t hi) {
  return uint32_t{lo} | (uint32_t{hi} << 16);
}

// The CTA's error sums (squared error, squared values) added to one (chunk, part)'s pair of
// doubles. Every thread of the CTA calls it.
__device__ void accumulate_errors(float err, float sq, double* out) {
  __shared__ double s_err[32];
  __shared__ double s_sq[32];
  double e = err;
  double s = sq;
  for (int o = 16; o > 0; o >>= 1) {
    e += __shfl_xor_sync(0xffffffffu, e, o);
    s += __shfl_xor_sync(0xffffffffu, s, o);
  }
  const uint32_t lane = threadIdx.x & 31;
  const uint32_t warp = threadIdx.x >> 5;
  if (lane == 0) {
    s_err[warp] = e;
    s_sq[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double te = 0;
    double ts = 0;
    for (uint32_t w = 0; w < (blockDim.x + 31) / 32; ++w) {
      te += s_err[w];
      ts += s_sq[w];
    }
    if (te != 0) atomicAdd(out, te);
    if (ts != 0) atomicAdd(out + 1, ts);
  }
}

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Integers as floats without the GPU's quarter-rate conversion instructions (rint, F2I, I2F):
// adding 1.5 * 2^23 to a float in [-2^22, 2^22] rounds it to an integer, ties to even (the add's own
// IEEE rounding: codec_math::round_even's result), and leaves that integer in the low mantissa bits,
// two's complement. A code is clamp(round_even(v), lo, hi) with integer bounds, which equals
// round_even(clamp(v, lo, hi)) (NaN included: both clamp it to lo), so the codes are the CPU's.
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23
constexpr uint32_t kRoundMagicBits = 0x4B400000u;
// The per-value helpers are __host__ __device__ so that a host program can check them against
// kv_codec_math.h over every float (they are the only arithmetic the kernels do on values).
#define KVF_HD __host__ __device__ __forceinline__
KVF_HD uint32_t round_bits(float clamped) {
  return cm::as_bits(cm::add(clamped, kRoundMagic));
}
KVF_HD float integer_value(uint32_t bits) {
  return cm::sub(cm::as_float(bits), kRoundMagic);
}
// A small integer (|i| < 2^22) as a float, exactly.
KVF_HD float to_float(int32_t i) {
  return integer_value(kRoundMagicBits + static_cast<uint32_t>(i));
}

// --- per-token codecs (int8, fp8) and copies: a warp per row ------------------------------------

enum class RowOp { kCopy, kInt8, kFp8 };

// |x| of two bf16 as their bits: for non-NaN values the order of the bits is the order of the
// magnitudes, so an integer max finds the absmax exactly.
__device__ __forceinline__ uint32_t abs_bits(uint32_t w) {
  return w & 0x7fff7fffu;
}
__device__ __forceinline__ uint32_t abs_bits(uint4 v) {
  return __vmaxu2(__vmaxu2(abs_bits(v.x), abs_bits(v.y)), __vmaxu2(abs_bits(v.z), abs_bits(v.w)));
}

template <RowOp kOp>
__device__ __forceinline__ float row_scale(uint32_t absmax_bits) {
  return cm::div(cm::bf16_to_float(static_cast<uint16_t>(absmax_bits)),
                 kOp == RowOp::kInt8 ? 127.0f : 448.0f);
}

// codec_math::float_to_e4m3 with its branches as selects (a warp never diverges on it): below
// 2^-6 the value is round_even(a * 512) steps of 2^-9 (8 being the smallest normal), else the
// mantissa is rounded to 3 bits by adding 0x7ffff plus the kept bit's parity below bit 20 (a carry
// moves into the exponent, as the header's ++mantissa does; nothing below 448 rounds past it),
// saturating at 448, NaN to 0. Checked against the header for every float by a host program.
KVF_HD uint32_t e4m3(float f) {
  const uint32_t u = cm::as_bits(f);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t magnitude = u & 0x7fffffffu;
  const float a = cm::as_float(magnitude);
  const uint32_t steps = round_bits(cm::mul(cm::min_value(a, 0.015625f), 512.0f)) & 0xfu;
  const uint32_t normal = ((magnitude + 0x7ffffu + ((magnitude >> 20) & 1u)) >> 20) - (120u << 3);
  uint32_t code = a < 0.015625f ? steps : normal;
  code = a >= 448.0f ? 0x7eu : code;
  return magnitude > 0x7f800000u ? 0u : (code | sign);
}

// codec_math::e4m3_to_float with its branches as selects (checked over all 256 codes).
KVF_HD float e4m3_value(uint32_t b) {
  const uint32_t sign = (b & 0x80u) << 24;
  const uint32_t exponent = (b >> 3) & 0xfu;
  const uint32_t mantissa = b & 0x7u;
  const uint32_t subnormal =
      cm::as_bits(cm::mul(to_float(static_cast<int32_t>(mantissa)), 0.001953125f)) | sign;
  uint32_t bits = exponent == 0 ? subnormal : (sign | ((exponent + 120u) << 23) | (mantissa << 20));
  bits = exponent == 15 && mantissa == 7 ? (sign | 0x7fc00000u) : bits;
  return cm::as_float(bits);
}

// One value's code, and its decoded value before the rounding to bf16 (for the error sums).
struct Coded {
  uint32_t code;
  float decoded;
};
template <RowOp kOp>
KVF_HD Coded row_code(float x, float scale) {
  if constexpr (kOp == RowOp::kInt8) {
    if (scale == 0.0f) return Coded{0, 0.0f};  // an all-zero row
    const uint32_t bits = round_bits(cm::clamp_value(cm::div(x, scale), -127.0f, 127.0f));
    return Coded{bits & 0xffu, cm::mul(integer_value(bits), scale)};
  } else {
    const uint32_t code = e4m3(cm::div(x, scale));  // scale 0: 0/0 is NaN, coded 0
    return Coded{code, cm::mul(e4m3_value(code), scale)};
  }
}
template <RowOp kOp>
KVF_HD uint16_t row_decode(uint32_t code, float scale) {
  if constexpr (kOp == RowOp::kInt8) {
    return cm::float_to_bf16(cm::mul(to_float(static_cast<int8_t>(code)), scale));
  } else {
    return cm::float_to_bf16(cm::mul(e4m3_value(code), scale));
  }
}

// Codes two values (a bf16 pair) into the low 16 bits, and sums the error of their round trip.
template <RowOp kOp, bool kErrors>
__device__ __forceinline__ uint32_t code_pair(uint32_t w, float scale, float& err, float& sq) {
  const float a = lo_bf16(w);
  const float b = hi_bf16(w);
  const Coded ca = row_code<kOp>(a, scale);
  const Coded cb = row_code<kOp>(b, scale);
  if constexpr (kErrors) {
    const float da = a - cm::bf16_to_float(cm::float_to_bf16(ca.decoded));
    const float db = b - cm::bf16_to_float(cm::float_to_bf16(cb.decoded));
    err += da * da + db * db;
    sq += a * a + b * b;
  }
  return ca.code | (cb.code << 8);
}

template <RowOp kOp, bool kErrors>
__device__ __forceinline__ uint2 code_vector(uint4 v, float scale, float& err, float& sq) {
  uint2 out;
  out.x = code_pair<kOp, kErrors>(v.x, scale, err, sq) | (code_pair<kOp, kErrors>(v.y, scale, err, sq) << 16);
  out.y = code_pair<kOp, kErrors>(v.z, scale, err, sq) | (code_pair<kOp, kErrors>(v.w, scale, err, sq) << 16);
  return out;
}

template <RowOp kOp>
__device__ __forceinline__ uint32_t decode_pair(uint32_t codes, float scale) {
  return pack_bf16(row_decode<kOp>(codes & 0xffu, scale), row_decode<kOp>((codes >> 8) & 0xffu, scale));
}
template <RowOp kOp>
__device__ __forceinline__ uint4 decode_vector(uint2 codes, float scale) {
  uint4 v;
  v.x = decode_pair<kOp>(codes.x, scale);
  v.y = decode_pair<kOp>(codes.x >> 16, scale);
  v.z = decode_pair<kOp>(codes.y, scale);
  v.w = decode_pair<kOp>(codes.y >> 16, scale);
  return v;
}

// int8/fp8 encode of row t: the segment holds `tokens` float scales, then tokens x channels codes.
// kVec = 8: 16-byte loads, 8-byte code stores (channels % 8 == 0, tokens even); kVec = 1: one value
// per lane (any geometry).
template <RowOp kOp, int kVec, bool kErrors>
__device__ __forceinline__ void quantize_row(uint64_t row, uint64_t seg, uint32_t t, const DeviceGeometry& g,
                                             uint32_t lane, float& err, float& sq) {
  const uint64_t codes = seg + 4ull * g.tokens + uint64_t{t} * g.channels;
  if constexpr (kVec == 8) {
    const uint32_t n = g.channels / 8;
    uint4 cache[kRowCache];
    uint32_t amax = 0;
#pragma unroll
    for (int i = 0; i < kRowCache; ++i) {
      const uint32_t k = lane + 32u * i;
      if (k < n) {
        cache[i] = load<uint4>(row + 16ull * k);
        amax = __vmaxu2(amax, abs_bits(cache[i]));
      }
    }
    for (uint32_t k = lane + 32u * kRowCache; k < n; k += 32)
      amax = __vmaxu2(amax, abs_bits(load<uint4>(row + 16ull * k)));
    amax = warp_max(max(amax & 0xffffu, amax >> 16));
    const float scale = row_scale<kOp>(amax);
    if (lane == 0) store<float>(seg + 4ull * t, scale);
#pragma unroll
    for (int i = 0; i < kRowCache; ++i) {
      const uint32_t k = lane + 32u * i;
      if (k < n) store<uint2>(codes + 8ull * k, code_vector<kOp, kErrors>(cache[i], scale, err, sq));
    }
    for (uint32_t k = lane + 32u * kRowCache; k < n; k += 32) {
      store<uint2>(codes + 8ull * k, code_vector<kOp, kErrors>(load<uint4>(row + 16ull * k), scale, err, sq));
    }
  } else {
    uint32_t amax = 0;
    for (uint32_t k = lane; k < g.channels; k += 32)
      amax = max(amax, uint32_t{load<uint16_t>(row + 2ull * k)} & 0x7fffu);
    amax = warp_max(amax);
    const float scale = row_scale<kOp>(amax);
    if (lane == 0) store<float>(seg + 4ull * t, scale);
    for (uint32_t k = lane; k < g.channels; k += 32) {
      const uint32_t w = load<uint16_t>(row + 2ull * k);
      store<uint8_t>(codes + k, static_cast<uint8_t>(code_pair<kOp, kErrors>(w, scale, err, sq) & 0xffu));
      // code_pair also coded (and summed) the zero high half: it adds nothing to either sum.
    }
  }
}

template <RowOp kOp, int kVec>
__device__ __forceinline__ void dequantize_row(uint64_t seg, uint64_t row, uint32_t t,
                                               const DeviceGeometry& g, uint32_t lane) {
  const uint64_t codes = seg + 4ull * g.tokens + uint64_t{t} * g.channels;
  const float scale = load<float>(seg + 4ull * t);
  if constexpr (kVec == 8) {
    const uint32_t n = g.channels / 8;
    for (uint32_t k = lane; k < n; k += 4 * 32) {
      uint2 c[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (k + 32u * u < n) c[u] = load<uint2>(codes + 8ull * (k + 32u * u));
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (k + 32u * u < n) store<uint4>(row + 16ull * (k + 32u * u), decode_vector<kOp>(c[u], scale));
      }
    }
  } else {
    for (uint32_t k = lane; k < g.channels; k += 32) {
      store<uint16_t>(row + 2ull * k, row_decode<kOp>(uint32_t{load<uint8_t>(codes + k)}, scale));
    }
  }
}

__device__ __forceinline__ void sum_squares(uint16_t v, float& sq) {
  const float x = cm::bf16_to_float(v);
  sq += x * x;  // an estimate: fusing does not matter here
}
__device__ __forceinline__ void sum_squares(uint32_t w, float& sq) {
  sum_squares(static_cast<uint16_t>(w & 0xffffu), sq);
  sum_squares(static_cast<uint16_t>(w >> 16), sq);
}
__device__ __forceinline__ void sum_squares(uint4 v, float& sq) {
  sum_squares(v.x, sq);
  sum_squares(v.y, sq);
  sum_squares(v.z, sq);
  sum_squares(v.w, sq);
}

// A row's bytes from src to dst with the widest accesses both allow, four in flight per lane; the
// squares of the values summed when asked (the KIVI residual rows weigh in ||x||, as in the CPU
// codec, though they are exact).
template <typename V, bool kSquares>
__device__ __forceinline__ void copy_units(uint64_t src, uint64_t dst, uint32_t n, uint32_t lane, float& sq) {
  for (uint32_t k = lane; k < n; k += 4 * 32) {
    V v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (k + 32u * u < n) v[u] = load<V>(src + sizeof(V) * (k + 32u * u));
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (k + 32u * u < n) {
        store<V>(dst + sizeof(V) * (k + 32u * u), v[u]);
        if constexpr (kSquares) sum_squares(v[u], sq);
      }
    }
  }
}

template <bool kSquares>
__device__ __forceinline__ void copy_row(uint64_t src, uint64_t dst, uint32_t channels, uint32_t lane,
                                         float& sq) {
  const uint64_t bytes = uint64_t{channels} * 2;
  const uint64_t bits = src | dst | bytes;
  if ((bits & 15) == 0) {
    copy_units<uint4, kSquares>(src, dst, static_cast<uint32_t>(bytes / 16), lane, sq);
  } else if ((bits & 3) == 0) {
    copy_units<uint32_t, kSquares>(src, dst, static_cast<uint32_t>(bytes / 4), lane, sq);
  } else {
    copy_units<uint16_t, kSquares>(src, dst, channels, lane, sq);
  }
}

struct RowsArgs {
  DeviceGeometry g;
  uint64_t encoded = 0;          // the batch's first encoded chunk
  double* errors = nullptr;      // encodes: [chunk][part][squared error, squared values]; null: none
  uint64_t copy_offset[2] = {};  // kCopy: where row row_begin of a part's tile lands in its segment
  uint32_t row_begin = 0;
  uint32_t row_count = 0;  // rows of each tile handled
  uint32_t slabs_per_tile = 0;
};

template <RowOp kOp, bool kEncode, int kVec>
__global__ void __launch_bounds__(kRowThreads, 4) rows_kernel(const RowsArgs a) {
  const DeviceGeometry& g = a.g;
  const uint32_t tile = blockIdx.x / a.slabs_per_tile;  // (chunk * layers + layer) * parts + part
  const uint32_t slab = blockIdx.x - tile * a.slabs_per_tile;
  const uint32_t part = tile % g.parts;
  const uint32_t layer = (tile / g.parts) % g.layers;
  const uint32_t chunk = tile / (g.parts * g.layers);
  const uint64_t seg = g.segment(a.encoded, chunk, layer, part);
  const uint32_t lane = threadIdx.x & 31;
  float err = 0;
  float sq = 0;
  for (uint32_t i = threadIdx.x >> 5; i < kRowsPerSlab; i += kRowWarps) {
    const uint32_t rel = slab * kRowsPerSlab + i;
    if (rel >= a.row_count) break;
    const uint32_t t = a.row_begin + rel;
    const uint64_t row = g.row(chunk, layer, part, t);
    if constexpr (kOp == RowOp::kCopy) {
      const uint64_t at = seg + a.copy_offset[part] + uint64_t{rel} * g.channels * 2;
      if constexpr (kEncode) {
        if (a.errors != nullptr) {
          copy_row<true>(row, at, g.channels, lane, sq);
        } else {
          copy_row<false>(row, at, g.channels, lane, sq);
        }
      } else {
        copy_row<false>(at, row, g.channels, lane, sq);
      }
    } else if constexpr (kEncode) {
      quantize_row<kOp, kVec, true>(row, seg, t, g, lane, err, sq);
    } else {
      dequantize_row<kOp, kVec>(seg, row, t, g, lane);
    }
  }
  if (kEncode && a.errors != nullptr) accumulate_errors(err, sq, a.errors + (uint64_t{chunk} * 2 + part) * 2);
}

// --- KIVI ---------------------------------------------------------------------------------------

// A group's {fp16 min, fp16 scale} and their float values. As the CPU codec: min is the group's
// min rounded to fp16, scale = (max - that rounded min) / L rounded to fp16, and a zero min or max
// counts as +0 (adding +0), so the bytes do not depend on the order the min and max were taken in.
struct GroupScale {
  uint32_t bits;  // min | scale << 16, as the segment stores it
  float min;
  float scale;
  float inverse;  // encodes: 1 / scale, 0 where scale is 0 (the codes multiply by it)
};

template <int kBits>
KVF_HD GroupScale group_scale(float lo, float hi) {
  constexpr float kLevels = static_cast<float>((1 << kBits) - 1);
  const uint16_t min_h = cm::float_to_half(cm::add(lo, 0.0f));
  const float min_f = cm::half_to_float(min_h);
  const uint16_t scale_h = cm::float_to_half(cm::div(cm::sub(cm::add(hi, 0.0f), min_f), kLevels));
  const float scale_f = cm::half_to_float(scale_h);
  return GroupScale{uint32_t{min_h} | (uint32_t{scale_h} << 16), min_f, scale_f,
                    scale_f == 0.0f ? 0.0f : cm::div(1.0f, scale_f)};
}

// The code's bits as round_bits leaves them (the code in the low bits): (x - min) times the
// inverse, so 0 where the scale is 0 (an inverse of 0; NaN clamps to 0 too).
template <int kBits>
KVF_HD uint32_t kivi_code_bits(float y_minus_min, const GroupScale& s) {
  constexpr float kLevels = static_cast<float>((1 << kBits) - 1);
  return round_bits(cm::clamp_value(cm::mul(y_minus_min, s.inverse), 0.0f, kLevels));
}
KVF_HD uint16_t kivi_decode(uint32_t code, const GroupScale& s) {
  return cm::float_to_bf16(cm::add(s.min, cm::mul(to_float(static_cast<int32_t>(code)), s.scale)));
}
KVF_HD GroupScale unpack_scale(uint32_t bits) {
  return GroupScale{bits, cm::half_to_float(static_cast<uint16_t>(bits & 0xffffu)),
                    cm::half_to_float(static_cast<uint16_t>(bits >> 16)), 0.0f};
}

// One value's code, its squared error and squared value added to the sums. The error is against
// the decoded value exactly as a decode rounds it to bf16 (the CPU's figure), with the hardware's
// conversion: it equals codec_math::float_to_bf16 for every non-NaN float, and only the estimate,
// never a payload byte, depends on it.
template <int kBits, bool kErrors>
__device__ __forceinline__ uint32_t kivi_code_sum(float x, const GroupScale& s, float& err, float& sq) {
  const float y = cm::sub(x, s.min);
  const uint32_t bits = kivi_code_bits<kBits>(y, s);
  if constexpr (kErrors) {
    const float decoded =
        __bfloat162float(__float2bfloat16_rn(cm::add(s.min, cm::mul(integer_value(bits), s.scale))));
    const float d = x - decoded;
    err += d * d;
    sq += x * x;
  }
  return bits & ((1u << kBits) - 1);
}

// The running min and max of a group (any order gives the same bytes: see GroupScale).
__device__ __forceinline__ void min_max(float x, float& lo, float& hi) {
  lo = cm::min_value(lo, x);
  hi = cm::max_value(hi, x);
}
__device__ __forceinline__ void min_max(uint4 v, float& lo, float& hi) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    min_max(lo_bf16(w[i]), lo, hi);
    min_max(hi_bf16(w[i]), lo, hi);
  }
}

// 8 consecutive values' codes packed little-endian (first value lowest): 32 bits (int4) or 16 (int2).
template <int kBits, bool kErrors>
__device__ __forceinline__ uint32_t pack8(uint4 v, const GroupScale& s, float& err, float& sq) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  uint32_t out = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out |= kivi_code_sum<kBits, kErrors>(lo_bf16(w[i]), s, err, sq) << (kBits * (2 * i));
    out |= kivi_code_sum<kBits, kErrors>(hi_bf16(w[i]), s, err, sq) << (kBits * (2 * i + 1));
  }
  return out;
}
template <int kBits>
__device__ __forceinline__ uint4 unpack8(uint32_t codes, const GroupScale& s) {
  constexpr uint32_t kMask = (1u << kBits) - 1;
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[i] = pack_bf16(kivi_decode((codes >> (kBits * (2 * i))) & kMask, s),
                     kivi_decode((codes >> (kBits * (2 * i + 1))) & kMask, s));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <int kBits>
__device__ __forceinline__ void store_codes8(uint64_t at, uint32_t codes) {
  if constexpr (kBits == 4) {
    store<uint32_t>(at, codes);
  } else {
    store<uint16_t>(at, static_cast<uint16_t>(codes));
  }
}
template <int kBits>
__device__ __forceinline__ uint32_t load_codes8(uint64_t at) {
  if constexpr (kBits == 4) {
    return load<uint32_t>(at);
  } else {
    return load<uint16_t>(at);
  }
}

struct KiviArgs {
  DeviceGeometry g;
  uint64_t encoded = 0;
  double* errors = nullptr;
  uint32_t ctas_per_tile = 0;  // values: CTAs per (chunk, layer)
  uint32_t slices = 0;         // keys: CTAs per group (channel slices)
  bool codes_aligned = false;  // keys: the codes start at a multiple of 32 * bits / 8 bytes
};

// KIVI values (part 1), token t < Q: a thread per (token, group of G channels).
template <int kBits, bool kEncode>
__global__ void __launch_bounds__(kValueThreads) kivi_values_kernel(const KiviArgs a) {
  const DeviceGeometry& g = a.g;
  const uint32_t tile = blockIdx.x / a.ctas_per_tile;  // chunk * layers + layer
  const uint32_t cta = blockIdx.x - tile * a.ctas_per_tile;
  const uint32_t layer = tile % g.layers;
  const uint32_t chunk = tile / g.layers;
  const uint32_t per_row = g.channels / g.group;
  const uint64_t groups = uint64_t{g.quantized} * per_row;
  const uint64_t idx = uint64_t{cta} * kValueThreads + threadIdx.x;
  float err = 0;
  float sq = 0;
  if (idx < groups) {
    const uint32_t t = static_cast<uint32_t>(idx / per_row);
    const uint32_t j = static_cast<uint32_t>(idx - uint64_t{t} * per_row);
    const uint64_t row = g.row(chunk, layer, 1, t) + uint64_t{j} * g.group * 2;
    const uint64_t seg = g.segment(a.encoded, chunk, layer, 1);
    const uint64_t meta = seg + idx * 4;
    const uint64_t codes = seg + groups * 4 + idx * g.group * kBits / 8;
    const uint32_t n = g.group / 8;  // 16-byte vectors of the group
    if constexpr (kEncode) {
      uint4 cache[4];
      float lo = cm::bf16_to_float(load<uint16_t>(row));
      float hi = lo;
#pragma unroll
      for (uint32_t i = 0; i < 4; ++i) {
        if (i < n) {
          cache[i] = load<uint4>(row + 16ull * i);
          min_max(cache[i], lo, hi);
        }
      }
      for (uint32_t i = 4; i < n; ++i) min_max(load<uint4>(row + 16ull * i), lo, hi);
      const GroupScale s = group_scale<kBits>(lo, hi);
      store<uint32_t>(meta, s.bits);
#pragma unroll
      for (uint32_t i = 0; i < 4; ++i) {
        if (i < n) store_codes8<kBits>(codes + i * kBits, pack8<kBits, true>(cache[i], s, err, sq));
      }
      for (uint32_t i = 4; i < n; ++i) {
        store_codes8<kBits>(codes + i * kBits, pack8<kBits, true>(load<uint4>(row + 16ull * i), s, err, sq));
      }
    } else {
      const GroupScale s = unpack_scale(load<uint32_t>(meta));
      for (uint32_t i = 0; i < n; i += 4) {
        uint32_t c[4];
#pragma unroll
        for (uint32_t u = 0; u < 4; ++u) {
          if (i + u < n) c[u] = load_codes8<kBits>(codes + (i + u) * kBits);
        }
#pragma unroll
        for (uint32_t u = 0; u < 4; ++u) {
          if (i + u < n) store<uint4>(row + 16ull * (i + u), unpack8<kBits>(c[u], s));
        }
      }
    }
  }
  if constexpr (kEncode) accumulate_errors(err, sq, a.errors + (uint64_t{chunk} * 2 + 1) * 2);
}

// KIVI keys (part 0): kCpt adjacent channels per thread (2: one 4-byte access per row; 1 for an
// odd channel count), G tokens per group. A row's kCpt values travel as one word.
template <int kCpt>
__device__ __forceinline__ uint32_t load_word(uint64_t at) {
  if constexpr (kCpt == 2) {
    return load<uint32_t>(at);
  } else {
    return load<uint16_t>(at);
  }
}
template <int kCpt>
__device__ __forceinline__ void store_word(uint64_t at, uint32_t w) {
  if constexpr (kCpt == 2) {
    store<uint32_t>(at, w);
  } else {
    store<uint16_t>(at, static_cast<uint16_t>(w));
  }
}
__device__ __forceinline__ float channel_of(uint32_t w, int ch) {
  return ch == 0 ? lo_bf16(w) : hi_bf16(w);
}

// Fills rows[0, n) with the addresses of tokens first..first+n of a tile. Every thread calls it.
__device__ __forceinline__ void fill_rows(uint64_t* rows, const DeviceGeometry& g, uint32_t chunk,
                                          uint32_t layer, uint32_t first, uint32_t n) {
  __syncthreads();  // the previous table is no longer read
  for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) rows[i] = g.row(chunk, layer, 0, first + i);
  __syncthreads();
}

template <int kBits, bool kEncode, int kCpt, bool kG32>
__global__ void __launch_bounds__(kKeyThreads) kivi_keys_kernel(const KiviArgs a) {
  constexpr uint32_t kWordBytes = kBits;  // code bytes of 8 tokens
  constexpr uint32_t kMask = (1u << kBits) - 1;
  const DeviceGeometry& g = a.g;
  __shared__ uint64_t rows[kKeyRowTable];
  const uint32_t groups = g.quantized / g.group;
  uint32_t unit = blockIdx.x;
  const uint32_t slice = unit % a.slices;
  unit /= a.slices;
  const uint32_t gi = unit % groups;
  const uint32_t tile = unit / groups;  // chunk * layers + layer
  const uint32_t layer = tile % g.layers;
  const uint32_t chunk = tile / g.layers;
  const uint32_t c = (slice * kKeyThreads + threadIdx.x) * kCpt;
  const bool active = c < g.channels;
  const uint32_t G = kG32 ? 32u : g.group;
  const uint64_t seg = g.segment(a.encoded, chunk, layer, 0);
  const uint64_t meta = seg + (uint64_t{gi} * g.channels + c) * 4;
  const uint64_t code_bytes = uint64_t{G} * kBits / 8;  // of one channel's group
  const uint64_t codes =
      seg + uint64_t{groups} * g.channels * 4 + (uint64_t{gi} * g.channels + c) * code_bytes;
  const uint32_t first = gi * G;
  float err = 0;
  float sq = 0;

  if constexpr (kG32) {
    // The group's 32 rows stay in registers between the min/max pass and the coding pass.
    fill_rows(rows, g, chunk, layer, first, 32);
    if (active) {
      if constexpr (kEncode) {
        uint32_t v[32];
#pragma unroll
        for (int t = 0; t < 32; ++t) v[t] = load_word<kCpt>(rows[t] + 2ull * c);
        GroupScale s[kCpt];
#pragma unroll
        for (int ch = 0; ch < kCpt; ++ch) {
          float lo = channel_of(v[0], ch);
          float hi = lo;
#pragma unroll
          for (int t = 1; t < 32; ++t) min_max(channel_of(v[t], ch), lo, hi);
          s[ch] = group_scale<kBits>(lo, hi);
        }
        if constexpr (kCpt == 2) {
          store<uint2>(meta, make_uint2(s[0].bits, s[1].bits));
        } else {
          store<uint32_t>(meta, s[0].bits);
        }
#pragma unroll
        for (int ch = 0; ch < kCpt; ++ch) {
          uint32_t w[4] = {0, 0, 0, 0};  // 32 codes: 4 words (int4) or 2 (int2)
#pragma unroll
          for (int t = 0; t < 32; ++t) {
            w[(t * kBits) / 32] |= kivi_code_sum<kBits, true>(channel_of(v[t], ch), s[ch], err, sq)
                                   << ((t * kBits) % 32);
          }
          const uint64_t at = codes + ch * code_bytes;
          if constexpr (kBits == 4) {
            if (a.codes_aligned) {
              store<uint4>(at, make_uint4(w[0], w[1], w[2], w[3]));
            } else {
#pragma unroll
              for (int k = 0; k < 4; ++k) store<uint32_t>(at + 4ull * k, w[k]);
            }
          } else {
            if (a.codes_aligned) {
              store<uint2>(at, make_uint2(w[0], w[1]));
            } else {
#pragma unroll
              for (int k = 0; k < 4; ++k) {
                store<uint16_t>(at + 2ull * k, static_cast<uint16_t>(w[k / 2] >> (16 * (k % 2))));
              }
            }
          }
        }
      } else {
        GroupScale s[kCpt];
        uint32_t w[kCpt][4];
#pragma unroll
        for (int ch = 0; ch < kCpt; ++ch) {
          s[ch] = unpack_scale(load<uint32_t>(meta + 4ull * ch));
          const uint64_t at = codes + ch * code_bytes;
          if constexpr (kBits == 4) {
            if (a.codes_aligned) {
              const uint4 q = load<uint4>(at);
              w[ch][0] = q.x;
              w[ch][1] = q.y;
              w[ch][2] = q.z;
              w[ch][3] = q.w;
            } else {
#pragma unroll
              for (int k = 0; k < 4; ++k) w[ch][k] = load<uint32_t>(at + 4ull * k);
            }
          } else {
            if (a.codes_aligned) {
              const uint2 q = load<uint2>(at);
              w[ch][0] = q.x;
              w[ch][1] = q.y;
            } else {
#pragma unroll
              for (int k = 0; k < 2; ++k) {
                w[ch][k] = uint32_t{load<uint16_t>(at + 4ull * k)} |
                           (uint32_t{load<uint16_t>(at + 4ull * k + 2)} << 16);
              }
            }
            w[ch][2] = w[ch][3] = 0;
          }
        }
#pragma unroll
        for (int t = 0; t < 32; ++t) {
          uint32_t y = 0;
#pragma unroll
          for (int ch = 0; ch < kCpt; ++ch) {
            y |= uint32_t{kivi_decode((w[ch][(t * kBits) / 32] >> ((t * kBits) % 32)) & kMask, s[ch])}
                 << (16 * ch);
          }
          store_word<kCpt>(rows[t] + 2ull * c, y);
        }
      }
    }
  } else {
    // Any G (a multiple of 8): row addresses kKeyRowTable tokens at a time, the values read twice
    // (min/max, then codes; the second read mostly hits L1).
    GroupScale s[kCpt];
    if constexpr (kEncode) {
      float lo[kCpt] = {};
      float hi[kCpt] = {};
      for (uint32_t t0 = 0; t0 < G; t0 += kKeyRowTable) {
        const uint32_t n = min(kKeyRowTable, G - t0);
        fill_rows(rows, g, chunk, layer, first + t0, n);
        if (!active) continue;
        uint32_t i = 0;
        if (t0 == 0) {
          const uint32_t w = load_word<kCpt>(rows[0] + 2ull * c);
#pragma unroll
          for (int ch = 0; ch < kCpt; ++ch) lo[ch] = hi[ch] = channel_of(w, ch);
          i = 1;
        }
#pragma unroll 8
        for (; i < n; ++i) {
          const uint32_t w = load_word<kCpt>(rows[i] + 2ull * c);
#pragma unroll
          for (int ch = 0; ch < kCpt; ++ch) min_max(channel_of(w, ch), lo[ch], hi[ch]);
        }
      }
      if (active) {
#pragma unroll
        for (int ch = 0; ch < kCpt; ++ch) {
          s[ch] = group_scale<kBits>(lo[ch], hi[ch]);
          store<uint32_t>(meta + 4ull * ch, s[ch].bits);
        }
      }
    } else if (active) {
#pragma unroll
      for (int ch = 0; ch < kCpt; ++ch) s[ch] = unpack_scale(load<uint32_t>(meta + 4ull * ch));
    }
    for (uint32_t t0 = 0; t0 < G; t0 += kKeyRowTable) {
      const uint32_t n = min(kKeyRowTable, G - t0);
      fill_rows(rows, g, chunk, layer, first + t0, n);
      if (!active) continue;
      for (uint32_t i = 0; i < n; i += 8) {
        const uint64_t word = (t0 + i) / 8 * kWordBytes;
        if constexpr (kEncode) {
          uint32_t v[8];
#pragma unroll
          for (int u = 0; u < 8; ++u) v[u] = load_word<kCpt>(rows[i + u] + 2ull * c);
#pragma unroll
          for (int ch = 0; ch < kCpt; ++ch) {
            uint32_t w = 0;
#pragma unroll
            for (int u = 0; u < 8; ++u)
              w |= kivi_code_sum<kBits, true>(channel_of(v[u], ch), s[ch], err, sq) << (kBits * u);
            store_codes8<kBits>(codes + ch * code_bytes + word, w);
          }
        } else {
          uint32_t w[kCpt];
#pragma unroll
          for (int ch = 0; ch < kCpt; ++ch) w[ch] = load_codes8<kBits>(codes + ch * code_bytes + word);
#pragma unroll
          for (int u = 0; u < 8; ++u) {
            uint32_t y = 0;
#pragma unroll
            for (int ch = 0; ch < kCpt; ++ch)
              y |= uint32_t{kivi_decode((w[ch] >> (kBits * u)) & kMask, s[ch])} << (16 * ch);
            store_word<kCpt>(rows[i + u] + 2ull * c, y);
          }
        }
      }
    }
  }
  if constexpr (kEncode) accumulate_errors(err, sq, a.errors + uint64_t{chunk} * 2 * 2);
}

// Each chunk's header and table from the template, its error estimates (0 without sums), and the
// zero padding after every segment that is not a multiple of 16 bytes long.
struct FinalizeArgs {
  const uint32_t* header_template = nullptr;
  const double* errors = nullptr;  // null: lossless, estimates 0
  uint64_t encoded = 0;
  uint64_t chunk_bytes = 0;
  uint64_t payload_offset = 0;
  uint64_t segment_bytes[2] = {};  // aligned
  uint64_t segment_length[2] = {};
  uint32_t header_words = 0;
  uint32_t segments = 0;  // layers * parts
  uint32_t parts = 0;
};

__global__ void finalize_kernel(const FinalizeArgs a) {
  const uint32_t chunk = blockIdx.x;
  const uint64_t base = a.encoded + chunk * a.chunk_bytes;
  uint32_t* out = reinterpret_cast<uint32_t*>(base);
  for (uint32_t i = threadIdx.x; i < a.header_words; i += blockDim.x) {
    if (i != 10 && i != 11) out[i] = a.header_template[i];  // bytes 40..48: the error floats, below
  }
  if (threadIdx.x < 2) {
    float e = 0.0f;
    if (a.errors != nullptr && threadIdx.x < a.parts) {
      const double* sums = a.errors + (uint64_t{chunk} * 2 + threadIdx.x) * 2;
      if (sums[1] > 0) e = static_cast<float>(sqrt(sums[0] / sums[1]));
      // inf or NaN in the chunk (or past 1.8e19: the per-thread partial sums are float): NaN, which
      // read_chunk_header refuses, as the CPU codec refuses to encode such a chunk at all.
      if (!isfinite(sums[0]) || !isfinite(sums[1])) e = __uint_as_float(0x7fc00000u);
    }
    out[10 + threadIdx.x] = __float_as_uint(e);
  }
  for (uint32_t s = threadIdx.x; s < a.segments; s += blockDim.x) {
    const uint32_t part = s % a.parts;
    const uint32_t layer = s / a.parts;
    const uint64_t seg = base + a.payload_offset + layer * (a.segment_bytes[0] + a.segment_bytes[1]) +
                         (part == 0 ? 0 : a.segment_bytes[0]);
    for (uint64_t b = a.segment_length[part]; b < a.segment_bytes[part]; ++b) store<uint8_t>(seg + b, 0);
  }
}

// --- host side ------------------------------------------------------------------------------------

Status cuda_error(cudaError_t err, const char* what) {
  ErrorCode code = ErrorCode::kInternal;
  if (err == cudaErrorMemoryAllocation) code = ErrorCode::kOutOfMemory;
  if (err == cudaErrorNoDevice || err == cudaErrorInvalidDevice || err == cudaErrorInsufficientDriver) {
    code = ErrorCode::kUnavailable;
  }
  return Status(code, std::string("GPU KV codec: ") + what + ": " + cudaGetErrorString(err) + " (" +
                          cudaGetErrorName(err) + ")");
}

#define KVF_CODEC_CUDA_TRY(call, what)                                          \
  do {                                                                          \
    const cudaError_t kvf_codec_err_ = (call);                                  \
    if (kvf_codec_err_ != cudaSuccess) return cuda_error(kvf_codec_err_, what); \
  } while (0)

Status invalid(const std::string& what) {
  return Status(ErrorCode::kInvalidArgument, "GPU KV codec: " + what);
}

// Pinned staging for the per-call descriptor and its device copy, reused round-robin. A slot's
// event is recorded after the last launch that reads its device copy, so reusing the slot (the
// ring wrapped) waits only for that call's kernels. One ring per device; never freed (the process
// may outlive its CUDA context at exit).
struct StagingSlot {
  uint8_t* host = nullptr;
  uint8_t* device = nullptr;
  size_t capacity = 0;
  cudaEvent_t done = nullptr;
};
constexpr size_t kStagingSlots = 8;
struct StagingRing {
  std::mutex mu;
  StagingSlot slots[kStagingSlots];
  size_t next = 0;
};

StagingRing& staging_ring(int device) {
  static std::mutex mu;
  static std::map<int, StagingRing*> rings;
  const std::lock_guard<std::mutex> lock(mu);
  StagingRing*& ring = rings[device];
  if (ring == nullptr) ring = new StagingRing();  // deliberately never freed (see above)
  return *ring;
}

Status prepare_slot(StagingSlot& slot, size_t bytes) {
  if (slot.done == nullptr) {
    KVF_CODEC_CUDA_TRY(cudaEventCreateWithFlags(&slot.done, cudaEventDisableTiming),
                       "cudaEventCreateWithFlags");
  } else {
    KVF_CODEC_CUDA_TRY(cudaEventSynchronize(slot.done), "cudaEventSynchronize (staging slot)");
  }
  if (slot.capacity >= bytes) return Status::Ok();
  if (slot.host != nullptr) cudaFreeHost(slot.host);
  if (slot.device != nullptr) cudaFree(slot.device);
  slot.host = nullptr;
  slot.device = nullptr;
  slot.capacity = 0;
  const size_t capacity = std::max<size_t>(bytes, 64 << 10);
  KVF_CODEC_CUDA_TRY(cudaMallocHost(reinterpret_cast<void**>(&slot.host), capacity),
                     "cudaMallocHost (staging)");
  KVF_CODEC_CUDA_TRY(cudaMalloc(reinterpret_cast<void**>(&slot.device), capacity),
                     "cudaMalloc (descriptors)");
  slot.capacity = capacity;
  return Status::Ok();
}

// One batch, as the kernels see it, with the host arrays that go to the device.
struct Batch {
  KvCodecParams params;
  KvChunkGeometry geometry;  // of one chunk
  uint32_t chunks = 0;
  uint64_t block_stride = 0;
  uint64_t part_stride = 0;
  std::vector<uint64_t> layer_base;
  std::vector<uint32_t> block_ids;  // chunks * geometry.blocks
};

uint64_t align16(uint64_t n) {
  return (n + 15) & ~uint64_t{15};
}
bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

Status check_codec(const KvCodecParams& params, const KvChunkGeometry& geometry) {
  if (!protocol::codec_is_fixed_rate(params.codec)) {
    return invalid("codec " + std::string(protocol::codec_name(params.codec)) +
                   " is not fixed-rate: the GPU codes identity, int8, fp8, int4 and int2 (the CPU codec "
                   "does the others)");
  }
  if (Status s = protocol::validate_codec(params, geometry); !s.ok()) return invalid(s.message());
  return Status::Ok();
}

uint32_t kivi_bits(KvCodec codec) {
  return codec == KvCodec::kInt4 ? 4 : 2;
}

// The descriptor upload and the launches of one encode or decode.
Status run(const Batch& b, uint64_t encoded, bool encode, cudaStream_t stream) {
  const KvCodecParams& params = b.params;
  const KvChunkGeometry& geo = b.geometry;
  const uint32_t parts = geo.parts;
  const uint64_t table_bytes = 16ull * geo.layers * parts;
  const uint64_t header_bytes = protocol::kKvChunkHeaderBytes + table_bytes;
  const uint64_t chunk_bytes = protocol::fixed_encoded_bytes(params, geo);
  uint64_t seg[2] = {0, 0};
  for (uint32_t p = 0; p < parts; ++p) seg[p] = protocol::fixed_segment_bytes(params, geo, p);

  // Staging: [error sums][header template][layer bases][block ids], each 16-byte aligned.
  const uint64_t errors_at = 0;
  const uint64_t errors_bytes = encode ? 32ull * b.chunks : 0;
  const uint64_t header_at = align16(errors_at + errors_bytes);
  const uint64_t header_len = encode ? header_bytes : 0;
  const uint64_t bases_at = align16(header_at + header_len);
  const uint64_t ids_at = align16(bases_at + 8ull * b.layer_base.size());
  const uint64_t staging_bytes = align16(ids_at + 4ull * b.block_ids.size());

  int device = 0;
  KVF_CODEC_CUDA_TRY(cudaGetDevice(&device), "cudaGetDevice");
#if CUDART_VERSION >= 12080
  if (stream != nullptr) KVF_CODEC_CUDA_TRY(cudaStreamGetDevice(stream, &device), "cudaStreamGetDevice");
#endif
  ScopedDevice scope(device);
  if (Status s = scope.status(); !s.ok()) return s;
  StagingRing& ring = staging_ring(device);
  const std::lock_guard<std::mutex> lock(ring.mu);
  StagingSlot& slot = ring.slots[ring.next];
  ring.next = (ring.next + 1) % kStagingSlots;
  if (Status s = prepare_slot(slot, staging_bytes); !s.ok()) return s;

  uint8_t* host = slot.host;
  std::memset(host, 0, staging_bytes);
  if (encode) {
    protocol::KvChunkHeader h;
    h.params = params;
    h.geometry = geo;
    h.kept_tokens = geo.tokens();
    h.raw_bytes = geo.raw_bytes();
    h.payload_bytes = chunk_bytes - header_bytes;
    const std::span<uint8_t> out(host + header_at, header_bytes);
    protocol::write_chunk_header(h, out);
    uint64_t offset = 0;
    for (uint32_t l = 0; l < geo.layers; ++l) {
      for (uint32_t p = 0; p < parts; ++p) {
        protocol::write_chunk_segment(h, out, l * parts + p, protocol::KvSegment{offset, seg[p]});
        offset += protocol::align_segment(seg[p]);
      }
    }
  }
  std::memcpy(host + bases_at, b.layer_base.data(), 8 * b.layer_base.size());
  std::memcpy(host + ids_at, b.block_ids.data(), 4 * b.block_ids.size());
  KVF_CODEC_CUDA_TRY(cudaMemcpyAsync(slot.device, host, staging_bytes, cudaMemcpyHostToDevice, stream),
                     "cudaMemcpyAsync (descriptor upload)");

  DeviceGeometry g;
  g.layer_base = reinterpret_cast<const uint64_t*>(slot.device + bases_at);
  g.block_ids = reinterpret_cast<const uint32_t*>(slot.device + ids_at);
  g.block_stride = b.block_stride;
  g.part_stride = b.part_stride;
  g.chunk_bytes = chunk_bytes;
  g.payload_offset = header_bytes;
  g.segment_bytes[0] = protocol::align_segment(seg[0]);
  g.segment_bytes[1] = parts == 2 ? protocol::align_segment(seg[1]) : 0;
  g.chunks = b.chunks;
  g.layers = geo.layers;
  g.parts = parts;
  g.tokens = geo.tokens();
  g.channels = geo.channels;
  g.block_tokens = geo.block_tokens;
  g.blocks_per_chunk = geo.blocks;
  const bool kivi = params.codec == KvCodec::kInt4 || params.codec == KvCodec::kInt2;
  g.group = kivi ? params.group : 0;
  g.quantized = kivi ? geo.tokens() - params.residual_tokens : geo.tokens();
  double* errors = encode ? reinterpret_cast<double*>(slot.device + errors_at) : nullptr;

  // Launches; the slot's event is recorded whatever happens, as the upload may still read it.
  auto launch_all = [&]() -> cudaError_t {
    auto rows = [&](RowOp op, uint32_t row_begin, uint32_t row_count, uint64_t copy0, uint64_t copy1,
                    double* sums) -> cudaError_t {
      if (row_count == 0) return cudaSuccess;
      RowsArgs a;
      a.g = g;
      a.encoded = encoded;
      a.errors = sums;
      a.copy_offset[0] = copy0;
      a.copy_offset[1] = copy1;
      a.row_begin = row_begin;
      a.row_count = row_count;
      a.slabs_per_tile = (row_count + kRowsPerSlab - 1) / kRowsPerSlab;
      const uint64_t grid = uint64_t{b.chunks} * geo.layers * parts * a.slabs_per_tile;
      if (grid > 0x7fffffffull) return cudaErrorInvalidConfiguration;
      const bool vec = geo.channels % 8 == 0 && geo.tokens() % 2 == 0;
      const dim3 grid_dim(static_cast<unsigned>(grid));
      switch (op) {
        case RowOp::kCopy:
          if (encode) {
            rows_kernel<RowOp::kCopy, true, 0><<<grid_dim, kRowThreads, 0, stream>>>(a);
          } else {
            rows_kernel<RowOp::kCopy, false, 0><<<grid_dim, kRowThreads, 0, stream>>>(a);
          }
          break;
        case RowOp::kInt8:
          if (encode && vec) rows_kernel<RowOp::kInt8, true, 8><<<grid_dim, kRowThreads, 0, stream>>>(a);
          if (encode && !vec) rows_kernel<RowOp::kInt8, true, 1><<<grid_dim, kRowThreads, 0, stream>>>(a);
          if (!encode && vec) rows_kernel<RowOp::kInt8, false, 8><<<grid_dim, kRowThreads, 0, stream>>>(a);
          if (!encode && !vec) rows_kernel<RowOp::kInt8, false, 1><<<grid_dim, kRowThreads, 0, stream>>>(a);
          break;
        case RowOp::kFp8:
          if (encode && vec) rows_kernel<RowOp::kFp8, true, 8><<<grid_dim, kRowThreads, 0, stream>>>(a);
          if (encode && !vec) rows_kernel<RowOp::kFp8, true, 1><<<grid_dim, kRowThreads, 0, stream>>>(a);
          if (!encode && vec) rows_kernel<RowOp::kFp8, false, 8><<<grid_dim, kRowThreads, 0, stream>>>(a);
          if (!encode && !vec) rows_kernel<RowOp::kFp8, false, 1><<<grid_dim, kRowThreads, 0, stream>>>(a);
          break;
      }
      return cudaGetLastError();
    };

    switch (params.codec) {
      case KvCodec::kIdentity:
        if (cudaError_t e = rows(RowOp::kCopy, 0, geo.tokens(), 0, 0, nullptr); e != cudaSuccess) return e;
        break;
      case KvCodec::kInt8:
        if (cudaError_t e = rows(RowOp::kInt8, 0, geo.tokens(), 0, 0, errors); e != cudaSuccess) return e;
        break;
      case KvCodec::kFp8:
        if (cudaError_t e = rows(RowOp::kFp8, 0, geo.tokens(), 0, 0, errors); e != cudaSuccess) return e;
        break;
      case KvCodec::kInt4:
      case KvCodec::kInt2: {
        const uint32_t bits = kivi_bits(params.codec);
        const uint32_t q = g.quantized;
        const uint32_t gsize = params.group;
        if (q > 0) {
          KiviArgs a;
          a.g = g;
          a.encoded = encoded;
          a.errors = errors;
          // Keys: one CTA per (chunk, layer, group, slice of 256 channels).
          const uint32_t cpt = geo.channels % 2 == 0 ? 2 : 1;
          a.slices = (geo.channels + kKeyThreads * cpt - 1) / (kKeyThreads * cpt);
          const uint64_t key_meta = uint64_t{q / gsize} * geo.channels * 4;
          a.codes_aligned = key_meta % (32ull * bits / 8) == 0;
          const uint64_t key_grid = uint64_t{b.chunks} * geo.layers * (q / gsize) * a.slices;
          if (key_grid > 0x7fffffffull) return cudaErrorInvalidConfiguration;
          const dim3 kg(static_cast<unsigned>(key_grid));
          const bool g32 = gsize == 32;
#define KVF_KEYS(BITS, ENC, CPT, G32) kivi_keys_kernel<BITS, ENC, CPT, G32><<<kg, kKeyThreads, 0, stream>>>(a)
#define KVF_KEYS_BY_SHAPE(BITS, ENC) \
  do {                               \
    if (cpt == 2 && g32) {           \
      KVF_KEYS(BITS, ENC, 2, true);  \
    } else if (cpt == 2) {           \
      KVF_KEYS(BITS, ENC, 2, false); \
    } else if (g32) {                \
      KVF_KEYS(BITS, ENC, 1, true);  \
    } else {                         \
      KVF_KEYS(BITS, ENC, 1, false); \
    }                                \
  } while (0)
          if (bits == 4 && encode) KVF_KEYS_BY_SHAPE(4, true);
          if (bits == 4 && !encode) KVF_KEYS_BY_SHAPE(4, false);
          if (bits == 2 && encode) KVF_KEYS_BY_SHAPE(2, true);
          if (bits == 2 && !encode) KVF_KEYS_BY_SHAPE(2, false);
#undef KVF_KEYS_BY_SHAPE
#undef KVF_KEYS
          if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
          if (parts == 2) {
            // Values: a thread per (token, group).
            const uint64_t groups = uint64_t{q} * (geo.channels / gsize);
            a.ctas_per_tile = static_cast<uint32_t>((groups + kValueThreads - 1) / kValueThreads);
            const uint64_t value_grid = uint64_t{b.chunks} * geo.layers * a.ctas_per_tile;
            if (value_grid > 0x7fffffffull) return cudaErrorInvalidConfiguration;
            const dim3 vg(static_cast<unsigned>(value_grid));
            if (bits == 4 && encode) kivi_values_kernel<4, true><<<vg, kValueThreads, 0, stream>>>(a);
            if (bits == 4 && !encode) kivi_values_kernel<4, false><<<vg, kValueThreads, 0, stream>>>(a);
            if (bits == 2 && encode) kivi_values_kernel<2, true><<<vg, kValueThreads, 0, stream>>>(a);
            if (bits == 2 && !encode) kivi_values_kernel<2, false><<<vg, kValueThreads, 0, stream>>>(a);
            if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
          }
        }
        // The residual rows, raw, after each segment's metadata and codes (their squares count in
        // the error estimates' ||x||, as in the CPU codec).
        uint64_t residual_at[2] = {0, 0};
        for (uint32_t p = 0; p < parts; ++p) {
          const uint64_t meta =
              p == 0 ? uint64_t{q / gsize} * geo.channels * 4 : uint64_t{q} * (geo.channels / gsize) * 4;
          residual_at[p] = meta + uint64_t{q} * geo.channels * bits / 8;
        }
        if (cudaError_t e = rows(RowOp::kCopy, q, geo.tokens() - q, residual_at[0], residual_at[1], errors);
            e != cudaSuccess) {
          return e;
        }
        break;
      }
      default:
        return cudaErrorInvalidValue;  // refused before: not fixed-rate
    }
    if (encode) {
      const bool lossy = params.codec != KvCodec::kIdentity;
      FinalizeArgs f;
      f.header_template = reinterpret_cast<const uint32_t*>(slot.device + header_at);
      f.errors = lossy ? errors : nullptr;
      f.encoded = encoded;
      f.chunk_bytes = chunk_bytes;
      f.payload_offset = header_bytes;
      f.segment_bytes[0] = g.segment_bytes[0];
      f.segment_bytes[1] = g.segment_bytes[1];
      f.segment_length[0] = seg[0];
      f.segment_length[1] = seg[1];
      f.header_words = static_cast<uint32_t>(header_bytes / 4);
      f.segments = geo.layers * parts;
      f.parts = parts;
      finalize_kernel<<<b.chunks, 128, 0, stream>>>(f);
      if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    }
    return cudaSuccess;
  };
  const cudaError_t launched = launch_all();
  const cudaError_t recorded = cudaEventRecord(slot.done, stream);
  KVF_CODEC_CUDA_TRY(launched, encode ? "encode launch" : "decode launch");
  KVF_CODEC_CUDA_TRY(recorded, "cudaEventRecord (staging slot)");
  return Status::Ok();
}

// A paged batch: checks and the addressing of KvLayout::extent.
Result<Batch> paged_batch(const KvCodecParams& params, const PagedChunks& chunks, bool writes) {
  Result<KvLayout> layout = KvLayout::create(chunks.layout);
  if (!layout.ok()) return invalid(layout.status().message());
  const protocol::KvLayoutDesc& d = chunks.layout;
  if (d.dtype_bytes != 2) {
    return invalid("the codecs take 16-bit (bf16) KV; the layout has " + std::to_string(d.dtype_bytes) +
                   "-byte values");
  }
  if (chunks.blocks_per_chunk == 0) return invalid("blocks_per_chunk is 0");
  if (chunks.block_ids.empty() || chunks.block_ids.size() % chunks.blocks_per_chunk != 0) {
    return invalid(std::to_string(chunks.block_ids.size()) +
                   " block ids are not a whole number (> 0) of chunks of " +
                   std::to_string(chunks.blocks_per_chunk) + " blocks");
  }
  if (chunks.layer_base.size() != d.num_layers) {
    return invalid(std::to_string(chunks.layer_base.size()) + " layer base pointers for " +
                   std::to_string(d.num_layers) + " layers");
  }
  for (size_t l = 0; l < chunks.layer_base.size(); ++l) {
    if (chunks.layer_base[l] == nullptr)
      return invalid("layer " + std::to_string(l) + "'s base pointer is null");
    if (!aligned16(chunks.layer_base[l])) {
      return invalid("layer " + std::to_string(l) + "'s base pointer is not 16-byte aligned");
    }
  }
  std::vector<uint8_t> seen(writes ? d.num_blocks : 0, 0);
  for (size_t i = 0; i < chunks.block_ids.size(); ++i) {
    const uint32_t id = chunks.block_ids[i];
    if (id >= d.num_blocks) {
      return invalid("block id " + std::to_string(id) + " (index " + std::to_string(i) +
                     ") is past the layout's " + std::to_string(d.num_blocks) + " blocks");
    }
    if (writes) {
      if (seen[id] != 0) {
        return invalid("block id " + std::to_string(id) +
                       " repeats: two chunks' rows would land in one block (which one wins is undefined)");
      }
      seen[id] = 1;
    }
  }
  Batch b;
  b.params = params;
  b.geometry.layers = d.num_layers;
  b.geometry.parts = layout->parts();
  b.geometry.blocks = chunks.blocks_per_chunk;
  b.geometry.block_tokens = d.block_tokens;
  b.geometry.channels = d.kv_heads * d.head_dim;
  b.geometry.dtype_bytes = 2;
  if (Status s = check_codec(params, b.geometry); !s.ok()) return s;
  b.chunks = static_cast<uint32_t>(chunks.block_ids.size() / chunks.blocks_per_chunk);
  // extent(block, part).offset = block * block_stride + part * part_stride, per layout kind.
  const uint64_t part_bytes = layout->part_bytes();
  switch (d.kind) {
    case KvLayoutKind::kFlashAttention:
      b.block_stride = part_bytes;
      b.part_stride = uint64_t{d.num_blocks} * part_bytes;
      break;
    case KvLayoutKind::kFlashInfer:
      b.block_stride = layout->block_bytes();
      b.part_stride = part_bytes;
      break;
    case KvLayoutKind::kMla:
      b.block_stride = part_bytes;
      b.part_stride = 0;
      break;
  }
  b.layer_base.reserve(d.num_layers);
  for (void* p : chunks.layer_base) b.layer_base.push_back(reinterpret_cast<uintptr_t>(p));
  b.block_ids.assign(chunks.block_ids.begin(), chunks.block_ids.end());
  return b;
}

// One contiguous raw chunk in store order: per layer, per block, per part.
Result<Batch> raw_batch(const KvCodecParams& params, const KvChunkGeometry& geometry, const void* raw) {
  if (Status s = check_codec(params, geometry); !s.ok()) return s;
  if (raw == nullptr) return invalid("the raw chunk pointer is null");
  if (!aligned16(raw)) return invalid("the raw chunk is not 16-byte aligned");
  Batch b;
  b.params = params;
  b.geometry = geometry;
  b.chunks = 1;
  const uint64_t part_bytes = uint64_t{geometry.block_tokens} * geometry.channels * 2;
  b.block_stride = part_bytes * geometry.parts;
  b.part_stride = part_bytes;
  for (uint32_t l = 0; l < geometry.layers; ++l) {
    b.layer_base.push_back(reinterpret_cast<uintptr_t>(raw) + uint64_t{l} * geometry.blocks * b.block_stride);
  }
  b.block_ids.resize(geometry.blocks);
  for (uint32_t i = 0; i < geometry.blocks; ++i) b.block_ids[i] = i;
  return b;
}

Status check_encoded_pointer(const void* p, const char* what) {
  if (p == nullptr) return invalid(std::string(what) + " is null");
  if (!aligned16(p)) return invalid(std::string(what) + " is not 16-byte aligned");
  return Status::Ok();
}

Status check_cuda() {
  const CudaAvailability& cuda = cuda_availability();
  if (cuda.device_count == 0)
    return Status(ErrorCode::kUnavailable, "GPU KV codec: no CUDA device: " + cuda.reason);
  return Status::Ok();
}

}  // namespace

Status encode_paged_chunks_cuda(const KvCodecParams& params, const PagedChunks& chunks, void* out_device,
                                void* cuda_stream) {
  Result<Batch> b = paged_batch(params, chunks, /*writes=*/false);
  if (!b.ok()) return b.status();
  if (Status s = check_encoded_pointer(out_device, "the output pointer"); !s.ok()) return s;
  if (Status s = check_cuda(); !s.ok()) return s;
  return run(*b, reinterpret_cast<uintptr_t>(out_device), true, static_cast<cudaStream_t>(cuda_stream));
}

Status decode_paged_chunks_cuda(const KvCodecParams& params, const PagedChunks& chunks,
                                const void* encoded_device, void* cuda_stream) {
  Result<Batch> b = paged_batch(params, chunks, /*writes=*/true);
  if (!b.ok()) return b.status();
  if (Status s = check_encoded_pointer(encoded_device, "the encoded pointer"); !s.ok()) return s;
  if (Status s = check_cuda(); !s.ok()) return s;
  return run(*b, reinterpret_cast<uintptr_t>(encoded_device), false, static_cast<cudaStream_t>(cuda_stream));
}

Status encode_chunk_cuda(const KvCodecParams& params, const KvChunkGeometry& geometry, const void* raw_device,
                         void* out_device, void* cuda_stream) {
  Result<Batch> b = raw_batch(params, geometry, raw_device);
  if (!b.ok()) return b.status();
  if (Status s = check_encoded_pointer(out_device, "the output pointer"); !s.ok()) return s;
  if (Status s = check_cuda(); !s.ok()) return s;
  return run(*b, reinterpret_cast<uintptr_t>(out_device), true, static_cast<cudaStream_t>(cuda_stream));
}

Status decode_chunk_cuda(const KvCodecParams& params, const KvChunkGeometry& geometry,
                         const void* encoded_device, void* raw_device, void* cuda_stream) {
  Result<Batch> b = raw_batch(params, geometry, raw_device);
  if (!b.ok()) return b.status();
  if (Status s = check_encoded_pointer(encoded_device, "the encoded pointer"); !s.ok()) return s;
  if (Status s = check_cuda(); !s.ok()) return s;
  return run(*b, reinterpret_cast<uintptr_t>(encoded_device), false, static_cast<cudaStream_t>(cuda_stream));
}

}  // namespace kvf::gpudirect
