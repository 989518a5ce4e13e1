// Weights of the GPU reference engine generated on the GPU, element by element, with the values
// ReferenceWeights::generate draws on the CPU: tensor t (counted from 1 in ReferenceWeights' order)
// is the SplitMix64 stream seeded with tensor_key(seed, t), and its element e (row-major, [in][out])
// is that stream's value e, which splitmix64_at computes directly. So generation is parallel (the
// 8B shape's 8 billion elements in milliseconds) and every process gets the same bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kvf::engines::gpu {

// Value i (from 0) of the SplitMix64 stream whose state starts at `key`.
__host__ __device__ inline uint64_t splitmix64_at(uint64_t key, uint64_t i) {
  uint64_t z = key + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// ReferenceWeights' stream seed of tensor `index` (from 1).
inline uint64_t tensor_key(uint64_t seed, uint64_t index) {
  return splitmix64_at(seed ^ (0xD1B54A32D192ED03ull * index), 0);
}

// A [rows][cols] tensor of uniform [-1, 1) * scale values, rounded to bf16, into dst with rows
// `ld` elements apart (a slice of a fused matrix when ld > cols).
void fill_uniform_bf16(__nv_bfloat16* dst, uint64_t rows, uint64_t cols, uint64_t ld, uint64_t key,
                       float scale, cudaStream_t stream);

// `count` norm weights 1 + uniform [-0.1, 0.1), fp32.
void fill_norm(float* dst, uint64_t count, uint64_t key, cudaStream_t stream);

}  // namespace kvf::engines::gpu
