#include <cuda_runtime.h>
#include <dlfcn.h>

#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "kvf/gpudirect/nccl_comm.h"

namespace kvf::gpudirect {
namespace {

// The few NCCL entry points used, with NCCL's stable C ABI (nccl.h is not needed to build).
struct NcclUniqueId {
  char internal[128];
};
using NcclResult = int;  // ncclResult_t: 0 success, 7 in progress
constexpr NcclResult kNcclInProgress = 7;
constexpr int kNcclUint8 = 1;  // ncclUint8

// The head of ncclConfig_t as NCCL 2.14 defined it. NCCL reads a config by its `size` and
// `version`, so this older, shorter form is understood by every later NCCL; only `blocking` is set.
struct NcclConfig214 {
  size_t size = sizeof(NcclConfig214);
  unsigned int magic = 0xcafebeef;
  unsigned int version = 21403;    // NCCL_VERSION(2, 14, 3)
  int blocking = 0;                // non-blocking: init and connect can be waited on with a deadline
  int cga_cluster_size = INT_MIN;  // NCCL_CONFIG_UNDEF_INT
  int min_ctas = INT_MIN;
  int max_ctas = INT_MIN;
  const char* net_name = nullptr;
};

struct NcclApi {
  void* handle = nullptr;
  std::string error;
  NcclResult (*get_unique_id)(NcclUniqueId*) = nullptr;
  NcclResult (*comm_init_rank_config)(void**, int, NcclUniqueId, int, NcclConfig214*) = nullptr;
  NcclResult (*send)(const void*, size_t, int, int, void*, cudaStream_t) = nullptr;
  NcclResult (*recv)(void*, size_t, int, int, void*, cudaStream_t) = nullptr;
  NcclResult (*group_start)() = nullptr;
  NcclResult (*group_end)() = nullptr;
  NcclResult (*comm_destroy)(void*) = nullptr;
  NcclResult (*comm_finalize)(void*) = nullptr;
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
        !bind(a.handle, "ncclCommInitRankConfig", a.comm_init_rank_config) ||
        !bind(a.handle, "ncclSend", a.send) || !bind(a.handle, "ncclRecv", a.recv) ||
        !bind(a.handle, "ncclGroupStart", a.group_start) || !bind(a.handle, "ncclGroupEnd", a.group_end) ||
        !bind(a.handle, "ncclCommDestroy", a.comm_destroy) ||
        !bind(a.handle, "ncclCommFinalize", a.comm_finalize) ||
        !bind(a.handle, "ncclCommAbort", a.comm_abort) ||
        !bind(a.handle, "ncclCommGetAsyncError", a.comm_get_async_error) ||
        !bind(a.handle, "ncclGetErrorString", a.get_error_string)) {
      a.error = "libnccl.so.2 lacks an entry point kvfabric needs (NCCL 2.14 or newer is required)";
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

// Waits while a non-blocking communicator's last call is still in progress: its final result.
NcclResult settle(void* comm, std::chrono::steady_clock::time_point deadline, const std::atomic<bool>* stop,
                  bool* gave_up) {
  *gave_up = false;
  const auto started = std::chrono::steady_clock::now();
  for (;;) {
    NcclResult state = 0;
    if (NcclResult r = nccl().comm_get_async_error(comm, &state); r != 0) return r;
    if (state != kNcclInProgress) return state;
    const auto now = std::chrono::steady_clock::now();
    if ((stop != nullptr && stop->load()) || now >= deadline) {
      *gave_up = true;
      return kNcclInProgress;
    }
    // An enqueue (send/recv on the data path) settles within microseconds: spin for it. Joining
    // and closing take milliseconds to seconds: sleep between polls once it is clearly one of those.
    if (now - started < std::chrono::milliseconds(2)) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
}

Status gave_up_status(const char* what, const std::atomic<bool>* stop) {
  if (stop != nullptr && stop->load()) {
    return Status(ErrorCode::kAborted, std::string(what) + ": given up, this side is shutting down");
  }
  return Status(ErrorCode::kTimeout, std::string(what) + ": the peer did not join in time");
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
  // Two ids: one to join with (non-blocking, so a peer that never comes can be given up on), one
  // for the blocking communicator the data path runs on (see create()).
  std::vector<uint8_t> ids;
  for (int i = 0; i < 2; ++i) {
    NcclUniqueId id{};
    if (NcclResult r = nccl().get_unique_id(&id); r != 0) return nccl_error("ncclGetUniqueId", r);
    ids.insert(ids.end(), id.internal, id.internal + sizeof(id.internal));
  }
  return ids;
}

Result<NcclComm> NcclComm::create(std::span<const uint8_t> id_bytes, int rank, int device,
                                  std::chrono::milliseconds timeout, const std::atomic<bool>* stop) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  if (Status s = available(); !s.ok()) return s;
  if (id_bytes.size() != sizeof(NcclUniqueId) && id_bytes.size() != 2 * sizeof(NcclUniqueId)) {
    return Status(ErrorCode::kMalformed, "an NCCL communicator id is one or two 128-byte unique ids, got " +
                                             std::to_string(id_bytes.size()) + " bytes");
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
  NcclConfig214 config;
  NcclResult r = nccl().comm_init_rank_config(&comm, 2, id, rank, &config);
  bool gave_up = false;
  if (r == kNcclInProgress && comm != nullptr) r = settle(comm, deadline, stop, &gave_up);
  if (r != 0) {
    if (comm != nullptr) nccl().comm_abort(comm);
    if (previous >= 0 && previous != device) cudaSetDevice(previous);
    if (gave_up) return gave_up_status("ncclCommInitRankConfig", stop);
    return nccl_error("ncclCommInitRankConfig", r);
  }
  NcclComm made(comm, rank, device, false);
  // NCCL connects a pair of ranks on their first send/recv, inside that call, and waits there for
  // the peer's matching call. The transport enqueues its sends on its progress thread before it
  // tells the receiver to post the receive, so that first connection must not happen there: one
  // byte goes rank 0 -> rank 1 here, while both sides are in create().
  Status warmed = made.warm_up(deadline, stop);
  if (warmed.ok() && id_bytes.size() == 2 * sizeof(NcclUniqueId)) {
    auto twin = join_blocking(id_bytes.subspan(sizeof(NcclUniqueId)), rank, device, deadline, stop);
    if (twin.ok()) {
      (void)made.close(std::chrono::seconds(10));  // the peer closes its own in step
      made = std::move(twin.value());
    } else {
      warmed = twin.status();
    }
  }
  if (previous >= 0 && previous != device) cudaSetDevice(previous);
  if (!warmed.ok()) return warmed;
  return Result<NcclComm>(std::move(made));
}

Result<NcclComm> NcclComm::join_blocking(std::span<const uint8_t> id_bytes, int rank, int device,
                                         std::chrono::steady_clock::time_point deadline,
                                         const std::atomic<bool>* stop) {
  // A non-blocking communicator launches every group (each send and receive is one) from a thread
  // NCCL creates for it: ~100 us a call on 2x H200, which held the nccl path to 0.3x of raw NCCL.
  // So the data path runs on a second, blocking communicator, joined once the first has shown the
  // peer is there. A blocking join cannot be given up on, so it runs on a thread of its own that
  // is left behind (and closes what it made) if the peer vanishes in between.
  struct Joining {
    std::mutex mutex;
    std::condition_variable changed;
    bool done = false, abandoned = false;
    Result<NcclComm> made = Status(ErrorCode::kInternal, "not joined");
  };
  auto joining = std::make_shared<Joining>();
  NcclUniqueId id{};
  std::memcpy(id.internal, id_bytes.data(), sizeof(id.internal));
  std::thread([joining, id, rank, device] {
    Result<NcclComm> made = Status(ErrorCode::kInternal, "not joined");
    if (cudaSetDevice(device) != cudaSuccess) {
      cudaGetLastError();
      made = Status(ErrorCode::kUnavailable, "cudaSetDevice(" + std::to_string(device) + ") failed");
    } else {
      void* comm = nullptr;
      NcclConfig214 config;
      config.blocking = 1;
      if (NcclResult r = nccl().comm_init_rank_config(&comm, 2, id, rank, &config); r != 0) {
        if (comm != nullptr) nccl().comm_abort(comm);
        made = nccl_error("ncclCommInitRankConfig (blocking)", r);
      } else {
        NcclComm c(comm, rank, device, true);
        Status w = c.warm_up(std::chrono::steady_clock::now() + std::chrono::hours(1), nullptr);
        if (w.ok()) {
          made = std::move(c);
        } else {
          made = w;
        }
      }
    }
    std::lock_guard lock(joining->mutex);
    if (joining->abandoned) {
      if (made.ok()) made->abort();
      return;
    }
    joining->made = std::move(made);
    joining->done = true;
    joining->changed.notify_all();
  }).detach();
  std::unique_lock lock(joining->mutex);
  while (!joining->done) {
    if ((stop != nullptr && stop->load()) || std::chrono::steady_clock::now() >= deadline) {
      joining->abandoned = true;
      return gave_up_status("joining the blocking NCCL communicator", stop);
    }
    joining->changed.wait_for(lock, std::chrono::milliseconds(10));
  }
  return std::move(joining->made);
}

Status NcclComm::warm_up(std::chrono::steady_clock::time_point deadline, const std::atomic<bool>* stop) {
  void* byte = nullptr;
  cudaStream_t stream = nullptr;
  if (cudaMalloc(&byte, 1) != cudaSuccess ||
      cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) {
    cudaGetLastError();
    if (byte != nullptr) cudaFree(byte);
    return Status(ErrorCode::kOutOfMemory, "NCCL warm-up: no memory for one byte and a stream");
  }
  Status s = rank_ == 0 ? send(byte, 1, stream) : recv(byte, 1, stream);
  // The byte lands only once the peer posted its side: poll, so a peer that never does cannot hold
  // this thread (aborting the communicator ends the waiting kernel).
  while (s.ok()) {
    cudaError_t q = cudaStreamQuery(stream);
    if (q == cudaSuccess) break;
    if (q != cudaErrorNotReady) {
      cudaGetLastError();
      s = Status(ErrorCode::kTransportError, "NCCL warm-up send/recv failed on the GPU");
    } else if ((stop != nullptr && stop->load()) || std::chrono::steady_clock::now() >= deadline) {
      s = gave_up_status("connecting the NCCL ranks", stop);
      abort();
      cudaStreamSynchronize(stream);
      cudaGetLastError();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
  cudaStreamDestroy(stream);
  cudaFree(byte);
  if (!s.ok() && s.message().rfind("connecting", 0) != 0) {
    return Status(s.code(), "connecting the NCCL ranks: " + s.message());
  }
  return s;
}

Status NcclComm::send(const void* data, uint64_t bytes, void* cuda_stream) {
  if (comm_ == nullptr) return Status(ErrorCode::kInvalidArgument, "send on an empty NCCL communicator");
  DeviceScope scope(device_);
  NcclResult r =
      nccl().send(data, bytes, kNcclUint8, 1 - rank_, comm_, static_cast<cudaStream_t>(cuda_stream));
  return finish_enqueue("ncclSend", r);
}

Status NcclComm::recv(void* data, uint64_t bytes, void* cuda_stream) {
  if (comm_ == nullptr) return Status(ErrorCode::kInvalidArgument, "recv on an empty NCCL communicator");
  DeviceScope scope(device_);
  NcclResult r =
      nccl().recv(data, bytes, kNcclUint8, 1 - rank_, comm_, static_cast<cudaStream_t>(cuda_stream));
  return finish_enqueue("ncclRecv", r);
}

Status NcclComm::send(std::span<const Part> parts, void* cuda_stream) {
  if (parts.empty()) return Status(ErrorCode::kInvalidArgument, "a grouped NCCL send of no parts");
  if (parts.size() == 1) return send(parts[0].data, parts[0].bytes, cuda_stream);
  if (comm_ == nullptr) return Status(ErrorCode::kInvalidArgument, "send on an empty NCCL communicator");
  DeviceScope scope(device_);
  if (NcclResult r = nccl().group_start(); r != 0) return nccl_error("ncclGroupStart", r);
  NcclResult first = 0;
  for (const Part& part : parts) {
    NcclResult r = nccl().send(part.data, part.bytes, kNcclUint8, 1 - rank_, comm_,
                               static_cast<cudaStream_t>(cuda_stream));
    if (r != 0 && first == 0) first = r;
  }
  // The group is ended even after a failed call (NCCL requires every start to be ended).
  NcclResult end = nccl().group_end();
  if (first != 0) return nccl_error("ncclSend", first);
  return finish_enqueue("ncclGroupEnd (sends)", end);
}

Status NcclComm::recv(void* data, std::span<const uint64_t> sizes, void* cuda_stream) {
  if (sizes.empty()) return Status(ErrorCode::kInvalidArgument, "a grouped NCCL receive of no parts");
  if (sizes.size() == 1) return recv(data, sizes[0], cuda_stream);
  if (comm_ == nullptr) return Status(ErrorCode::kInvalidArgument, "recv on an empty NCCL communicator");
  DeviceScope scope(device_);
  if (NcclResult r = nccl().group_start(); r != 0) return nccl_error("ncclGroupStart", r);
  NcclResult first = 0;
  auto* at = static_cast<uint8_t*>(data);
  for (uint64_t bytes : sizes) {
    NcclResult r =
        nccl().recv(at, bytes, kNcclUint8, 1 - rank_, comm_, static_cast<cudaStream_t>(cuda_stream));
    if (r != 0 && first == 0) first = r;
    at += bytes;
  }
  NcclResult end = nccl().group_end();
  if (first != 0) return nccl_error("ncclRecv", first);
  return finish_enqueue("ncclGroupEnd (receives)", end);
}

Status NcclComm::finish_enqueue(const char* what, int result) {
  // A non-blocking communicator answers "in progress" while it still enqueues (it connects the
  // ranks on first use; create() did that already, so this is short). The next call on the
  // communicator must wait for it.
  if (result == kNcclInProgress) {
    bool gave_up = false;
    result = settle(comm_, std::chrono::steady_clock::now() + std::chrono::seconds(30), nullptr, &gave_up);
    if (gave_up) return gave_up_status(what, nullptr);
  }
  return result == 0 ? Status::Ok() : nccl_error(what, result);
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

Status NcclComm::close(std::chrono::milliseconds timeout) {
  if (comm_ == nullptr) return Status::Ok();
  DeviceScope scope(device_);
  if (blocking_) {
    // A blocking finalize waits for the peer with no deadline. The transport closes a lane only
    // once its sends and receives are done (StagingClosed), so nothing is left to flush: abort
    // frees this side's resources without waiting on the peer.
    nccl().comm_abort(comm_);
    comm_ = nullptr;
    return Status::Ok();
  }
  // Finalize flushes and meets the peer (non-blocking here, so it can be waited on with a
  // deadline); after it, destroy only frees what is ours. A peer that is gone or never closes
  // leaves abort, which needs nobody.
  bool gave_up = false;
  NcclResult r = nccl().comm_finalize(comm_);
  if (r == 0 || r == kNcclInProgress)
    r = settle(comm_, std::chrono::steady_clock::now() + timeout, nullptr, &gave_up);
  if (r == 0) {
    nccl().comm_destroy(comm_);
    comm_ = nullptr;
    return Status::Ok();
  }
  nccl().comm_abort(comm_);
  comm_ = nullptr;
  if (gave_up)
    return Status(ErrorCode::kTimeout,
                  "closing the NCCL communicator: the peer did not close in time; aborted");
  return nccl_error("closing the NCCL communicator (aborted)", r);
}

void NcclComm::reset() {
  (void)close(std::chrono::seconds(10));
}

}  // namespace kvf::gpudirect
