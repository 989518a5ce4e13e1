#include <cuda_runtime.h>

#include <string>

#include "kvf/gpudirect/cuda_probe.h"

namespace kvf::gpudirect {

const CudaAvailability& cuda_availability() {
  static const CudaAvailability availability = [] {
    CudaAvailability a;
    a.built_with_cuda = true;
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      a.reason = std::string("CUDA runtime reports: ") + cudaGetErrorString(err);
      cudaGetLastError();
    } else if (count == 0) {
      a.reason = "no CUDA devices present";
    }
    a.device_count = err == cudaSuccess ? count : 0;
    return a;
  }();
  return availability;
}

}  // namespace kvf::gpudirect
