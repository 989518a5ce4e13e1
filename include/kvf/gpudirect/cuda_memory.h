// CUDA memory for the GPU data path: device buffers, pinned host memory (registered or allocated),
// CUDA IPC export/import between processes of one host, dma-buf export for GPUDirect RDMA, and
// RAII streams and events. Compiles without CUDA headers (streams and events are void*); in a
// build without CUDA, or on a machine without a GPU, every factory returns kUnavailable with the
// reason (cuda_availability()).
//
// Threads: the objects are move-only handles, not synchronized: create, move and destroy each from
// one owner; the memory they hold may be used from any thread. No function here leaves the calling
// thread's current CUDA device changed: those that need a device set it and restore the caller's.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "kvf/protocol/status.h"

namespace kvf::gpudirect {

// cudaMalloc'd bytes on one device; cudaFree'd (on that device) on destruction.
class DeviceBuffer {
 public:
  static Result<DeviceBuffer> allocate(int device, uint64_t bytes);
  DeviceBuffer() = default;  // empty: holds nothing

  DeviceBuffer(DeviceBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), bytes_(std::exchange(o.bytes_, 0)), device_(o.device_) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
      device_ = o.device_;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { reset(); }

  void* data() const { return data_; }
  uint64_t size() const { return bytes_; }
  int device() const { return device_; }

 private:
  DeviceBuffer(void* data, uint64_t bytes, int device) : data_(data), bytes_(bytes), device_(device) {}
  void reset();
  void* data_ = nullptr;
  uint64_t bytes_ = 0;
  int device_ = -1;
};

// Page-locks caller-owned host memory (an mmap, a POSIX shared-memory arena) with cudaHostRegister
// (portable: every device; mapped: kernels may address it), so copies to and from GPUs DMA straight
// from it. The memory must outlive the registration; unregistered on destruction. A range can be
// registered once per process (CUDA refuses overlapping registrations: kInvalidArgument).
class PinnedRegistration {
 public:
  static Result<PinnedRegistration> register_range(void* p, uint64_t bytes);
  // Like register_range, except that a range another owner in this process has already
  // page-locked whole is used as it stands. (UCX's cuda_copy domain page-locks the host memory it
  // maps once a CUDA context is current on the mapping thread, so the same slots can come back
  // from ucp_mem_map pinned or not.) Such a registration unregisters nothing: the other owner's
  // must outlive it. A range pinned only in part is refused (kInvalidArgument).
  static Result<PinnedRegistration> register_or_reuse(void* p, uint64_t bytes);

  PinnedRegistration(PinnedRegistration&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)),
        bytes_(std::exchange(o.bytes_, 0)),
        device_pointer_(std::exchange(o.device_pointer_, nullptr)),
        owned_(std::exchange(o.owned_, false)) {}
  PinnedRegistration& operator=(PinnedRegistration&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
      device_pointer_ = std::exchange(o.device_pointer_, nullptr);
      owned_ = std::exchange(o.owned_, false);
    }
    return *this;
  }
  PinnedRegistration(const PinnedRegistration&) = delete;
  PinnedRegistration& operator=(const PinnedRegistration&) = delete;
  ~PinnedRegistration() { reset(); }

  void* data() const { return data_; }
  uint64_t size() const { return bytes_; }
  // The address kernels use for data() (cudaHostGetDevicePointer); equal to data() where the
  // GPU can use host pointers directly.
  void* device_pointer() const { return device_pointer_; }
  // False when register_or_reuse found the range pinned by another owner.
  bool owned() const { return owned_; }

 private:
  PinnedRegistration(void* data, uint64_t bytes, void* device_pointer, bool owned)
      : data_(data), bytes_(bytes), device_pointer_(device_pointer), owned_(owned) {}
  static Result<PinnedRegistration> register_impl(void* p, uint64_t bytes, bool reuse_existing);
  void reset();
  void* data_ = nullptr;
  uint64_t bytes_ = 0;
  void* device_pointer_ = nullptr;
  bool owned_ = false;
};

// cudaHostAlloc'd (portable, mapped) host memory, for staging; cudaFreeHost'd on destruction.
class PinnedBuffer {
 public:
  static Result<PinnedBuffer> allocate(uint64_t bytes);

  PinnedBuffer(PinnedBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { reset(); }

  void* data() const { return data_; }
  uint64_t size() const { return bytes_; }

 private:
  PinnedBuffer(void* data, uint64_t bytes) : data_(data), bytes_(bytes) {}
  void reset();
  void* data_ = nullptr;
  uint64_t bytes_ = 0;
};

// Exports [device_ptr, +length) of cudaMalloc'd memory for another process of this host: a
// CudaIpcBlob (cuda_ipc_blob.h) holding the IPC handle of the whole allocation containing it and
// the range's offset inside it. The allocation must stay alive while importers use it. Memory from
// cudaMallocAsync pools or the VMM API (cuMemCreate) cannot be exported this way (kInvalidArgument
// from CUDA). The blob cannot be opened by this same process: CUDA refuses its own handles.
Result<std::vector<uint8_t>> export_cuda_ipc(const void* device_ptr, uint64_t length);

// An exported range mapped into this process (cudaIpcOpenMemHandle with lazy peer access, opened
// on `local_device`, which need not be the GPU that holds the memory: with NVLink/PCIe P2P it can
// be another). Closed (cudaIpcCloseMemHandle) on destruction. Refuses, before touching CUDA, a
// malformed blob (kMalformed/kUnsupportedVersion), a blob from another host (kUnavailable), and a
// blob this process exported (kInvalidArgument: CUDA cannot open an IPC handle in the process that
// exported it). Open each exported allocation once per process and share the mapping.
class CudaIpcMapping {
 public:
  static Result<CudaIpcMapping> open(std::span<const uint8_t> blob, int local_device);

  CudaIpcMapping(CudaIpcMapping&& o) noexcept
      : base_(std::exchange(o.base_, nullptr)),
        offset_(o.offset_),
        bytes_(std::exchange(o.bytes_, 0)),
        source_device_(o.source_device_),
        local_device_(o.local_device_) {}
  CudaIpcMapping& operator=(CudaIpcMapping&& o) noexcept {
    if (this != &o) {
      reset();
      base_ = std::exchange(o.base_, nullptr);
      offset_ = o.offset_;
      bytes_ = std::exchange(o.bytes_, 0);
      source_device_ = o.source_device_;
      local_device_ = o.local_device_;
    }
    return *this;
  }
  CudaIpcMapping(const CudaIpcMapping&) = delete;
  CudaIpcMapping& operator=(const CudaIpcMapping&) = delete;
  ~CudaIpcMapping() { reset(); }

  // The exported range (mapped allocation base + the exporter's offset), size() bytes.
  void* data() const { return static_cast<uint8_t*>(base_) + offset_; }
  uint64_t size() const { return bytes_; }
  // This process's ordinal of the GPU that holds the memory (matched by UUID, so it is right
  // whatever CUDA_VISIBLE_DEVICES each side has); -1 when that GPU is not visible here.
  int source_device() const { return source_device_; }
  int local_device() const { return local_device_; }

 private:
  CudaIpcMapping(void* base, uint64_t offset, uint64_t bytes, int source_device, int local_device)
      : base_(base),
        offset_(offset),
        bytes_(bytes),
        source_device_(source_device),
        local_device_(local_device) {}
  void reset();
  void* base_ = nullptr;
  uint64_t offset_ = 0;
  uint64_t bytes_ = 0;
  int source_device_ = -1;
  int local_device_ = -1;
};

// This process's ordinal of the GPU holding the memory a CUDA IPC blob exports (matched by UUID),
// or -1 when that GPU is not visible here. kMalformed for a blob that does not decode.
Result<int> device_holding(std::span<const uint8_t> blob);

// A dma-buf file descriptor for device memory (cuMemGetHandleForAddressRange), so an RDMA NIC can
// register it with ibv_reg_dmabuf_mr without nvidia-peermem. The range is widened to host pages,
// as the driver requires; offset() is where device_ptr lies inside the dma-buf. Closes the fd on
// destruction (a verbs registration made from it keeps its own reference).
class DmaBufExport {
 public:
  static Result<DmaBufExport> create(const void* device_ptr, uint64_t length);

  DmaBufExport(DmaBufExport&& o) noexcept
      : fd_(std::exchange(o.fd_, -1)), offset_(o.offset_), bytes_(std::exchange(o.bytes_, 0)) {}
  DmaBufExport& operator=(DmaBufExport&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
      offset_ = o.offset_;
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  DmaBufExport(const DmaBufExport&) = delete;
  DmaBufExport& operator=(const DmaBufExport&) = delete;
  ~DmaBufExport() { reset(); }

  int fd() const { return fd_; }
  uint64_t offset() const { return offset_; }  // of device_ptr inside the dma-buf
  uint64_t size() const { return bytes_; }     // of the page-aligned dma-buf

 private:
  DmaBufExport(int fd, uint64_t offset, uint64_t bytes) : fd_(fd), offset_(offset), bytes_(bytes) {}
  void reset();
  int fd_ = -1;
  uint64_t offset_ = 0;
  uint64_t bytes_ = 0;
};

// Makes `device` current on the calling thread for a scope and gives the caller's current device
// back afterwards (engines call in from threads whose device they chose). It sets the device even
// when it already is the current one: on a thread that has made no CUDA call yet no context is
// current, and driver API calls (cuMemGetAddressRange) would fail with CUDA_ERROR_INVALID_CONTEXT.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device);
  ~ScopedDevice();
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  // Ok once the device is current; CUDA's error naming the device otherwise (kUnavailable without
  // CUDA).
  Status status() const;

 private:
  int device_;
  int previous_ = -1;
  bool switched_ = false;
  int error_ = 0;  // a cudaError_t
};

// The ordinal of the GPU whose memory `p` points into (device or managed memory); kInvalidArgument
// for host or unknown memory.
Result<int> device_of(const void* p);
// True when `p` points into cudaMalloc'd device memory (not managed, not host); false otherwise,
// also when there is no CUDA.
bool pointer_is_device(const void* p);

// The cudaMalloc'd allocation `p` points into: its GPU, first byte and size (cuMemGetAddressRange).
// kInvalidArgument for host, managed or unknown memory. For a receiver checking that addresses a
// peer names lie inside its own device memory before it writes there.
struct DeviceAllocation {
  int device = -1;
  uintptr_t base = 0;
  uint64_t bytes = 0;
};
Result<DeviceAllocation> device_allocation_of(const void* p);

// Lets kernels and copies on `from` reach memory on `to` directly (NVLink/PCIe P2P). Idempotent:
// access already enabled is success. kUnavailable when the two GPUs cannot reach each other.
Status enable_peer_access(int from, int to);

// Copy between any two of host, pinned, device and IPC-mapped memory (cudaMemcpyDefault) on the
// legacy default stream; the bytes are in place when it returns. For setup and tests: the data
// path copies on its own streams.
Status copy_sync(void* dst, const void* src, uint64_t bytes);
// cudaMemset on device memory; done when it returns.
Status fill_device(void* p, uint8_t value, uint64_t bytes);

// A non-blocking CUDA stream on one device (no implicit sync with the legacy default stream).
class CudaStream {
 public:
  // kHigh: the device's greatest stream priority. When kernels of several streams wait for SMs at
  // once, the block scheduler starts a high-priority stream's blocks first (it never preempts
  // blocks already running).
  enum class Priority { kNormal, kHigh };
  static Result<CudaStream> create(int device, Priority priority = Priority::kNormal);
  CudaStream() = default;  // empty: no stream

  CudaStream(CudaStream&& o) noexcept : stream_(std::exchange(o.stream_, nullptr)), device_(o.device_) {}
  CudaStream& operator=(CudaStream&& o) noexcept {
    if (this != &o) {
      reset();
      stream_ = std::exchange(o.stream_, nullptr);
      device_ = o.device_;
    }
    return *this;
  }
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  ~CudaStream() { reset(); }

  void* handle() const { return stream_; }  // a cudaStream_t
  int device() const { return device_; }
  // Enqueues an async copy (cudaMemcpyDefault); host memory should be pinned for it to be async.
  // `prefer_copy_engines`: issued as a one-copy cudaMemcpyBatchAsync with
  // cudaMemcpyFlagPreferOverlapWithCompute, a hint that the driver keep it off the SMs (CUDA 13
  // builds; elsewhere the plain copy).
  Status copy_async(void* dst, const void* src, uint64_t bytes, bool prefer_copy_engines = false) const;
  // Work enqueued after this waits for `event` (any cudaEvent_t, e.g. an engine's layer event,
  // also of another device) without blocking the host.
  Status wait_event(void* event) const;
  // Stream memory operations on a 32-bit counter in device memory (this GPU's, or a peer's through
  // a CUDA IPC mapping): work enqueued after wait_value waits until the counter, compared
  // cyclically, is at least `value` ((int32_t)(counter - value) >= 0); write_value stores `value`
  // once everything enqueued before it has finished and is visible. Together they let two
  // processes hand buffers to each other on the GPUs with no host in between.
  Status wait_value(const void* counter, uint32_t value) const;
  Status write_value(void* counter, uint32_t value) const;
  Status synchronize() const;

 private:
  CudaStream(void* stream, int device) : stream_(stream), device_(device) {}
  void reset();
  void* stream_ = nullptr;
  int device_ = -1;
};

// A CUDA event on one device, created with cudaEventDisableTiming (cheapest to record and poll)
// unless `timing` is asked for.
class CudaEvent {
 public:
  static Result<CudaEvent> create(int device, bool timing = false);
  // An event another process of this host can wait on (cudaEventInterprocess, no timing): it
  // records here; the other side opens ipc_handle() with open_ipc and makes a stream wait for it.
  // A wait sees the last record made before it was enqueued, so the recorder must tell the
  // waiter (a message) after recording, and must not record again until the waiter has passed.
  static Result<CudaEvent> create_interprocess(int device);
  Result<std::vector<uint8_t>> ipc_handle() const;  // 64 bytes (cudaIpcEventHandle_t)
  static Result<CudaEvent> open_ipc(std::span<const uint8_t> handle, int device);
  CudaEvent() = default;  // empty: no event

  CudaEvent(CudaEvent&& o) noexcept : event_(std::exchange(o.event_, nullptr)), device_(o.device_) {}
  CudaEvent& operator=(CudaEvent&& o) noexcept {
    if (this != &o) {
      reset();
      event_ = std::exchange(o.event_, nullptr);
      device_ = o.device_;
    }
    return *this;
  }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  ~CudaEvent() { reset(); }

  void* handle() const { return event_; }  // a cudaEvent_t
  int device() const { return device_; }
  // Records on `stream` (a cudaStream_t of the same device; null: the legacy default stream).
  Status record(void* stream) const;
  Status record(const CudaStream& stream) const { return record(stream.handle()); }
  Result<bool> done() const;
  Status synchronize() const;
  // Milliseconds from `start` to this event; both need timing.
  Result<float> elapsed_ms_since(const CudaEvent& start) const;

 private:
  CudaEvent(void* event, int device) : event_(event), device_(device) {}
  void reset();
  void* event_ = nullptr;
  int device_ = -1;
};

// cudaEventQuery on any cudaEvent_t (an engine's own): true when the work before it has finished,
// false while it runs, an error Status when that work failed.
Result<bool> event_done(void* event);

}  // namespace kvf::gpudirect
