// EngineModel and KvPool: what the reference engine tools (kvfabric-engine, kvfabric-prefix-reuse)
// run on, the same on the CPU and on one GPU. EngineModel puts ReferenceModel (CPU, fp32) and
// GpuReferenceModel (one GPU, bf16, cuBLAS) behind one interface; KvPool is an engine's paged KV
// pool with its layers back to back in one allocation (what the connector's PD needs), in host
// memory or in one GPU's memory, every byte set to a fill value at creation (0xFF poisons: a bf16
// 0xFFFF is a NaN, so a read of a slot nobody wrote shows in the results).
// Thread rules: as the model under it: the CPU model is const and reentrant for disjoint blocks;
// the GPU model takes one call at a time. A KvPool is a value to share read-only; its bytes follow
// KvCacheView's rules.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "kvf/engines/kv_cache_view.h"
#include "kvf/engines/model_shape.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/protocol/status.h"

namespace kvf::engines {

class EngineModel {
 public:
  // Called during a prefill once layer `layer`'s K/V writes are issued: on the CPU they are done
  // (cuda_stream is null); on a GPU they are enqueued on cuda_stream (a cudaStream_t), where the
  // caller records an event (KvConnector::save_kv_layer(request, layer, cuda_stream)).
  using LayerSavedFn = std::function<void(uint32_t layer, void* cuda_stream)>;

  // device < 0: the CPU model; otherwise the GPU model on that device, with room for prompts of
  // up to max_tokens positions. Errors as the models' create().
  static Result<std::unique_ptr<EngineModel>> create(const ModelShape& shape, uint64_t seed, int device,
                                                     uint32_t max_tokens = 16384);
  virtual ~EngineModel() = default;

  virtual const ModelShape& shape() const = 0;
  virtual int device() const = 0;  // -1: the CPU
  // Positions start .. start + tokens.size() - 1 (start 0: the whole prompt), as the models'
  // prefill/prefill_from; returns the next token once the computation has finished.
  virtual Result<uint32_t> prefill_from(uint32_t start, std::span<const uint32_t> tokens,
                                        std::span<const uint32_t> block_table, const KvCacheView& kv,
                                        const LayerSavedFn& on_layer_saved = {}) = 0;
  virtual Result<uint32_t> decode_step(uint32_t position, uint32_t last_token,
                                       std::span<const uint32_t> block_table, const KvCacheView& kv) = 0;
  virtual Result<std::vector<uint32_t>> generate(std::span<const uint32_t> prompt, uint32_t n_new,
                                                 std::span<const uint32_t> block_table,
                                                 const KvCacheView& kv) = 0;
};

class KvPool {
 public:
  // device < 0: host memory; otherwise cudaMalloc'd memory on that GPU. kOutOfMemory or CUDA's
  // error when it cannot be allocated.
  static Result<KvPool> create(const protocol::KvLayoutDesc& desc, int device, uint8_t fill = 0);

  KvPool(KvPool&&) = default;
  KvPool& operator=(KvPool&&) = default;

  const KvCacheView& view() const { return view_; }
  const protocol::KvLayout& layout() const { return view_.layout; }
  int device() const { return device_; }
  uint64_t bytes() const { return view_.layout.layer_bytes() * view_.layers.size(); }

 private:
  KvPool(KvCacheView view, int device) : view_(std::move(view)), device_(device) {}
  KvCacheView view_;
  int device_ = -1;
  std::vector<uint8_t> host_;
  gpudirect::DeviceBuffer gpu_;
};

}  // namespace kvf::engines
