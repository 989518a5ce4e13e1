// GpuReferenceModel in a build without CUDA: nothing can be created, and every call says why.
#include "kvf/engines/gpu_reference_model.h"

namespace kvf::engines {

namespace {

Status unavailable() {
  return Status(ErrorCode::kUnavailable, "GpuReferenceModel: kvfabric was built without CUDA");
}

}  // namespace

struct GpuReferenceModel::Impl {};

GpuReferenceModel::GpuReferenceModel(const ModelShape& shape, const GpuModelOptions& options)
    : shape_(shape), options_(options) {}

GpuReferenceModel::~GpuReferenceModel() = default;

Result<std::unique_ptr<GpuReferenceModel>> GpuReferenceModel::create(const ModelShape&, uint64_t,
                                                                     GpuModelOptions) {
  return unavailable();
}

Result<std::unique_ptr<GpuReferenceModel>> GpuReferenceModel::create_from(const ModelShape&,
                                                                          const ReferenceWeights&,
                                                                          GpuModelOptions) {
  return unavailable();
}

Result<uint32_t> GpuReferenceModel::prefill(std::span<const uint32_t>, std::span<const uint32_t>,
                                            const KvCacheView&, const GpuLayerSavedFn&, std::vector<float>*) {
  return unavailable();
}

Result<uint32_t> GpuReferenceModel::prefill_from(uint32_t, std::span<const uint32_t>,
                                                 std::span<const uint32_t>, const KvCacheView&,
                                                 const GpuLayerSavedFn&, std::vector<float>*) {
  return unavailable();
}

Result<uint32_t> GpuReferenceModel::decode_step(uint32_t, uint32_t, std::span<const uint32_t>,
                                                const KvCacheView&, std::vector<float>*) {
  return unavailable();
}

Result<std::vector<uint32_t>> GpuReferenceModel::generate(std::span<const uint32_t>, uint32_t,
                                                          std::span<const uint32_t>, const KvCacheView&) {
  return unavailable();
}

Status GpuReferenceModel::check_cache(const KvCacheView&) const {
  return unavailable();
}

void* GpuReferenceModel::stream() const {
  return nullptr;
}

uint64_t GpuReferenceModel::device_bytes() const {
  return 0;
}

}  // namespace kvf::engines
