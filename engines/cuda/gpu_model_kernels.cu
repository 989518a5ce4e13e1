#include <cmath>

#include "cuda/gpu_model_kernels.cuh"

namespace kvf::engines::gpu {
namespace {

// Threads of the row-wise kernels (one block per row): powers of two, multiples of the warp.
constexpr uint32_t kRowThreads = 256;
constexpr uint32_t kSoftmaxThreads = 1024;
constexpr uint32_t kArgmaxThreads = 1024;
// Grid of the element-wise kernels, which stride over their elements: enough blocks to fill any
// current GPU, few enough that no launch is ever oversized.
constexpr uint32_t kElementThreads = 256;
constexpr uint32_t kMaxElementBlocks = 4096;

uint32_t element_blocks(uint64_t elements) {
  const uint64_t blocks = (elements + kElementThreads - 1) / kElementThreads;
  return static_cast<uint32_t>(blocks < kMaxElementBlocks ? (blocks == 0 ? 1 : blocks) : kMaxElementBlocks);
}

__device__ uint64_t first_element() {
  return static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ uint64_t element_stride() {
  return static_cast<uint64_t>(gridDim.x) * blockDim.x;
}

// Reductions over a block of kThreads in one fixed order (each warp by shuffles, then warp 0 over
// the warps' results), so a row's result is the same bits on every run. Every thread gets it.
// `shared` holds kThreads / 32 floats.
template <uint32_t kThreads, typename Op>
__device__ float block_reduce(float v, float* shared, Op op) {
  constexpr uint32_t kWarps = kThreads / 32;
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  const uint32_t lane = threadIdx.x % 32;
  const uint32_t warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = shared[lane < kWarps ? lane : 0];
    for (int offset = 16; offset > 0; offset /= 2) {
      const float other = __shfl_down_sync(0xffffffffu, v, offset);
      if (lane + offset < kWarps) v = op(v, other);
    }
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  const float result = shared[0];
  __syncthreads();  // `shared` is free for the next reduction
  return result;
}

struct Add {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__global__ void embed_kernel(const uint32_t* tokens, const bf16* embedding, uint32_t hidden, float* x) {
  const bf16* e = embedding + static_cast<uint64_t>(tokens[blockIdx.x]) * hidden;
  float* row = x + static_cast<uint64_t>(blockIdx.x) * hidden;
  for (uint32_t i = threadIdx.x; i < hidden; i += blockDim.x) row[i] = __bfloat162float(e[i]);
}

__global__ void rms_norm_kernel(const float* x, uint32_t hidden, const float* weight, float eps, bf16* out) {
  __shared__ float shared[kRowThreads / 32];
  const float* row = x + static_cast<uint64_t>(blockIdx.x) * hidden;
  float sum_sq = 0.0f;
  for (uint32_t i = threadIdx.x; i < hidden; i += blockDim.x) sum_sq += row[i] * row[i];
  sum_sq = block_reduce<kRowThreads>(sum_sq, shared, Add{});
  const float inv = 1.0f / sqrtf(sum_sq / static_cast<float>(hidden) + eps);
  bf16* o = out + static_cast<uint64_t>(blockIdx.x) * hidden;
  for (uint32_t i = threadIdx.x; i < hidden; i += blockDim.x)
    o[i] = __float2bfloat16_rn(row[i] * inv * weight[i]);
}

__global__ void rope_table_kernel(const double* frequencies, uint32_t positions, uint32_t half,
                                  float2* table) {
  const uint64_t total = static_cast<uint64_t>(positions) * half;
  for (uint64_t e = first_element(); e < total; e += element_stride()) {
    // In double, as the CPU engine does: position * frequency loses fp32 precision at long contexts.
    const double angle = static_cast<double>(e / half) * frequencies[e % half];
    table[e] = make_float2(static_cast<float>(cos(angle)), static_cast<float>(sin(angle)));
  }
}

__global__ void rope_write_kernel(const float* qkv, uint32_t rows, uint32_t first_position, Dims d,
                                  const float2* rope_table, bf16* q_grouped, uint8_t* layer,
                                  const uint32_t* block_table, KvAddressing a) {
  const uint32_t r = blockIdx.x;
  const uint32_t position = first_position + r;
  const uint32_t half = d.head_dim / 2;
  const uint32_t group = d.group();
  const float* row = qkv + static_cast<uint64_t>(r) * d.qkv_width();
  const float2* angles = rope_table + static_cast<uint64_t>(position) * half;
  bf16* key_row = reinterpret_cast<bf16*>(layer + kv_row_offset(a, block_table, position, false));
  bf16* value_row = reinterpret_cast<bf16*>(layer + kv_row_offset(a, block_table, position, true));
  const uint32_t pairs = (d.q_heads + d.kv_heads) * half;
  for (uint32_t e = threadIdx.x; e < pairs; e += blockDim.x) {
    // Heads 0..q_heads-1 are q's, the next kv_heads k's: in a row k directly follows q.
    const uint32_t head = e / half;
    const uint32_t i = e % half;
    const float* x = row + static_cast<uint64_t>(head) * d.head_dim;
    const float x1 = x[i];
    const float x2 = x[i + half];
    const float c = angles[i].x;
    const float s = angles[i].y;
    // Rounded step by step (no FMA contraction), as the CPU engine computes it.
    const float y1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
    const float y2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    if (head < d.q_heads) {
      q_grouped[grouped_index(rows, group, d.head_dim, r, head, i)] = __float2bfloat16_rn(y1);
      q_grouped[grouped_index(rows, group, d.head_dim, r, head, i + half)] = __float2bfloat16_rn(y2);
    } else {
      bf16* k = key_row + static_cast<uint64_t>(head - d.q_heads) * d.head_dim;
      k[i] = __float2bfloat16_rn(y1);
      k[i + half] = __float2bfloat16_rn(y2);
    }
  }
  const float* v = row + d.q_width() + d.kv_width();
  for (uint32_t e = threadIdx.x; e < d.kv_width(); e += blockDim.x) value_row[e] = __float2bfloat16_rn(v[e]);
}

template <typename Piece>
__global__ void gather_kv_kernel(const uint8_t* layer, const uint32_t* block_table, KvAddressing a,
                                 uint32_t tokens, uint8_t* keys, uint8_t* values) {
  const uint64_t pieces = a.token_bytes / sizeof(Piece);  // per token row
  const uint64_t per_part = tokens * pieces;
  for (uint64_t e = first_element(); e < 2 * per_part; e += element_stride()) {
    const bool value = e >= per_part;
    const uint64_t at = value ? e - per_part : e;
    const auto t = static_cast<uint32_t>(at / pieces);
    const uint64_t p = at % pieces;
    const Piece* src = reinterpret_cast<const Piece*>(layer + kv_row_offset(a, block_table, t, value)) + p;
    Piece* dst =
        reinterpret_cast<Piece*>((value ? values : keys) + static_cast<uint64_t>(t) * a.token_bytes) + p;
    *dst = *src;
  }
}

// Keys 0..valid-1 of score row `row` (grid row (g, r, s) of the tile) attend; the rest are masked.
__device__ uint32_t valid_keys(uint64_t row, uint32_t rows_per_head, uint32_t group, uint32_t keys,
                               uint32_t first_position) {
  const uint32_t r = static_cast<uint32_t>(row % rows_per_head) / group;  // the tile's query row
  const uint32_t causal = first_position + r + 1;                         // keys 0..its position
  return causal < keys ? causal : keys;
}

// The scores are the attention's largest traffic: this version reads each once, holding a row in
// registers (kPerThread values per thread), for rows of up to kSoftmaxThreads * kPerThread keys.
template <uint32_t kPerThread>
__global__ void __launch_bounds__(kSoftmaxThreads)
    causal_softmax_cached_kernel(const float* scores, uint32_t rows_per_head, uint32_t group, uint32_t keys,
                                 uint32_t ld, uint32_t first_position, bf16* probs) {
  __shared__ float shared[kSoftmaxThreads / 32];
  const uint64_t row = blockIdx.x;
  const uint32_t valid = valid_keys(row, rows_per_head, group, keys, first_position);
  const float* s = scores + row * ld;
  bf16* p = probs + row * ld;
  float v[kPerThread];
  float max = -INFINITY;
#pragma unroll
  for (uint32_t j = 0; j < kPerThread; ++j) {
    const uint32_t t = threadIdx.x + j * kSoftmaxThreads;
    v[j] = t < valid ? s[t] : -INFINITY;
    max = fmaxf(max, v[j]);
  }
  max = block_reduce<kSoftmaxThreads>(max, shared, Max{});
  float sum = 0.0f;
#pragma unroll
  for (uint32_t j = 0; j < kPerThread; ++j) {
    const uint32_t t = threadIdx.x + j * kSoftmaxThreads;
    v[j] = t < valid ? expf(v[j] - max) : 0.0f;  // masked keys: exactly 0
    sum += v[j];
  }
  sum = block_reduce<kSoftmaxThreads>(sum, shared, Add{});
#pragma unroll
  for (uint32_t j = 0; j < kPerThread; ++j) {
    const uint32_t t = threadIdx.x + j * kSoftmaxThreads;
    if (t < keys) p[t] = __float2bfloat16_rn(v[j] / sum);
  }
}

// Rows of any length: three passes over the scores.
__global__ void causal_softmax_kernel(const float* scores, uint32_t rows_per_head, uint32_t group,
                                      uint32_t keys, uint32_t ld, uint32_t first_position, bf16* probs) {
  __shared__ float shared[kRowThreads / 32];
  const uint64_t row = blockIdx.x;
  const uint32_t valid = valid_keys(row, rows_per_head, group, keys, first_position);
  const float* s = scores + row * ld;
  bf16* p = probs + row * ld;
  float max = -INFINITY;
  for (uint32_t t = threadIdx.x; t < valid; t += blockDim.x) max = fmaxf(max, s[t]);
  max = block_reduce<kRowThreads>(max, shared, Max{});
  float sum = 0.0f;
  for (uint32_t t = threadIdx.x; t < valid; t += blockDim.x) sum += expf(s[t] - max);
  sum = block_reduce<kRowThreads>(sum, shared, Add{});
  for (uint32_t t = threadIdx.x; t < keys; t += blockDim.x) {
    p[t] = t < valid ? __float2bfloat16_rn(expf(s[t] - max) / sum) : __float2bfloat16_rn(0.0f);
  }
}

// One block per row (no 64-bit division per element). Moves pairs of bf16: head_dim is even, so a
// pair never straddles two heads.
__global__ void ungroup_heads_kernel(const bf16* grouped, uint32_t rows, Dims d, bf16* attn) {
  const uint32_t r = blockIdx.x;
  const uint32_t pairs_per_row = d.q_width() / 2;
  auto* out = reinterpret_cast<__nv_bfloat162*>(attn) + static_cast<uint64_t>(r) * pairs_per_row;
  const auto* in = reinterpret_cast<const __nv_bfloat162*>(grouped);
  for (uint32_t pair = threadIdx.x; pair < pairs_per_row; pair += blockDim.x) {
    const uint32_t column = pair * 2;
    out[pair] =
        in[grouped_index(rows, d.group(), d.head_dim, r, column / d.head_dim, column % d.head_dim) / 2];
  }
}

// One block per row, as above.
__global__ void swiglu_kernel(const float* gate_up, uint32_t intermediate, bf16* act) {
  const float* gate = gate_up + static_cast<uint64_t>(blockIdx.x) * 2 * intermediate;
  const float* up = gate + intermediate;
  bf16* out = act + static_cast<uint64_t>(blockIdx.x) * intermediate;
  for (uint32_t j = threadIdx.x; j < intermediate; j += blockDim.x) {
    const float g = gate[j];
    out[j] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * up[j]);
  }
}

constexpr uint32_t kNone = 0xFFFFFFFFu;

__global__ void argmax_kernel(const float* values, uint32_t count, uint32_t* out) {
  __shared__ float best_value[kArgmaxThreads];
  __shared__ uint32_t best_index[kArgmaxThreads];
  float value = 0.0f;
  uint32_t index = kNone;
  // Increasing indices and a strict comparison: each thread keeps its lowest index among ties.
  for (uint32_t i = threadIdx.x; i < count; i += blockDim.x) {
    const float v = values[i];
    if (!isnan(v) && (index == kNone || v > value)) {
      value = v;
      index = i;
    }
  }
  best_value[threadIdx.x] = value;
  best_index[threadIdx.x] = index;
  __syncthreads();
  for (uint32_t half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      const float v = best_value[threadIdx.x + half];
      const uint32_t i = best_index[threadIdx.x + half];
      const uint32_t mine = best_index[threadIdx.x];
      if (i != kNone &&
          (mine == kNone || v > best_value[threadIdx.x] || (v == best_value[threadIdx.x] && i < mine))) {
        best_value[threadIdx.x] = v;
        best_index[threadIdx.x] = i;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = best_index[0] == kNone ? 0 : best_index[0];
}

}  // namespace

void embed(const uint32_t* tokens, uint32_t rows, const bf16* embedding, uint32_t hidden, float* x,
           cudaStream_t stream) {
  embed_kernel<<<rows, kRowThreads, 0, stream>>>(tokens, embedding, hidden, x);
}

void rms_norm(const float* x, uint32_t rows, uint32_t hidden, const float* weight, float eps, bf16* out,
              cudaStream_t stream) {
  rms_norm_kernel<<<rows, kRowThreads, 0, stream>>>(x, hidden, weight, eps, out);
}

void fill_rope_table(const double* frequencies, uint32_t positions, uint32_t half, float2* table,
                     cudaStream_t stream) {
  const uint64_t total = static_cast<uint64_t>(positions) * half;
  rope_table_kernel<<<element_blocks(total), kElementThreads, 0, stream>>>(frequencies, positions, half,
                                                                           table);
}

void rope_and_write_kv(const float* qkv, uint32_t rows, uint32_t first_position, const Dims& dims,
                       const float2* rope_table, bf16* q_grouped, uint8_t* layer, const uint32_t* block_table,
                       const KvAddressing& addressing, cudaStream_t stream) {
  rope_write_kernel<<<rows, 128, 0, stream>>>(qkv, rows, first_position, dims, rope_table, q_grouped, layer,
                                              block_table, addressing);
}

void gather_kv(const uint8_t* layer, const uint32_t* block_table, const KvAddressing& addressing,
               uint32_t tokens, bool vector_copy, bf16* keys, bf16* values, cudaStream_t stream) {
  auto* k = reinterpret_cast<uint8_t*>(keys);
  auto* v = reinterpret_cast<uint8_t*>(values);
  if (vector_copy) {
    const uint64_t total = 2 * static_cast<uint64_t>(tokens) * (addressing.token_bytes / sizeof(uint4));
    gather_kv_kernel<uint4>
        <<<element_blocks(total), kElementThreads, 0, stream>>>(layer, block_table, addressing, tokens, k, v);
  } else {
    const uint64_t total = 2 * static_cast<uint64_t>(tokens) * (addressing.token_bytes / sizeof(uint16_t));
    gather_kv_kernel<uint16_t>
        <<<element_blocks(total), kElementThreads, 0, stream>>>(layer, block_table, addressing, tokens, k, v);
  }
}

void causal_softmax(const float* scores, uint32_t kv_heads, uint32_t rows, uint32_t group, uint32_t keys,
                    uint32_t ld, uint32_t first_position, bf16* probs, cudaStream_t stream) {
  const uint32_t grid = kv_heads * rows * group;
  const uint32_t per_head = rows * group;
  if (keys <= kSoftmaxThreads * 4) {
    causal_softmax_cached_kernel<4>
        <<<grid, kSoftmaxThreads, 0, stream>>>(scores, per_head, group, keys, ld, first_position, probs);
  } else if (keys <= kSoftmaxThreads * 16) {
    causal_softmax_cached_kernel<16>
        <<<grid, kSoftmaxThreads, 0, stream>>>(scores, per_head, group, keys, ld, first_position, probs);
  } else if (keys <= kSoftmaxThreads * 32) {
    causal_softmax_cached_kernel<32>
        <<<grid, kSoftmaxThreads, 0, stream>>>(scores, per_head, group, keys, ld, first_position, probs);
  } else {
    causal_softmax_kernel<<<grid, kRowThreads, 0, stream>>>(scores, per_head, group, keys, ld, first_position,
                                                            probs);
  }
}

void ungroup_heads(const bf16* grouped, uint32_t rows, const Dims& dims, bf16* attn, cudaStream_t stream) {
  ungroup_heads_kernel<<<rows, kRowThreads, 0, stream>>>(grouped, rows, dims, attn);
}

void swiglu(const float* gate_up, uint32_t rows, uint32_t intermediate, bf16* act, cudaStream_t stream) {
  swiglu_kernel<<<rows, kRowThreads, 0, stream>>>(gate_up, intermediate, act);
}

void argmax(const float* values, uint32_t count, uint32_t* out, cudaStream_t stream) {
  argmax_kernel<<<1, kArgmaxThreads, 0, stream>>>(values, count, out);
}

}  // namespace kvf::engines::gpu
