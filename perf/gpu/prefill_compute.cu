#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "prefill_compute.h"

namespace kvf::perf {
namespace {

// One GEMM of the layer: C[T, n] = X[T, k] W[n, k]^T.
struct GemmShape {
  int n;
  int k;
};
// Llama-3-8B: hidden 4096, 32 q heads + 8 kv heads of dim 128, MLP intermediate 14336.
constexpr GemmShape kLayerGemms[] = {
    {4096 + 2 * 8 * 128, 4096},  // QKV projection
    {4096, 4096},                // attention output
    {2 * 14336, 4096},           // MLP gate + up, fused as engines do
    {4096, 14336},               // MLP down
};
constexpr int kMaxK = 14336;
constexpr int kMaxN = 2 * 14336;
constexpr uint32_t kMaxTokens = 262144;
// Hopper's cuBLAS wants 32 MiB of workspace; an explicit one keeps it the same on every stream
// (cublasSetStream falls back to the library's default pool).
constexpr size_t kWorkspaceBytes = 32u << 20;

uint64_t weight_elements() {
  uint64_t n = 0;
  for (const auto& g : kLayerGemms) n += static_cast<uint64_t>(g.n) * static_cast<uint64_t>(g.k);
  return n;
}

Status cuda_failure(cudaError_t err, const char* call) {
  return Status(err == cudaErrorMemoryAllocation ? ErrorCode::kOutOfMemory : ErrorCode::kInternal,
                std::string("prefill compute: ") + call + " failed: " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ")");
}

Status cublas_failure(cublasStatus_t status, const char* call) {
  return Status(status == CUBLAS_STATUS_ALLOC_FAILED ? ErrorCode::kOutOfMemory : ErrorCode::kInternal,
                std::string("prefill compute: ") + call + " failed: " + cublasGetStatusName(status) + " (" +
                    cublasGetStatusString(status) + ")");
}

#define KVF_PREFILL_CUDA(call)                                  \
  do {                                                          \
    if (cudaError_t kvf_err = (call); kvf_err != cudaSuccess) { \
      return cuda_failure(kvf_err, #call);                      \
    }                                                           \
  } while (0)

#define KVF_PREFILL_CUBLAS(call)                                           \
  do {                                                                     \
    if (cublasStatus_t kvf_st = (call); kvf_st != CUBLAS_STATUS_SUCCESS) { \
      return cublas_failure(kvf_st, #call);                                \
    }                                                                      \
  } while (0)

__device__ uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in [-scale, scale], with |v| >= scale / 64 so that no element is zero (or nearly so):
// the load must keep the tensor cores as busy, and as hot, as real weights and activations do.
__global__ void fill_random_bf16(__nv_bfloat16* out, uint64_t n, uint64_t seed, float scale) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    uint64_t z = splitmix64(seed ^ (i * 0xD1B54A32D192ED03ull));
    float magnitude = (1.0f / 64) + (63.0f / 64) * static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
    float v = (z & 1) != 0 ? magnitude : -magnitude;
    out[i] = __float2bfloat16(v * scale);
  }
}

Status fill(__nv_bfloat16* out, uint64_t n, uint64_t seed, float scale) {
  fill_random_bf16<<<1024, 256>>>(out, n, seed, scale);
  KVF_PREFILL_CUDA(cudaGetLastError());
  return Status::Ok();
}

}  // namespace

struct PrefillComputeLoad::Gpu {
  int device = 0;
  cublasHandle_t handle = nullptr;
  __nv_bfloat16* weights = nullptr;  // the four weights back to back, in kLayerGemms order
  __nv_bfloat16* x = nullptr;        // [T, kMaxK] activations, read as [T, k] by each GEMM
  __nv_bfloat16* out = nullptr;      // [T, kMaxN] outputs, written as [T, n] by each GEMM
  void* workspace = nullptr;
  uint64_t bytes = 0;
  cudaStream_t bound_stream = nullptr;
  bool stream_bound = false;

  ~Gpu() {
    // Teardown errors are ignored: there is no caller left to tell, and after a failed run they
    // would only repeat the error that ended it.
    if (cudaSetDevice(device) != cudaSuccess) return;
    if (handle != nullptr) cublasDestroy(handle);
    cudaFree(weights);
    cudaFree(x);
    cudaFree(out);
    cudaFree(workspace);
  }
};

PrefillComputeLoad::PrefillComputeLoad(int device, uint32_t tokens)
    : device_(device), tokens_(tokens), gpu_(std::make_unique<Gpu>()) {
  gpu_->device = device;
}

PrefillComputeLoad::~PrefillComputeLoad() = default;

Result<std::unique_ptr<PrefillComputeLoad>> PrefillComputeLoad::create(int device, uint32_t tokens) {
  if (tokens == 0 || tokens > kMaxTokens) {
    return Status(ErrorCode::kInvalidArgument, "prefill compute: tokens must be 1.." +
                                                   std::to_string(kMaxTokens) + ", got " +
                                                   std::to_string(tokens));
  }
  int count = 0;
  KVF_PREFILL_CUDA(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) {
    return Status(ErrorCode::kInvalidArgument, "prefill compute: no GPU " + std::to_string(device) +
                                                   " (found " + std::to_string(count) + ")");
  }
  std::unique_ptr<PrefillComputeLoad> load(new PrefillComputeLoad(device, tokens));
  Gpu& g = *load->gpu_;
  KVF_PREFILL_CUDA(cudaSetDevice(device));
  const uint64_t w_elems = weight_elements();
  const uint64_t x_elems = static_cast<uint64_t>(tokens) * kMaxK;
  const uint64_t out_elems = static_cast<uint64_t>(tokens) * kMaxN;
  KVF_PREFILL_CUDA(cudaMalloc(&g.weights, w_elems * sizeof(__nv_bfloat16)));
  KVF_PREFILL_CUDA(cudaMalloc(&g.x, x_elems * sizeof(__nv_bfloat16)));
  KVF_PREFILL_CUDA(cudaMalloc(&g.out, out_elems * sizeof(__nv_bfloat16)));
  KVF_PREFILL_CUDA(cudaMalloc(&g.workspace, kWorkspaceBytes));
  g.bytes = (w_elems + x_elems + out_elems) * sizeof(__nv_bfloat16) + kWorkspaceBytes;
  // Weights at the scale of a trained model's (std ~0.02), activations around 1; the outputs are
  // never fed back, so nothing grows towards bf16's overflow over many layers.
  if (Status s = fill(g.weights, w_elems, 0x5eed0001, 0.035f); !s.ok()) return s;
  if (Status s = fill(g.x, x_elems, 0x5eed0002, 1.0f); !s.ok()) return s;
  if (Status s = fill(g.out, out_elems, 0x5eed0003, 1.0f); !s.ok()) return s;
  KVF_PREFILL_CUBLAS(cublasCreate(&g.handle));
  // The fills ran on the legacy default stream; the caller's stream may not synchronize with it.
  KVF_PREFILL_CUDA(cudaDeviceSynchronize());
  // Spelled out: nvcc's front end does not apply C++20's implicit move to a converting return.
  return Result<std::unique_ptr<PrefillComputeLoad>>(std::move(load));
}

Status PrefillComputeLoad::enqueue_layer(void* stream) {
  Gpu& g = *gpu_;
  KVF_PREFILL_CUDA(cudaSetDevice(device_));
  auto s = static_cast<cudaStream_t>(stream);
  if (!g.stream_bound || g.bound_stream != s) {
    KVF_PREFILL_CUBLAS(cublasSetStream(g.handle, s));
    KVF_PREFILL_CUBLAS(cublasSetWorkspace(g.handle, g.workspace, kWorkspaceBytes));
    g.bound_stream = s;
    g.stream_bound = true;
  }
  const float alpha = 1.0f;
  const float beta = 0.0f;
  const int t = static_cast<int>(tokens_);
  const __nv_bfloat16* w = g.weights;
  for (const auto& gemm : kLayerGemms) {
    // Column-major view: out^T[n, T] = W[n, k] (stored row-major, so transposed) x^T[k, T].
    KVF_PREFILL_CUBLAS(cublasGemmEx(g.handle, CUBLAS_OP_T, CUBLAS_OP_N, gemm.n, t, gemm.k, &alpha, w,
                                    CUDA_R_16BF, gemm.k, g.x, CUDA_R_16BF, gemm.k, &beta, g.out, CUDA_R_16BF,
                                    gemm.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    w += static_cast<size_t>(gemm.n) * static_cast<size_t>(gemm.k);
  }
  return Status::Ok();
}

double PrefillComputeLoad::layer_flops() const {
  double flops = 0;
  for (const auto& g : kLayerGemms) flops += 2.0 * static_cast<double>(tokens_) * g.n * g.k;
  return flops;
}

uint64_t PrefillComputeLoad::device_bytes() const {
  return gpu_->bytes;
}

}  // namespace kvf::perf
