#include "cuda/gpu_weight_init.cuh"

namespace kvf::engines::gpu {
namespace {

constexpr uint32_t kThreads = 256;
constexpr uint32_t kMaxBlocks = 8192;

uint32_t blocks_for(uint64_t elements) {
  const uint64_t blocks = (elements + kThreads - 1) / kThreads;
  return static_cast<uint32_t>(blocks < kMaxBlocks ? (blocks == 0 ? 1 : blocks) : kMaxBlocks);
}

// ReferenceWeights' symmetric(): the top 24 bits scaled by 2^-23, minus 1: exact in a float.
__device__ float symmetric(uint64_t z) {
  return __fsub_rn(__fmul_rn(static_cast<float>(static_cast<uint32_t>(z >> 40)), 0x1.0p-23f), 1.0f);
}

__global__ void fill_uniform_kernel(__nv_bfloat16* dst, uint64_t rows, uint64_t cols, uint64_t ld,
                                    uint64_t key, float scale) {
  const uint64_t total = rows * cols;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t e = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const uint64_t at = cols == ld ? e : (e / cols) * ld + e % cols;  // the division only for slices
    dst[at] = __float2bfloat16_rn(__fmul_rn(symmetric(splitmix64_at(key, e)), scale));
  }
}

__global__ void fill_norm_kernel(float* dst, uint64_t count, uint64_t key) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t e = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += stride) {
    // (u * 0.1) + 1, each step rounded as the CPU does it (no FMA contraction).
    dst[e] = __fadd_rn(__fmul_rn(symmetric(splitmix64_at(key, e)), 0.1f), 1.0f);
  }
}

}  // namespace

void fill_uniform_bf16(__nv_bfloat16* dst, uint64_t rows, uint64_t cols, uint64_t ld, uint64_t key,
                       float scale, cudaStream_t stream) {
  fill_uniform_kernel<<<blocks_for(rows * cols), kThreads, 0, stream>>>(dst, rows, cols, ld, key, scale);
}

void fill_norm(float* dst, uint64_t count, uint64_t key, cudaStream_t stream) {
  fill_norm_kernel<<<blocks_for(count), kThreads, 0, stream>>>(dst, count, key);
}

}  // namespace kvf::engines::gpu
