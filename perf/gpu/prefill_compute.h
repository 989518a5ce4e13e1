// PrefillComputeLoad: the GEMMs of one Llama-3-8B transformer layer during the prefill of T tokens,
// enqueued on a caller's CUDA stream. The GPU benchmarks run it next to KV transfers to see what the
// transfers cost a real prefill (and what the prefill costs the transfers): a prefill layer is
// tensor-core bound and streams its weights from HBM, which is what a copy engine competes with.
//
// Per layer, with X the [T, K] bf16 activations and W a [N, K] bf16 weight (as torch's Linear
// stores it, so C = X W^T, cuBLAS "TN"), fp32 accumulation, bf16 out:
//   QKV projection  4096 -> 6144   (32 q heads + 2 x 8 kv heads, head dim 128)
//   attention out   4096 -> 4096
//   MLP gate + up   4096 -> 2 x 14336 (one fused GEMM)
//   MLP down       14336 -> 4096
// The attention core (QK^T, softmax, PV: about 2 T^2 4096 FLOPs causal, ~13 % at T = 8192) and the
// element-wise work (norms, RoPE, SiLU) are left out; layer_flops() counts only the GEMMs above.
// Weights and activations are random bf16 (never zeros: a tensor core multiplying zeros draws less
// power and clocks higher than a real prefill). Every layer reuses one set of weights; at 416 MiB
// per layer it does not fit in L2 either way, so HBM traffic is that of distinct layers.
//
// Thread rules: one thread. The object owns a cuBLAS handle bound to its device; call it from one
// thread at a time (it makes its device current in enqueue_layer). The header needs no CUDA headers.
#pragma once

#include <cstdint>
#include <memory>

#include "kvf/protocol/status.h"

namespace kvf::perf {

class PrefillComputeLoad {
 public:
  // Allocates weights and activations on `device` (about 450 MiB + 84 KiB per token) and fills
  // them with random bf16. `tokens`: 1 .. 262144.
  static Result<std::unique_ptr<PrefillComputeLoad>> create(int device, uint32_t tokens);
  ~PrefillComputeLoad();
  PrefillComputeLoad(const PrefillComputeLoad&) = delete;
  PrefillComputeLoad& operator=(const PrefillComputeLoad&) = delete;

  // Enqueues the four GEMMs of one layer on `stream` (a cudaStream_t of this object's device;
  // nullptr is the legacy default stream). Returns once enqueued, not once run.
  Status enqueue_layer(void* stream);

  // Floating-point operations of one enqueue_layer() (2 per multiply-add).
  double layer_flops() const;
  int device() const { return device_; }
  uint32_t tokens() const { return tokens_; }
  // Device memory this object holds.
  uint64_t device_bytes() const;

 private:
  struct Gpu;  // CUDA/cuBLAS state, defined in prefill_compute.cu
  PrefillComputeLoad(int device, uint32_t tokens);

  int device_;
  uint32_t tokens_;
  std::unique_ptr<Gpu> gpu_;
};

}  // namespace kvf::perf
