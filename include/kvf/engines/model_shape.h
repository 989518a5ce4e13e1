// ModelShape: the dimensions of a Llama-shaped decoder (layers, widths, heads, vocabulary) and the
// KV block size its engine pages with, plus the presets the reference engines use: a tiny one that
// a CPU runs in milliseconds, and Llama-3-8B (described here for the GPU engine; the CPU engine
// refuses to allocate its weights). Plain value type; safe to share between threads.
#pragma once

#include <cstdint>
#include <string>

#include "kvf/protocol/kv_layout.h"
#include "kvf/protocol/status.h"

namespace kvf::engines {

struct ModelShape {
  uint32_t layers = 0;
  uint32_t hidden = 0;        // residual stream width
  uint32_t q_heads = 0;       // query heads
  uint32_t kv_heads = 0;      // key/value heads (grouped-query attention: q_heads % kv_heads == 0)
  uint32_t head_dim = 0;      // even: RoPE rotates pairs
  uint32_t intermediate = 0;  // SwiGLU width
  uint32_t vocab = 0;
  uint32_t block_tokens = 0;  // tokens per KV block (page)

  // 4 layers, hidden 256, 8 q heads, 2 kv heads, head dim 32, intermediate 512, vocab 1024, block 16.
  static ModelShape tiny();
  // Llama-3-8B: 32 layers, hidden 4096, 32 q heads, 8 kv heads, head dim 128, intermediate 14336,
  // vocab 128256, block 16 (vLLM's default page).
  static ModelShape llama3_8b();

  // kInvalidArgument naming the first dimension that is zero or inconsistent.
  Status validate() const;
  // Parameters of the model's weights (embedding and LM head untied, as Llama-3-8B has them).
  uint64_t parameter_count() const;
  // The paged KV layout this model's engine registers: FlashAttention, one buffer per layer, bf16.
  protocol::KvLayoutDesc kv_layout_desc(uint32_t num_blocks) const;
  std::string to_string() const;

  bool operator==(const ModelShape&) const = default;
};

// RoPE base frequency (Llama 3) and RMSNorm epsilon, fixed for every shape.
inline constexpr double kRopeTheta = 500000.0;
inline constexpr float kRmsNormEps = 1e-5f;
inline constexpr uint32_t kKvDtypeBytes = 2;  // bf16

}  // namespace kvf::engines
