// main() of the GPU tests (label gpu): on a machine without a usable CUDA device it prints
// "SKIP: <reason>" and exits 77, which ctest reports as skipped (SKIP_RETURN_CODE), so a CPU-only
// CI passes while a GPU machine runs the full Catch2 session. Works with Catch2 v2 and v3.
#include <cstdio>

#if __has_include(<catch2/catch_session.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include "kvf/gpudirect/cuda_probe.h"

int main(int argc, char** argv) {
  const kvf::gpudirect::CudaAvailability& cuda = kvf::gpudirect::cuda_availability();
  if (cuda.device_count == 0) {
    std::printf("SKIP: %s\n", cuda.reason.c_str());
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
