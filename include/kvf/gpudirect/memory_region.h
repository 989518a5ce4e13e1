// MemoryRegion: a range of memory that transports can move bytes to and from, with its
// registration (UCX memory handle and packed rkey) tied to its lifetime. It either owns the
// memory (host allocation, POSIX shared memory) or registers memory someone else owns (an engine's
// KV buffers). Move-only RAII. The bytes may be used from any thread; the object itself is not
// synchronized: create and destroy it from one owner.
#pragma once

#include <ucp/api/ucp.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/ucx_context.h"
#include "kvf/protocol/messages.h"
#include "kvf/protocol/status.h"

namespace kvf::gpudirect {

class MemoryRegion {
 public:
  // Page-aligned anonymous host memory. `ucx` may be null: then the region is not registered
  // (enough for the in-process transport).
  static Result<MemoryRegion> allocate_host(std::shared_ptr<UcxContext> ucx, uint64_t bytes);
  // Memory that UCX allocates itself (ucp_mem_map with UCP_MEM_MAP_ALLOCATE). On one host UCX
  // can then export it as a shared-memory segment that peers map, so their puts are plain
  // memcpy with no work on this side: use it for regions peers write into. Needs `ucx`.
  static Result<MemoryRegion> allocate_ucx(std::shared_ptr<UcxContext> ucx, uint64_t bytes);
  // POSIX shared memory: creates `name` (must not exist; "/kvf-..."), unlinked when the creator
  // is destroyed. Other processes map it with open_shared.
  static Result<MemoryRegion> create_shared(std::shared_ptr<UcxContext> ucx, const std::string& name,
                                            uint64_t bytes);
  static Result<MemoryRegion> open_shared(std::shared_ptr<UcxContext> ucx, const std::string& name);
  // cudaMalloc'd memory on `device`, exported for CUDA IPC (its descriptors carry the handle, so
  // a process on this host can map it: the cuda_ipc transport) and registered with UCX when the
  // UCX build handles CUDA memory (`ucx` may be null: then it is not). data() is a device pointer.
  static Result<MemoryRegion> allocate_cuda(std::shared_ptr<UcxContext> ucx, int device, uint64_t bytes);
  // An engine's cudaMalloc'd memory (not owned: the caller keeps it alive longer than the region),
  // exported for CUDA IPC and registered with UCX where the UCX build handles CUDA memory, as
  // allocate_cuda's: so peers can write an engine's GPU KV pool straight into its blocks.
  static Result<MemoryRegion> register_cuda(std::shared_ptr<UcxContext> ucx, void* device_ptr,
                                            uint64_t bytes);
  // Registers memory owned by the caller, which must outlive the region.
  static Result<MemoryRegion> register_external(std::shared_ptr<UcxContext> ucx, void* address,
                                                uint64_t bytes, protocol::MemoryKind kind);

  MemoryRegion(MemoryRegion&& other) noexcept;
  MemoryRegion& operator=(MemoryRegion&& other) noexcept;
  MemoryRegion(const MemoryRegion&) = delete;
  MemoryRegion& operator=(const MemoryRegion&) = delete;
  ~MemoryRegion();

  uint8_t* data() const { return static_cast<uint8_t*>(address_); }
  uint64_t size() const { return bytes_; }
  protocol::MemoryKind kind() const { return kind_; }
  ucp_mem_h ucx_memh() const { return memh_; }
  bool registered() const { return memh_ != nullptr; }
  bool contains(const void* p, uint64_t length) const;
  // True when [p, p+length) lies inside one live host-memory region of this process that is
  // registered with UCX: memory this process lets peers write. A receiver that places bytes for a peer itself
  // (staged transports) checks destinations with it, so a peer can reach nothing it could not
  // reach with a one-sided put anyway.
  static bool registered_range(const void* p, uint64_t length);

  // What a peer needs to write into [data()+offset, +length): address, length and packed rkey.
  protocol::RegionDescriptor descriptor(uint64_t region_id) const;
  protocol::RegionDescriptor descriptor(uint64_t region_id, uint64_t offset, uint64_t length) const;

 private:
  enum class Ownership : uint8_t { kNone, kMmap, kSharedCreator, kSharedOpener, kUcx, kCuda };
  MemoryRegion() = default;
  Status register_with_ucx();
  Status pack_rkey();
  void release();

  std::shared_ptr<UcxContext> ucx_;
  void* address_ = nullptr;
  uint64_t bytes_ = 0;
  protocol::MemoryKind kind_ = protocol::MemoryKind::kHost;
  Ownership ownership_ = Ownership::kNone;
  std::string shm_name_;
  ucp_mem_h memh_ = nullptr;
  std::vector<uint8_t> packed_rkey_;
  std::unique_ptr<DeviceBuffer> device_buffer_;  // kCuda: the allocation
  std::vector<uint8_t> cuda_ipc_;                // kCuda: data() as u64, then the CUDA IPC blob
};

}  // namespace kvf::gpudirect
