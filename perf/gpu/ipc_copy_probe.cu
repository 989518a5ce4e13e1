// kvfabric-gpu-ipc-copy-probe: copy-engine bandwidth GPU0 -> GPU1 between two processes through
// CUDA IPC: the sender pushing, the receiver pulling, and both at once on halves of the request,
// 1 GiB per case, cases alternating round after round. With a second argument, the one-process
// anchor instead (cudaMemcpyPeerAsync, as perf/bench-gpu.sh's). Needs two GPUs with peer access.
// Usage: kvfabric-gpu-ipc-copy-probe [ROUNDS] [anchor]
#include <cuda_runtime.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "probe_util.h"
constexpr size_t kTotal = 1ull << 30, kLayer = 32ull << 20, kLayers = kTotal / kLayer;
enum Case { kPushLayers, kPullLayers, kPushOne, kPullOne, kBothLayers, kBothHalves, kPush2Streams, kCases };
const char* names[] = {"push 32x32MiB (sender's CE)",
                       "pull 32x32MiB (receiver's CE)",
                       "push 1x1GiB",
                       "pull 1x1GiB",
                       "push even + pull odd layers",
                       "push half + pull half (2 copies)",
                       "push 32x32MiB on 2 streams"};
// side 0 = sender (GPU0, child), 1 = receiver (GPU1, parent). local = own buffer, remote = mapped peer
// buffer.
static void run(int side, int c, char* local, char* remote, cudaStream_t* s) {
  auto copy = [&](size_t off, size_t n, int si) {
    if (side == 0)
      CK(cudaMemcpyAsync(remote + off, local + off, n, cudaMemcpyDefault, s[si]));
    else
      CK(cudaMemcpyAsync(local + off, remote + off, n, cudaMemcpyDefault, s[si]));
  };
  switch (c) {
    case kPushLayers:
      if (side == 0)
        for (size_t i = 0; i < kLayers; ++i) copy(i * kLayer, kLayer, 0);
      break;
    case kPullLayers:
      if (side == 1)
        for (size_t i = 0; i < kLayers; ++i) copy(i * kLayer, kLayer, 0);
      break;
    case kPushOne:
      if (side == 0) copy(0, kTotal, 0);
      break;
    case kPullOne:
      if (side == 1) copy(0, kTotal, 0);
      break;
    case kBothLayers:
      for (size_t i = (size_t)side; i < kLayers; i += 2) copy(i * kLayer, kLayer, 0);
      break;
    case kBothHalves:
      copy(side * kTotal / 2, kTotal / 2, 0);
      break;
    case kPush2Streams:
      if (side == 0)
        for (size_t i = 0; i < kLayers; ++i) copy(i * kLayer, kLayer, (int)(i % 2));
      break;
  }
  CK(cudaStreamSynchronize(s[0]));
  CK(cudaStreamSynchronize(s[1]));
}
static int anchor(int rounds) {  // one process, both GPUs: cudaMemcpyPeerAsync, as bench-gpu's anchor
  char *a, *b;
  cudaStream_t s;
  CK(cudaSetDevice(1));
  CK(cudaMalloc(&b, kTotal));
  CK(cudaDeviceEnablePeerAccess(0, 0));
  CK(cudaSetDevice(0));
  CK(cudaMalloc(&a, kTotal));
  CK(cudaDeviceEnablePeerAccess(1, 0));
  CK(cudaStreamCreate(&s));
  std::vector<double> one, layers;
  for (int r = -1; r < rounds; ++r) {
    double t = now();
    CK(cudaMemcpyPeerAsync(b, 1, a, 0, kTotal, s));
    CK(cudaStreamSynchronize(s));
    if (r >= 0) one.push_back(kTotal / (now() - t) / 1e9);
    t = now();
    for (size_t i = 0; i < kLayers; ++i)
      CK(cudaMemcpyPeerAsync(b + i * kLayer, 1, a + i * kLayer, 0, kLayer, s));
    CK(cudaStreamSynchronize(s));
    if (r >= 0) layers.push_back(kTotal / (now() - t) / 1e9);
  }
  std::sort(one.begin(), one.end());
  std::sort(layers.begin(), layers.end());
  std::printf("one process: cudaMemcpyPeerAsync 1 GiB %.1f GB/s, 32 x 32 MiB %.1f GB/s (medians of %d)\n",
              one[one.size() / 2], layers[layers.size() / 2], rounds);
  return 0;
}
int main(int argc, char** argv) {
  int rounds = argc > 1 ? std::atoi(argv[1]) : 5;
  if (argc > 2) return anchor(rounds);
  int sv[2];
  socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
  pid_t pid = fork();
  int side = pid == 0 ? 0 : 1, fd = sv[side];
  CK(cudaSetDevice(side));
  char* local;
  CK(cudaMalloc(&local, kTotal));
  CK(cudaMemset(local, side ? 0 : 0x5a, kTotal));
  cudaIpcMemHandle_t mine, theirs;
  CK(cudaIpcGetMemHandle(&mine, local));
  xfer(fd, &mine, sizeof mine, true);
  xfer(fd, &theirs, sizeof theirs, false);
  char* remote;
  CK(cudaIpcOpenMemHandle((void**)&remote, theirs, cudaIpcMemLazyEnablePeerAccess));
  cudaStream_t s[2];
  CK(cudaStreamCreateWithFlags(&s[0], cudaStreamNonBlocking));
  CK(cudaStreamCreateWithFlags(&s[1], cudaStreamNonBlocking));
  CK(cudaDeviceSynchronize());
  std::vector<std::vector<double>> gbps(kCases);
  for (int r = -1; r < rounds; ++r) {
    for (int c = 0; c < kCases; ++c) {
      const double go = start_together(fd, side);
      run(side, c, local, remote, s);
      double end = now(), other;
      xfer(fd, &end, sizeof end, true);
      xfer(fd, &other, sizeof other, false);
      if (r >= 0 && side == 1) gbps[c].push_back(kTotal / (std::max(end, other) - go) / 1e9);
    }
  }
  if (side == 1) {
    std::printf(
        "GPU0 -> GPU1 between two processes over CUDA IPC, 1 GiB a case, medians of %d rounds (cases "
        "alternate)\n",
        rounds);
    for (int c = 0; c < kCases; ++c) {
      auto v = gbps[c];
      std::sort(v.begin(), v.end());
      std::printf("%-36s %8.1f GB/s   (", names[c], v[v.size() / 2]);
      for (double x : gbps[c]) std::printf(" %.1f", x);
      std::printf(" )\n");
    }
    waitpid(pid, nullptr, 0);
  }
  CK(cudaIpcCloseMemHandle(remote));
  return 0;
}
