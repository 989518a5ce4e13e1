// The GPU reference engine's own kernels (everything but the GEMMs, which are cuBLAS's), each
// behind a launcher that enqueues it on a stream. Activations are row-major ([row][column]); the
// attention's query and output heads use a grouped layout, [kv_head][row][group][head_dim], so that
// the group of query heads sharing one KV head is one matrix of rows * group rows for cuBLAS.
// Every reduction runs in a fixed order (no atomics): the same inputs give the same bits.
// Launchers only enqueue; launch errors surface through cudaGetLastError.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kvf::engines::gpu {

using bf16 = __nv_bfloat16;

// Where a layer's K and V of a token lie in a kFlashAttention layer buffer, as byte offsets from
// the layer's base: block b's K starts at key_base + b * block_stride (V at value_base + ...), and
// holds block_tokens rows of token_bytes (kv_heads * head_dim bf16 values, head after head).
struct KvAddressing {
  uint64_t key_base = 0;
  uint64_t value_base = 0;
  uint64_t block_stride = 0;
  uint32_t block_tokens = 0;
  uint32_t token_bytes = 0;
};

// The byte offset of `position`'s K (value = false) or V row in a layer buffer.
__host__ __device__ inline uint64_t kv_row_offset(const KvAddressing& a, const uint32_t* block_table,
                                                  uint32_t position, bool value) {
  const uint64_t block = block_table[position / a.block_tokens];
  const uint64_t slot = position % a.block_tokens;
  return (value ? a.value_base : a.key_base) + block * a.block_stride + slot * a.token_bytes;
}

// Element (row r, query head h = g * group + s, dim i) of the grouped [kv_head][row][group][dim]
// layout over `rows` rows.
__host__ __device__ inline uint64_t grouped_index(uint32_t rows, uint32_t group, uint32_t head_dim,
                                                  uint32_t r, uint32_t h, uint32_t i) {
  const uint32_t g = h / group;
  const uint32_t s = h % group;
  return ((uint64_t{g} * rows + r) * group + s) * head_dim + i;
}

// Dimensions the kernels need, from the ModelShape.
struct Dims {
  uint32_t hidden = 0;
  uint32_t q_heads = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t intermediate = 0;
  __host__ __device__ uint32_t group() const { return q_heads / kv_heads; }
  __host__ __device__ uint32_t q_width() const { return q_heads * head_dim; }
  __host__ __device__ uint32_t kv_width() const { return kv_heads * head_dim; }
  __host__ __device__ uint32_t qkv_width() const { return q_width() + 2 * kv_width(); }
};

// x[r][:] = embedding[tokens[r]][:] in fp32, for r < rows.
void embed(const uint32_t* tokens, uint32_t rows, const bf16* embedding, uint32_t hidden, float* x,
           cudaStream_t stream);

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, in bf16, for r < rows.
void rms_norm(const float* x, uint32_t rows, uint32_t hidden, const float* weight, float eps, bf16* out,
              cudaStream_t stream);

// cos and sin of position * frequencies[i] (computed in double, stored as fp32) for every position
// < positions and i < half: table[position * half + i] = (cos, sin).
void fill_rope_table(const double* frequencies, uint32_t positions, uint32_t half, float2* table,
                     cudaStream_t stream);

// From the fp32 projections qkv [rows][q | k | v] of positions first_position + r: RoPE (rotate
// half) on q and k; q into q_grouped (bf16, grouped layout over `rows`); k and v, bf16, into the
// layer's paged cache through the block table (device memory).
void rope_and_write_kv(const float* qkv, uint32_t rows, uint32_t first_position, const Dims& dims,
                       const float2* rope_table, bf16* q_grouped, uint8_t* layer, const uint32_t* block_table,
                       const KvAddressing& addressing, cudaStream_t stream);

// K and V of positions [0, tokens) from the paged cache into contiguous [tokens][kv_width] bf16
// buffers. `vector_copy`: every row offset and token_bytes are multiples of 16 bytes (and the
// buffers 16-byte aligned), so rows move in 16-byte pieces.
void gather_kv(const uint8_t* layer, const uint32_t* block_table, const KvAddressing& addressing,
               uint32_t tokens, bool vector_copy, bf16* keys, bf16* values, cudaStream_t stream);

// Row-wise causal softmax of scores [kv_heads][rows * group][ld] (fp32, already scaled; the first
// `keys` of each row are scores): row (g, r, s) is query row r of the tile, at position
// first_position + r, and attends to keys 0..first_position + r; the later ones (< keys) get
// probability exactly 0. probs has the same shape, bf16.
void causal_softmax(const float* scores, uint32_t kv_heads, uint32_t rows, uint32_t group, uint32_t keys,
                    uint32_t ld, uint32_t first_position, bf16* probs, cudaStream_t stream);

// attn [rows][q_heads * head_dim] from the grouped layout over `rows`.
void ungroup_heads(const bf16* grouped, uint32_t rows, const Dims& dims, bf16* attn, cudaStream_t stream);

// act[r][j] = silu(gate_up[r][j]) * gate_up[r][intermediate + j], bf16.
void swiglu(const float* gate_up, uint32_t rows, uint32_t intermediate, bf16* act, cudaStream_t stream);

// *out = the index of the largest of values[0..count); ties go to the lowest index; NaN never
// wins (all NaN: 0).
void argmax(const float* values, uint32_t count, uint32_t* out, cudaStream_t stream);

}  // namespace kvf::engines::gpu
