// Host code only; a .cu so that it is built (and linked with the CUDA runtime) only when nvcc is.
#include <cuda.h>
#include <cuda_runtime.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "kvf/gpudirect/cuda_ipc_blob.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/cuda_probe.h"

namespace kvf::gpudirect {
namespace {

// The few driver API calls the runtime has no equivalent of, looked up through the runtime
// rather than linked: linking libcuda.so.1 would stop every kvfabric binary from starting on
// machines that have the toolkit but no driver (CI), where the runtime just reports no device.
struct DriverApi {
  using MemGetAddressRange = CUresult(CUDAAPI*)(CUdeviceptr*, size_t*, CUdeviceptr);
  using MemGetHandleForAddressRange = CUresult(CUDAAPI*)(void*, CUdeviceptr, size_t, CUmemRangeHandleType,
                                                         unsigned long long);
  using GetErrorName = CUresult(CUDAAPI*)(CUresult, const char**);
  using StreamWaitValue32 = CUresult(CUDAAPI*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
  using StreamWriteValue32 = CUresult(CUDAAPI*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
  MemGetAddressRange mem_get_address_range = nullptr;
  MemGetHandleForAddressRange mem_get_handle_for_address_range = nullptr;
  GetErrorName get_error_name = nullptr;
  StreamWaitValue32 stream_wait_value32 = nullptr;
  StreamWriteValue32 stream_write_value32 = nullptr;
};

template <typename Fn>
void lookup(const char* symbol, Fn& out) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  if (cudaGetDriverEntryPointByVersion(symbol, &fn, 12000, cudaEnableDefault, &found) == cudaSuccess &&
      found == cudaDriverEntryPointSuccess) {
    out = reinterpret_cast<Fn>(fn);
  } else {
    cudaGetLastError();
  }
}

const DriverApi& driver() {
  static const DriverApi api = [] {
    DriverApi a;
    lookup("cuMemGetAddressRange", a.mem_get_address_range);
    lookup("cuMemGetHandleForAddressRange", a.mem_get_handle_for_address_range);
    lookup("cuGetErrorName", a.get_error_name);
    lookup("cuStreamWaitValue32", a.stream_wait_value32);
    lookup("cuStreamWriteValue32", a.stream_write_value32);
    return a;
  }();
  return api;
}

std::string driver_error_text(CUresult r) {
  const char* name = nullptr;
  if (driver().get_error_name != nullptr) driver().get_error_name(r, &name);
  return name != nullptr ? std::string(name) : "CUresult " + std::to_string(static_cast<int>(r));
}

// "cudaErrorMemoryAllocation (out of memory)"; also clears the thread's last-error slot, so a
// reported failure does not resurface from an unrelated later call.
std::string cuda_text(cudaError_t err) {
  cudaGetLastError();
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

ErrorCode code_for(cudaError_t err, ErrorCode fallback) {
  switch (err) {
    case cudaErrorMemoryAllocation:
      return ErrorCode::kOutOfMemory;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorDevicesUnavailable:
    case cudaErrorNotSupported:
      return ErrorCode::kUnavailable;
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevice:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorHostMemoryAlreadyRegistered:
    case cudaErrorHostMemoryNotRegistered:
      return ErrorCode::kInvalidArgument;
    default:
      return fallback;
  }
}

Status cuda_error(std::string_view what, cudaError_t err, ErrorCode fallback = ErrorCode::kInternal) {
  return Status(code_for(err, fallback), std::string(what) + ": " + cuda_text(err));
}

Status require_cuda() {
  const CudaAvailability& a = cuda_availability();
  if (a.device_count == 0) return Status(ErrorCode::kUnavailable, "no CUDA device: " + a.reason);
  return Status::Ok();
}

Status require_device(int device) {
  if (Status s = require_cuda(); !s.ok()) return s;
  const int count = cuda_availability().device_count;
  if (device < 0 || device >= count) {
    return Status(ErrorCode::kInvalidArgument, "CUDA device " + std::to_string(device) + " does not exist (" +
                                                   std::to_string(count) + " visible)");
  }
  return Status::Ok();
}

using DeviceGuard = ScopedDevice;

const char* memory_type_name(cudaMemoryType type) {
  switch (type) {
    case cudaMemoryTypeUnregistered:
      return "unregistered host";
    case cudaMemoryTypeHost:
      return "pinned host";
    case cudaMemoryTypeDevice:
      return "device";
    case cudaMemoryTypeManaged:
      return "managed";
  }
  return "unknown";
}

Result<cudaPointerAttributes> attributes_of(const void* p) {
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess) return cuda_error("cudaPointerGetAttributes", err, ErrorCode::kInvalidArgument);
  return attr;
}

// The device memory `p` points into, or why it is not device memory.
Result<cudaPointerAttributes> device_attributes_of(const void* p, std::string_view who) {
  if (Status s = require_cuda(); !s.ok()) return s;
  Result<cudaPointerAttributes> attr = attributes_of(p);
  if (!attr.ok()) return attr;
  if (attr->type != cudaMemoryTypeDevice) {
    return Status(ErrorCode::kInvalidArgument, std::string(who) + ": the pointer is " +
                                                   memory_type_name(attr->type) +
                                                   " memory, not cudaMalloc'd device memory");
  }
  return attr;
}

struct AllocationRange {
  uintptr_t base = 0;
  uint64_t bytes = 0;
};

// The allocation containing `p` (its device must be current).
Result<AllocationRange> allocation_of(const void* p) {
  if (driver().mem_get_address_range == nullptr) {
    return Status(ErrorCode::kUnavailable, "the CUDA driver does not export cuMemGetAddressRange");
  }
  CUdeviceptr base = 0;
  size_t bytes = 0;
  CUresult r = driver().mem_get_address_range(&base, &bytes, reinterpret_cast<CUdeviceptr>(p));
  if (r != CUDA_SUCCESS) {
    return Status(ErrorCode::kInvalidArgument, "cuMemGetAddressRange: " + driver_error_text(r));
  }
  return AllocationRange{static_cast<uintptr_t>(base), static_cast<uint64_t>(bytes)};
}

// Each visible device's UUID, by ordinal: how an importer finds the exporter's GPU in its own
// numbering.
const std::vector<DeviceUuid>& device_uuids() {
  static const std::vector<DeviceUuid> uuids = [] {
    std::vector<DeviceUuid> out;
    for (int d = 0; d < cuda_availability().device_count; ++d) {
      cudaDeviceProp prop{};
      DeviceUuid u{};
      if (cudaGetDeviceProperties(&prop, d) == cudaSuccess) {
        std::memcpy(u.data(), prop.uuid.bytes, u.size());
      } else {
        cudaGetLastError();
      }
      out.push_back(u);
    }
    return out;
  }();
  return uuids;
}

// The ordinal here of the GPU with `uuid`; -1 when it is not visible to this process.
int ordinal_of(const DeviceUuid& uuid) {
  const std::vector<DeviceUuid>& uuids = device_uuids();
  for (size_t d = 0; d < uuids.size(); ++d) {
    if (uuids[d] == uuid) return static_cast<int>(d);
  }
  return -1;
}

}  // namespace

// --- DeviceBuffer -------------------------------------------------------------------------------

Result<DeviceBuffer> DeviceBuffer::allocate(int device, uint64_t bytes) {
  if (bytes == 0) return Status(ErrorCode::kInvalidArgument, "DeviceBuffer::allocate: zero bytes");
  if (Status s = require_device(device); !s.ok()) return s;
  DeviceGuard guard(device);
  if (Status s = guard.status(); !s.ok()) return s;
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    return cuda_error("cudaMalloc of " + std::to_string(bytes) + " bytes on GPU " + std::to_string(device),
                      err);
  }
  return DeviceBuffer(p, bytes, device);
}

void DeviceBuffer::reset() {
  if (data_ == nullptr) return;
  DeviceGuard guard(device_);
  if (cudaFree(data_) != cudaSuccess) cudaGetLastError();  // at exit the runtime may be gone
  data_ = nullptr;
  bytes_ = 0;
}

// --- PinnedRegistration / PinnedBuffer ------------------------------------------------------------

Result<PinnedRegistration> PinnedRegistration::register_range(void* p, uint64_t bytes) {
  return register_impl(p, bytes, /*reuse_existing=*/false);
}

Result<PinnedRegistration> PinnedRegistration::register_or_reuse(void* p, uint64_t bytes) {
  return register_impl(p, bytes, /*reuse_existing=*/true);
}

Result<PinnedRegistration> PinnedRegistration::register_impl(void* p, uint64_t bytes, bool reuse_existing) {
  if (p == nullptr || bytes == 0) {
    return Status(ErrorCode::kInvalidArgument, "PinnedRegistration: null pointer or zero bytes");
  }
  if (Status s = require_cuda(); !s.ok()) return s;
  cudaError_t err = cudaHostRegister(p, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
  if (err == cudaErrorHostMemoryAlreadyRegistered && reuse_existing) {
    cudaGetLastError();
    // Pinned whole by one registration: both ends are page-locked host memory, and the GPU sees
    // them the same distance apart. (One registration pins a contiguous range.)
    auto last = static_cast<uint8_t*>(p) + (bytes - 1);
    cudaPointerAttributes first_attr{};
    cudaPointerAttributes last_attr{};
    const bool pinned = cudaPointerGetAttributes(&first_attr, p) == cudaSuccess &&
                        cudaPointerGetAttributes(&last_attr, last) == cudaSuccess &&
                        first_attr.type == cudaMemoryTypeHost && last_attr.type == cudaMemoryTypeHost &&
                        first_attr.devicePointer != nullptr &&
                        static_cast<uint8_t*>(last_attr.devicePointer) ==
                            static_cast<uint8_t*>(first_attr.devicePointer) + (bytes - 1);
    if (!pinned) {
      cudaGetLastError();
      return Status(ErrorCode::kInvalidArgument,
                    "cudaHostRegister of " + std::to_string(bytes) +
                        " bytes: part of the range is already registered with CUDA, part is not");
    }
    return PinnedRegistration(p, bytes, first_attr.devicePointer, /*owned=*/false);
  }
  if (err != cudaSuccess) {
    return cuda_error("cudaHostRegister of " + std::to_string(bytes) + " bytes", err);
  }
  void* device_pointer = nullptr;
  err = cudaHostGetDevicePointer(&device_pointer, p, 0);
  if (err != cudaSuccess) {
    Status s = cuda_error("cudaHostGetDevicePointer", err);
    cudaHostUnregister(p);
    return s;
  }
  return PinnedRegistration(p, bytes, device_pointer, /*owned=*/true);
}

void PinnedRegistration::reset() {
  if (data_ == nullptr) return;
  if (owned_ && cudaHostUnregister(data_) != cudaSuccess) cudaGetLastError();
  owned_ = false;
  data_ = nullptr;
  bytes_ = 0;
  device_pointer_ = nullptr;
}

Result<PinnedBuffer> PinnedBuffer::allocate(uint64_t bytes) {
  if (bytes == 0) return Status(ErrorCode::kInvalidArgument, "PinnedBuffer::allocate: zero bytes");
  if (Status s = require_cuda(); !s.ok()) return s;
  void* p = nullptr;
  cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped);
  if (err != cudaSuccess) return cuda_error("cudaHostAlloc of " + std::to_string(bytes) + " bytes", err);
  return PinnedBuffer(p, bytes);
}

void PinnedBuffer::reset() {
  if (data_ == nullptr) return;
  if (cudaFreeHost(data_) != cudaSuccess) cudaGetLastError();
  data_ = nullptr;
  bytes_ = 0;
}

// --- CUDA IPC -------------------------------------------------------------------------------------

Result<std::vector<uint8_t>> export_cuda_ipc(const void* device_ptr, uint64_t length) {
  if (device_ptr == nullptr || length == 0) {
    return Status(ErrorCode::kInvalidArgument, "export_cuda_ipc: null pointer or zero length");
  }
  Result<cudaPointerAttributes> attr = device_attributes_of(device_ptr, "export_cuda_ipc");
  if (!attr.ok()) return attr.status();
  const int device = attr->device;
  DeviceGuard guard(device);
  if (Status s = guard.status(); !s.ok()) return s;
  Result<AllocationRange> allocation = allocation_of(device_ptr);
  if (!allocation.ok()) return allocation.status();
  const uint64_t offset = reinterpret_cast<uintptr_t>(device_ptr) - allocation->base;
  if (length > allocation->bytes - offset) {
    return Status(ErrorCode::kInvalidArgument, "export_cuda_ipc: " + std::to_string(length) +
                                                   " bytes at offset " + std::to_string(offset) +
                                                   " run past the end of their allocation of " +
                                                   std::to_string(allocation->bytes) + " bytes");
  }
  cudaIpcMemHandle_t handle{};
  cudaError_t err = cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(allocation->base));
  if (err != cudaSuccess) {
    return Status(
        code_for(err, ErrorCode::kInternal),
        "cudaIpcGetMemHandle: " + cuda_text(err) +
            " (only cudaMalloc'd memory exports this way; not cudaMallocAsync pools or cuMemCreate)");
  }
  CudaIpcBlob blob;
  static_assert(sizeof(handle.reserved) == CudaIpcBlob::kHandleBytes);
  std::memcpy(blob.ipc_handle.data(), handle.reserved, CudaIpcBlob::kHandleBytes);
  blob.offset = offset;
  blob.length = length;
  blob.allocation_bytes = allocation->bytes;
  blob.device = device;
  if (static_cast<size_t>(device) < device_uuids().size()) blob.device_uuid = device_uuids()[device];
  if (Status s = stamp_cuda_ipc_origin(blob); !s.ok()) return s;
  return encode_cuda_ipc_blob(blob);
}

Result<CudaIpcMapping> CudaIpcMapping::open(std::span<const uint8_t> bytes, int local_device) {
  Result<CudaIpcBlob> blob = decode_cuda_ipc_blob(bytes);
  if (!blob.ok()) return blob.status();
  if (Status s = check_cuda_ipc_importable(*blob); !s.ok()) return s;
  if (Status s = require_device(local_device); !s.ok()) return s;
  DeviceGuard guard(local_device);
  if (Status s = guard.status(); !s.ok()) return s;
  cudaIpcMemHandle_t handle{};
  std::memcpy(handle.reserved, blob->ipc_handle.data(), CudaIpcBlob::kHandleBytes);
  void* base = nullptr;
  cudaError_t err = cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess);
  if (err != cudaSuccess) {
    return Status(code_for(err, ErrorCode::kTransportError),
                  "cudaIpcOpenMemHandle on GPU " + std::to_string(local_device) + ": " + cuda_text(err) +
                      " (the exporting process must still hold the allocation, and its GPU must be visible "
                      "here and reachable from GPU " +
                      std::to_string(local_device) + ")");
  }
  // The blob's range was checked against the allocation size it states; check that against what
  // was actually mapped, so a lying blob cannot make data()+size() run past the mapping.
  Result<AllocationRange> mapped = allocation_of(base);
  if (mapped.ok() && mapped->bytes < blob->offset + blob->length) {
    cudaIpcCloseMemHandle(base);
    return Status(ErrorCode::kMalformed, "CUDA IPC blob: range [" + std::to_string(blob->offset) + ", +" +
                                             std::to_string(blob->length) +
                                             ") exceeds the mapped allocation of " +
                                             std::to_string(mapped->bytes) + " bytes");
  }
  return CudaIpcMapping(base, blob->offset, blob->length, ordinal_of(blob->device_uuid), local_device);
}

Result<int> device_holding(std::span<const uint8_t> bytes) {
  auto blob = decode_cuda_ipc_blob(bytes);
  if (!blob.ok()) return blob.status();
  return ordinal_of(blob->device_uuid);
}

void CudaIpcMapping::reset() {
  if (base_ == nullptr) return;
  DeviceGuard guard(local_device_);
  if (cudaIpcCloseMemHandle(base_) != cudaSuccess) cudaGetLastError();
  base_ = nullptr;
  bytes_ = 0;
}

// --- dma-buf --------------------------------------------------------------------------------------

Result<DmaBufExport> DmaBufExport::create(const void* device_ptr, uint64_t length) {
  if (device_ptr == nullptr || length == 0) {
    return Status(ErrorCode::kInvalidArgument, "DmaBufExport: null pointer or zero length");
  }
  Result<cudaPointerAttributes> attr = device_attributes_of(device_ptr, "DmaBufExport");
  if (!attr.ok()) return attr.status();
  if (driver().mem_get_handle_for_address_range == nullptr) {
    return Status(ErrorCode::kUnavailable, "the CUDA driver does not export cuMemGetHandleForAddressRange");
  }
  DeviceGuard guard(attr->device);
  if (Status s = guard.status(); !s.ok()) return s;
  // The driver wants the range aligned to host pages.
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto p = reinterpret_cast<uintptr_t>(device_ptr);
  const uintptr_t begin = p & ~(page - 1);
  const uintptr_t end = (p + length + page - 1) & ~(page - 1);
  int fd = -1;
  CUresult r = driver().mem_get_handle_for_address_range(&fd, static_cast<CUdeviceptr>(begin), end - begin,
                                                         CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0);
  if (r != CUDA_SUCCESS) {
    const ErrorCode code =
        r == CUDA_ERROR_NOT_SUPPORTED ? ErrorCode::kUnavailable : ErrorCode::kInvalidArgument;
    return Status(code, "cuMemGetHandleForAddressRange(DMA_BUF_FD) on GPU " + std::to_string(attr->device) +
                            ": " + driver_error_text(r) +
                            (r == CUDA_ERROR_NOT_SUPPORTED
                                 ? " (dma-buf needs the open GPU kernel module and Linux 5.12 or later)"
                                 : ""));
  }
  return DmaBufExport(fd, p - begin, end - begin);
}

void DmaBufExport::reset() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
  bytes_ = 0;
}

// --- pointers, peers, copies --------------------------------------------------------------------

Result<int> device_of(const void* p) {
  if (Status s = require_cuda(); !s.ok()) return s;
  Result<cudaPointerAttributes> attr = attributes_of(p);
  if (!attr.ok()) return attr.status();
  if (attr->type != cudaMemoryTypeDevice && attr->type != cudaMemoryTypeManaged) {
    return Status(ErrorCode::kInvalidArgument,
                  std::string("device_of: the pointer is ") + memory_type_name(attr->type) + " memory");
  }
  return attr->device;
}

Result<DeviceAllocation> device_allocation_of(const void* p) {
  Result<cudaPointerAttributes> attr = device_attributes_of(p, "device_allocation_of");
  if (!attr.ok()) return attr.status();
  DeviceGuard guard(attr->device);
  if (Status s = guard.status(); !s.ok()) return s;
  Result<AllocationRange> range = allocation_of(p);
  if (!range.ok()) return range.status();
  return DeviceAllocation{attr->device, range->base, range->bytes};
}

bool pointer_is_device(const void* p) {
  if (p == nullptr || cuda_availability().device_count == 0) return false;
  Result<cudaPointerAttributes> attr = attributes_of(p);
  return attr.ok() && attr->type == cudaMemoryTypeDevice;
}

Status enable_peer_access(int from, int to) {
  if (Status s = require_device(from); !s.ok()) return s;
  if (Status s = require_device(to); !s.ok()) return s;
  if (from == to) return Status::Ok();
  int can = 0;
  cudaError_t err = cudaDeviceCanAccessPeer(&can, from, to);
  if (err != cudaSuccess) return cuda_error("cudaDeviceCanAccessPeer", err);
  if (can == 0) {
    return Status(ErrorCode::kUnavailable, "GPU " + std::to_string(from) + " cannot access GPU " +
                                               std::to_string(to) + " directly (no P2P path between them)");
  }
  DeviceGuard guard(from);
  if (Status s = guard.status(); !s.ok()) return s;
  err = cudaDeviceEnablePeerAccess(to, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();
    return Status::Ok();
  }
  if (err != cudaSuccess) {
    return cuda_error(
        "cudaDeviceEnablePeerAccess(" + std::to_string(from) + " -> " + std::to_string(to) + ")", err);
  }
  return Status::Ok();
}

Status copy_sync(void* dst, const void* src, uint64_t bytes) {
  if (bytes == 0) return Status::Ok();
  if (dst == nullptr || src == nullptr) return Status(ErrorCode::kInvalidArgument, "copy_sync: null pointer");
  if (Status s = require_cuda(); !s.ok()) return s;
  // cudaMemcpy returns early for device-to-device copies and, from pageable memory, once the
  // bytes are staged; waiting on the legacy stream it ran on makes the copy complete on return.
  cudaError_t err = cudaMemcpy(dst, src, bytes, cudaMemcpyDefault);
  if (err == cudaSuccess) err = cudaStreamSynchronize(nullptr);
  if (err != cudaSuccess) return cuda_error("cudaMemcpy of " + std::to_string(bytes) + " bytes", err);
  return Status::Ok();
}

Status fill_device(void* p, uint8_t value, uint64_t bytes) {
  if (bytes == 0) return Status::Ok();
  Result<int> device = device_of(p);
  if (!device.ok()) return device.status();
  DeviceGuard guard(*device);
  if (Status s = guard.status(); !s.ok()) return s;
  // The legacy stream, not the whole device: an engine's own non-blocking streams run on.
  cudaError_t err = cudaMemset(p, value, bytes);
  if (err == cudaSuccess) err = cudaStreamSynchronize(nullptr);
  if (err != cudaSuccess) return cuda_error("cudaMemset of " + std::to_string(bytes) + " bytes", err);
  return Status::Ok();
}

// --- streams and events ---------------------------------------------------------------------------

Result<CudaStream> CudaStream::create(int device, Priority priority) {
  if (Status s = require_device(device); !s.ok()) return s;
  DeviceGuard guard(device);
  if (Status s = guard.status(); !s.ok()) return s;
  int least = 0, greatest = 0;
  if (priority == Priority::kHigh) {
    cudaError_t err = cudaDeviceGetStreamPriorityRange(&least, &greatest);
    if (err != cudaSuccess) return cuda_error("cudaDeviceGetStreamPriorityRange", err);
  }
  cudaStream_t stream = nullptr;
  cudaError_t err = cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking,
                                                 priority == Priority::kHigh ? greatest : least);
  if (err != cudaSuccess) return cuda_error("cudaStreamCreateWithPriority", err);
  return CudaStream(stream, device);
}

void CudaStream::reset() {
  if (stream_ == nullptr) return;
  DeviceGuard guard(device_);
  if (cudaStreamDestroy(static_cast<cudaStream_t>(stream_)) != cudaSuccess) cudaGetLastError();
  stream_ = nullptr;
}

Status CudaStream::copy_async(void* dst, const void* src, uint64_t bytes, bool prefer_copy_engines) const {
  if (bytes == 0) return Status::Ok();
  if (stream_ == nullptr) return Status(ErrorCode::kInvalidArgument, "copy_async on a moved-from stream");
  DeviceGuard guard(device_);
  if (Status s = guard.status(); !s.ok()) return s;
#if CUDART_VERSION >= 13000
  if (prefer_copy_engines) {
    size_t size = bytes, attr_index = 0;
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;  // the source may be written earlier on the stream
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    const void* source = src;
    cudaError_t err = cudaMemcpyBatchAsync(&dst, &source, &size, 1, &attr, &attr_index, 1,
                                           static_cast<cudaStream_t>(stream_));
    if (err != cudaSuccess)
      return cuda_error("cudaMemcpyBatchAsync of " + std::to_string(bytes) + " bytes", err);
    return Status::Ok();
  }
#else
  (void)prefer_copy_engines;
#endif
  cudaError_t err = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, static_cast<cudaStream_t>(stream_));
  if (err != cudaSuccess) return cuda_error("cudaMemcpyAsync of " + std::to_string(bytes) + " bytes", err);
  return Status::Ok();
}

Status CudaStream::wait_event(void* event) const {
  if (stream_ == nullptr || event == nullptr) {
    return Status(ErrorCode::kInvalidArgument, "wait_event: moved-from stream or null event");
  }
  cudaError_t err = cudaStreamWaitEvent(static_cast<cudaStream_t>(stream_), static_cast<cudaEvent_t>(event),
                                        cudaEventWaitDefault);
  if (err != cudaSuccess) return cuda_error("cudaStreamWaitEvent", err);
  return Status::Ok();
}

Status CudaStream::wait_value(const void* counter, uint32_t value) const {
  if (stream_ == nullptr || counter == nullptr) {
    return Status(ErrorCode::kInvalidArgument, "wait_value: moved-from stream or null counter");
  }
  if (driver().stream_wait_value32 == nullptr) {
    return Status(ErrorCode::kUnavailable, "cuStreamWaitValue32 is not in this CUDA driver");
  }
  CUresult r = driver().stream_wait_value32(static_cast<CUstream>(stream_),
                                            static_cast<CUdeviceptr>(reinterpret_cast<uintptr_t>(counter)),
                                            value, CU_STREAM_WAIT_VALUE_GEQ);
  if (r != CUDA_SUCCESS) return Status(ErrorCode::kInternal, "cuStreamWaitValue32: " + driver_error_text(r));
  return Status::Ok();
}

Status CudaStream::write_value(void* counter, uint32_t value) const {
  if (stream_ == nullptr || counter == nullptr) {
    return Status(ErrorCode::kInvalidArgument, "write_value: moved-from stream or null counter");
  }
  if (driver().stream_write_value32 == nullptr) {
    return Status(ErrorCode::kUnavailable, "cuStreamWriteValue32 is not in this CUDA driver");
  }
  // The default flags put a memory barrier before the write: the stream's earlier copies and
  // kernels are visible to whoever sees the new value.
  CUresult r = driver().stream_write_value32(static_cast<CUstream>(stream_),
                                             static_cast<CUdeviceptr>(reinterpret_cast<uintptr_t>(counter)),
                                             value, CU_STREAM_WRITE_VALUE_DEFAULT);
  if (r != CUDA_SUCCESS) return Status(ErrorCode::kInternal, "cuStreamWriteValue32: " + driver_error_text(r));
  return Status::Ok();
}

Status CudaStream::synchronize() const {
  if (stream_ == nullptr) return Status(ErrorCode::kInvalidArgument, "synchronize on a moved-from stream");
  cudaError_t err = cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));
  if (err != cudaSuccess) return cuda_error("cudaStreamSynchronize", err);
  return Status::Ok();
}

Result<CudaEvent> CudaEvent::create(int device, bool timing) {
  if (Status s = require_device(device); !s.ok()) return s;
  DeviceGuard guard(device);
  if (Status s = guard.status(); !s.ok()) return s;
  cudaEvent_t event = nullptr;
  cudaError_t err = cudaEventCreateWithFlags(&event, timing ? cudaEventDefault : cudaEventDisableTiming);
  if (err != cudaSuccess) return cuda_error("cudaEventCreateWithFlags", err);
  return CudaEvent(event, device);
}

Result<CudaEvent> CudaEvent::create_interprocess(int device) {
  if (Status s = require_device(device); !s.ok()) return s;
  DeviceGuard guard(device);
  if (Status s = guard.status(); !s.ok()) return s;
  cudaEvent_t event = nullptr;
  cudaError_t err = cudaEventCreateWithFlags(&event, cudaEventDisableTiming | cudaEventInterprocess);
  if (err != cudaSuccess) return cuda_error("cudaEventCreateWithFlags(interprocess)", err);
  return CudaEvent(event, device);
}

Result<std::vector<uint8_t>> CudaEvent::ipc_handle() const {
  if (event_ == nullptr) return Status(ErrorCode::kInvalidArgument, "ipc_handle of an empty event");
  cudaIpcEventHandle_t handle{};
  cudaError_t err = cudaIpcGetEventHandle(&handle, static_cast<cudaEvent_t>(event_));
  if (err != cudaSuccess) return cuda_error("cudaIpcGetEventHandle", err, ErrorCode::kInvalidArgument);
  const auto* p = reinterpret_cast<const uint8_t*>(&handle);
  return std::vector<uint8_t>(p, p + sizeof(handle));
}

Result<CudaEvent> CudaEvent::open_ipc(std::span<const uint8_t> bytes, int device) {
  if (bytes.size() != sizeof(cudaIpcEventHandle_t)) {
    return Status(ErrorCode::kMalformed, "a CUDA IPC event handle is " +
                                             std::to_string(sizeof(cudaIpcEventHandle_t)) + " bytes, got " +
                                             std::to_string(bytes.size()));
  }
  if (Status s = require_device(device); !s.ok()) return s;
  DeviceGuard guard(device);
  if (Status s = guard.status(); !s.ok()) return s;
  cudaIpcEventHandle_t handle{};
  std::memcpy(&handle, bytes.data(), sizeof(handle));
  cudaEvent_t event = nullptr;
  cudaError_t err = cudaIpcOpenEventHandle(&event, handle);
  if (err != cudaSuccess) return cuda_error("cudaIpcOpenEventHandle", err, ErrorCode::kInvalidArgument);
  return CudaEvent(event, device);
}

void CudaEvent::reset() {
  if (event_ == nullptr) return;
  DeviceGuard guard(device_);
  if (cudaEventDestroy(static_cast<cudaEvent_t>(event_)) != cudaSuccess) cudaGetLastError();
  event_ = nullptr;
}

Status CudaEvent::record(void* stream) const {
  if (event_ == nullptr) return Status(ErrorCode::kInvalidArgument, "record on a moved-from event");
  DeviceGuard guard(device_);
  if (Status s = guard.status(); !s.ok()) return s;
  cudaError_t err = cudaEventRecord(static_cast<cudaEvent_t>(event_), static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) return cuda_error("cudaEventRecord", err);
  return Status::Ok();
}

Result<bool> CudaEvent::done() const {
  return event_done(event_);
}

Status CudaEvent::synchronize() const {
  if (event_ == nullptr) return Status(ErrorCode::kInvalidArgument, "synchronize on a moved-from event");
  cudaError_t err = cudaEventSynchronize(static_cast<cudaEvent_t>(event_));
  if (err != cudaSuccess) return cuda_error("cudaEventSynchronize", err);
  return Status::Ok();
}

Result<float> CudaEvent::elapsed_ms_since(const CudaEvent& start) const {
  if (event_ == nullptr || start.event_ == nullptr) {
    return Status(ErrorCode::kInvalidArgument, "elapsed_ms_since on a moved-from event");
  }
  float ms = 0;
  cudaError_t err =
      cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start.event_), static_cast<cudaEvent_t>(event_));
  if (err != cudaSuccess) return cuda_error("cudaEventElapsedTime (both events need timing)", err);
  return ms;
}

Result<bool> event_done(void* event) {
  if (event == nullptr) return Status(ErrorCode::kInvalidArgument, "event_done: null event");
  cudaError_t err = cudaEventQuery(static_cast<cudaEvent_t>(event));
  if (err == cudaSuccess) return true;
  if (err == cudaErrorNotReady) return false;
  return cuda_error("the CUDA work before the event failed", err);
}

// --- ScopedDevice ------------------------------------------------------------------------------

ScopedDevice::ScopedDevice(int device) : device_(device) {
  if (cudaGetDevice(&previous_) != cudaSuccess) {
    cudaGetLastError();
    previous_ = -1;
  }
  const cudaError_t err = cudaSetDevice(device);
  error_ = static_cast<int>(err);
  switched_ = err == cudaSuccess && previous_ >= 0 && previous_ != device;
}

ScopedDevice::~ScopedDevice() {
  if (switched_ && cudaSetDevice(previous_) != cudaSuccess) cudaGetLastError();
}

Status ScopedDevice::status() const {
  if (error_ == static_cast<int>(cudaSuccess)) return Status::Ok();
  return cuda_error("cudaSetDevice(" + std::to_string(device_) + ")", static_cast<cudaError_t>(error_));
}

}  // namespace kvf::gpudirect
