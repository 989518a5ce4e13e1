// Built when libibverbs is found (CMakeLists.txt adds it explicitly; noverbs/ otherwise).
#include "kvf/gpudirect/verbs_registration.h"

#include <infiniband/verbs.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/cuda_probe.h"

namespace kvf::gpudirect {
namespace {

// Relaxed ordering is an optional flag (ignored where unsupported); it lets the NIC reorder PCIe
// writes, which GPU memory needs for full GPUDirect bandwidth.
constexpr int kAccess =
    IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_RELAXED_ORDERING;

std::string errno_text(int err) {
  return std::string(std::strerror(err));
}

}  // namespace

Result<VerbsDevice> VerbsDevice::open_matching(std::string_view name) {
  int count = 0;
  ibv_device** list = ibv_get_device_list(&count);
  if (list == nullptr) {
    const int err = errno;
    return Status(ErrorCode::kUnavailable,
                  "no RDMA device (ibv_get_device_list failed: " + errno_text(err) + ")");
  }
  if (count == 0) {
    ibv_free_device_list(list);
    return Status(ErrorCode::kUnavailable, "no RDMA device (ibv_get_device_list found none)");
  }
  ibv_device* chosen = nullptr;
  std::string names;
  for (int i = 0; i < count; ++i) {
    const char* n = ibv_get_device_name(list[i]);
    names += (i == 0 ? "" : ", ") + std::string(n != nullptr ? n : "?");
    if (chosen == nullptr && (name.empty() || (n != nullptr && name == n))) chosen = list[i];
  }
  if (chosen == nullptr) {
    ibv_free_device_list(list);
    return Status(ErrorCode::kNotFound,
                  "no RDMA device named '" + std::string(name) + "' (found " + names + ")");
  }
  std::string chosen_name = ibv_get_device_name(chosen);
  ibv_context* context = ibv_open_device(chosen);
  const int open_errno = errno;
  ibv_free_device_list(list);  // an opened context stays valid
  if (context == nullptr) {
    return Status(ErrorCode::kUnavailable, "ibv_open_device(" + chosen_name + "): " + errno_text(open_errno));
  }
  ibv_pd* pd = ibv_alloc_pd(context);
  if (pd == nullptr) {
    const int err = errno;
    ibv_close_device(context);
    return Status(ErrorCode::kTransportError, "ibv_alloc_pd(" + chosen_name + "): " + errno_text(err));
  }
  return VerbsDevice(context, pd, std::move(chosen_name));
}

Result<VerbsDevice> VerbsDevice::open_first() {
  return open_matching({});
}

Result<VerbsDevice> VerbsDevice::open(std::string_view name) {
  if (name.empty()) return Status(ErrorCode::kInvalidArgument, "VerbsDevice::open: empty device name");
  return open_matching(name);
}

void VerbsDevice::reset() {
  if (pd_ != nullptr) ibv_dealloc_pd(pd_);
  if (context_ != nullptr) ibv_close_device(context_);
  pd_ = nullptr;
  context_ = nullptr;
}

Result<VerbsMemoryRegion> VerbsMemoryRegion::register_host(ibv_pd* pd, void* p, uint64_t bytes) {
  if (pd == nullptr || p == nullptr || bytes == 0) {
    return Status(ErrorCode::kInvalidArgument, "register_host: null pd, null pointer or zero bytes");
  }
  ibv_mr* mr = ibv_reg_mr(pd, p, bytes, kAccess);
  if (mr == nullptr) {
    const int err = errno;
    return Status(ErrorCode::kTransportError,
                  "ibv_reg_mr of " + std::to_string(bytes) + " host bytes: " + errno_text(err));
  }
  return VerbsMemoryRegion(mr, p, bytes, VerbsRegistrationPath::kHost, {});
}

Result<VerbsMemoryRegion> VerbsMemoryRegion::register_cuda(ibv_pd* pd, void* device_ptr, uint64_t bytes) {
  if (pd == nullptr || device_ptr == nullptr || bytes == 0) {
    return Status(ErrorCode::kInvalidArgument, "register_cuda: null pd, null pointer or zero bytes");
  }
  if (!cuda_availability().built_with_cuda) {
    return Status(ErrorCode::kUnavailable, "register_cuda: kvfabric was built without CUDA");
  }
  if (!pointer_is_device(device_ptr)) {
    Result<int> device = device_of(device_ptr);
    return Status(device.ok() ? ErrorCode::kInvalidArgument : device.status().code(),
                  "register_cuda: not cudaMalloc'd device memory" +
                      (device.ok() ? std::string() : " (" + device.status().message() + ")"));
  }
  std::string reason;
  // dma-buf first: it needs no out-of-tree kernel module. The fd is closed when `dmabuf` goes
  // out of scope; the registration holds its own reference to the buffer.
  Result<DmaBufExport> dmabuf = DmaBufExport::create(device_ptr, bytes);
  if (dmabuf.ok()) {
    ibv_mr* mr = ibv_reg_dmabuf_mr(pd, dmabuf->offset(), bytes, reinterpret_cast<uint64_t>(device_ptr),
                                   dmabuf->fd(), kAccess);
    if (mr != nullptr) return VerbsMemoryRegion(mr, device_ptr, bytes, VerbsRegistrationPath::kDmaBuf, {});
    reason = "ibv_reg_dmabuf_mr: " + errno_text(errno);
  } else {
    reason = dmabuf.status().message();
  }
  ibv_mr* mr = ibv_reg_mr(pd, device_ptr, bytes, kAccess);
  if (mr == nullptr) {
    const int err = errno;
    return Status(ErrorCode::kUnavailable, "GPUDirect RDMA registration of " + std::to_string(bytes) +
                                               " bytes failed: dma-buf: " + reason +
                                               "; ibv_reg_mr (needs nvidia-peermem): " + errno_text(err));
  }
  return VerbsMemoryRegion(mr, device_ptr, bytes, VerbsRegistrationPath::kPeerMem, std::move(reason));
}

uint32_t VerbsMemoryRegion::lkey() const {
  return mr_ != nullptr ? mr_->lkey : 0;
}

uint32_t VerbsMemoryRegion::rkey() const {
  return mr_ != nullptr ? mr_->rkey : 0;
}

void VerbsMemoryRegion::reset() {
  if (mr_ != nullptr) ibv_dereg_mr(mr_);
  mr_ = nullptr;
}

}  // namespace kvf::gpudirect
