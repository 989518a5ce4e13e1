// Built instead of cuda/cuda_memory.cu when nvcc was not found: every factory says why it cannot.
// The objects can never be created here, so their resets have nothing to release.
#include "kvf/gpudirect/cuda_memory.h"

#include <string>

namespace kvf::gpudirect {
namespace {

Status built_without_cuda(const std::string& what) {
  return Status(ErrorCode::kUnavailable, what + ": kvfabric was built without CUDA (nvcc not found)");
}

}  // namespace

Result<DeviceBuffer> DeviceBuffer::allocate(int, uint64_t) {
  return built_without_cuda("DeviceBuffer::allocate");
}
void DeviceBuffer::reset() {}

Result<PinnedRegistration> PinnedRegistration::register_range(void*, uint64_t) {
  return built_without_cuda("PinnedRegistration::register_range");
}
Result<PinnedRegistration> PinnedRegistration::register_or_reuse(void*, uint64_t) {
  return built_without_cuda("PinnedRegistration::register_or_reuse");
}
void PinnedRegistration::reset() {}

Result<PinnedBuffer> PinnedBuffer::allocate(uint64_t) {
  return built_without_cuda("PinnedBuffer::allocate");
}
void PinnedBuffer::reset() {}

Result<std::vector<uint8_t>> export_cuda_ipc(const void*, uint64_t) {
  return built_without_cuda("export_cuda_ipc");
}

Result<CudaIpcMapping> CudaIpcMapping::open(std::span<const uint8_t>, int) {
  return built_without_cuda("CudaIpcMapping::open");
}
void CudaIpcMapping::reset() {}

Result<DmaBufExport> DmaBufExport::create(const void*, uint64_t) {
  return built_without_cuda("DmaBufExport::create");
}
void DmaBufExport::reset() {}

Result<int> device_holding(std::span<const uint8_t>) {
  return built_without_cuda("device_holding");
}

Result<int> device_of(const void*) {
  return built_without_cuda("device_of");
}

Result<DeviceAllocation> device_allocation_of(const void*) {
  return built_without_cuda("device_allocation_of");
}

bool pointer_is_device(const void*) {
  return false;
}

Status enable_peer_access(int, int) {
  return built_without_cuda("enable_peer_access");
}

Status copy_sync(void*, const void*, uint64_t) {
  return built_without_cuda("copy_sync");
}

Status fill_device(void*, uint8_t, uint64_t) {
  return built_without_cuda("fill_device");
}

Result<CudaStream> CudaStream::create(int, Priority) {
  return built_without_cuda("CudaStream::create");
}
void CudaStream::reset() {}
Status CudaStream::copy_async(void*, const void*, uint64_t, bool) const {
  return built_without_cuda("CudaStream::copy_async");
}
Status CudaStream::wait_event(void*) const {
  return built_without_cuda("CudaStream::wait_event");
}
Status CudaStream::wait_value(const void*, uint32_t) const {
  return built_without_cuda("CudaStream::wait_value");
}
Status CudaStream::write_value(void*, uint32_t) const {
  return built_without_cuda("CudaStream::write_value");
}
Status CudaStream::synchronize() const {
  return built_without_cuda("CudaStream::synchronize");
}

Result<CudaEvent> CudaEvent::create(int, bool) {
  return built_without_cuda("CudaEvent::create");
}
Result<CudaEvent> CudaEvent::create_interprocess(int) {
  return built_without_cuda("CudaEvent::create_interprocess");
}
Result<std::vector<uint8_t>> CudaEvent::ipc_handle() const {
  return built_without_cuda("CudaEvent::ipc_handle");
}
Result<CudaEvent> CudaEvent::open_ipc(std::span<const uint8_t>, int) {
  return built_without_cuda("CudaEvent::open_ipc");
}
void CudaEvent::reset() {}
Status CudaEvent::record(void*) const {
  return built_without_cuda("CudaEvent::record");
}
Result<bool> CudaEvent::done() const {
  return built_without_cuda("CudaEvent::done");
}
Status CudaEvent::synchronize() const {
  return built_without_cuda("CudaEvent::synchronize");
}
Result<float> CudaEvent::elapsed_ms_since(const CudaEvent&) const {
  return built_without_cuda("CudaEvent::elapsed_ms_since");
}

Result<bool> event_done(void*) {
  return built_without_cuda("event_done");
}

ScopedDevice::ScopedDevice(int device) : device_(device) {}
ScopedDevice::~ScopedDevice() = default;
Status ScopedDevice::status() const {
  return built_without_cuda("ScopedDevice");
}

}  // namespace kvf::gpudirect
