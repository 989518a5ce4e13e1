#include "kvf/engines/engine_model.h"

#include <algorithm>
#include <new>

#include "kvf/engines/gpu_reference_model.h"
#include "kvf/engines/reference_model.h"

namespace kvf::engines {
namespace {

class CpuEngineModel final : public EngineModel {
 public:
  explicit CpuEngineModel(ReferenceModel model) : model_(std::move(model)) {}
  const ModelShape& shape() const override { return model_.shape(); }
  int device() const override { return -1; }
  Result<uint32_t> prefill_from(uint32_t start, std::span<const uint32_t> tokens,
                                std::span<const uint32_t> block_table, const KvCacheView& kv,
                                const LayerSavedFn& on_layer_saved) override {
    ::kvf::engines::LayerSavedFn saved;  // ReferenceModel's: the layer index only
    if (on_layer_saved) saved = [&on_layer_saved](uint32_t layer) { on_layer_saved(layer, nullptr); };
    return start == 0 ? model_.prefill(tokens, block_table, kv, saved)
                      : model_.prefill_from(start, tokens, block_table, kv, saved);
  }
  Result<uint32_t> decode_step(uint32_t position, uint32_t last_token, std::span<const uint32_t> block_table,
                               const KvCacheView& kv) override {
    return model_.decode_step(position, last_token, block_table, kv);
  }
  Result<std::vector<uint32_t>> generate(std::span<const uint32_t> prompt, uint32_t n_new,
                                         std::span<const uint32_t> block_table,
                                         const KvCacheView& kv) override {
    return model_.generate(prompt, n_new, block_table, kv);
  }

 private:
  ReferenceModel model_;
};

class GpuEngineModel final : public EngineModel {
 public:
  explicit GpuEngineModel(std::unique_ptr<GpuReferenceModel> model) : model_(std::move(model)) {}
  const ModelShape& shape() const override { return model_->shape(); }
  int device() const override { return model_->device(); }
  Result<uint32_t> prefill_from(uint32_t start, std::span<const uint32_t> tokens,
                                std::span<const uint32_t> block_table, const KvCacheView& kv,
                                const LayerSavedFn& on_layer_saved) override {
    GpuLayerSavedFn saved;
    if (on_layer_saved)
      saved = [&on_layer_saved](uint32_t layer, void* stream) { on_layer_saved(layer, stream); };
    return start == 0 ? model_->prefill(tokens, block_table, kv, saved)
                      : model_->prefill_from(start, tokens, block_table, kv, saved);
  }
  Result<uint32_t> decode_step(uint32_t position, uint32_t last_token, std::span<const uint32_t> block_table,
                               const KvCacheView& kv) override {
    return model_->decode_step(position, last_token, block_table, kv);
  }
  Result<std::vector<uint32_t>> generate(std::span<const uint32_t> prompt, uint32_t n_new,
                                         std::span<const uint32_t> block_table,
                                         const KvCacheView& kv) override {
    return model_->generate(prompt, n_new, block_table, kv);
  }

 private:
  std::unique_ptr<GpuReferenceModel> model_;
};

}  // namespace

Result<std::unique_ptr<EngineModel>> EngineModel::create(const ModelShape& shape, uint64_t seed, int device,
                                                         uint32_t max_tokens) {
  if (device < 0) {
    auto model = ReferenceModel::create(shape, seed);
    if (!model.ok()) return model.status();
    return std::unique_ptr<EngineModel>(new CpuEngineModel(std::move(model.value())));
  }
  GpuModelOptions options;
  options.device = device;
  options.max_batch_tokens = max_tokens;
  options.max_context = std::max(max_tokens, options.max_context);
  auto model = GpuReferenceModel::create(shape, seed, options);
  if (!model.ok()) return model.status();
  return std::unique_ptr<EngineModel>(new GpuEngineModel(std::move(model.value())));
}

Result<KvPool> KvPool::create(const protocol::KvLayoutDesc& desc, int device, uint8_t fill) {
  auto layout = protocol::KvLayout::create(desc);
  if (!layout.ok()) return layout.status();
  const uint64_t bytes = layout->layer_bytes() * desc.num_layers;
  KvPool pool(KvCacheView{layout.value(), {}}, device);
  uint8_t* base = nullptr;
  if (device < 0) {
    try {
      pool.host_.assign(bytes, fill);
    } catch (const std::bad_alloc&) {
      return Status(ErrorCode::kOutOfMemory, "KV pool: " + std::to_string(bytes) + " bytes of host memory");
    }
    base = pool.host_.data();
  } else {
    auto buffer = gpudirect::DeviceBuffer::allocate(device, bytes);
    if (!buffer.ok())
      return Status(buffer.status().code(),
                    "KV pool on cuda:" + std::to_string(device) + ": " + buffer.status().message());
    if (Status s = gpudirect::fill_device(buffer->data(), fill, bytes); !s.ok()) return s;
    pool.gpu_ = std::move(buffer.value());
    base = static_cast<uint8_t*>(pool.gpu_.data());
  }
  for (uint32_t l = 0; l < desc.num_layers; ++l)
    pool.view_.layers.push_back(base + l * layout->layer_bytes());
  return pool;
}

}  // namespace kvf::engines
