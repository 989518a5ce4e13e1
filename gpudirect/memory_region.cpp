#include "kvf/gpudirect/memory_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

namespace kvf::gpudirect {
namespace {

std::string errno_text(int err) {
  return std::string(std::strerror(err));
}

// Live UCX-registered ranges of this process: base -> length (see registered_range).
std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::map<uintptr_t, uint64_t>& registry() {
  static std::map<uintptr_t, uint64_t> r;
  return r;
}

}  // namespace

Result<MemoryRegion> MemoryRegion::allocate_host(std::shared_ptr<UcxContext> ucx, uint64_t bytes) {
  if (bytes == 0) return Status(ErrorCode::kInvalidArgument, "allocate_host: zero bytes");
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    return Status(ErrorCode::kOutOfMemory,
                  "mmap of " + std::to_string(bytes) + " bytes: " + errno_text(errno));
  }
  MemoryRegion region;
  region.ucx_ = std::move(ucx);
  region.address_ = p;
  region.bytes_ = bytes;
  region.kind_ = protocol::MemoryKind::kHost;
  region.ownership_ = Ownership::kMmap;
  if (Status s = region.register_with_ucx(); !s.ok()) return s;
  return region;
}

Result<MemoryRegion> MemoryRegion::allocate_cuda(std::shared_ptr<UcxContext> ucx, int device,
                                                 uint64_t bytes) {
  if (bytes == 0) return Status(ErrorCode::kInvalidArgument, "allocate_cuda: zero bytes");
  auto buffer = DeviceBuffer::allocate(device, bytes);
  if (!buffer.ok()) return buffer.status();
  auto region = register_cuda(std::move(ucx), buffer->data(), bytes);
  if (!region.ok()) return region.status();
  region->ownership_ = Ownership::kCuda;
  region->device_buffer_ = std::make_unique<DeviceBuffer>(std::move(buffer.value()));
  return region;
}

Result<MemoryRegion> MemoryRegion::register_cuda(std::shared_ptr<UcxContext> ucx, void* device_ptr,
                                                 uint64_t bytes) {
  if (device_ptr == nullptr || bytes == 0)
    return Status(ErrorCode::kInvalidArgument, "register_cuda: null address or zero length");
  auto blob = export_cuda_ipc(device_ptr, bytes);
  if (!blob.ok())
    return Status(blob.status().code(), "exporting GPU memory for CUDA IPC: " + blob.status().message());
  MemoryRegion region;
  region.address_ = device_ptr;
  region.bytes_ = bytes;
  region.kind_ = protocol::MemoryKind::kCudaDevice;
  region.ownership_ = Ownership::kNone;
  // The importer maps the whole exported range and finds a descriptor's bytes by their distance
  // from this address.
  auto base = reinterpret_cast<uint64_t>(region.address_);
  for (int i = 0; i < 8; ++i) region.cuda_ipc_.push_back(static_cast<uint8_t>(base >> (8 * i)));
  region.cuda_ipc_.insert(region.cuda_ipc_.end(), blob->begin(), blob->end());
  if (ucx && ucx->supports_cuda_memory()) {
    region.ucx_ = std::move(ucx);
    if (Status s = region.register_with_ucx(); !s.ok()) return s;
  }
  return region;
}

Result<MemoryRegion> MemoryRegion::allocate_ucx(std::shared_ptr<UcxContext> ucx, uint64_t bytes) {
  if (bytes == 0) return Status(ErrorCode::kInvalidArgument, "allocate_ucx: zero bytes");
  if (!ucx) return Status(ErrorCode::kInvalidArgument, "allocate_ucx needs a UCX context");
  ucp_mem_map_params_t params{};
  params.field_mask =
      UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_FLAGS;
  params.address = nullptr;
  params.length = bytes;
  params.flags = UCP_MEM_MAP_ALLOCATE;
  ucp_mem_h memh = nullptr;
  ucs_status_t status = ucp_mem_map(ucx->handle(), &params, &memh);
  if (status != UCS_OK) {
    return Status(ErrorCode::kOutOfMemory, "ucp_mem_map(ALLOCATE) of " + std::to_string(bytes) +
                                               " bytes: " + ucx_status_string(status));
  }
  ucp_mem_attr_t attr{};
  attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
  status = ucp_mem_query(memh, &attr);
  if (status != UCS_OK) {
    ucp_mem_unmap(ucx->handle(), memh);
    return Status(ErrorCode::kTransportError, "ucp_mem_query: " + ucx_status_string(status));
  }
  MemoryRegion region;
  region.ucx_ = std::move(ucx);
  region.address_ = attr.address;
  region.bytes_ = bytes;
  region.kind_ = protocol::MemoryKind::kHost;
  region.ownership_ = Ownership::kUcx;  // ucp_mem_unmap frees it
  region.memh_ = memh;
  if (Status s = region.pack_rkey(); !s.ok()) return s;
  return region;
}

Result<MemoryRegion> MemoryRegion::create_shared(std::shared_ptr<UcxContext> ucx, const std::string& name,
                                                 uint64_t bytes) {
  if (bytes == 0) return Status(ErrorCode::kInvalidArgument, "create_shared: zero bytes");
  if (name.size() < 2 || name[0] != '/' || name.find('/', 1) != std::string::npos) {
    return Status(ErrorCode::kInvalidArgument, "shared memory name must look like /name, got '" + name + "'");
  }
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) return Status(ErrorCode::kInvalidArgument, "shm_open(" + name + "): " + errno_text(errno));
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    int err = errno;
    close(fd);
    shm_unlink(name.c_str());
    return Status(ErrorCode::kOutOfMemory, "ftruncate(" + name + "): " + errno_text(err));
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int err = errno;
  close(fd);
  if (p == MAP_FAILED) {
    shm_unlink(name.c_str());
    return Status(ErrorCode::kOutOfMemory, "mmap(" + name + "): " + errno_text(err));
  }
  MemoryRegion region;
  region.ucx_ = std::move(ucx);
  region.address_ = p;
  region.bytes_ = bytes;
  region.kind_ = protocol::MemoryKind::kSharedMemory;
  region.ownership_ = Ownership::kSharedCreator;
  region.shm_name_ = name;
  if (Status s = region.register_with_ucx(); !s.ok()) return s;
  return region;
}

Result<MemoryRegion> MemoryRegion::open_shared(std::shared_ptr<UcxContext> ucx, const std::string& name) {
  int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) return Status(ErrorCode::kNotFound, "shm_open(" + name + "): " + errno_text(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || st.st_size <= 0) {
    close(fd);
    return Status(ErrorCode::kInvalidArgument, "shared memory " + name + " is empty or unreadable");
  }
  auto bytes = static_cast<uint64_t>(st.st_size);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int err = errno;
  close(fd);
  if (p == MAP_FAILED) return Status(ErrorCode::kOutOfMemory, "mmap(" + name + "): " + errno_text(err));
  MemoryRegion region;
  region.ucx_ = std::move(ucx);
  region.address_ = p;
  region.bytes_ = bytes;
  region.kind_ = protocol::MemoryKind::kSharedMemory;
  region.ownership_ = Ownership::kSharedOpener;
  region.shm_name_ = name;
  if (Status s = region.register_with_ucx(); !s.ok()) return s;
  return region;
}

Result<MemoryRegion> MemoryRegion::register_external(std::shared_ptr<UcxContext> ucx, void* address,
                                                     uint64_t bytes, protocol::MemoryKind kind) {
  if (address == nullptr || bytes == 0) {
    return Status(ErrorCode::kInvalidArgument, "register_external: null address or zero length");
  }
  MemoryRegion region;
  region.ucx_ = std::move(ucx);
  region.address_ = address;
  region.bytes_ = bytes;
  region.kind_ = kind;
  region.ownership_ = Ownership::kNone;
  if (Status s = region.register_with_ucx(); !s.ok()) return s;
  return region;
}

Status MemoryRegion::register_with_ucx() {
  if (!ucx_) return Status::Ok();
  ucp_mem_map_params_t params{};
  params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  params.address = address_;
  params.length = bytes_;
  if (kind_ == protocol::MemoryKind::kCudaDevice) {
    // A UCX without CUDA support would treat the device pointer as host memory and fail with a
    // message that names neither CUDA nor the fix.
    if (!ucx_->supports_cuda_memory()) {
      release();
      return Status(ErrorCode::kUnavailable,
                    "this UCX cannot register CUDA device memory (ucp_context_query lists no CUDA memory "
                    "type: UCX was built without its cuda modules, or they failed to load); use a UCX with "
                    "CUDA support, e.g. the libucx-cu13 wheel");
    }
    params.field_mask |= UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
    params.memory_type = UCS_MEMORY_TYPE_CUDA;
  }
  ucs_status_t status = ucp_mem_map(ucx_->handle(), &params, &memh_);
  if (status != UCS_OK) {
    memh_ = nullptr;
    release();
    return Status(ErrorCode::kTransportError,
                  "ucp_mem_map of " + std::to_string(bytes_) + " bytes: " + ucx_status_string(status));
  }
  if (Status s = pack_rkey(); !s.ok()) {
    release();
    return s;
  }
  return Status::Ok();
}

Status MemoryRegion::pack_rkey() {
  void* rkey_buffer = nullptr;
  size_t rkey_size = 0;
  ucs_status_t status = ucp_rkey_pack(ucx_->handle(), memh_, &rkey_buffer, &rkey_size);
  if (status != UCS_OK)
    return Status(ErrorCode::kTransportError, "ucp_rkey_pack: " + ucx_status_string(status));
  auto* b = static_cast<uint8_t*>(rkey_buffer);
  packed_rkey_.assign(b, b + rkey_size);
  ucp_rkey_buffer_release(rkey_buffer);
  if (kind_ != protocol::MemoryKind::kCudaDevice) {
    std::lock_guard lock(registry_mutex());
    registry()[reinterpret_cast<uintptr_t>(address_)] = bytes_;
  }
  return Status::Ok();
}

bool MemoryRegion::contains(const void* p, uint64_t length) const {
  auto begin = reinterpret_cast<uintptr_t>(address_);
  auto q = reinterpret_cast<uintptr_t>(p);
  return q >= begin && length <= bytes_ && q - begin <= bytes_ - length;
}

protocol::RegionDescriptor MemoryRegion::descriptor(uint64_t region_id) const {
  return descriptor(region_id, 0, bytes_);
}

protocol::RegionDescriptor MemoryRegion::descriptor(uint64_t region_id, uint64_t offset,
                                                    uint64_t length) const {
  protocol::RegionDescriptor d;
  d.region_id = region_id;
  d.base_address = reinterpret_cast<uintptr_t>(address_) + offset;
  d.length = length;
  d.kind = kind_;
  d.ucx_rkey = packed_rkey_;  // an rkey covers the whole mapping; the bounds travel beside it
  d.cuda_ipc = cuda_ipc_;
  return d;
}

bool MemoryRegion::registered_range(const void* p, uint64_t length) {
  const auto at = reinterpret_cast<uintptr_t>(p);
  std::lock_guard lock(registry_mutex());
  auto it = registry().upper_bound(at);
  if (it == registry().begin()) return false;
  --it;
  return at - it->first <= it->second && length <= it->second - (at - it->first);
}

void MemoryRegion::release() {
  if (memh_ != nullptr) {
    std::lock_guard lock(registry_mutex());
    registry().erase(reinterpret_cast<uintptr_t>(address_));
  }
  if (memh_ != nullptr && ucx_) ucp_mem_unmap(ucx_->handle(), memh_);
  memh_ = nullptr;
  if (address_ != nullptr) {
    switch (ownership_) {
      case Ownership::kMmap:
      case Ownership::kSharedOpener:
        munmap(address_, bytes_);
        break;
      case Ownership::kSharedCreator:
        munmap(address_, bytes_);
        shm_unlink(shm_name_.c_str());
        break;
      case Ownership::kCuda:  // after ucp_mem_unmap: UCX may hold the pages until then
        device_buffer_.reset();
        break;
      case Ownership::kNone:
      case Ownership::kUcx:  // released by ucp_mem_unmap above
        break;
    }
  }
  address_ = nullptr;
  bytes_ = 0;
  packed_rkey_.clear();
  cuda_ipc_.clear();
}

MemoryRegion::MemoryRegion(MemoryRegion&& other) noexcept {
  *this = std::move(other);
}

MemoryRegion& MemoryRegion::operator=(MemoryRegion&& other) noexcept {
  if (this != &other) {
    release();
    ucx_ = std::move(other.ucx_);
    address_ = std::exchange(other.address_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    kind_ = other.kind_;
    ownership_ = std::exchange(other.ownership_, Ownership::kNone);
    shm_name_ = std::move(other.shm_name_);
    memh_ = std::exchange(other.memh_, nullptr);
    packed_rkey_ = std::move(other.packed_rkey_);
    device_buffer_ = std::move(other.device_buffer_);
    cuda_ipc_ = std::move(other.cuda_ipc_);
  }
  return *this;
}

MemoryRegion::~MemoryRegion() {
  release();
}

}  // namespace kvf::gpudirect
