#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "kvf/gpudirect/nccl_comm.h"

namespace kvf::gpudirect {
namespace {

// The few NCCL entry points used, with NCCL's stable C ABI (nccl.h is not needed to build).
struct NcclUniqueId {
  char internal[128];
};
using NcclResult = int;        // ncclResult_t: 0 success, 7 in progress
constexpr int kNcclUint8 = 1;  // ncclUint8

struct NcclApi {
  void* handle = nullptr;
  std::string error;
  NcclResult (*get_unique_id)(NcclUniqueId*) = nullptr;
  NcclResult (*comm_init_rank)(void**, int, NcclUniqueId, int) = nullptr;
  NcclResult (*send)(const void*, size_t, int, int, void*, cudaStream_t) = nullptr;
  NcclResult (*recv)(void*, size_t, int, int, void*, cudaStream_t) = nullptr;
  NcclResult (*comm_destroy)(void*) = nullptr;
  NcclResult (*comm_abort)(void*) = nullptr;
  NcclResult (*comm_get_async_error)(void*, NcclResult*) = nullptr;
  const char* (*get_error_string)(NcclResult) = nullptr;
};

template <typename Fn>
bool bind(void* handle, const char* name, Fn& out) {
  out = reinterpret_cast<Fn>(dlsym(handle, name));
  return out != nullptr;
}

const NcclApi& nccl() {
  static const NcclApi api = [] {
    NcclApi a;
    a.handle = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (a.handle == nullptr) {
      const char* why = dlerror();
      a.error = std::string("cannot load libnccl.so.2 (") + (why != nullptr ? why : "not found") +
                "): install NCCL or use the cuda_ipc transport";
      return a;
    }
    if (!bind(a.handle, "ncclGetUniqueId", a.get_unique_id) ||
        !bind(a.handle, "ncclCommInitRank", a.comm_init_rank) || !bind(a.handle, "ncclSend", a.send) ||
        !bind(a.handle, "ncclRecv", a.recv) || !bind(a.handle, "ncclCommDestroy", a.comm_destroy) ||
        !bind(a.handle, "ncclCommAbort", a.comm_abort) ||
        !bind(a.handle, "ncclCommGetAsyncError", a.comm_get_async_error) ||
        !bind(a.handle, "ncclGetErrorString", a.get_error_string)) {
      a.error = "libnccl.so.2 lacks an entry point kvfabric needs (NCCL 2.7 or newer is required)";
      a.handle = nullptr;
    }
    return a;
  }();
  return api;
}

Status nccl_error(const char* what, NcclResult r) {
  const char* text = nccl().get_error_string != nullptr ? nccl().get_error_string(r) : "?";
  return Status(ErrorCode::kTransportError, std::string(what) + ": " + (text != nullptr ? text : "?") +
                                                " (ncclResult " + std::to_string(r) + ")");
}

// Makes `device` current for NCCL calls made from a thread that may be on another GPU.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) cudaSetDevice(device);
  }
  ~DeviceScope() {
    int now = -1;
    if (previous_ >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace

Status NcclComm::available() {
  if (nccl().handle == nullptr) return Status(ErrorCode::kUnavailable, nccl().error);
  return Status::Ok();
}

Result<std::vector<uint8_t>> NcclComm::unique_id() {
  if (Status s = available(); !s.ok()) return s;
  NcclUniqueId id{};
  if (NcclResult r = nccl().get_unique_id(&id); r != 0) return nccl_error("ncclGetUniqueId", r);
  return std::vector<uint8_t>(id.internal, id.internal + sizeof(id.internal));
}

Result<NcclComm> NcclComm::create(std::span<const uint8_t> id_bytes, int rank, int device) {
  if (Status s = available(); !s.ok()) return s;
  if (id_bytes.size() != sizeof(NcclUniqueId)) {
    return Status(ErrorCode::kMalformed,
                  "an NCCL unique id is 128 bytes, got " + std::to_string(id_bytes.size()));
  }
  if (rank != 0 && rank != 1) return Status(ErrorCode::kInvalidArgument, "NCCL rank must be 0 or 1");
  setenv("NCCL_NVLS_ENABLE", "0", 0);  // never NVLink multicast (see the header)
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
  if (cudaError_t err = cudaSetDevice(device); err != cudaSuccess) {
    cudaGetLastError();
    return Status(ErrorCode::kUnavailable,
                  "cudaSetDevice(" + std::to_string(device) + "): " + cudaGetErrorString(err));
  }
  NcclUniqueId id{};
  std::memcpy(id.internal, id_bytes.data(), sizeof(id.internal));
  void* comm = nullptr;
  NcclResult r = nccl().comm_init_rank(&comm, 2, id, rank);
  if (r != 0) {
    if (previous >= 0 && previous != device) cudaSetDevice(previous);
    return nccl_error("ncclCommInitRank", r);
  }
  NcclComm made(comm, rank, device);
  // NCCL connects a pair of ranks on their first send/recv, inside that call, and waits there for
  // the peer's matching call. The transport enqueues its sends on its progress thread before it
  // tells the receiver to post the receive, so that first connection must not happen there: one
  // byte goes rank 0 -> rank 1 here, while both sides are in create().
  Status warmed = made.warm_up();
  if (previous >= 0 && previous != device) cudaSetDevice(previous);
  if (!warmed.ok()) return warmed;
  return Result<NcclComm>(std::move(made));
}

Status NcclComm::warm_up() {
  void* byte = nullptr;
  cudaStream_t stream = nullptr;
  if (cudaMalloc(&byte, 1) != cudaSuccess ||
      cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) {
    cudaGetLastError();
    if (byte != nullptr) cudaFree(byte);
    return Status(ErrorCode::kOutOfMemory, "NCCL warm-up: no memory for one byte and a stream");
  }
  Status s = rank_ == 0 ? send(byte, 1, stream) : recv(byte, 1, stream);
  if (s.ok() && cudaStreamSynchronize(stream) != cudaSuccess) {
    cudaGetLastError();
    s = Status(ErrorCode::kTransportError, "NCCL warm-up send/recv failed on the GPU");
  }
  cudaStreamDestroy(stream);
  cudaFree(byte);
  if (!s.ok()) return Status(s.code(), "connecting the NCCL ranks: " + s.message());
  return Status::Ok();
}

Status NcclComm::send(const void* data, uint64_t bytes, void* cuda_stream) {
  if (comm_ == nullptr) return Status(ErrorCode::kInvalidArgument, "send on an empty NCCL communicator");
  DeviceScope scope(device_);
  NcclResult r =
      nccl().send(data, bytes, kNcclUint8, 1 - rank_, comm_, static_cast<cudaStream_t>(cuda_stream));
  return r == 0 ? Status::Ok() : nccl_error("ncclSend", r);
}

Status NcclComm::recv(void* data, uint64_t bytes, void* cuda_stream) {
  if (comm_ == nullptr) return Status(ErrorCode::kInvalidArgument, "recv on an empty NCCL communicator");
  DeviceScope scope(device_);
  NcclResult r =
      nccl().recv(data, bytes, kNcclUint8, 1 - rank_, comm_, static_cast<cudaStream_t>(cuda_stream));
  return r == 0 ? Status::Ok() : nccl_error("ncclRecv", r);
}

Status NcclComm::async_error() const {
  if (comm_ == nullptr) return Status::Ok();
  NcclResult state = 0;
  if (NcclResult r = nccl().comm_get_async_error(comm_, &state); r != 0) {
    return nccl_error("ncclCommGetAsyncError", r);
  }
  return state == 0 || state == 7 ? Status::Ok() : nccl_error("NCCL communicator", state);
}

void NcclComm::abort() {
  if (comm_ == nullptr) return;
  nccl().comm_abort(comm_);
  comm_ = nullptr;
}

void NcclComm::reset() {
  if (comm_ == nullptr) return;
  // A communicator whose peer is gone cannot finish a destroy; abort it instead.
  if (async_error().ok()) {
    nccl().comm_destroy(comm_);
  } else {
    nccl().comm_abort(comm_);
  }
  comm_ = nullptr;
}

}  // namespace kvf::gpudirect
