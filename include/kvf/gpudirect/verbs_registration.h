// Raw libibverbs registration, for GPUDirect RDMA where UCX is not wanted: VerbsDevice opens an
// RDMA device and its protection domain; VerbsMemoryRegion registers host or CUDA device memory
// in that domain and holds the keys a peer needs. Built everywhere: without libibverbs (or without
// an RDMA device, as on every machine here) the factories return kUnavailable with the reason.
//
// Threads: move-only RAII handles, not synchronized: create, move and destroy each from one owner.
// Verbs objects themselves are thread-safe, so the handles' pd()/context() may be used anywhere.
// A VerbsDevice must outlive the regions registered in its protection domain.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include "kvf/protocol/status.h"

struct ibv_context;
struct ibv_pd;
struct ibv_mr;

namespace kvf::gpudirect {

// One opened RDMA device (ibv_open_device) and a protection domain on it (ibv_alloc_pd).
class VerbsDevice {
 public:
  // The first device ibv_get_device_list reports; kUnavailable when there is none.
  static Result<VerbsDevice> open_first();
  // The device called `name` (as ibv_devices prints it, e.g. "mlx5_0"); kNotFound when absent.
  static Result<VerbsDevice> open(std::string_view name);

  VerbsDevice(VerbsDevice&& o) noexcept
      : context_(std::exchange(o.context_, nullptr)),
        pd_(std::exchange(o.pd_, nullptr)),
        name_(std::move(o.name_)) {}
  VerbsDevice& operator=(VerbsDevice&& o) noexcept {
    if (this != &o) {
      reset();
      context_ = std::exchange(o.context_, nullptr);
      pd_ = std::exchange(o.pd_, nullptr);
      name_ = std::move(o.name_);
    }
    return *this;
  }
  VerbsDevice(const VerbsDevice&) = delete;
  VerbsDevice& operator=(const VerbsDevice&) = delete;
  ~VerbsDevice() { reset(); }

  ibv_context* context() const { return context_; }
  ibv_pd* pd() const { return pd_; }
  const std::string& name() const { return name_; }

 private:
  VerbsDevice(ibv_context* context, ibv_pd* pd, std::string name)
      : context_(context), pd_(pd), name_(std::move(name)) {}
  static Result<VerbsDevice> open_matching(std::string_view name);  // empty name: the first
  void reset();
  ibv_context* context_ = nullptr;
  ibv_pd* pd_ = nullptr;
  std::string name_;
};

// How a region was registered: which kernel path lets the NIC reach the memory.
enum class VerbsRegistrationPath : uint8_t {
  kHost,     // ibv_reg_mr on host memory
  kDmaBuf,   // ibv_reg_dmabuf_mr on a dma-buf the CUDA driver exported (no extra kernel module)
  kPeerMem,  // ibv_reg_mr on a device pointer, resolved by the nvidia-peermem kernel module
};
std::string_view registration_path_name(VerbsRegistrationPath path);

// A memory region registered with a protection domain (local and remote write, remote read);
// ibv_dereg_mr on destruction. The memory must outlive it.
class VerbsMemoryRegion {
 public:
  static Result<VerbsMemoryRegion> register_host(ibv_pd* pd, void* p, uint64_t bytes);
  // GPUDirect RDMA on cudaMalloc'd memory: dma-buf first (DmaBufExport, then ibv_reg_dmabuf_mr),
  // then ibv_reg_mr through nvidia-peermem. path() says which worked; fallback_reason() why
  // dma-buf did not. kUnavailable without CUDA; kInvalidArgument for a non-device pointer.
  static Result<VerbsMemoryRegion> register_cuda(ibv_pd* pd, void* device_ptr, uint64_t bytes);

  VerbsMemoryRegion(VerbsMemoryRegion&& o) noexcept
      : mr_(std::exchange(o.mr_, nullptr)),
        data_(o.data_),
        bytes_(o.bytes_),
        path_(o.path_),
        fallback_reason_(std::move(o.fallback_reason_)) {}
  VerbsMemoryRegion& operator=(VerbsMemoryRegion&& o) noexcept {
    if (this != &o) {
      reset();
      mr_ = std::exchange(o.mr_, nullptr);
      data_ = o.data_;
      bytes_ = o.bytes_;
      path_ = o.path_;
      fallback_reason_ = std::move(o.fallback_reason_);
    }
    return *this;
  }
  VerbsMemoryRegion(const VerbsMemoryRegion&) = delete;
  VerbsMemoryRegion& operator=(const VerbsMemoryRegion&) = delete;
  ~VerbsMemoryRegion() { reset(); }

  void* data() const { return data_; }
  uint64_t size() const { return bytes_; }
  uint32_t lkey() const;
  uint32_t rkey() const;
  VerbsRegistrationPath path() const { return path_; }
  // Why the dma-buf path was not used (empty when it was, or for host memory).
  const std::string& fallback_reason() const { return fallback_reason_; }

 private:
  VerbsMemoryRegion(ibv_mr* mr, void* data, uint64_t bytes, VerbsRegistrationPath path, std::string reason)
      : mr_(mr), data_(data), bytes_(bytes), path_(path), fallback_reason_(std::move(reason)) {}
  void reset();
  ibv_mr* mr_ = nullptr;
  void* data_ = nullptr;
  uint64_t bytes_ = 0;
  VerbsRegistrationPath path_ = VerbsRegistrationPath::kHost;
  std::string fallback_reason_;
};

}  // namespace kvf::gpudirect
