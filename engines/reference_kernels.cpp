#include "kvf/engines/reference_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace kvf::engines::reference {

uint16_t to_bf16(float value) {
  uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0) {
    // Keep a NaN a NaN: truncating could clear every mantissa bit left and make it an infinity.
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  const uint32_t lsb = (bits >> 16) & 1u;  // ties round to the even neighbour
  bits += 0x7FFFu + lsb;
  return static_cast<uint16_t>(bits >> 16);
}

float from_bf16(uint16_t bits) {
  const uint32_t wide = uint32_t{bits} << 16;
  float value = 0;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

namespace {

// Outputs are computed kChunk at a time in a local accumulator: a fixed trip count over restrict
// pointers is what GCC's -O2 cost model vectorizes (it leaves loops of unknown length scalar), and
// lanes are independent outputs, so no sum is reordered.
constexpr uint32_t kChunk = 64;
constexpr uint32_t kTileRows = 4;  // rows that share each load of a weight chunk

void axpy_chunk(float* __restrict acc, const float* __restrict w, float a) {
  for (uint32_t j = 0; j < kChunk; ++j) acc[j] += a * w[j];
}

void matmul_tile(const float* x, uint32_t rows, uint32_t in, const float* w, uint32_t out, float* y) {
  uint32_t o = 0;
  for (; o + kChunk <= out; o += kChunk) {
    float acc[kTileRows][kChunk] = {};
    for (uint32_t i = 0; i < in; ++i) {
      const float* wchunk = w + uint64_t{i} * out + o;
      for (uint32_t r = 0; r < rows; ++r) axpy_chunk(acc[r], wchunk, x[uint64_t{r} * in + i]);
    }
    for (uint32_t r = 0; r < rows; ++r) std::copy(acc[r], acc[r] + kChunk, y + uint64_t{r} * out + o);
  }
  for (; o < out; ++o) {  // the last out % kChunk outputs
    for (uint32_t r = 0; r < rows; ++r) {
      float sum = 0.0f;
      for (uint32_t i = 0; i < in; ++i) sum += x[uint64_t{r} * in + i] * w[uint64_t{i} * out + o];
      y[uint64_t{r} * out + o] = sum;
    }
  }
}

}  // namespace

void matmul(const float* x, uint32_t rows, uint32_t in, const float* w, uint32_t out, float* y) {
  for (uint32_t r = 0; r < rows; r += kTileRows) {
    const uint32_t tile = std::min(kTileRows, rows - r);
    matmul_tile(x + uint64_t{r} * in, tile, in, w, out, y + uint64_t{r} * out);
  }
}

void rms_norm(std::span<const float> x, std::span<const float> weight, float eps, std::span<float> out) {
  float sum_sq = 0.0f;
  for (const float v : x) sum_sq += v * v;
  const float inv = 1.0f / std::sqrt(sum_sq / static_cast<float>(x.size()) + eps);
  for (size_t i = 0; i < x.size(); ++i) out[i] = x[i] * inv * weight[i];
}

void apply_rope(float* heads, uint32_t num_heads, uint32_t head_dim, uint64_t position, double theta) {
  const uint32_t half = head_dim / 2;
  for (uint32_t i = 0; i < half; ++i) {
    // The angle in double: position * frequency loses fp32 precision at long contexts.
    const double freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
    const double angle = static_cast<double>(position) * freq;
    const auto c = static_cast<float>(std::cos(angle));
    const auto s = static_cast<float>(std::sin(angle));
    for (uint32_t h = 0; h < num_heads; ++h) {
      float* head = heads + uint64_t{h} * head_dim;
      const float x1 = head[i];
      const float x2 = head[i + half];
      head[i] = x1 * c - x2 * s;
      head[i + half] = x2 * c + x1 * s;
    }
  }
}

void swiglu(std::span<float> gate, std::span<const float> up) {
  for (size_t i = 0; i < gate.size(); ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

uint32_t argmax(std::span<const float> values) {
  uint32_t best = 0;
  bool found = false;
  for (uint32_t i = 0; i < values.size(); ++i) {
    // Strictly greater: an equal value later in the vocabulary never displaces an earlier one.
    if (!std::isnan(values[i]) && (!found || values[i] > values[best])) {
      best = i;
      found = true;
    }
  }
  return best;
}

const uint8_t* kv_slot(const uint8_t* layer_base, const protocol::KvLayout& layout,
                       std::span<const uint32_t> block_table, uint64_t position, uint32_t kv_head,
                       protocol::KvPart part) {
  const protocol::KvLayoutDesc& d = layout.desc();
  const uint32_t block = block_table[position / d.block_tokens];
  const uint64_t slot = position % d.block_tokens;
  const uint64_t within = (slot * d.kv_heads + kv_head) * uint64_t{d.head_dim} * d.dtype_bytes;
  return layer_base + layout.extent(block, part).offset + within;
}

uint8_t* kv_slot(uint8_t* layer_base, const protocol::KvLayout& layout, std::span<const uint32_t> block_table,
                 uint64_t position, uint32_t kv_head, protocol::KvPart part) {
  return const_cast<uint8_t*>(
      kv_slot(static_cast<const uint8_t*>(layer_base), layout, block_table, position, kv_head, part));
}

namespace {

void store_bf16(uint8_t* dst, const float* src, uint32_t n) {
  for (uint32_t i = 0; i < n; ++i) {
    const uint16_t b = to_bf16(src[i]);
    std::memcpy(dst + 2 * uint64_t{i}, &b, 2);
  }
}

// Attention's inner loops in runs of kLanes: fixed-length runs over restrict pointers are what
// GCC vectorizes at -O2. dot() keeps kLanes partial sums and adds them in one fixed order, so its
// result is the same on every run.
constexpr uint32_t kLanes = 8;

float dot(const float* __restrict a, const float* __restrict b, uint32_t n) {
  float lanes[kLanes] = {};
  uint32_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (uint32_t l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  }
  float sum = 0.0f;
  for (const float v : lanes) sum += v;
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y += a * x over n values.
void axpy(float* __restrict y, const float* __restrict x, float a, uint32_t n) {
  uint32_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (uint32_t l = 0; l < kLanes; ++l) y[i + l] += a * x[i + l];
  }
  for (; i < n; ++i) y[i] += a * x[i];
}

void load_bf16(const uint8_t* src, uint32_t n, float* dst) {
  for (uint32_t i = 0; i < n; ++i) {
    uint16_t b = 0;
    std::memcpy(&b, src + 2 * uint64_t{i}, 2);
    dst[i] = from_bf16(b);
  }
}

}  // namespace

void write_kv(uint8_t* layer_base, const protocol::KvLayout& layout, std::span<const uint32_t> block_table,
              uint64_t position, const float* k, const float* v) {
  const protocol::KvLayoutDesc& d = layout.desc();
  for (uint32_t h = 0; h < d.kv_heads; ++h) {
    const uint64_t at = uint64_t{h} * d.head_dim;
    store_bf16(kv_slot(layer_base, layout, block_table, position, h, protocol::KvPart::kKey), k + at,
               d.head_dim);
    store_bf16(kv_slot(layer_base, layout, block_table, position, h, protocol::KvPart::kValue), v + at,
               d.head_dim);
  }
}

void paged_attention(const float* q, uint32_t q_heads, uint64_t position, const uint8_t* layer_base,
                     const protocol::KvLayout& layout, std::span<const uint32_t> block_table, float* out) {
  const protocol::KvLayoutDesc& d = layout.desc();
  const uint32_t dim = d.head_dim;
  const uint32_t group = q_heads / d.kv_heads;
  const uint64_t tokens = position + 1;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  std::vector<float> scores(tokens * group);  // [group][tokens]
  std::vector<float> row(dim);
  for (uint32_t g = 0; g < d.kv_heads; ++g) {
    // Each key is read and converted once for all the query heads that share it.
    for (uint64_t t = 0; t < tokens; ++t) {
      load_bf16(kv_slot(layer_base, layout, block_table, t, g, protocol::KvPart::kKey), dim, row.data());
      for (uint32_t j = 0; j < group; ++j) {
        scores[j * tokens + t] = dot(q + (uint64_t{g} * group + j) * dim, row.data(), dim) * scale;
      }
    }
    for (uint32_t j = 0; j < group; ++j) {
      float* s = scores.data() + j * tokens;
      const float max = *std::max_element(s, s + tokens);
      float sum = 0.0f;
      for (uint64_t t = 0; t < tokens; ++t) {
        s[t] = std::exp(s[t] - max);
        sum += s[t];
      }
      for (uint64_t t = 0; t < tokens; ++t) s[t] /= sum;
      std::fill(out + (uint64_t{g} * group + j) * dim, out + (uint64_t{g} * group + j + 1) * dim, 0.0f);
    }
    for (uint64_t t = 0; t < tokens; ++t) {
      load_bf16(kv_slot(layer_base, layout, block_table, t, g, protocol::KvPart::kValue), dim, row.data());
      for (uint32_t j = 0; j < group; ++j) {
        axpy(out + (uint64_t{g} * group + j) * dim, row.data(), scores[j * tokens + t], dim);
      }
    }
  }
}

}  // namespace kvf::engines::reference
