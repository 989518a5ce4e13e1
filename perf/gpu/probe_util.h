// What the two-process GPU probes (ipc_copy_probe.cu, staged_pipeline_probe.cu) share: a check
// that ends the probe on a failed CUDA runtime call, a monotonic clock that both processes of a
// pair read alike, and a blocking exchange of fixed-size messages over a socketpair.
#pragma once

#include <cuda_runtime.h>
#include <time.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#define CK(x)                                                                   \
  do {                                                                          \
    cudaError_t e = (x);                                                        \
    if (e != cudaSuccess) {                                                     \
      std::fprintf(stderr, "%d %s: %s\n", __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                             \
    }                                                                           \
  } while (0)

// Seconds on CLOCK_MONOTONIC: one clock for every process of the machine.
static inline double now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) * 1e-9;
}

// Writes (wr) or reads exactly n bytes; a peer that went away ends the probe (exit 2).
static inline void xfer(int fd, void* p, size_t n, bool wr) {
  char* c = static_cast<char*>(p);
  while (n) {
    ssize_t k = wr ? write(fd, c, n) : read(fd, c, n);
    if (k <= 0) std::exit(2);
    c += k;
    n -= static_cast<size_t>(k);
  }
}

// The receiver (side 1) names a start time 2 ms ahead and sends it; both spin until then, so the
// pair starts a case together. Returns that time.
static inline double start_together(int fd, int side) {
  double go = 0;
  if (side == 1) {
    go = now() + 0.002;
    xfer(fd, &go, sizeof go, true);
  } else {
    xfer(fd, &go, sizeof go, false);
  }
  while (now() < go) {
  }
  return go;
}
