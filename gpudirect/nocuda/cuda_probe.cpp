#include "kvf/gpudirect/cuda_probe.h"

namespace kvf::gpudirect {

const CudaAvailability& cuda_availability() {
  static const CudaAvailability availability{false, 0, "kvfabric was built without CUDA (nvcc not found)"};
  return availability;
}

}  // namespace kvf::gpudirect
