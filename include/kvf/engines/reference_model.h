// ReferenceModel: the CPU reference engine (issue 5): a Llama-shaped decoder with seeded random
// weights that computes real KV caches in an engine's paged layout, so that the fabric can be
// tested end to end on what a prefill engine writes and a decode engine reads. Per layer: RMSNorm,
// Q/K/V projections, RoPE (theta 500000), grouped-query attention over the paged cache (K/V stored
// as bf16, math in fp32), output projection and residual, RMSNorm, SwiGLU MLP and residual; then a
// final RMSNorm, the LM head and greedy argmax (ties: the lowest token id).
// The model owns its weights only. KV memory is the caller's: every call gets a KvCacheView (the
// layout, kFlashAttention bf16 as ModelShape::kv_layout_desc gives it, and one base pointer per
// layer) and the request's block table: block_table[i] holds positions [i*block_tokens,
// (i+1)*block_tokens), in any order, not necessarily contiguous. Two models created with the same
// shape and seed compute the same bits, so one can decode from the cache another prefilled.
// Every input is validated; bad ones return kInvalidArgument naming the problem, and nothing is
// written. Thread rules: all calls are const and keep no state between them; concurrent calls are
// safe when their requests' blocks are disjoint.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <utility>
#include <vector>

#include "kvf/engines/kv_cache_view.h"
#include "kvf/engines/model_shape.h"
#include "kvf/engines/reference_weights.h"
#include "kvf/protocol/status.h"

namespace kvf::engines {

// Called during prefill once layer `layer`'s K and V of the whole prompt are in the cache (before
// that layer's attention runs): where an engine calls the connector's save_layer.
using LayerSavedFn = std::function<void(uint32_t layer)>;

class ReferenceModel {
 public:
  // fp32 weights of the tiny preset are 11 MiB; Llama-3-8B's 30 GiB are the GPU engine's to hold.
  static constexpr uint64_t kDefaultMaxWeightBytes = uint64_t{2} << 30;

  // kInvalidArgument for an invalid shape or one whose fp32 weights exceed max_weight_bytes.
  static Result<ReferenceModel> create(const ModelShape& shape, uint64_t seed,
                                       uint64_t max_weight_bytes = kDefaultMaxWeightBytes);

  const ModelShape& shape() const { return shape_; }
  uint64_t seed() const { return seed_; }
  const ReferenceWeights& weights() const { return weights_; }

  // Computes the prompt (positions 0..tokens.size()-1), writes its K/V of every layer into the
  // cache, and returns the first generated token. `logits`, when given, receives the last
  // position's vocab logits.
  Result<uint32_t> prefill(std::span<const uint32_t> tokens, std::span<const uint32_t> block_table,
                           const KvCacheView& kv, const LayerSavedFn& on_layer_saved = {},
                           std::vector<float>* logits = nullptr) const;

  // Prefill of a prompt whose first `start` positions are in the cache already (a prefix loaded
  // from the store): computes positions start .. start+tokens.size()-1 from `tokens` (the prompt
  // after the prefix), writes their K/V, and returns the first generated token. The same math as
  // prefill() of the whole prompt: the loaded positions' K/V are what it would have written.
  Result<uint32_t> prefill_from(uint32_t start, std::span<const uint32_t> tokens,
                                std::span<const uint32_t> block_table, const KvCacheView& kv,
                                const LayerSavedFn& on_layer_saved = {},
                                std::vector<float>* logits = nullptr) const;

  // Appends `last_token` at `position` (its K/V written there; positions before it must hold the
  // request's cache) and returns the next token.
  Result<uint32_t> decode_step(uint32_t position, uint32_t last_token, std::span<const uint32_t> block_table,
                               const KvCacheView& kv, std::vector<float>* logits = nullptr) const;

  // prefill, then n_new - 1 decode steps: the n_new generated tokens. The table must cover
  // prompt.size() + n_new - 1 positions (checked before anything is computed).
  Result<std::vector<uint32_t>> generate(std::span<const uint32_t> prompt, uint32_t n_new,
                                         std::span<const uint32_t> block_table, const KvCacheView& kv) const;
  // The same in a host KV pool of its own (blocks 0, 1, 2, ... in order).
  Result<std::vector<uint32_t>> generate(std::span<const uint32_t> prompt, uint32_t n_new) const;

  // The checks every call makes on the cache: its layout matches the shape, one non-null buffer
  // per layer.
  Status check_cache(const KvCacheView& kv) const;

 private:
  ReferenceModel(const ModelShape& shape, uint64_t seed, ReferenceWeights weights)
      : shape_(shape), seed_(seed), weights_(std::move(weights)) {}

  // Tokens in range, the table covering positions [0, end_position) with distinct in-range blocks.
  Status check_request(std::span<const uint32_t> tokens, uint64_t end_position,
                       std::span<const uint32_t> block_table, const KvCacheView& kv) const;
  // The decoder over tokens at positions first_position, first_position + 1, ...; inputs checked.
  uint32_t forward(std::span<const uint32_t> tokens, uint32_t first_position,
                   std::span<const uint32_t> block_table, const KvCacheView& kv,
                   const LayerSavedFn& on_layer_saved, std::vector<float>* logits) const;

  ModelShape shape_;
  uint64_t seed_;
  ReferenceWeights weights_;
};

}  // namespace kvf::engines
