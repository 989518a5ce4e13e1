// GpuReferenceModel: the GPU reference engine: the same Llama-shaped decoder as ReferenceModel (the
// CPU reference engine; read its header for the math and the cache contract), on one GPU in bf16
// with CUDA kernels and cuBLAS, over paged KV caches in that GPU's memory. It is what a prefill or
// decode engine of Llama-3-8B's shape computes, at an engine's speed, so that the fabric's GPU
// paths (PD layer streaming, store loads into GPU blocks) are measured on real KV.
// Weights (bf16) and the workspace (sized by GpuModelOptions) live on the GPU for the model's
// lifetime. KV memory is the caller's: every layer pointer of the KvCacheView must be cudaMalloc'd
// memory of the model's GPU (checked). create() draws each weight element from (seed, tensor,
// element) exactly as ReferenceWeights does, then rounds it to bf16 (norm weights stay fp32), so
// every process with the same shape and seed holds the same bits, and a decode engine continues from
// another engine's cache. Results are deterministic: the same inputs give the same bits on every run
// and in every process on the same GPU model (no atomics; fixed reduction orders; cuBLAS picks its
// algorithm by problem size, so a position computed in a call of another size, as prefill_from's
// prefix was, may differ in the last bits).
// Every input is validated; bad ones return kInvalidArgument naming the problem, and nothing is
// written. Thread rules: one call at a time per model (calls share the model's stream and
// workspace; serialize them, e.g. one engine thread per model). Calls leave the calling thread's
// current CUDA device as they found it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "kvf/engines/kv_cache_view.h"
#include "kvf/engines/model_shape.h"
#include "kvf/engines/reference_weights.h"
#include "kvf/protocol/status.h"

namespace kvf::engines {

struct GpuModelOptions {
  int device = 0;
  uint32_t max_batch_tokens = 16384;  // most positions computed in one call (a prefill's rows)
  uint32_t max_context = 32768;       // most positions a request may have (prefix + new)
  // Memory for the fp32 attention scores of one query tile (their bf16 probabilities take half as
  // much again): a prefill's rows are computed in tiles of as many rows as fit (at least one row at
  // max_context). Smaller means more, smaller tiles; the result is the same up to rounding.
  uint64_t attention_score_bytes = uint64_t{4} << 30;
};

// Called on the host during prefill once layer `layer`'s K/V writes of all the call's positions
// are ENQUEUED on `stream` (the model's cudaStream_t), before that layer's attention is enqueued:
// the caller records a CUDA event there to learn when they are complete (the connector's
// save_kv_layer). It must not call into the model, nor throw.
using GpuLayerSavedFn = std::function<void(uint32_t layer, void* stream)>;

class GpuReferenceModel {
 public:
  // Weights generated on the GPU from (shape, seed): the values of ReferenceWeights::generate,
  // rounded to bf16. kUnavailable without CUDA or without the GPU; kOutOfMemory when the weights
  // and the workspace do not fit; kInvalidArgument for a bad shape or options.
  static Result<std::unique_ptr<GpuReferenceModel>> create(const ModelShape& shape, uint64_t seed,
                                                           GpuModelOptions options = {});
  // The same model with given (CPU reference) weights uploaded, matrices rounded to bf16: for
  // tests that compare against ReferenceModel on small shapes.
  static Result<std::unique_ptr<GpuReferenceModel>> create_from(const ModelShape& shape,
                                                                const ReferenceWeights& weights,
                                                                GpuModelOptions options = {});

  ~GpuReferenceModel();
  GpuReferenceModel(const GpuReferenceModel&) = delete;
  GpuReferenceModel& operator=(const GpuReferenceModel&) = delete;

  // As ReferenceModel::prefill: computes positions 0..tokens.size()-1, writes their K/V (bf16) of
  // every layer into the cache before that layer's attention, which reads all K/V back from the
  // cache; returns the greedy next token. `logits`, when given, receives the last position's vocab
  // logits. The stream is synchronized before it returns.
  Result<uint32_t> prefill(std::span<const uint32_t> tokens, std::span<const uint32_t> block_table,
                           const KvCacheView& kv, const GpuLayerSavedFn& on_layer_saved = {},
                           std::vector<float>* logits = nullptr);
  // As ReferenceModel::prefill_from: positions start .. start+tokens.size()-1 over a cache whose
  // first `start` positions hold the prompt's prefix.
  Result<uint32_t> prefill_from(uint32_t start, std::span<const uint32_t> tokens,
                                std::span<const uint32_t> block_table, const KvCacheView& kv,
                                const GpuLayerSavedFn& on_layer_saved = {},
                                std::vector<float>* logits = nullptr);
  // Appends `last_token` at `position` (its K/V written there) and returns the next token.
  Result<uint32_t> decode_step(uint32_t position, uint32_t last_token, std::span<const uint32_t> block_table,
                               const KvCacheView& kv, std::vector<float>* logits = nullptr);
  // prefill, then n_new - 1 decode steps at positions prompt.size(), prompt.size() + 1, ...: the
  // n_new generated tokens. The table must cover prompt.size() + n_new - 1 positions.
  Result<std::vector<uint32_t>> generate(std::span<const uint32_t> prompt, uint32_t n_new,
                                         std::span<const uint32_t> block_table, const KvCacheView& kv);

  // The checks every call makes on the cache: the layout matches the shape (kFlashAttention, bf16),
  // one buffer per layer, each a 2-byte aligned range of cudaMalloc'd memory on the model's GPU.
  Status check_cache(const KvCacheView& kv) const;

  void* stream() const;  // the non-blocking cudaStream_t every call enqueues on
  int device() const { return options_.device; }
  const ModelShape& shape() const { return shape_; }
  const GpuModelOptions& options() const { return options_; }
  uint64_t device_bytes() const;  // weights and workspace held on the GPU

 private:
  struct Impl;
  GpuReferenceModel(const ModelShape& shape, const GpuModelOptions& options);

  // Tokens in range, sizes within the options, the table covering [0, end_position) with distinct
  // in-range blocks, the cache as check_cache wants it.
  Status check_request(std::span<const uint32_t> tokens, uint64_t end_position,
                       std::span<const uint32_t> block_table, const KvCacheView& kv) const;
  Result<uint32_t> forward(std::span<const uint32_t> tokens, uint32_t first_position,
                           std::span<const uint32_t> block_table, const KvCacheView& kv,
                           const GpuLayerSavedFn& on_layer_saved, std::vector<float>* logits);

  ModelShape shape_;
  GpuModelOptions options_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvf::engines
