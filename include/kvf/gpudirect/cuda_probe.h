// Run-time CUDA detection: a build with CUDA still runs on machines without a GPU or driver.
// Thread-safe (the answer is computed once).
#pragma once

#include <string>

namespace kvf::gpudirect {

struct CudaAvailability {
  bool built_with_cuda = false;
  int device_count = 0;  // 0 when unavailable
  std::string reason;    // why there are no devices, when device_count == 0
};

const CudaAvailability& cuda_availability();

}  // namespace kvf::gpudirect
