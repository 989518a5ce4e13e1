// ReferenceWeights: the fp32 weights of the reference engine's Llama-shaped decoder, drawn from a
// seeded splitmix64 stream so that every process, compiler and standard library that builds them
// from the same (shape, seed) gets the same bits: that is what lets a decode engine continue from
// a prefill engine's KV cache with a model it built on its own. Matrices are stored input-major
// ([in][out]), the order reference::matmul reads. Immutable after generate(); safe to share.
#pragma once

#include <cstdint>
#include <vector>

#include "kvf/engines/model_shape.h"

namespace kvf::engines {

struct ReferenceLayerWeights {
  std::vector<float> attn_norm;  // [hidden]
  std::vector<float> wq;         // [hidden][q_heads * head_dim]
  std::vector<float> wk;         // [hidden][kv_heads * head_dim]
  std::vector<float> wv;         // [hidden][kv_heads * head_dim]
  std::vector<float> wo;         // [q_heads * head_dim][hidden]
  std::vector<float> mlp_norm;   // [hidden]
  std::vector<float> w_gate;     // [hidden][intermediate]
  std::vector<float> w_up;       // [hidden][intermediate]
  std::vector<float> w_down;     // [intermediate][hidden]
};

struct ReferenceWeights {
  std::vector<float> embedding;  // [vocab][hidden]
  std::vector<ReferenceLayerWeights> layers;
  std::vector<float> final_norm;  // [hidden]
  std::vector<float> lm_head;     // [hidden][vocab]

  // Each tensor has its own stream, seeded from (seed, the tensor's index in the order above), so a
  // tensor's values depend on the seed and its own size only. Matrices are uniform in
  // [-1, 1) / sqrt(fan_in), the embedding uniform in [-1, 1), norm weights 1 + uniform [-0.1, 0.1).
  // Precondition: shape.validate() is ok.
  static ReferenceWeights generate(const ModelShape& shape, uint64_t seed);
};

}  // namespace kvf::engines
