// kvfabric-gpu-staged-pipeline-probe: a staged GPU0 -> GPU1 layer stream between two processes
// with no host round trip per layer (the design the cuda_ipc transport's staged puts should take).
//
// Sender: gather kernel (shuffled paged blocks -> local staging) -> copy engine into a receiver
// slot (IPC-mapped) -> cuStreamWriteValue32 "ready" into the receiver's memory. Receiver:
// cuStreamWaitValue32 on that flag -> scatter kernel (slot -> shuffled paged blocks) ->
// cuStreamWriteValue32 "freed" into the sender's memory, which the sender's copy stream waits on
// before it reuses the slot. Flags count a slot's uses, so neither side depends on when the other
// enqueued its work. Both hosts enqueue the whole request up front. Llama-3-8B shape: 32 layers x
// 512 blocks x (32 KiB K + 32 KiB V), 1 GiB. Every byte is checked after the last round.
//
// Usage: kvfabric-gpu-staged-pipeline-probe [ROUNDS] [RECEIVER_SLOTS] [LAYERS_PER_COPY]
//        [COPY_STREAMS] (defaults 5 4 1 1). Prints GB/s (1 GiB over the wall time of both
//        processes) and the blocks that differ after the last round (exit 1 if any). Its anchor is
//        kvfabric-gpu-ipc-copy-probe's.
#include <cuda.h>
#include <cuda_runtime.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "probe_util.h"
#define CU(x)                                               \
  do {                                                      \
    CUresult e = (x);                                       \
    if (e != CUDA_SUCCESS) {                                \
      const char* m;                                        \
      cuGetErrorString(e, &m);                              \
      std::fprintf(stderr, "%d %s: %s\n", __LINE__, #x, m); \
      std::exit(1);                                         \
    }                                                       \
  } while (0)
constexpr uint32_t kLayers = 32, kBlocks = 512, kExt = 32768, kPerLayer = 2 * kBlocks;  // extents a layer
constexpr size_t kLayerBytes = size_t{kPerLayer} * kExt, kTotal = kLayerBytes * kLayers;
// Paged pool: layer l, part p (K/V), block b at ((l * 2 + p) * kBlocks + b) * kExt.
__global__ void fill(uint4* pool, size_t n16, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x)
    pool[i] = make_uint4((uint32_t)i * 2654435761u ^ seed, (uint32_t)(i >> 32) + seed, (uint32_t)i + 7, seed);
}
// ext e of a layer: part e / kBlocks, block ids[e % kBlocks]; staging holds extents in order.
__global__ void gather(const char* pool, const uint32_t* ids, uint32_t layer, char* staging) {
  const uint32_t e = blockIdx.x, part = e / kBlocks;
  const uint4* s = (const uint4*)(pool + ((size_t)(layer * 2 + part) * kBlocks + ids[e % kBlocks]) * kExt);
  uint4* d = (uint4*)(staging + (size_t)e * kExt);
  for (uint32_t i = threadIdx.x; i < kExt / 16; i += blockDim.x) d[i] = s[i];
}
__global__ void scatter(const char* staging, const uint32_t* ids, uint32_t layer, char* pool) {
  const uint32_t e = blockIdx.x, part = e / kBlocks;
  const uint4* s = (const uint4*)(staging + (size_t)e * kExt);
  uint4* d = (uint4*)(pool + ((size_t)(layer * 2 + part) * kBlocks + ids[e % kBlocks]) * kExt);
  for (uint32_t i = threadIdx.x; i < kExt / 16; i += blockDim.x) d[i] = s[i];
}
struct Handles {
  cudaIpcMemHandle_t slots, flags;
};
int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 5;
  const uint32_t R = argc > 2 ? (uint32_t)std::atoi(argv[2]) : 4;  // receiver slots
  const uint32_t G = argc > 3 ? (uint32_t)std::atoi(argv[3]) : 1;  // layers per copy (divides 32)
  const uint32_t C = argc > 4 ? (uint32_t)std::atoi(argv[4]) : 1;  // sender copy streams (group k on k % C)
  const uint32_t L = 4;                                            // sender staging buffers
  const size_t kGroupBytes = kLayerBytes * G;
  int sv[2];
  socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
  const pid_t pid = fork();
  const int side = pid == 0 ? 0 : 1, fd = sv[side];  // 0 sender GPU0, 1 receiver GPU1
  CK(cudaSetDevice(side));
  // Both sides know both block orders (same seeds): the sender's source blocks and the receiver's.
  std::vector<uint32_t> src_ids(kBlocks), dst_ids(kBlocks);
  std::iota(src_ids.begin(), src_ids.end(), 0);
  std::iota(dst_ids.begin(), dst_ids.end(), 0);
  std::shuffle(src_ids.begin(), src_ids.end(), std::mt19937(1));
  std::shuffle(dst_ids.begin(), dst_ids.end(), std::mt19937(2));
  uint32_t* ids;
  CK(cudaMalloc(&ids, kBlocks * 4));
  CK(cudaMemcpy(ids, side == 0 ? src_ids.data() : dst_ids.data(), kBlocks * 4, cudaMemcpyHostToDevice));
  char* pool;
  CK(cudaMalloc(&pool, kTotal));
  char* local;  // sender: L staging buffers; receiver: R slots
  CK(cudaMalloc(&local, kGroupBytes * (side == 0 ? L : R)));
  uint32_t* flags;
  CK(cudaMalloc(&flags, 4096));  // sender: freed[R]; receiver: ready[R]
  Handles mine, theirs;
  CK(cudaIpcGetMemHandle(&mine.slots, local));
  CK(cudaIpcGetMemHandle(&mine.flags, flags));
  xfer(fd, &mine, sizeof mine, true);
  xfer(fd, &theirs, sizeof theirs, false);
  char* peer_slots;
  uint32_t* peer_flags;
  CK(cudaIpcOpenMemHandle((void**)&peer_slots, theirs.slots, cudaIpcMemLazyEnablePeerAccess));
  CK(cudaIpcOpenMemHandle((void**)&peer_flags, theirs.flags, cudaIpcMemLazyEnablePeerAccess));
  cudaStream_t work, copies[4];
  CK(cudaStreamCreateWithFlags(&work, cudaStreamNonBlocking));
  for (auto& c : copies) CK(cudaStreamCreateWithFlags(&c, cudaStreamNonBlocking));
  std::vector<cudaEvent_t> gathered(kLayers), copied(kLayers);
  for (auto& ev : gathered) CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  for (auto& ev : copied) CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  if (side == 0) fill<<<1024, 256>>>((uint4*)pool, kTotal / 16, 0x1234);
  CK(cudaDeviceSynchronize());
  auto dptr = [](const void* p) { return (CUdeviceptr)(uintptr_t)p; };
  std::vector<double> gbps;
  for (int r = -1; r < rounds; ++r) {
    if (side == 1) CK(cudaMemset(pool, 0xee, kTotal));  // poison
    CK(cudaMemset(flags, 0, 4096));
    CK(cudaDeviceSynchronize());
    const double go = start_together(fd, side);
    for (uint32_t k = 0; k < kLayers / G; ++k) {  // group k: layers k*G .. k*G+G-1
      const uint32_t slot = k % R, use = k / R;
      cudaStream_t copy = copies[k % C];
      if (side == 0) {
        char* st = local + (size_t)(k % L) * kGroupBytes;
        if (k >= L) CK(cudaStreamWaitEvent(work, copied[k - L], 0));  // staging buffer free again
        for (uint32_t j = 0; j < G; ++j)
          gather<<<kPerLayer, 256, 0, work>>>(pool, ids, k * G + j, st + j * kLayerBytes);
        CK(cudaEventRecord(gathered[k], work));
        CK(cudaStreamWaitEvent(copy, gathered[k], 0));
        if (use > 0)
          CU(cuStreamWaitValue32(copy, dptr(flags + slot), use,
                                 CU_STREAM_WAIT_VALUE_GEQ));  // receiver freed it
        CK(cudaMemcpyAsync(peer_slots + (size_t)slot * kGroupBytes, st, kGroupBytes, cudaMemcpyDefault,
                           copy));
        CU(cuStreamWriteValue32(copy, dptr(peer_flags + slot), use + 1, CU_STREAM_WRITE_VALUE_DEFAULT));
        CK(cudaEventRecord(copied[k], copy));
      } else {
        CU(cuStreamWaitValue32(work, dptr(flags + slot), use + 1, CU_STREAM_WAIT_VALUE_GEQ));
        for (uint32_t j = 0; j < G; ++j)
          scatter<<<kPerLayer, 256, 0, work>>>(local + (size_t)slot * kGroupBytes + j * kLayerBytes, ids,
                                               k * G + j, pool);
        CU(cuStreamWriteValue32(work, dptr(peer_flags + slot), use + 1, CU_STREAM_WRITE_VALUE_DEFAULT));
        CK(cudaEventRecord(copied[k], work));  // group k landed (LayerReady of its layers)
      }
    }
    CK(cudaStreamSynchronize(work));
    for (auto& c : copies) CK(cudaStreamSynchronize(c));
    double end = now(), other;
    xfer(fd, &end, sizeof end, true);
    xfer(fd, &other, sizeof other, false);
    if (r >= 0) gbps.push_back(kTotal / (std::max(end, other) - go) / 1e9);
  }
  // Verify on the receiver: its block dst_ids[j] of (layer, part) must hold the sender's block src_ids[j].
  uint64_t bad = 0;
  if (side == 0) {
    std::vector<char> h(kTotal);
    CK(cudaMemcpy(h.data(), pool, kTotal, cudaMemcpyDeviceToHost));
    xfer(fd, h.data(), kTotal, true);
  } else {
    std::vector<char> s(kTotal), d(kTotal);
    xfer(fd, s.data(), kTotal, false);
    CK(cudaMemcpy(d.data(), pool, kTotal, cudaMemcpyDeviceToHost));
    for (uint32_t l = 0; l < kLayers * 2; ++l)
      for (uint32_t j = 0; j < kBlocks; ++j)
        bad += std::memcmp(&s[((size_t)l * kBlocks + src_ids[j]) * kExt],
                           &d[((size_t)l * kBlocks + dst_ids[j]) * kExt], kExt) != 0;
    std::vector<double> v = gbps;
    std::sort(v.begin(), v.end());
    std::printf(
        "staged pipeline, %u layer(s) a copy, %u receiver slots, %u sender buffers, %u copy stream(s): %.1f "
        "GB/s median of %d (",
        G, R, L, C, v[v.size() / 2], rounds);
    for (double x : gbps) std::printf(" %.1f", x);
    std::printf(" ); blocks differing after the last round: %llu of %u\n", (unsigned long long)bad,
                kLayers * 2 * kBlocks);
    waitpid(pid, nullptr, 0);
  }
  return bad != 0;
}
