#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "kvf/gpudirect/cuda_probe.h"
#include "kvf/gpudirect/segment_copier.h"

namespace kvf::gpudirect {
namespace {

// The most threads a block may have (KernelShape::threads). The default 512: a 64 KiB segment is
// then 8 16-byte vectors per thread, two unrolled rounds of four loads in flight, and four such
// thread blocks fill an SM's 2048 threads.
constexpr int kThreads = 512;

// A failed CUDA call as a Status that names the call and CUDA's own words for the error.
Status cuda_error(cudaError_t err, const char* what) {
  ErrorCode code = ErrorCode::kTransportError;  // the copy path failed: callers fail the transfer
  if (err == cudaErrorMemoryAllocation) code = ErrorCode::kOutOfMemory;
  if (err == cudaErrorNoDevice || err == cudaErrorInvalidDevice || err == cudaErrorInsufficientDriver) {
    code = ErrorCode::kUnavailable;
  }
  return Status(code,
                std::string(what) + ": " + cudaGetErrorString(err) + " (" + cudaGetErrorName(err) + ")");
}

#define KVF_CUDA_TRY(call, what)                                              \
  do {                                                                        \
    const cudaError_t kvf_cuda_err_ = (call);                                 \
    if (kvf_cuda_err_ != cudaSuccess) return cuda_error(kvf_cuda_err_, what); \
  } while (0)

// Makes `device` current for a scope and restores the caller's device afterwards: the caller's
// thread may be driving another GPU, and kernels launch on the current device.
class DeviceScope {
 public:
  DeviceScope() = default;
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  ~DeviceScope() {
    if (switched_) cudaSetDevice(previous_);  // nothing to report to from a destructor
  }
  Status enter(int device) {
    KVF_CUDA_TRY(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      KVF_CUDA_TRY(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
    return Status::Ok();
  }

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// --- the kernel -----------------------------------------------------------------------------------

__device__ __forceinline__ void copy_bytes(const uint8_t* src, uint8_t* dst, uint64_t n) {
  for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

// Consecutive threads take consecutive words (coalesced); each thread keeps four loads in flight
// before it stores, which memory latency (and NVLink latency for peer destinations) needs.
template <unsigned kUnroll, typename V>
__device__ __forceinline__ void copy_words(const V* __restrict__ src, V* __restrict__ dst, uint64_t n) {
  const uint64_t stride = blockDim.x;
  uint64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
    V v[kUnroll];
#pragma unroll
    for (unsigned u = 0; u < kUnroll; ++u) v[u] = src[i + u * stride];
#pragma unroll
    for (unsigned u = 0; u < kUnroll; ++u) dst[i + u * stride] = v[u];
  }
  for (; i < n; i += stride) dst[i] = src[i];
}

// For src and dst with the same address modulo sizeof(V): bytes up to the first V-aligned address,
// then whole Vs, then the tail bytes. Odd sizes (an fp8 layout with odd dimensions) thus still move
// most bytes with wide accesses.
template <unsigned kUnroll, typename V>
__device__ void copy_aligned(const uint8_t* src, uint8_t* dst, uint64_t bytes) {
  constexpr uint64_t kAlign = sizeof(V);
  uint64_t head = (kAlign - reinterpret_cast<uintptr_t>(dst) % kAlign) % kAlign;
  if (head > bytes) head = bytes;
  const uint64_t words = (bytes - head) / kAlign;
  const uint64_t body_end = head + words * kAlign;
  copy_bytes(src, dst, head);
  copy_words<kUnroll>(reinterpret_cast<const V*>(src + head), reinterpret_cast<V*>(dst + head), words);
  copy_bytes(src + body_end, dst + body_end, bytes - body_end);
}

// Grid-stride over segments: each thread block copies whole segments (at most kMaxSegmentBytes
// after splitting), so blocks never coordinate and no synchronization is needed. Bytes only: the
// dtype does not matter.
template <unsigned kUnroll>
__global__ void __launch_bounds__(kThreads)
    copy_segments_kernel(const CopySegment* __restrict__ segments, uint32_t count, uint64_t src_base,
                         uint64_t dst_base) {
  for (uint32_t i = blockIdx.x; i < count; i += gridDim.x) {
    const CopySegment seg = segments[i];
    const uint64_t src_address = src_base + seg.src;  // bases are 0 for absolute segments
    const uint64_t dst_address = dst_base + seg.dst;
    const auto* src = reinterpret_cast<const uint8_t*>(src_address);
    auto* dst = reinterpret_cast<uint8_t*>(dst_address);
    // Equal low bits in src and dst mean one head of bytes aligns both for the wide accesses.
    const uint64_t skew = src_address ^ dst_address;
    if ((skew & 15) == 0) {
      copy_aligned<kUnroll, uint4>(src, dst, seg.bytes);
    } else if ((skew & 7) == 0) {
      copy_aligned<kUnroll, uint64_t>(src, dst, seg.bytes);
    } else if ((skew & 3) == 0) {
      copy_aligned<kUnroll, uint32_t>(src, dst, seg.bytes);
    } else {
      copy_bytes(src, dst, seg.bytes);
    }
  }
}

using CopyKernel = void (*)(const CopySegment*, uint32_t, uint64_t, uint64_t);

CopyKernel kernel_for(uint32_t unroll) {
  switch (unroll) {
    case 4:
      return copy_segments_kernel<4>;
    case 8:
      return copy_segments_kernel<8>;
    case 16:
      return copy_segments_kernel<16>;
    default:
      return nullptr;
  }
}

// Refuses what would fault on the device: a fault is sticky and ends the whole CUDA context.
Status check_segments(std::span<const CopySegment> segments) {
  for (size_t i = 0; i < segments.size(); ++i) {
    const CopySegment& s = segments[i];
    if (s.bytes != 0 && (s.src == 0 || s.dst == 0)) {
      return Status(ErrorCode::kInvalidArgument, "segment [" + std::to_string(i) + "] of " +
                                                     std::to_string(s.bytes) + " bytes has a null " +
                                                     (s.src == 0 ? "source" : "destination"));
    }
  }
  return Status::Ok();
}

struct Slot {
  CopySegment* host = nullptr;    // pinned: the upload below is asynchronous
  CopySegment* device = nullptr;  // what the kernel reads
  cudaEvent_t done = nullptr;     // recorded after the launch that read this slot
};

}  // namespace

struct SegmentCopier::Impl {
  int device = 0;
  uint32_t max_segments = 0;
  int sms = 1;
  KernelShape shape;
  CopyKernel kernel = copy_segments_kernel<4>;
  unsigned grid_limit = 1;  // thread blocks launched at most: resident at once, or shape.max_blocks
  std::vector<Slot> slots;
  uint32_t next = 0;
  uint64_t launches = 0;
  // Reused argument arrays of the batched copy-engine path.
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;

  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  ~Impl() {
    // Errors cannot be reported from here; a failed call leaves that resource to the context's
    // teardown. Waiting on each event first keeps a running kernel from reading freed descriptors.
    DeviceScope scope;
    if (!scope.enter(device).ok()) return;
    for (Slot& s : slots) {
      if (s.done != nullptr) {
        cudaEventSynchronize(s.done);
        cudaEventDestroy(s.done);
      }
      if (s.device != nullptr) cudaFree(s.device);
      if (s.host != nullptr) cudaFreeHost(s.host);
    }
  }
};

SegmentCopier::SegmentCopier(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SegmentCopier::~SegmentCopier() = default;

int SegmentCopier::device() const {
  return impl_->device;
}
int SegmentCopier::multiprocessors() const {
  return impl_->sms;
}
uint32_t SegmentCopier::max_segments_per_launch() const {
  return impl_->max_segments;
}
uint64_t SegmentCopier::kernel_launches() const {
  return impl_->launches;
}

Result<std::unique_ptr<SegmentCopier>> SegmentCopier::create(int device, uint32_t max_segments_per_launch,
                                                             uint32_t slots) {
  if (max_segments_per_launch == 0 || slots == 0) {
    return Status(ErrorCode::kInvalidArgument,
                  "SegmentCopier needs max_segments_per_launch > 0 and slots > 0");
  }
  const CudaAvailability& cuda = cuda_availability();
  if (cuda.device_count == 0) return Status(ErrorCode::kUnavailable, "no CUDA device: " + cuda.reason);
  if (device < 0 || device >= cuda.device_count) {
    return Status(ErrorCode::kUnavailable, "CUDA device " + std::to_string(device) + " does not exist (" +
                                               std::to_string(cuda.device_count) + " present)");
  }
  DeviceScope scope;
  if (Status s = scope.enter(device); !s.ok()) return s;

  auto impl = std::make_unique<Impl>();
  impl->device = device;
  impl->max_segments = max_segments_per_launch;
  KVF_CUDA_TRY(cudaDeviceGetAttribute(&impl->sms, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute");
  std::unique_ptr<SegmentCopier> copier(new SegmentCopier(std::move(impl)));
  if (Status s = copier->set_kernel_shape(KernelShape{}); !s.ok()) return s;
  Impl& m = *copier->impl_;

  const size_t bytes = size_t{max_segments_per_launch} * sizeof(CopySegment);
  m.slots.resize(slots);
  for (Slot& s : m.slots) {  // on failure, ~Impl frees what was made so far
    KVF_CUDA_TRY(cudaMallocHost(reinterpret_cast<void**>(&s.host), bytes),
                 "cudaMallocHost (descriptor staging)");
    KVF_CUDA_TRY(cudaMalloc(reinterpret_cast<void**>(&s.device), bytes), "cudaMalloc (descriptors)");
    KVF_CUDA_TRY(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  }
  return std::move(copier);  // nvcc does not apply C++20 implicit move here
}

Status SegmentCopier::set_kernel_shape(const KernelShape& shape) {
  const CopyKernel kernel = kernel_for(shape.unroll);
  if (kernel == nullptr || (shape.threads != 128 && shape.threads != 256 && shape.threads != 512)) {
    return Status(ErrorCode::kInvalidArgument,
                  "kernel shape: threads must be 128, 256 or 512 and unroll 4, 8 or "
                  "16 (got " +
                      std::to_string(shape.threads) + ", " + std::to_string(shape.unroll) + ")");
  }
  Impl& m = *impl_;
  DeviceScope scope;
  if (Status s = scope.enter(m.device); !s.ok()) return s;
  int per_sm = 0;
  KVF_CUDA_TRY(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, static_cast<int>(shape.threads), 0),
      "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  unsigned limit = static_cast<unsigned>(std::max(1, m.sms * per_sm));
  if (shape.max_blocks != 0) limit = std::min(limit, shape.max_blocks);
  m.shape = shape;
  m.kernel = kernel;
  m.grid_limit = limit;
  return Status::Ok();
}

KernelShape SegmentCopier::kernel_shape() const {
  return impl_->shape;
}

Status SegmentCopier::copy(std::span<const CopySegment> segments, void* cuda_stream) {
  if (Status s = check_segments(segments); !s.ok()) return s;
  Impl& m = *impl_;
  DeviceScope scope;
  if (Status s = scope.enter(m.device); !s.ok()) return s;
  const auto stream = static_cast<cudaStream_t>(cuda_stream);

  // Walk the segments once, cutting them into pieces of at most kMaxSegmentBytes straight into the
  // slot's pinned buffer (no intermediate vector on the hot path).
  size_t seg = 0;
  uint64_t offset = 0;  // into segments[seg]
  for (;;) {
    while (seg < segments.size() && segments[seg].bytes == 0) ++seg;
    if (seg == segments.size()) break;
    Slot& slot = m.slots[m.next];
    m.next = (m.next + 1) % static_cast<uint32_t>(m.slots.size());
    // The launch that last used this slot must have read its descriptors before they change.
    KVF_CUDA_TRY(cudaEventSynchronize(slot.done), "cudaEventSynchronize (descriptor slot)");
    uint32_t n = 0;
    while (n < m.max_segments && seg < segments.size()) {
      const CopySegment& s = segments[seg];
      if (s.bytes == 0) {
        ++seg;
        continue;
      }
      const uint64_t len = std::min(kMaxSegmentBytes, s.bytes - offset);
      slot.host[n++] = CopySegment{s.src + offset, s.dst + offset, len};
      offset += len;
      if (offset == s.bytes) {
        ++seg;
        offset = 0;
      }
    }
    KVF_CUDA_TRY(cudaMemcpyAsync(slot.device, slot.host, size_t{n} * sizeof(CopySegment),
                                 cudaMemcpyHostToDevice, stream),
                 "cudaMemcpyAsync (descriptor upload)");
    m.kernel<<<std::min<unsigned>(n, m.grid_limit), m.shape.threads, 0, stream>>>(slot.device, n, 0, 0);
    const cudaError_t launched = cudaGetLastError();
    // Recorded even after a failed launch: the upload above may still be reading slot.host.
    const cudaError_t recorded = cudaEventRecord(slot.done, stream);
    KVF_CUDA_TRY(launched, "copy_segments_kernel launch");
    KVF_CUDA_TRY(recorded, "cudaEventRecord (descriptor slot)");
    ++m.launches;
  }
  return Status::Ok();
}

void ResidentSegments::reset() {
  if (segments_ == nullptr) return;
  DeviceScope scope;
  if (scope.enter(device_).ok()) cudaFree(segments_);  // nothing to report to from a destructor
  segments_ = nullptr;
}

Result<ResidentSegments> SegmentCopier::make_resident(std::span<const CopySegment> relative) {
  Impl& m = *impl_;
  std::vector<CopySegment> pieces;
  pieces.reserve(relative.size());
  uint64_t bytes = 0;
  for (const CopySegment& s : relative) {
    for (uint64_t offset = 0; offset < s.bytes; offset += kMaxSegmentBytes) {
      const uint64_t len = std::min(kMaxSegmentBytes, s.bytes - offset);
      pieces.push_back(CopySegment{s.src + offset, s.dst + offset, len});
    }
    bytes += s.bytes;
  }
  if (pieces.size() > m.max_segments) {
    return Status(ErrorCode::kInvalidArgument, std::to_string(pieces.size()) + " pieces exceed the " +
                                                   std::to_string(m.max_segments) + " of one launch");
  }
  DeviceScope scope;
  if (Status s = scope.enter(m.device); !s.ok()) return s;
  ResidentSegments r;
  r.device_ = m.device;
  r.count_ = static_cast<uint32_t>(pieces.size());
  r.bytes_ = bytes;
  if (pieces.empty()) return std::move(r);  // nvcc does not apply C++20 implicit move here
  KVF_CUDA_TRY(cudaMalloc(&r.segments_, pieces.size() * sizeof(CopySegment)),
               "cudaMalloc (resident segments)");
  KVF_CUDA_TRY(
      cudaMemcpy(r.segments_, pieces.data(), pieces.size() * sizeof(CopySegment), cudaMemcpyHostToDevice),
      "cudaMemcpy (resident segments)");
  return std::move(r);
}

Status SegmentCopier::copy_resident(const ResidentSegments& segments, uint64_t src_base, uint64_t dst_base,
                                    void* cuda_stream) {
  if (segments.count_ == 0) return Status::Ok();
  if (src_base == 0 || dst_base == 0) {
    return Status(ErrorCode::kInvalidArgument, "copy_resident: a zero base would address nothing valid");
  }
  if (segments.device_ != impl_->device) {
    return Status(ErrorCode::kInvalidArgument, "copy_resident: segments made for GPU " +
                                                   std::to_string(segments.device_) + ", copier on GPU " +
                                                   std::to_string(impl_->device));
  }
  Impl& m = *impl_;
  DeviceScope scope;
  if (Status s = scope.enter(m.device); !s.ok()) return s;
  m.kernel<<<std::min<unsigned>(segments.count_, m.grid_limit), m.shape.threads, 0,
             static_cast<cudaStream_t>(cuda_stream)>>>(static_cast<const CopySegment*>(segments.segments_),
                                                       segments.count_, src_base, dst_base);
  KVF_CUDA_TRY(cudaGetLastError(), "copy_segments_kernel launch (resident)");
  ++m.launches;
  return Status::Ok();
}

Status SegmentCopier::copy_with_copy_engines(std::span<const CopySegment> segments, void* cuda_stream,
                                             bool batched) {
  if (Status s = check_segments(segments); !s.ok()) return s;
  Impl& m = *impl_;
  DeviceScope scope;
  if (Status s = scope.enter(m.device); !s.ok()) return s;
  const auto stream = static_cast<cudaStream_t>(cuda_stream);
  auto as_ptr = [](uint64_t a) { return reinterpret_cast<void*>(static_cast<uintptr_t>(a)); };

#if CUDART_VERSION >= 13000
  // The batch API refuses the legacy default stream; such callers get the per-copy loop below.
  if (stream != nullptr && batched) {
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;  // sources may be written earlier on the stream
    size_t attr_index = 0;                                 // one attribute set for every copy
    size_t seg = 0;
    while (seg < segments.size()) {
      m.dsts.clear();
      m.srcs.clear();
      m.sizes.clear();
      for (; seg < segments.size() && m.sizes.size() < m.max_segments; ++seg) {
        const CopySegment& s = segments[seg];
        if (s.bytes == 0) continue;  // the batch API rejects empty copies
        m.dsts.push_back(as_ptr(s.dst));
        m.srcs.push_back(as_ptr(s.src));
        m.sizes.push_back(s.bytes);
      }
      if (m.sizes.empty()) break;
      KVF_CUDA_TRY(cudaMemcpyBatchAsync(m.dsts.data(), m.srcs.data(), m.sizes.data(), m.sizes.size(), &attr,
                                        &attr_index, 1, stream),
                   "cudaMemcpyBatchAsync");
    }
    return Status::Ok();
  }
#endif
  for (const CopySegment& s : segments) {
    if (s.bytes == 0) continue;
    KVF_CUDA_TRY(cudaMemcpyAsync(as_ptr(s.dst), as_ptr(s.src), s.bytes, cudaMemcpyDefault, stream),
                 "cudaMemcpyAsync");
  }
  return Status::Ok();
}

}  // namespace kvf::gpudirect
