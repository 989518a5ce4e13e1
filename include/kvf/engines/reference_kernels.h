// The math of the CPU reference engine, one function per step of a Llama decoder layer, over plain
// fp32 arrays, plus the bf16 rounding and the paged KV access that the engine's cache uses. They are
// public so that tests can check each step against an independent dense implementation.
// Every sum is taken in an order the code fixes (the compiler reorders none; no threads), so results
// are the same bits on every run and in every process. Pure functions; safe to call from any thread.
#pragma once

#include <cstdint>
#include <span>

#include "kvf/protocol/kv_layout.h"

namespace kvf::engines::reference {

// bf16 is the upper half of an fp32; rounding is to nearest, ties to even; NaN stays NaN.
uint16_t to_bf16(float value);
float from_bf16(uint16_t bits);
inline float round_to_bf16(float value) {
  return from_bf16(to_bf16(value));
}

// y[r][o] = sum_i x[r][i] * w[i][o] for r < rows: w is stored input-major ([in][out]) so that the
// inner loop runs over contiguous outputs (vectorizes without reordering any element's sum).
void matmul(const float* x, uint32_t rows, uint32_t in, const float* w, uint32_t out, float* y);

// out = x / sqrt(mean(x^2) + eps) * weight, over one row of x.size() values (out may alias x).
void rms_norm(std::span<const float> x, std::span<const float> weight, float eps, std::span<float> out);

// Rotary position embedding, Llama's rotate-half convention: within each head of head_dim values,
// element i and element i + head_dim/2 form pair i, rotated by position * theta^(-2i/head_dim).
void apply_rope(float* heads, uint32_t num_heads, uint32_t head_dim, uint64_t position, double theta);

// gate[i] = silu(gate[i]) * up[i]: SwiGLU's activation, in place in `gate`.
void swiglu(std::span<float> gate, std::span<const float> up);

// Index of the largest value; ties go to the lowest index; NaN never wins (all NaN: 0).
uint32_t argmax(std::span<const float> values);

// Where token `position`'s K or V of one KV head lies in a FlashAttention-layout layer buffer,
// given the request's block table (block_table[position / block_tokens] holds the token).
// Preconditions (the engine validates them): the table covers the position, its block id is in range.
uint8_t* kv_slot(uint8_t* layer_base, const protocol::KvLayout& layout, std::span<const uint32_t> block_table,
                 uint64_t position, uint32_t kv_head, protocol::KvPart part);
const uint8_t* kv_slot(const uint8_t* layer_base, const protocol::KvLayout& layout,
                       std::span<const uint32_t> block_table, uint64_t position, uint32_t kv_head,
                       protocol::KvPart part);

// Stores one token's K and V (kv_heads * head_dim floats each) at `position`, rounded to bf16.
void write_kv(uint8_t* layer_base, const protocol::KvLayout& layout, std::span<const uint32_t> block_table,
              uint64_t position, const float* k, const float* v);

// Causal grouped-query attention of one query token at `position` over the paged cache's tokens
// 0..position (inclusive, so the token's own K/V must already be written). q and out hold
// q_heads * head_dim floats; q head h reads KV head h / (q_heads / kv_heads). Scores are scaled by
// 1/sqrt(head_dim), softmax in fp32 with the maximum subtracted, keys and values read as bf16.
void paged_attention(const float* q, uint32_t q_heads, uint64_t position, const uint8_t* layer_base,
                     const protocol::KvLayout& layout, std::span<const uint32_t> block_table, float* out);

}  // namespace kvf::engines::reference
